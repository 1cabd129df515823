"""Data-efficiency benchmark: full data vs random-k vs MiniRec-k and its ablations, several seeds, one harness.

For each seed: one proxy fit (on `proxy.subset` of the base pipeline config) and one scoring pass over the pool
(`score.pool_size` samples, the "full data" of this benchmark); then, from that one score table, a selection per
strategy and k, each trained with the base config's `train` stage and tested at its best-valid checkpoint:

- `full`: every pool sample, no curriculum;
- `random`: a seeded random k, no curriculum (needs neither proxy nor scoring);
- `minirec`: greedy value selection with the easy→hard curriculum; `minirec_no_curriculum`: the same k, no curriculum;
- `learnability` / `representativeness` / `diversity`: top-k by L, top-k by R, k-center only, each with the curriculum.

Cross-model transfer (optional): the MiniRec-k selection made with the base policy's proxy trains `transfer_policy`,
next to that policy trained on random-k. Time per method counts what the method needs: full and random = training;
the scored strategies = proxy + scoring + selection + training (the one proxy and scoring serve every k). Test time is
reported but not counted. Every stage writes `done.json`, so a killed benchmark resumes where it stopped; each also
records the settings it depends on (`pipeline.step_settings`), so grids that differ only in how they select (e.g.
`score.selection.mu`) can share a `work_dir`: they reuse its proxies, scores, untrained test and the fits of equal
selections (fit folders are named by the selection's contents), and a setting that changes a step is refused by name.

`learner: sasrec` trains SASRec (`minirec.sasrec`, a classic sequential recommender that learns from a few hundred
samples in seconds) instead of the policy on every selection: the selections, made with the policy's proxy and scores
as above, are then judged by a model that learns at this size (cross-model transfer to another kind of model).
SASRec trains on the selected samples in shuffled epochs (no curriculum) for the same step budget whatever k,
early-stopped on the whole validation split.

    python benchmarks/data_efficiency.py --config benchmarks/configs/data_efficiency_cpu.yaml

Every row is tested on the same samples (the baselines, zero-shot, popularity and random ranking, once for all seeds
by the untrained policy's test in `work_dir/untrained_test`): its 95 % interval resamples them (the per-sample NDCG@10
averaged over seeds), and MiniRec-k is compared with random-k and full data by paired differences on those samples.
`sasrec` adds the classic sequential recommender of `benchmarks/sasrec.py` (same split and test samples) as a
reference row; the pool diagnostics (reward spread, samples with no reward, learnability) say what the scores had to
select from.

Writes runs.csv (one row per trained model), summary.csv, pool.csv and data_efficiency.md (mean ± std over seeds, the
intervals and the headline ratios), quality_vs_k.png, time_vs_k.png and quality_vs_time.png into `out`.
"""

from __future__ import annotations

import math
import os
import shlex
import statistics
import sys
import time
from argparse import ArgumentError
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from bench_common import device_kind, machine, markdown_table, run_header, save_figure, write_csv
from sasrec import split_tensors
from cli import pipeline_parser
from minirec.evaluation import bootstrap_intervals, metric_names, paired_differences, per_sample_metrics
from minirec.io import DataError, atomic_write_text, read_json
from minirec.rewards import misses_top_k
from minirec.sasrec import SASRecConfig, sasrec_ranks, train_sasrec
from minirec.selection import STRATEGIES, learnability, representativeness
from minirec.subsets import ScoreTable, Selection, select_subsets
from pipeline import PipelineSpec, fit_proxy, fit_subset, run_step, score_pool, step_settings, test_best

LEARNERS = ("policy", "sasrec")
SCORED = ("minirec", "minirec_no_curriculum", "learnability", "representativeness", "diversity")
RUN_COLUMNS = ("seed", "policy", "strategy", "k", "train_samples", "proxy_s", "score_s", "select_s", "train_s",
               "method_s", "test_s", "train_steps", "best_val_ndcg@10", "test_ndcg@10", "test_ndcg@10_lo",
               "test_ndcg@10_hi", "test_hr@10", "test_ndcg@20", "test_hr@20")  # fmt: skip
SUMMARY_COLUMNS = ("policy", "strategy", "k", "seeds", "test_ndcg@10_mean", "test_ndcg@10_lo", "test_ndcg@10_hi",
                   "test_ndcg@10_std", "test_hr@10_mean", "test_hr@10_std", "method_s_mean", "train_s_mean",
                   "time_vs_full", "ndcg@10_vs_full", "minus_zero_shot", "minus_zero_shot_lo",
                   "minus_zero_shot_hi", "minus_random", "minus_random_lo", "minus_random_hi")  # fmt: skip
HEADLINE_COLUMNS = ("policy", "k", "time_vs_full", "ndcg@10_vs_full", "minus_random", "minus_random_lo",
                    "minus_random_hi", "minus_full", "minus_full_lo", "minus_full_hi")  # fmt: skip
QUARTER_COLUMNS = ("score", "quarter", "seeds", "samples_per_quarter", "score_min", "score_max", "val_ndcg@10_mean",
                   "test_ndcg@10_mean", "test_ndcg@10_lo", "test_ndcg@10_hi", "top_minus_bottom",
                   "top_minus_bottom_lo", "top_minus_bottom_hi")  # fmt: skip
POOL_COLUMNS = ("seed", "pool", "rollouts", "frac_no_reward", "frac_all_rollouts_equal", "reward_mean",
                "reward_std_over_pool", "reward_p10", "reward_p50", "reward_p90", "within_sample_std",
                "rollout_agreement", "frac_L_over_0.5")  # fmt: skip


