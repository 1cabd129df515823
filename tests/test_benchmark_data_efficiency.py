"""benchmarks/data_efficiency.py end to end on a tiny model and synthetic data: every method of every seed trained
once, time accounting per method, selections that are prefixes across k, cross-model transfer, tables and plots,
a re-run that trains nothing, bad grids refused; and its shipped configs parse."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from minirec.io import DataError
from minirec.rewards import misses_top_k

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench(import_benchmark):
    return import_benchmark("data_efficiency")


def tiny_base(folder: Path) -> str:
    """A pipeline YAML: tiny Qwen2 on synthetic data with planted preferences, a 24-sample pool."""
    optim = {"lr": 3.0e-3, "micro_batch_size": 8}
    cfg = {
        "processing": {"dataset": "synthetic", "synthetic_users": 80, "synthetic_items": 24},
        "loader": {"cache_dir": str(folder / "cache"), "max_val_samples": 16, "max_test_samples": 16,
                   "train_batch_size": 8, "eval_batch_size": 16},
        "policy": {"pretrained": "tiny-random-qwen2", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "sampling": {"group_size": 2, "max_new_tokens": 3},
        "reward": {"ndcg_k": 5},  # below the catalogue size: some samples' rollouts all miss it (no reward)
        "proxy": {"subset": "random:8", "max_epochs": 1, "optim": optim},
        "score": {"pool_size": 24, "num_rollouts": 2, "selection": {"ks": [8, 16], "num_stages": 2}},
        "train": {"max_epochs": 2, "optim": optim},
        "eval_max_new_tokens": 3,
        "device": {"accelerator": "cpu"},
    }
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def sasrec_result(import_benchmark, folder: Path) -> str:
    """benchmarks/sasrec.py on the data and test samples of `tiny_base` (a few epochs) -> its metrics.json."""
    data = ["--data.class_path", "datamodules.RecDataModule", "--data.init_args.cache_dir", str(folder / "cache"),
            "--data.init_args.processing.dataset", "synthetic", "--data.init_args.processing.synthetic_users", "80",
            "--data.init_args.processing.synthetic_items", "24", "--data.init_args.max_test_samples", "16"]
    assert import_benchmark("sasrec").main([*data, "--sasrec.max_epochs", "3", "--out", str(folder / "sasrec")]) == 0
    return str(folder / "sasrec" / "metrics.json")


@pytest.fixture(scope="module")
def run(bench, import_benchmark, tmp_path_factory):
    folder = tmp_path_factory.mktemp("data_efficiency")
    args = ["--base", tiny_base(folder), "--out", str(folder / "results"), "--work_dir", str(folder / "work"),
            "--ks", "[8, 16]", "--seeds", "[0, 1]", "--strategies", "[full, random, minirec, diversity]",
            "--transfer_policy", "{pretrained: tiny-random-llama}", "--transfer_k", "8",
            "--sasrec", sasrec_result(import_benchmark, folder)]
    assert bench.main(args) == 0
    return folder, args


def test_every_method_runs_once_with_its_time(run) -> None:
    folder, _ = run
    rows = read_csv(folder / "results/runs.csv")
    baselines = [r for r in rows if r["strategy"] in ("zero-shot", "popularity", "random ranking")]
    assert sorted((r["seed"], r["strategy"]) for r in baselines) == sorted(
        (s, m) for s in "01" for m in ("zero-shot", "popularity", "random ranking"))  # once per seed, untrained
    untrained = json.loads((folder / "work/untrained_test/test_metrics.json").read_text())  # one test for the seeds
    for seed in "01":
        zero_shot = next(r for r in baselines if r["seed"] == seed and r["strategy"] == "zero-shot")
        assert float(zero_shot["test_ndcg@10"]) == pytest.approx(untrained["methods"]["zero_shot"]["ndcg@10"]["mean"])
    rows = [r for r in rows if r not in baselines]
    keys = sorted((r["seed"], r["policy"], r["strategy"], r["k"]) for r in rows)
    expected = sorted([(s, "tiny-random-qwen2", m, k) for s in "01" for m, k in
                       [("full", "24"), ("random", "8"), ("random", "16"), ("minirec", "8"), ("minirec", "16"),
                        ("diversity", "8"), ("diversity", "16")]]
                      + [(s, "tiny-random-llama", m, "8") for s in "01" for m in ("minirec_transfer", "random")])
    assert keys == expected
    for r in rows:
        f = {k: float(r[k]) for k in ("proxy_s", "score_s", "select_s", "train_s", "method_s", "test_s")}
        assert f["train_s"] > 0 and f["test_s"] > 0 and 0 <= float(r["test_ndcg@10"]) <= float(r["test_hr@10"]) <= 1
        assert f["method_s"] == pytest.approx(f["proxy_s"] + f["score_s"] + f["select_s"] + f["train_s"])
        if r["strategy"] in ("full", "random"):  # needs neither the proxy nor the scores
            assert f["proxy_s"] == f["score_s"] == f["select_s"] == 0
        else:
            assert f["proxy_s"] > 0 and f["score_s"] > 0 and f["select_s"] > 0
    full = [r for r in rows if r["strategy"] == "full"]
    random8 = [r for r in rows if r["strategy"] == "random" and r["k"] == "8" and r["policy"] == "tiny-random-qwen2"]
    assert all(int(r["train_steps"]) > int(q["train_steps"]) for r, q in zip(full, random8))  # 24 vs 8 samples


def test_selections_are_prefixes_and_seeded(run) -> None:
    folder, _ = run
    sel = lambda seed, name: json.loads((folder / f"work/seed{seed}/selections/{name}.json").read_text())  # noqa
    for seed in (0, 1):
        small, large = sel(seed, "minirec_k8"), sel(seed, "minirec_k16")
        assert large["selection_order"][:8] == small["selection_order"]
        assert small["curriculum"] == "stages" and sorted(set(small["stages"])) == [0, 1]
        assert sel(seed, "random_k8")["curriculum"] == "none"
        assert len(sel(seed, "full_k24")["ids"]) == 24
    assert sel(0, "random_k16")["ids"] != sel(1, "random_k16")["ids"]  # the seed changes random-k
    scores = read_csv(folder / "work/seed0/scores/scores.csv")
    assert len(scores) == 24 and {r["sample_id"] for r in scores} == set(map(str, sel(0, "full_k24")["ids"]))


def test_tables_plots_and_ratios(run) -> None:
    folder, _ = run
    summary = read_csv(folder / "results/summary.csv")
    full = next(r for r in summary if r["strategy"] == "full")
    assert float(full["time_vs_full"]) == pytest.approx(1.0) and full["seeds"] == "2"
    minirec = [r for r in summary if r["strategy"] == "minirec"]
    runs = read_csv(folder / "results/runs.csv")
    for r in minirec:
        own = [float(x["method_s"]) for x in runs if x["strategy"] == "minirec" and x["k"] == r["k"]]
        fulls = [float(x["method_s"]) for x in runs if x["strategy"] == "full"]
        assert float(r["time_vs_full"]) == pytest.approx(sum(own) / sum(fulls), rel=1e-6)
    md = (folder / "results/data_efficiency.md").read_text()
    assert "## Headline ratios" in md and "MiniRec time / full time" in md and "data_efficiency.py" in md
    assert "| zero-shot |" in md and "| popularity |" in md and "| random ranking |" in md and "| SASRec |" in md
    sasrec = json.loads((folder / "sasrec/metrics.json").read_text())
    row = next(r for r in summary if r["strategy"] == "SASRec")
    assert float(row["test_ndcg@10_mean"]) == pytest.approx(sasrec["summary"]["sasrec"]["ndcg@10"])
    for r in summary:  # every row: an interval over the shared test samples around its seed mean
        assert float(r["test_ndcg@10_lo"]) <= float(r["test_ndcg@10_mean"]) + 1e-9 <= float(r["test_ndcg@10_hi"]) + 2e-9
    for png in ("quality_vs_k.png", "time_vs_k.png", "quality_vs_time.png"):
        assert (folder / "results" / png).stat().st_size > 10_000


def test_paired_differences_and_pool_diagnostics(bench, run) -> None:
    """MiniRec − random-k and − full (with the transfer policy's MiniRec − random-k), every trained row − zero-shot
    and every selection − random-k are paired on the test samples (their means are the differences of the seed
    means); the pool table reads the score tables."""
    import torch

    folder, _ = run
    summary = {(r["policy"], r["strategy"], r["k"]): float(r["test_ndcg@10_mean"])
               for r in read_csv(folder / "results/summary.csv")}
    heads = read_csv(folder / "results/headline.csv")
    assert [(r["policy"], r["k"]) for r in heads] == [("tiny-random-llama", "8"), ("tiny-random-qwen2", "8"),
                                                       ("tiny-random-qwen2", "16")]
    for r in heads:
        minirec = summary[(r["policy"], "minirec" if r["policy"] == "tiny-random-qwen2" else "minirec_transfer",
                           r["k"])]
        # float32 per-sample metrics: equal to the difference of the means up to rounding, not relatively
        assert float(r["minus_random"]) == pytest.approx(minirec - summary[(r["policy"], "random", r["k"])], abs=1e-6)
        assert float(r["minus_random_lo"]) <= float(r["minus_random"]) + 1e-9 <= float(r["minus_random_hi"]) + 2e-9
        if r["policy"] == "tiny-random-qwen2":
            assert float(r["minus_full"]) == pytest.approx(minirec - summary[(r["policy"], "full", "24")], abs=1e-6)
        else:  # the transfer policy trains no full data
            assert r["minus_full"] == r["time_vs_full"] == ""
    zero_shot = summary[("tiny-random-qwen2", "zero-shot", "0")]
    for r in read_csv(folder / "results/summary.csv"):  # every trained row against the model it starts from
        if r["k"] == "0" or r["policy"] != "tiny-random-qwen2":  # baselines, SASRec (no per-sample values), transfer
            assert r["minus_zero_shot"] == r["minus_zero_shot_lo"] == r["minus_zero_shot_hi"] == ""  # NaN
        else:
            diff, lo, hi = (float(r[f"minus_zero_shot{b}"]) for b in ("", "_lo", "_hi"))
            assert diff == pytest.approx(float(r["test_ndcg@10_mean"]) - zero_shot, abs=1e-6)
            assert lo <= diff + 1e-9 <= hi + 2e-9
        if r["strategy"] in ("random", "full") or r["k"] == "0":
            assert r["minus_random"] == ""
        else:  # a selection (scored strategy or transfer) against random-k of its policy
            diff = float(r["minus_random"])
            assert diff == pytest.approx(float(r["test_ndcg@10_mean"]) - summary[(r["policy"], "random", r["k"])],
                                         abs=1e-6)
            assert float(r["minus_random_lo"]) <= diff + 1e-9 <= float(r["minus_random_hi"]) + 2e-9
    pools = read_csv(folder / "results/pool.csv")
    assert [(p["seed"], p["pool"], p["rollouts"]) for p in pools] == [("0", "24", "2"), ("1", "24", "2")]
    table = torch.load(folder / "work/seed1/scores/score_table.pt", weights_only=True)
    spec = bench.load_spec(str(folder / "base.yaml"))
    missed = misses_top_k(table["rewards"], spec.reward.ndcg_k, spec.reward.softmax_weight).all(1)
    assert float(pools[1]["frac_no_reward"]) == pytest.approx(float(missed.double().mean()))
    assert 0 < float(missed.double().mean()) < 1
    rewards = table["rewards"].double()  # 2 rollouts: the halves are the two rollouts
    assert float(pools[1]["rollout_agreement"]) == pytest.approx(float(torch.corrcoef(rewards.T)[0, 1]))
    assert float(pools[1]["reward_mean"]) == pytest.approx(float(table["rewards"].double().mean()))
    assert "## Pool diagnostics" in (folder / "results/data_efficiency.md").read_text()


def test_rerun_resumes_without_training(bench, run) -> None:
    folder, args = run
    before = (folder / "results/runs.csv").read_text()
    markers = sorted((folder / "work").rglob("done.json"))
    stamps = [p.stat().st_mtime_ns for p in markers]
    assert bench.main(args) == 0
    assert [p.stat().st_mtime_ns for p in markers] == stamps  # no stage ran again
    cols = ("seed", "strategy", "k", "train_s", "test_ndcg@10")
    pick = lambda text: [tuple(r[c] for c in cols) for r in csv.DictReader(text.splitlines())]  # noqa: E731
    assert pick((folder / "results/runs.csv").read_text()) == pick(before)


def test_sasrec_learner_judges_the_same_selections(bench, run) -> None:
    """`learner: sasrec` reuses the policy grid's proxy and scores (nothing of them runs again), trains SASRec on
    exactly each selection's samples, tests it on the same samples as the policy rows, takes the zero-shot baseline from
    one untrained-policy test, and a repeated fit in a fresh folder ranks every test sample the same."""
    import torch

    folder, _ = run
    scored = [folder / f"work/seed0/{step}/done.json" for step in ("proxy", "scores")]
    stamps = [p.stat().st_mtime_ns for p in scored]
    out = folder / "sasrec_results"
    summary = bench.run_benchmark(base=str(folder / "base.yaml"), out=str(out), work_dir=str(folder / "work"),
                                  ks=[8, 16], seeds=[0], strategies=["full", "random", "minirec"], learner="sasrec",
                                  sasrec_steps=200)
    assert [p.stat().st_mtime_ns for p in scored] == stamps
    rows = read_csv(out / "runs.csv")
    trained = sorted((r["policy"], r["strategy"], r["k"]) for r in rows if r["k"] != "0")
    assert trained == sorted(("sasrec", m, k) for m, k in
                             [("full", "24"), ("random", "8"), ("random", "16"), ("minirec", "8"), ("minirec", "16")])
    work = folder / "work/seed0"
    for r in (r for r in rows if r["k"] != "0"):
        name = f"{r['strategy']}_k{r['k']}"
        done = json.loads((fit_dir(bench, work, f"sasrec_{name}", name) / "done.json").read_text())
        selection = json.loads((work / f"selections/{name}.json").read_text())
        assert done["fit"]["train_samples"] == len(selection["ids"]) == int(r["k"])
        assert 80 <= done["fit"]["global_step"] <= 200 + 8  # the same step budget whatever k (stopped after 40 %)
        ranks = torch.tensor(done["report"]["ranks"]["policy"])
        assert len(ranks) == 16 and float(r["test_ndcg@10"]) == pytest.approx(
            float(torch.where(ranks <= 10, 1 / torch.log2(ranks.double() + 1), 0.0).mean()), abs=1e-6)
        assert float(r["method_s"]) == pytest.approx(sum(float(r[c]) for c in ("proxy_s", "score_s", "select_s",
                                                                               "train_s")))
        assert (float(r["proxy_s"]) > 0) == (r["strategy"] == "minirec")
    untrained = json.loads((folder / "work/untrained_test/test_metrics.json").read_text())
    zero_shot = next(r for r in rows if r["strategy"] == "zero-shot")
    assert zero_shot["policy"] == "tiny-random-qwen2"
    assert float(zero_shot["test_ndcg@10"]) == pytest.approx(untrained["methods"]["zero_shot"]["ndcg@10"]["mean"])
    policy_test = json.loads((fit_dir(bench, work, "full_k24", "full_k24") / "test/test_metrics.json").read_text())
    assert len(policy_test["ranks"]["policy"]) == len(ranks)
    assert {r["strategy"] for r in summary if r["policy"] == "sasrec"} == {"full", "random", "minirec"}
    assert "learner **SASRec**" in (out / "data_efficiency.md").read_text()
    quarters = read_csv(out / "quarters.csv")  # the pool of 24 ranked by each score, SASRec on each quarter
    assert [(q["score"], q["quarter"], q["samples_per_quarter"]) for q in quarters] == [
        (s, str(q), "6") for s in ("L", "R") for q in (1, 2, 3, 4)]
    for s in ("L", "R"):
        parts = [set(json.loads((work / f"quarters/{s}_q{q}.json").read_text())["ids"]) for q in (1, 2, 3, 4)]
        assert set().union(*parts) == set(json.loads((work / "selections/full_k24.json").read_text())["ids"])
        mins = [float(q["score_min"]) for q in quarters if q["score"] == s]
        maxs = [float(q["score_max"]) for q in quarters if q["score"] == s]
        assert all(lo >= hi for lo, hi in zip(mins, maxs[1:]))  # quarter 1 holds the highest scores
        top, bottom = (next(q for q in quarters if q["score"] == s and q["quarter"] == n) for n in ("1", "4"))
        assert float(top["top_minus_bottom"]) == pytest.approx(
            float(top["test_ndcg@10_mean"]) - float(bottom["test_ndcg@10_mean"]), abs=1e-6)
    spec = replace(bench.load_spec(str(folder / "base.yaml")), seed=0)
    again = bench.sasrec_train_and_test(spec, folder / "sasrec_again", str(work / "selections/minirec_k8.json"), 200)
    first = json.loads((fit_dir(bench, work, "sasrec_minirec_k8", "minirec_k8") / "done.json").read_text())
    assert again["report"]["ranks"] == first["report"]["ranks"] and again["fit"] == first["fit"]


def fit_dir(bench, work: Path, name: str, selection: str) -> Path:
    """The folder of the fit `name` on `work/selections/<selection>.json` (named by its contents)."""
    return bench.fit_folder(work, name, str(work / "selections" / f"{selection}.json"))


def test_grids_that_select_differently_share_a_work_dir(bench, run) -> None:
    """A grid with another `score.selection.mu` in the same work_dir reuses the proxies, scores, untrained test and
    every fit whose selection is unchanged (full data, random-k), fits the changed selections anew (and reports their
    own numbers); a setting that changes the scores is refused by name before anything runs."""
    folder, _ = run
    work, out = folder / "work", folder / "mu_results"
    args = dict(base=str(folder / "base.yaml"), out=str(out), work_dir=str(work), ks=[8, 16], seeds=[0],
                strategies=["full", "random", "minirec"], learner="sasrec", sasrec_steps=200)
    bench.run_benchmark(**args)  # as the SASRec test above ran it (no-op if it did)
    seed = work / "seed0"
    inputs = {f"sasrec_{n}": seed / f"selections/{n}.json" for n in
              ("full_k24", "random_k8", "random_k16", "minirec_k8", "minirec_k16")}
    inputs |= {f"sasrec_{s}_q{q}": seed / f"quarters/{s}_q{q}.json" for s in "LR" for q in (1, 2, 3, 4)}
    digests = lambda: {n: bench.Selection.load(p).digest() for n, p in inputs.items()}  # noqa: E731
    markers, old = {p: p.stat().st_mtime_ns for p in work.rglob("done.json")}, digests()
    bench.run_benchmark(**{**args, "base_args": ["--score.selection.mu", "0.05"]})
    now, new = {p: p.stat().st_mtime_ns for p in work.rglob("done.json")}, digests()
    assert all(now[p] == t for p, t in markers.items())  # nothing that existed ran again
    changed = sorted(n for n in inputs if new[n] != old[n])
    assert "sasrec_minirec_k8" in changed and not any("full" in n or "random" in n or "_R_" in n for n in changed)
    assert sorted(p.parent.name for p in set(now) - set(markers)) == sorted(f"{n}-{new[n]}" for n in changed)
    changed = [n.removeprefix("sasrec_") for n in changed if "minirec" in n]
    rows = {(r["strategy"], r["k"]): r for r in read_csv(out / "runs.csv")}
    for n in changed:
        done = json.loads((fit_dir(bench, work / "seed0", f"sasrec_{n}", n) / "done.json").read_text())
        strategy, k = n.rsplit("_k", 1)
        assert float(rows[strategy, k]["test_ndcg@10"]) == pytest.approx(done["metrics"]["test/ndcg@10"])
    with pytest.raises(DataError, match=r"seed0/scores: made with other settings \(changed: \['score.num_rollouts'\]"):
        bench.run_benchmark(**{**args, "base_args": ["--score.num_rollouts", "3"]})
    assert {p: p.stat().st_mtime_ns for p in work.rglob("done.json")} == now


@pytest.mark.parametrize("over, match", [
    ({"ks": [8, 24]}, "ks: need distinct sizes below the pool size 24"),
    ({"strategies": ["best"]}, "unknown"),
    ({"seeds": [0, 0]}, "distinct seeds"),
    ({"transfer_policy": {"pretrained": "tiny-random-llama"}}, "needs transfer_k"),
    ({"ks": [1, 8]}, "num_stages 2 exceeds the smallest k 1"),
    ({"sasrec": "nope/metrics.json"}, "data_efficiency.sasrec: no file at nope/metrics.json"),
    ({"learner": "gbdt"}, "data_efficiency.learner: unknown 'gbdt'"),
    ({"learner": "sasrec", "strategies": ["minirec_no_curriculum"]}, "drop minirec_no_curriculum and transfer_policy"),
    ({"learner": "sasrec", "transfer_policy": {"pretrained": "tiny-random-llama"}, "transfer_k": 8},
     "sasrec trains without a curriculum"),
])
def test_bad_grid_is_refused_before_any_run(bench, tmp_path: Path, over: dict, match: str) -> None:
    args = {"base": tiny_base(tmp_path), "out": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
            "ks": [8, 16], **over}
    with pytest.raises(DataError, match=match):
        bench.run_benchmark(**args)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_missing_base_config(bench, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no pipeline config at"):
        bench.run_benchmark(base=str(tmp_path / "nope.yaml"))


def test_base_args_apply_over_the_base_config(bench) -> None:
    """`base_args` change one setting of the base config and keep the rest; a wrong one is a one-line error."""
    base = str(BENCHMARKS / "configs" / "pipeline-beauty-smollm2.yaml")
    plain, top150 = bench.load_spec(base), bench.load_spec(base, ["--reward.ndcg_k", "150"])
    assert plain.reward.ndcg_k == 1000 and top150.reward.ndcg_k == 150
    assert replace(top150, reward=plain.reward) == plain
    assert bench.load_spec(base, ["--device.accelerator", "gpu"]).device.accelerator == "gpu"  # the grid on a GPU
    with pytest.raises(DataError, match=r"^data_efficiency.base_args \['--reward.ndcg_kk', '150'\]: unrecognized") as e:
        bench.load_spec(base, ["--reward.ndcg_kk", "150"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("path", sorted(p.name for p in (BENCHMARKS / "configs").glob("*.yaml")))
def test_shipped_benchmark_configs_parse(bench, path: str) -> None:
    cfg = yaml.safe_load((BENCHMARKS / "configs" / path).read_text())
    if "base" not in cfg:  # a pipeline config
        spec = bench.load_spec(str(BENCHMARKS / "configs" / path))
        assert spec.score.pool_size and spec.policy.pretrained
        return
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_function_arguments(bench.run_benchmark, skip={"command"})
    parsed = parser.parse_object(cfg)
    spec = bench.load_spec(str(ROOT / parsed.base), parsed.base_args)
    bench.check_grid(spec, parsed.ks, parsed.seeds, parsed.strategies, parsed.transfer_k)