def load_spec(base: str, base_args: list[str] = []) -> PipelineSpec:
    """The PipelineSpec of a `minirec pipeline` YAML (its run_dir is ignored), with `base_args` (`minirec pipeline`
    command-line arguments, e.g. `["--reward.ndcg_k", "150"]`) applied over it."""
    if not Path(base).is_file():
        raise DataError(f"data_efficiency.base: no pipeline config at {base}")
    parser = pipeline_parser()
    try:
        cfg = parser.instantiate(parser.parse_args(["--config", base, *base_args]))
    except ArgumentError as e:
        raise DataError(f"data_efficiency.base_args {base_args}: {str(e).splitlines()[0]}") from None
    return PipelineSpec(**{k: v for k, v in vars(cfg).items() if k not in ("config", "run_dir", "__path__")})


def check_grid(spec: PipelineSpec, ks: list[int], seeds: list[int], strategies: list[str],
               transfer_k: int | None, learner: str = "policy", transfer: bool = False) -> None:
    """Validate the grid against the base config (score.pool_size None = the whole training split)."""
    if learner not in LEARNERS:
        raise DataError(f"data_efficiency.learner: unknown {learner!r}; choose from {', '.join(LEARNERS)}")
    if learner == "sasrec" and (transfer or "minirec_no_curriculum" in strategies):
        raise DataError("data_efficiency.learner: sasrec trains without a curriculum and is itself the transfer: "
                        "drop minirec_no_curriculum and transfer_policy")
    pool = spec.score.pool_size or sys.maxsize
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise DataError(f"data_efficiency.strategies: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    if not ks or len(set(ks)) < len(ks) or not all(1 <= k < pool for k in ks):
        raise DataError(f"data_efficiency.ks: need distinct sizes below the pool size {spec.score.pool_size}, got {ks}")
    if not seeds or len(set(seeds)) < len(seeds):
        raise DataError(f"data_efficiency.seeds: need distinct seeds, got {seeds}")
    selection = spec.score.selection
    if selection.curriculum == "stages" and selection.num_stages > min(ks):
        raise DataError(f"data_efficiency: score.selection.num_stages {selection.num_stages} exceeds the smallest k "
                        f"{min(ks)}")
    if transfer_k is not None and transfer_k not in ks:
        raise DataError(f"data_efficiency.transfer_k: {transfer_k} is not one of ks {ks}")


def write_selections(spec: PipelineSpec, table: ScoreTable, strategy: str, ks: list[int],
                     folder: Path) -> tuple[dict[int, str], float]:
    """Selection files `<strategy>_k<k>.json` for every k from the score table (`minirec.subsets.select_subsets`;
    one file, k = N in pool order, for `full`); -> ({k: path}, seconds). `random` and `full` get no curriculum."""
    n = table.sample_id.numel()
    fingerprint, start = spec.processing.fingerprint(), time.perf_counter()
    if strategy == "full":
        ids = table.sample_id.tolist()
        selections = {n: Selection(ids=ids, stages=[0] * n, curriculum="none", fingerprint=fingerprint, k=n,
                                   strategy="full", selection_order=ids, pool_size=n)}
    else:
        curriculum = "none" if strategy == "random" else spec.score.selection.curriculum
        config = replace(spec.score.selection, strategy=strategy, ks=tuple(ks), curriculum=curriculum, seed=spec.seed)
        selections = select_subsets(table, config, fingerprint).selections
    seconds = time.perf_counter() - start
    paths = {}
    for k, selection in selections.items():
        paths[k] = str(folder / f"{strategy}_k{k}.json")
        selection.save(paths[k])
    return paths, seconds


def fit_folder(parent: Path, name: str, selection: str) -> Path:
    """`parent/<name>-<digest>`: the folder of a fit on a selection file, named by what the fit reads from it
    (`Selection.digest`), so grids that share a `work_dir` share the fits of equal selections (full data and random-k
    under another `mu`, say) and never reuse a fit of a different one."""
    return parent / f"{name}-{Selection.load(selection).digest()}"


def train_and_test(spec: PipelineSpec, folder: Path, selection: str) -> dict[str, Any]:
    """Fit on a selection file, then test its best-valid checkpoint (each a resumable step with the settings
    `step_settings(spec, "fit")`); `report` is the test's `test_metrics.json`."""
    times: dict[str, float] = {}
    settings = step_settings(spec, "fit")
    fit = run_step(folder / "train", times, f"train {folder.name}", lambda d: fit_subset(spec, d, selection), settings)
    test = run_step(folder / "test", times, f"test {folder.name}",
                    lambda d: test_best(spec, d, fit["best_checkpoint"], baselines=False), settings)
    return {"fit": fit, "metrics": test["metrics"], "report": test["baselines"],
            "train_s": times[f"train {folder.name}"], "test_s": times[f"test {folder.name}"]}


def sasrec_schedule(samples: int, seed: int, steps: int) -> SASRecConfig:
    """SASRec settings that give a subset of `samples` the same optimizer-step budget as any other: at most about
    `steps` steps, validated about every steps/50, stopped after about 0.4·steps without a better validation NDCG@10.
    (The whole-split defaults count epochs, and an epoch of 32 samples is one step: stopped after 20 of them, before
    it learns anything.)"""
    per_epoch = math.ceil(samples / SASRecConfig.batch_size)
    every = max(1, round(steps / 50 / per_epoch))
    return SASRecConfig(seed=seed, max_epochs=math.ceil(steps / per_epoch), val_every=every,
                        patience=max(1, math.ceil(0.4 * steps / (per_epoch * every))))


def sasrec_train_and_test(spec: PipelineSpec, folder: Path, selection: str, steps: int) -> dict[str, Any]:
    """SASRec (`sasrec_schedule`, seeded by `spec.seed`) trained on a selection file's samples, early-stopped on the
    whole validation split and tested on the pipeline's test samples, as a resumable step; the result has the keys of
    `train_and_test`, its `report` holding SASRec's per-sample target ranks and interval under `policy`."""

    def body(d: Path) -> dict[str, Any]:
        dm = spec.datamodule(subset=selection)
        dm.setup()
        length = dm.processing.window_size
        train = split_tensors(dm, "train", dm.train_ids, length)
        valid = split_tensors(dm, "valid", list(range(len(dm.rows["valid"]))), length)
        start = time.perf_counter()
        cfg = sasrec_schedule(len(train[1]), spec.seed, steps)
        model, log = train_sasrec(dm.num_items, train, valid, cfg)
        train_s, start = time.perf_counter() - start, time.perf_counter()
        ranks = sasrec_ranks(model, *split_tensors(dm, "test", dm.split_order["test"], length))
        values = per_sample_metrics(ranks, (10, 20))  # [S, 4], columns as metric_names
        mean, lo, hi = bootstrap_intervals({"policy": values}, seed=0)["policy"]
        best = max(log, key=lambda r: r["val_ndcg@10"])
        return {"fit": {"train_samples": len(train[1]),
                        "global_step": math.ceil(len(train[1]) / cfg.batch_size) * (log[-1]["epoch"] + 1),
                        "best_val_ndcg@10": best["val_ndcg@10"], "epochs": len(log), "best_epoch": best["epoch"]},
                "metrics": {f"test/{n}": float(m) for n, m in zip(metric_names((10, 20)), mean)},
                "report": {"methods": {"policy": {"ndcg@10": {"mean": float(mean[0]), "lo": float(lo[0]),
                                                              "hi": float(hi[0])}}},
                           "ranks": {"policy": ranks.tolist()}},
                "train_s": train_s, "test_s": time.perf_counter() - start}

    return run_step(folder, {}, folder.name, body, {**step_settings(spec, "fit"), "sasrec_steps": steps})


def score_quarters(spec: PipelineSpec, table: ScoreTable, folder: Path, steps: int) -> list[dict[str, Any]]:
    """What a sample's score says about what it teaches: the pool ranked by learnability L and by representativeness
    R (`[N]` each, as the selection computes them) and cut into quarters, SASRec trained on each quarter
    (`sasrec_train_and_test`); -> one row per (score, quarter 1 = highest), with the per-sample test NDCG@10 under
    `samples`."""
    selection, n = spec.score.selection, table.sample_id.numel()
    scores = {"L": learnability(table.mean_reward, selection.mu, selection.sigma),
              "R": representativeness(table.rep_vec)}
    rows = []
    for name, score in scores.items():
        for quarter, part in enumerate(torch.argsort(score, descending=True, stable=True).chunk(4), start=1):
            ids = table.sample_id[part].tolist()
            path = folder / "quarters" / f"{name}_q{quarter}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            Selection(ids=ids, stages=[0] * len(ids), curriculum="none", fingerprint=spec.processing.fingerprint(),
                      k=len(ids), strategy=f"{name}_q{quarter}", selection_order=ids, pool_size=n).save(path)
            fit = fit_folder(folder, f"sasrec_{name}_q{quarter}", str(path))
            result = sasrec_train_and_test(spec, fit, str(path), steps)
            rows.append({"seed": spec.seed, "score": name, "quarter": quarter, "samples_per_quarter": len(ids),
                         "score_min": float(score[part].min()), "score_max": float(score[part].max()),
                         "val_ndcg@10": result["fit"]["best_val_ndcg@10"],
                         "samples": sample_ndcg10(result["report"], "policy", fit / "done.json")})
    return rows


def summarise_quarters(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (score, quarter): seed means, the 95 % interval of the seed-averaged per-sample test NDCG@10, and quarter
    1 − quarter 4 paired on the test samples (on quarter 1's row)."""
    out = []
    for score in dict.fromkeys(r["score"] for r in rows):
        mine = [r for r in rows if r["score"] == score]
        samples = {q: torch.tensor([r["samples"] for r in mine if r["quarter"] == q], dtype=torch.float64).mean(0)
                   for q in sorted({r["quarter"] for r in mine})}
        top, bottom = min(samples), max(samples)
        diff = paired_interval(samples[top].tolist(), samples[bottom].tolist())
        for q, values in samples.items():
            rs = [r for r in mine if r["quarter"] == q]
            _, lo, hi = interval([values.tolist()])
            out.append({"score": score, "quarter": q, "seeds": len(rs), "samples_per_quarter": rs[0]["samples_per_quarter"],
                        "score_min": statistics.fmean(r["score_min"] for r in rs),
                        "score_max": statistics.fmean(r["score_max"] for r in rs),
                        "val_ndcg@10_mean": statistics.fmean(r["val_ndcg@10"] for r in rs),
                        "test_ndcg@10_mean": float(values.mean()), "test_ndcg@10_lo": lo, "test_ndcg@10_hi": hi,
                        **dict(zip(("top_minus_bottom", "top_minus_bottom_lo", "top_minus_bottom_hi"),
                                   diff if q == top else (float("nan"),) * 3))})
    return out


BASELINES = {"zero_shot": "zero-shot", "popularity": "popularity", "random": "random ranking"}
"""Test-report method -> strategy name of the rows every table carries (measured once per seed on the same test
samples as the trained models; `random ranking` is the expected value, not the random-k selection)."""


def sample_ndcg10(report: dict[str, Any], method: str, path: Path) -> list[float]:
    """Per-sample NDCG@10 `[S]` of `method` from the per-sample target ranks of a test's `test_metrics.json`."""
    ranks = report.get("ranks", {}).get(method)
    if ranks is None:
        raise DataError(f"{path}: no per-sample ranks of '{method}' (written by an older version: delete that test "
                        "folder to test again)")
    return per_sample_metrics(torch.tensor(ranks), (10,))[:, 0].tolist()


def interval(samples: list[list[float]]) -> tuple[float, float, float]:
    """Mean and 95 % bootstrap interval over the test samples of the per-sample values averaged over seeds:
    samples `[seeds][S]` -> (mean, lo, hi)."""
    values = torch.tensor(samples, dtype=torch.float64).mean(0, keepdim=True).T  # [S, 1]
    mean, lo, hi = bootstrap_intervals({"v": values}, seed=0)["v"]
    return float(mean[0]), float(lo[0]), float(hi[0])


def pool_diagnostics(table: ScoreTable, spec: PipelineSpec) -> dict[str, Any]:
    """What the scores had to select from: the share of pool samples none of whose rollouts reach the reward's top
    `ndcg_k` (rewards `[N, n]`), the spread of the proxy's rollout rewards over the pool, how far a sample's mean
    reward is the sample's rather than its draws' (the correlation over the pool of the mean rewards of its two halves
    of rollouts) and the share of samples the learnability score L rates above 0.5."""
    rewards, mean = table.rewards.double(), table.mean_reward.double()
    q = torch.quantile(mean, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    selection = spec.score.selection
    missed = misses_top_k(rewards, spec.reward.ndcg_k, spec.reward.softmax_weight).all(1)
    half = rewards.shape[1] // 2  # r̄ of a sample's first and second half of rollouts, correlated over the pool
    halves = torch.stack([rewards[:, :half].mean(1), rewards[:, half : 2 * half].mean(1)]) if half else None
    return {
        "seed": spec.seed, "pool": rewards.shape[0], "rollouts": rewards.shape[1],
        "frac_no_reward": float(missed.double().mean()),
        "frac_all_rollouts_equal": float((rewards.amax(1) == rewards.amin(1)).double().mean()),
        "reward_mean": float(rewards.mean()), "reward_std_over_pool": float(mean.std(correction=0)),
        "reward_p10": float(q[0]), "reward_p50": float(q[1]), "reward_p90": float(q[2]),
        "within_sample_std": float(rewards.std(1, correction=0).mean()),
        "rollout_agreement": float(torch.corrcoef(halves)[0, 1]) if half else float("nan"),
        "frac_L_over_0.5": float((learnability(mean, selection.mu, selection.sigma) > 0.5).double().mean()),
    }


def run_seed(spec: PipelineSpec, out: Path, ks: list[int], strategies: list[str], transfer_policy: dict[str, Any] | None,
             transfer_k: int | None, learner: str = "policy", sasrec_steps: int = 2000
             ) -> tuple[list, dict[str, Any], list]:
    """Every method of one seed under `out/seed<seed>`, each fit in `<method>-<digest>` (SASRec's in
    `sasrec_<method>-<digest>`, `fit_folder`); the baselines from the untrained policy's test in `out/untrained_test`,
    shared by the seeds; -> (one row per trained model, each with its per-sample test
    NDCG@10 under `samples` (none for the random-ranking expectation), the pool diagnostics, the SASRec learner's
    `score_quarters` rows (none for the policy))."""
    folder = out / f"seed{spec.seed}"
    times: dict[str, float] = {}
    proxy = run_step(folder / "proxy", times, "proxy", lambda d: fit_proxy(spec, d), step_settings(spec, "proxy"))
    run_step(folder / "scores", times, "score", lambda d: score_pool(spec, d, proxy["adapter"]),
             step_settings(spec, "scores"))
    table = ScoreTable.load(folder / "scores" / "score_table.pt")
    # the baselines (zero-shot, popularity, random) on the test samples, with the untrained policy, greedy
    base_path = out / "untrained_test" / "test_metrics.json"
    base_report = run_step(out / "untrained_test", times, "untrained test", lambda d: test_best(spec, d, None),
                           step_settings(spec, "untrained"))["baselines"]
    rows = []

    def add(policy_spec: PipelineSpec, strategy: str, k: int, path: str, select_s: float, name: str) -> None:
        """Train and test one method; its time counts the proxy and scoring only if its selection used them. The
        seed's rows start with the baselines (the same for every method of the seed)."""
        if learner == "sasrec":
            fit = fit_folder(folder, f"sasrec_{name}", path)
            result, label = sasrec_train_and_test(policy_spec, fit, path, sasrec_steps), "sasrec"
            report, report_path = result["report"], fit / "done.json"
        else:
            fit = fit_folder(folder, name, path)
            result, label = train_and_test(policy_spec, fit, path), policy_spec.policy.pretrained
            report, report_path = result["report"], fit / "test" / "test_metrics.json"
        m = result["metrics"]
        if not rows:
            for method, row_name in BASELINES.items():
                ndcg = base_report["methods"][method]["ndcg@10"]
                rows.append({
                    "seed": spec.seed, "policy": policy_spec.policy.pretrained, "strategy": row_name, "k": 0,
                    "train_samples": 0, "proxy_s": 0.0, "score_s": 0.0, "select_s": 0.0, "train_s": 0.0,
                    "method_s": 0.0, "test_s": 0.0, "train_steps": 0, "best_val_ndcg@10": float("nan"),
                    **{f"test_{n}": base_report["methods"][method][n]["mean"]
                       for n in ("ndcg@10", "hr@10", "ndcg@20", "hr@20")},
                    "test_ndcg@10_lo": ndcg["lo"], "test_ndcg@10_hi": ndcg["hi"],
                    "samples": None if method == "random" else sample_ndcg10(base_report, method, base_path),
                })
        proxy_s, score_s = (times["proxy"], times["score"]) if select_s else (0.0, 0.0)
        rows.append({
            "seed": spec.seed, "policy": label, "strategy": strategy, "k": k,
            "train_samples": k, "proxy_s": proxy_s, "score_s": score_s, "select_s": select_s,
            "train_s": result["train_s"], "method_s": proxy_s + score_s + select_s + result["train_s"],
            "test_s": result["test_s"],
            "train_steps": result["fit"]["global_step"], "best_val_ndcg@10": result["fit"]["best_val_ndcg@10"],
            **{f"test_{name}": m.get(f"test/{name}", float("nan"))
               for name in ("ndcg@10", "hr@10", "ndcg@20", "hr@20")},
            "test_ndcg@10_lo": report["methods"]["policy"]["ndcg@10"]["lo"],
            "test_ndcg@10_hi": report["methods"]["policy"]["ndcg@10"]["hi"],
            "samples": sample_ndcg10(report, "policy", report_path),
        })

    selections: dict[str, dict[int, str]] = {}
    select_times: dict[str, float] = {}
    for strategy in dict.fromkeys([*strategies, *(["minirec", "random"] if transfer_policy else [])]):
        paths, select_s = write_selections(spec, table, strategy, ks, folder / "selections")
        selections[strategy], select_times[strategy] = paths, select_s
        if strategy in strategies:
            for k, path in paths.items():
                add(spec, strategy, k, path, select_s if strategy in SCORED else 0.0, f"{strategy}_k{k}")
    if transfer_policy is not None:
        other = replace(spec, policy=replace(spec.policy, **transfer_policy))
        tag = other.policy.pretrained.replace("/", "_")
        minirec_s = select_times["minirec"]
        add(other, "minirec_transfer", transfer_k, selections["minirec"][transfer_k], minirec_s, f"transfer_minirec_{tag}")
        add(other, "random", transfer_k, selections["random"][transfer_k], 0.0, f"transfer_random_{tag}")
    quarters = score_quarters(spec, table, folder, sasrec_steps) if learner == "sasrec" else []
    return rows, pool_diagnostics(table, spec), quarters


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict[str, Any]], references: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (policy, strategy, k) with the 95 % interval over test samples of the seed-averaged
    per-sample NDCG@10 (kept under `samples` `[S]`; the random-ranking expectation keeps its own interval), time
    and NDCG@10 relative to full data (same policy), and each trained row of the base policy − zero-shot (that policy
    untrained) in NDCG@10, and each selection's row (scored strategies, transfer) − random-k (same policy and k),
    paired on the test samples (NaN where they do not apply or a row has no per-sample values); `references` are
    summary rows added as they are (SASRec)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["strategy"], r["k"]), []).append(r)
    out = []
    for (policy, strategy, k), rs in groups.items():
        ndcg, ndcg_std = _mean_std([r["test_ndcg@10"] for r in rs])
        hr, hr_std = _mean_std([r["test_hr@10"] for r in rs])
        if rs[0]["samples"] is None:
            samples, lo, hi = None, *(statistics.fmean(r[f"test_ndcg@10_{b}"] for r in rs) for b in ("lo", "hi"))
        else:
            samples = torch.tensor([r["samples"] for r in rs], dtype=torch.float64).mean(0).tolist()
            _, lo, hi = interval([samples])
        out.append({"policy": policy, "strategy": strategy, "k": k, "seeds": len(rs), "test_ndcg@10_mean": ndcg,
                    "test_ndcg@10_lo": lo, "test_ndcg@10_hi": hi, "test_ndcg@10_std": ndcg_std,
                    "test_hr@10_mean": hr, "test_hr@10_std": hr_std, "samples": samples,
                    "method_s_mean": statistics.fmean(r["method_s"] for r in rs),
                    "train_s_mean": statistics.fmean(r["train_s"] for r in rs)})
    out.extend(references)
    for row in out:
        trained = row["samples"] is not None and row["strategy"] not in BASELINES.values()
        minus = paired(out, row, BASELINES["zero_shot"], 0) if trained else (float("nan"),) * 3
        row.update(zip(("minus_zero_shot", "minus_zero_shot_lo", "minus_zero_shot_hi"), minus))
        selected = row["samples"] is not None and row["strategy"] in (*SCORED, "minirec_transfer")
        minus = paired(out, row, "random", row["k"]) if selected else (float("nan"),) * 3
        row.update(zip(("minus_random", "minus_random_lo", "minus_random_hi"), minus))
        full = next((f for f in out if f["policy"] == row["policy"] and f["strategy"] == "full"), None)
        row["time_vs_full"] = row["method_s_mean"] / full["method_s_mean"] if full else float("nan")
        row["ndcg@10_vs_full"] = (row["test_ndcg@10_mean"] / full["test_ndcg@10_mean"]
                                  if full and full["test_ndcg@10_mean"] > 0 else float("nan"))
    order = {s: i for i, s in enumerate((*BASELINES.values(), "SASRec", "full", "random", *SCORED, "minirec_transfer"))}
    return sorted(out, key=lambda r: (r["policy"], r["k"], order.get(r["strategy"], 99)))


def paired(summary: list[dict[str, Any]], row: dict[str, Any], strategy: str, k: int | None) -> tuple[float, ...]:
    """Mean and 95 % interval of row − (the `strategy` row of the same policy, at k, any k if None) in NDCG@10,
    paired on the test samples: (diff, lo, hi), NaN where that row is missing."""
    other = next((r for r in summary if r["policy"] == row["policy"] and r["strategy"] == strategy
                  and (k is None or r["k"] == k)), None)
    return paired_interval(row["samples"], other["samples"]) if other else (float("nan"),) * 3


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % bootstrap interval of a − b, per-sample values `[S]` paired on the test samples."""
    values = {m: torch.tensor(v, dtype=torch.float64)[:, None] for m, v in (("a", a), ("b", b))}
    return tuple(float(v[0]) for v in bootstrap_intervals(paired_differences(values, of="a"), seed=0)["a-b"])


def headline(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per policy and k: MiniRec time and NDCG@10 relative to full data, and MiniRec − random-k (`summarise`'s),
    MiniRec − full in NDCG@10 with paired 95 % intervals; for the transfer policy its MiniRec-k (the base policy's
    selection) − random-k (NaN against a full data it has not trained on)."""
    out = []
    for r in (r for r in summary if r["strategy"] in ("minirec", "minirec_transfer")):
        out.append({"policy": r["policy"], "k": r["k"], "time_vs_full": r["time_vs_full"],
                    "ndcg@10_vs_full": r["ndcg@10_vs_full"],
                    **{c: r[c] for c in ("minus_random", "minus_random_lo", "minus_random_hi")},
                    **dict(zip(("minus_full", "minus_full_lo", "minus_full_hi"), paired(summary, r, "full", None)))})
    return out


def load_sasrec(path: str) -> dict[str, Any]:
    """A `benchmarks/sasrec.py` result (`metrics.json`), checked before any run."""
    if not Path(path).is_file():
        raise DataError(f"data_efficiency.sasrec: no file at {path}")
    m = read_json(Path(path))
    if not isinstance(m, dict) or not {"summary", "intervals", "test_samples", "train_s"} <= set(m) \
            or "sasrec" not in m["intervals"]:
        raise DataError(f"data_efficiency.sasrec: {path} is not a metrics.json of benchmarks/sasrec.py")
    return m


def sasrec_row(m: dict[str, Any], path: str, policy: str, samples: int) -> dict[str, Any]:
    """The summary row of a SASRec result `m` (`load_sasrec`; trained on the whole training split), which must be
    tested on the same number of test samples; its time is SASRec's training time."""
    if m["test_samples"] != samples:
        raise DataError(f"data_efficiency.sasrec: {path} was tested on {m.get('test_samples')} samples, this run on "
                        f"{samples}: use the same data settings")
    lo, hi = m["intervals"]["sasrec"]["ndcg@10"]
    nan = float("nan")
    return {"policy": policy, "strategy": "SASRec", "k": 0, "seeds": 1, "test_ndcg@10_mean": m["summary"]["sasrec"]["ndcg@10"],
            "test_ndcg@10_lo": lo, "test_ndcg@10_hi": hi, "test_ndcg@10_std": nan,
            "test_hr@10_mean": m["summary"]["sasrec"]["hr@10"], "test_hr@10_std": nan, "samples": None,
            "method_s_mean": m["train_s"], "train_s_mean": m["train_s"]}


def plot(summary: list[dict[str, Any]], policy: str, out: Path) -> None:
    """quality_vs_k.png (test NDCG@10 mean ± std vs k) and time_vs_k.png (method seconds vs k), one line per
    strategy of `policy`, full data and the baselines (quality only) drawn as horizontal lines; quality_vs_time.png
    (test NDCG@10 with its interval against method seconds, one point per strategy and k, the untrained baselines as
    horizontal lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if r["policy"] == policy or r["k"] == 0]  # the baselines belong to the LLM
    for key, err, ylabel, name in (("test_ndcg@10_mean", "test_ndcg@10_std", "test NDCG@10", "quality_vs_k.png"),
                                   ("method_s_mean", None, "method wall time (s)", "time_vs_k.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, strategy in enumerate(dict.fromkeys(r["strategy"] for r in rows)):
            line = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["k"])
            if strategy == "full":
                ax.axhline(line[0][key], color="k", ls="--", label=f"full data (N={line[0]['k']})")
                continue
            if line[0]["k"] == 0:  # references (untrained baselines, SASRec): quality lines only
                if err:
                    ax.axhline(line[0][key], color=f"C{i}", ls=":", label=strategy)
                continue
            ax.errorbar([r["k"] for r in line], [r[key] for r in line],
                        yerr=[r[err] for r in line] if err else None, marker="o", capsize=3, color=f"C{i}",
                        label=strategy)
        ax.set(xscale="log", xlabel="subset size k", ylabel=ylabel, title=f"{ylabel} vs k\n{policy}")
        ax.set_xticks(sorted({r["k"] for r in rows if r["strategy"] != "full" and r["k"]}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # log-axis minor labels overlap the ks
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out / name)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))  # quality_vs_time.png: what each method's time buys
    for i, strategy in enumerate(dict.fromkeys(r["strategy"] for r in rows)):
        line = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["k"])
        if line[0]["k"] == 0 and strategy != "SASRec":  # untrained baselines take no training time
            ax.axhline(line[0]["test_ndcg@10_mean"], color=f"C{i}", ls=":", label=strategy)
            continue
        y = [r["test_ndcg@10_mean"] for r in line]
        ax.errorbar([r["method_s_mean"] for r in line], y, marker="s" if strategy in ("full", "SASRec") else "o",
                    yerr=[[v - r["test_ndcg@10_lo"] for v, r in zip(y, line)],
                          [r["test_ndcg@10_hi"] - v for v, r in zip(y, line)]],
                    capsize=3, color=f"C{i}", label=strategy if strategy != "SASRec" else "SASRec, whole split")
        for r in line:
            if r["k"]:
                ax.annotate(str(r["k"]), (r["method_s_mean"], r["test_ndcg@10_mean"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="method wall time (s)", ylabel="test NDCG@10 (95 % interval)",
           title=f"test NDCG@10 vs method time\n{policy}; points labelled with k")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "quality_vs_time.png")
    plt.close(fig)


def write_markdown(path: Path, summary: list[dict[str, Any]], heads: list[dict[str, Any]],
                   pools: list[dict[str, Any]], quarters: list[dict[str, Any]], spec: PipelineSpec,
                   info: dict[str, Any]) -> None:
    """The run's header (command, date, machine, settings), the summary table, the headline ratios, the pool
    diagnostics and (SASRec learner) the score quarters."""
    text = [
        *run_header("Data-efficiency benchmark", info),
        f"Dataset `{spec.processing.dataset}`; policy `{spec.policy.pretrained}`; pool (full data) N = "
        f"{spec.score.pool_size or 'whole training split'}; ks {info['ks']}; seeds {info['seeds']}; proxy on `{spec.proxy.subset}` for "
        f"{spec.proxy.max_epochs} epoch(s); reward top ndcg_k {spec.reward.ndcg_k}, learnability peak mu "
        f"{spec.score.selection.mu}; " + (
            f"training {spec.train.max_epochs} epochs, curriculum `{spec.score.selection.curriculum}` with "
            f"{spec.score.selection.num_stages} stages; test on {spec.loader.max_test_samples or 'all'} samples at the "
            f"best-valid checkpoint ({spec.loader.max_val_samples} validation samples)." if info["learner"] == "policy"
            else "learner **SASRec** (`minirec.sasrec` model defaults, seeded by the grid's seed) trained on each "
            f"selection without a curriculum for the same step budget (`sasrec_schedule`: at most {info['sasrec_steps']} "
            "steps, validated 50 times, stopped after 40 % of them without a better validation NDCG@10 on the whole "
            "validation split); the selections are the policy's "
            f"(its proxy and scores); test on {spec.loader.max_test_samples or 'all'} samples. Zero-shot is the "
            "untrained policy."), "",
        "The wall time above is this invocation's: a resumed run skips the steps already complete in its work_dir "
        "and does not count their time, which stays in each method's own times below.", "",
        "Method time = what the method needs: full and random = training; the scored strategies = proxy + scoring + "
        "selection + training (SASRec: its training on the whole training split). Mean and ± std over seeds; "
        "[lo, hi] = 95 % bootstrap interval over the test samples of the seed-averaged per-sample NDCG@10; "
        "− zero-shot = the row's NDCG@10 minus the untrained policy's, − random-k = a selection's minus random-k's "
        "(same policy and k), each paired on the test samples, with its 95 % interval.", "",
        markdown_table(summary, {
            "policy": "policy", "strategy": "strategy", "k": "k", "seeds": "seeds",
            "test_ndcg@10_mean": "NDCG@10", "test_ndcg@10_lo": "lo", "test_ndcg@10_hi": "hi",
            "test_ndcg@10_std": "± std", "test_hr@10_mean": "HR@10",
            "test_hr@10_std": "± std", "method_s_mean": "method s", "train_s_mean": "train s",
            "time_vs_full": "time / full", "ndcg@10_vs_full": "NDCG@10 / full",
            "minus_zero_shot": "− zero-shot", "minus_zero_shot_lo": "lo", "minus_zero_shot_hi": "hi",
            "minus_random": "− random-k", "minus_random_lo": "lo", "minus_random_hi": "hi"}), "",
        "## Headline ratios (MiniRec-k vs full data and random-k)", "",
        "Differences in NDCG@10 are paired on the test samples (seed-averaged per-sample values); an interval that "
        "excludes 0 separates the two methods. A transfer policy's row is the base policy's MiniRec-k selection "
        "training that policy, against random-k on it (cross-model transfer).", "",
        markdown_table(heads, {"policy": "policy", "k": "k", "time_vs_full": "MiniRec time / full time",
                               "ndcg@10_vs_full": "MiniRec NDCG@10 / full NDCG@10",
                               "minus_random": "MiniRec − random", "minus_random_lo": "lo", "minus_random_hi": "hi",
                               "minus_full": "MiniRec − full", "minus_full_lo": "lo", "minus_full_hi": "hi"}), "",
        "## Pool diagnostics (the proxy's rollout rewards over the pool)", "",
        "no reward = share of samples none of whose rollouts ranks the target within the reward's top ndcg_k (what "
        "learnability prunes in the paper's setting, 55 % there; none when ndcg_k covers the catalogue); "
        "all equal = share whose rollouts score alike; reward p10/p50/p90 = quantiles of a sample's mean reward; "
        "rollout agreement = correlation over the pool of the mean rewards of each sample's two halves of rollouts "
        "(near 0: r̄, and so L, says more about the draws than about the sample); "
        "L > 0.5 = share the learnability score rates above 0.5.", "",
        markdown_table(pools, {"seed": "seed", "pool": "pool", "rollouts": "rollouts",
                               "frac_no_reward": "no reward", "frac_all_rollouts_equal": "all equal",
                               "reward_mean": "reward mean", "reward_std_over_pool": "std over pool",
                               "reward_p10": "p10", "reward_p50": "p50", "reward_p90": "p90",
                               "within_sample_std": "within-sample std", "rollout_agreement": "rollout agreement",
                               "frac_L_over_0.5": "L > 0.5"}), "",
        *([
            "## What a sample's score says about what it teaches (SASRec on each quarter of the pool)", "",
            "The pool ranked by learnability L and by representativeness R and cut into quarters (1 = highest "
            "scores); SASRec trained on each quarter, test NDCG@10 with its 95 % interval, and quarter 1 − quarter 4 "
            "paired on the test samples: if a score marks the samples that teach most, quarter 1 is above quarter 4.",
            "",
            markdown_table(quarters, {"score": "score", "quarter": "quarter", "seeds": "seeds",
                                      "samples_per_quarter": "samples", "score_min": "score min",
                                      "score_max": "score max", "val_ndcg@10_mean": "val NDCG@10",
                                      "test_ndcg@10_mean": "test NDCG@10", "test_ndcg@10_lo": "lo",
                                      "test_ndcg@10_hi": "hi", "top_minus_bottom": "quarter 1 − 4",
                                      "top_minus_bottom_lo": "lo", "top_minus_bottom_hi": "hi"}), "",
        ] if quarters else []),
        "![quality vs k](quality_vs_k.png)", "", "![time vs k](time_vs_k.png)", "",
        "![quality vs time](quality_vs_time.png)", "",
    ]
    atomic_write_text(path, "\n".join(text))


def run_benchmark(
    base: str,
    base_args: list[str] = [],
    out: str = "benchmarks/results/data_efficiency",
    work_dir: str = "runs/data_efficiency",
    ks: list[int] = [32, 64, 128],
    seeds: list[int] = [0, 1, 2],
    strategies: list[str] = ["full", "random", "minirec", "learnability", "representativeness", "diversity",
                             "minirec_no_curriculum"],
    transfer_policy: dict[str, Any] | None = None,
    transfer_k: int | None = None,
    sasrec: str | None = None,
    learner: str = "policy",
    sasrec_steps: int = 2000,
    command: str = "",
) -> list[dict[str, Any]]:
    """Run (or resume) the grid and write the tables and plots; returns the summary rows.

    Args:
        base: a `minirec pipeline` YAML whose settings every run shares (score.pool_size = the full data).
        base_args: `minirec pipeline` arguments applied over `base` (e.g. `["--reward.ndcg_k", "150"]`;
            `["--device.accelerator", "gpu"]`: the same grid on one GPU).
        out: folder of the results (CSV, markdown, plots).
        work_dir: folder of the runs (checkpoints, scores); a re-run resumes there.
        ks: subset sizes.
        seeds: global seeds (LoRA init, rollout sampling, random-k); pool and evaluation samples stay fixed by
            `loader.seed`.
        strategies: methods to compare (`full`, `random`, `minirec` and the ablations).
        transfer_policy: policy settings that replace the base ones (e.g. `{pretrained: tiny-random-llama}`) for a
            second policy trained on the base policy's MiniRec-k selection and on random-k (cross-model transfer).
        transfer_k: the k of the transfer runs.
        sasrec: `metrics.json` of `benchmarks/sasrec.py` on the same data settings, shown as a reference row.
        learner: the model trained on every selection: `policy` (the base config's RecPO fit) or `sasrec` (SASRec,
            no curriculum; rows under policy `sasrec`).
        sasrec_steps: the SASRec learner's optimizer-step budget per subset (`sasrec_schedule`).
        command: the command line recorded in the markdown (set by `main`).
    """
    spec = load_spec(base, base_args)
    check_grid(spec, ks, seeds, strategies, transfer_k, learner, transfer_policy is not None)
    if transfer_policy is not None and transfer_k is None:
        raise DataError("data_efficiency: transfer_policy needs transfer_k")
    selection = replace(spec.score.selection, ks=tuple(ks), strategy="minirec")
    spec = replace(spec, score=replace(spec.score, selection=selection))
    sasrec_result = load_sasrec(sasrec) if sasrec is not None else None
    start = time.perf_counter()
    rows, pools, quarters = [], [], []
    for seed in seeds:
        seed_rows, pool, seed_quarters = run_seed(replace(spec, seed=seed), Path(work_dir), ks, strategies, transfer_policy, transfer_k,
                                   learner, sasrec_steps)
        rows += seed_rows
        pools.append(pool)
        quarters += seed_quarters
    samples = len(next(r["samples"] for r in rows if r["samples"] is not None))
    label = spec.policy.pretrained if learner == "policy" else "sasrec"
    summary = summarise(rows, [sasrec_row(sasrec_result, sasrec, label, samples)] if sasrec else [])
    heads = headline(summary)
    results = Path(out)
    results.mkdir(parents=True, exist_ok=True)
    write_csv(results / "runs.csv", rows, RUN_COLUMNS)
    write_csv(results / "summary.csv", summary, SUMMARY_COLUMNS)
    write_csv(results / "headline.csv", heads, HEADLINE_COLUMNS)
    write_csv(results / "pool.csv", pools, POOL_COLUMNS)
    quarters = summarise_quarters(quarters) if quarters else []
    if quarters:
        write_csv(results / "quarters.csv", quarters, QUARTER_COLUMNS)
    plot(summary, label, results)
    info = {"command": command,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": time.perf_counter() - start,
            "machine": machine(torch.get_num_threads(), "cpu" if spec.device.accelerator == "cpu" else device_kind()),
            "ks": ks, "seeds": seeds, "learner": learner, "sasrec_steps": sasrec_steps}
    write_markdown(results / "data_efficiency.md", summary, heads, pools, quarters, spec, info)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="data_efficiency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(run_benchmark, skip={"command"})
    argv = sys.argv[1:] if argv is None else argv
    cfg = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/data_efficiency.py", *argv])
    summary = run_benchmark(**{k: v for k, v in vars(cfg).items() if k not in ("config", "__path__")}, command=command)
    print(markdown_table(summary, {"policy": "policy", "strategy": "strategy", "k": "k",
                                   "test_ndcg@10_mean": "NDCG@10", "method_s_mean": "method s",
                                   "time_vs_full": "time / full"}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from minirec.io import run_command  # a user error: one `error: ...` line, exit status 2 (--debug: traceback)

    sys.exit(run_command(main))
