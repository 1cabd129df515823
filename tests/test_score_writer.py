"""ScoreWriter end to end with the real RecDataModule (synthetic data) and a fake scoring module: artefacts, prefix
property, selection round trip, resume after a kill, missing samples, fingerprint mismatch, settings errors, and a
2-process (DDP, CPU) run that must give the same table as one process.

Run as a script (`python tests/test_score_writer.py CACHE OUT`) it does the 2-process predict for the last test.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.score_writer import CSV_COLUMNS, ScoreWriter
from datamodules import RecDataModule
from minirec.io import DataError
from minirec.subsets import SelectionConfig
from minirec.processing import ProcessingConfig
from minirec.selection import greedy_value_selection, learnability, representativeness, value_scores

SYNTH = ProcessingConfig(dataset="synthetic", synthetic_users=60, synthetic_items=24)
POOL, BATCH, ROLLOUTS = 40, 8, 4
ARTEFACTS = ("fingerprint.json", "scores.csv", "score_table.pt", "summary.json", "selection.json", "reward_hist.png",
             "l_vs_r.png", "selected_vs_pool.png", "curriculum.png")


class FakeScorer(L.LightningModule):
    """Deterministic per-sample scores (a function of the sample id); optionally dies at batch `fail_at`."""

    def __init__(self, rollouts: int = ROLLOUTS, fail_at: int | None = None, proxy: str = "proxy.ckpt"):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[int] = []

    def scoring_config(self) -> dict:
        h = self.hparams
        return {"proxy": h.proxy, "rollouts": h.rollouts, "space": "hidden", "temperatures": (1.5,)}

    def predict_step(self, batch, batch_idx):
        if batch_idx == self.hparams.fail_at:
            raise RuntimeError("simulated kill")
        ids = batch["sample_id"]
        self.seen += ids.tolist()
        gens = [torch.Generator().manual_seed(int(i)) for i in ids]
        rewards = torch.stack([torch.rand(self.hparams.rollouts, generator=g) ** 2 for g in gens])
        rewards[ids % 4 == 0] = 0.0  # samples that never hit the target
        return {
            "sample_id": ids,
            "rewards": rewards,
            "mean_reward": rewards.mean(dim=1),
            "user_emb": torch.stack([torch.randn(8, generator=g) for g in gens]),
            "rep_vec": torch.stack([torch.randn(6, generator=g) + 1.0 for g in gens]),
        }


def make_dm(cache: str, **kw) -> RecDataModule:
    kw = {"max_predict_samples": POOL, "eval_batch_size": BATCH, **kw}
    return RecDataModule(processing=SYNTH, cache_dir=cache, **kw)


def predict(cache: str, writer: ScoreWriter, module: FakeScorer | None = None, **trainer_kw) -> FakeScorer:
    module = module or FakeScorer()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[writer], **trainer_kw)
    trainer.predict(module, datamodule=make_dm(cache), return_predictions=False)
    return module


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        return list(reader)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cache"))
    make_dm(path).prepare_data()
    return path


@pytest.fixture(scope="module")
def pool(cache: str) -> list[int]:
    dm = make_dm(cache)
    dm.setup()
    return dm.predict_pool_ids()


def test_end_to_end_artefacts_prefix_and_round_trip(tmp_path, cache, pool) -> None:
    out = tmp_path / "scores"
    module = predict(cache, ScoreWriter(str(out), SelectionConfig(ks=[8, 16], num_stages=4)))
    assert sorted(module.seen) == sorted(pool) and len(pool) == POOL
    for name in ARTEFACTS + ("selection_k8.json", "selection_k16.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(list((out / "shards").glob("rank0-*.pt"))) == POOL // BATCH
    assert not list(out.rglob("*.tmp"))

    rows = read_csv(out / "scores.csv")
    assert [int(r["sample_id"]) for r in rows] == pool  # every sample once, in pool order
    rewards = torch.tensor([[float(x) for x in r["rewards"].split(" ")] for r in rows])
    mean = torch.tensor([float(r["mean_reward"]) for r in rows])
    assert rewards.shape == (POOL, ROLLOUTS) and torch.allclose(rewards.mean(dim=1), mean, atol=1e-6)
    vectors = torch.load(out / "score_table.pt", weights_only=True)
    assert vectors["sample_id"].tolist() == pool and vectors["user_emb"].shape == (POOL, 8)
    L_, R_ = learnability(mean), representativeness(vectors["rep_vec"])
    q = value_scores(L_, R_)
    for col, expected in (("L", L_), ("R", R_), ("q", q)):
        assert torch.allclose(torch.tensor([float(r[col]) for r in rows]), expected, atol=1e-5), col

    s8, s16 = (json.loads((out / f"selection_k{k}.json").read_text()) for k in (8, 16))
    order = [pool[i] for i in greedy_value_selection(q, vectors["user_emb"], 16)]
    assert s16["selection_order"] == order and s8["selection_order"] == order[:8]  # greedy prefix property
    for sel, k in ((s8, 8), (s16, 16)):
        assert sel["k"] == k and sorted(sel["ids"]) == sorted(sel["selection_order"])
        assert sel["curriculum"] == "stages" and sorted(set(sel["stages"])) == [0, 1, 2, 3]
        r_of = dict(zip(pool, mean.tolist()))
        assert all(r_of[a] >= r_of[b] for a, b in zip(sel["ids"], sel["ids"][1:]))  # easy -> hard
        assert sel["fingerprint"] == SYNTH.fingerprint() and sel["pool_size"] == POOL
        assert sel["proxy_checkpoint"] == "proxy.ckpt" and sel["strategy"] == "minirec"
        assert sel["config"]["ks"] == [8, 16] and sel["config"]["scoring"]["rollouts"] == ROLLOUTS
    assert json.loads((out / "selection.json").read_text()) == s8

    rank = {int(r["sample_id"]): int(r["selected_rank"]) for r in rows}
    stage = {int(r["sample_id"]): int(r["stage"]) for r in rows}
    assert [i for i, _ in sorted(((i, r) for i, r in rank.items() if r >= 0), key=lambda x: x[1])] == order
    assert {i: stage[i] for i in s16["ids"]} == dict(zip(s16["ids"], s16["stages"]))
    assert sum(v == -1 for v in stage.values()) == POOL - 16

    summary = json.loads((out / "summary.json").read_text())
    assert summary["pool_size"] == POOL and summary["num_rollouts"] == ROLLOUTS
    assert summary["mean_reward"] == pytest.approx(float(mean.mean()), abs=1e-6)
    assert summary["frac_all_rewards_zero"] == pytest.approx(float((rewards == 0).all(dim=1).float().mean()))
    assert summary["per_k"]["8"]["mean_L"] == pytest.approx(float(L_[[pool.index(i) for i in order[:8]]].mean()))

    dm = make_dm(cache, subset=str(out / "selection.json"))  # the next stage trains on it
    dm.setup()
    assert [dm.data["train"][r]["sample_id"] for r in dm.train_ids] == s8["ids"]
    assert dm.num_stages == 4 and dm.curriculum == "stages"


@pytest.mark.parametrize("strategy,curriculum", [("random", "folds"), ("diversity", "stages"),
                                                 ("minirec_no_curriculum", "stages")])
def test_other_strategies_keep_prefixes(tmp_path, cache, pool, strategy, curriculum) -> None:
    out = tmp_path / "scores"
    selection = SelectionConfig(ks=[12, 6], strategy=strategy, curriculum=curriculum, num_stages=3, fold_size=4)
    predict(cache, ScoreWriter(str(out), selection))
    small, large = (json.loads((out / f"selection_k{k}.json").read_text()) for k in (6, 12))
    assert large["selection_order"][:6] == small["selection_order"] and len(set(large["selection_order"])) == 12
    assert json.loads((out / "selection.json").read_text())["k"] == 12  # the first of ks
    expected_mode = "none" if strategy == "minirec_no_curriculum" else curriculum
    assert large["curriculum"] == expected_mode
    if expected_mode == "none":
        assert large["ids"] == large["selection_order"] and set(large["stages"]) == {0}
    if expected_mode == "folds":
        assert large["stages"] == [0] * 4 + [1] * 4 + [2] * 4


def test_resume_after_kill_scores_only_the_rest(tmp_path, cache, pool) -> None:
    out = tmp_path / "scores"
    with pytest.raises(RuntimeError, match="simulated kill"):
        predict(cache, ScoreWriter(str(out), SelectionConfig(ks=[8])), FakeScorer(fail_at=2))
    assert len(list((out / "shards").glob("*.pt"))) == 2 and not (out / "scores.csv").exists()
    (out / "shards" / ".rank0-999.pt.x.tmp").write_bytes(b"half a shard")  # a write the kill interrupted
    second = predict(cache, ScoreWriter(str(out), SelectionConfig(ks=[8])))
    assert not list(out.rglob("*.tmp"))
    assert sorted(second.seen) == sorted(pool[2 * BATCH:])  # only the unfinished samples
    assert [int(r["sample_id"]) for r in read_csv(out / "scores.csv")] == pool
    assert json.loads((out / "summary.json").read_text())["previously_scored"] == 2 * BATCH

    clean = tmp_path / "clean"
    predict(cache, ScoreWriter(str(clean), SelectionConfig(ks=[8])))
    assert (out / "scores.csv").read_text() == (clean / "scores.csv").read_text()
    assert (out / "selection.json").read_text() == (clean / "selection.json").read_text()

    # killed after the last shard but before the merge: the rerun scores nothing and merges
    for name in ("scores.csv", "selection.json", "selection_k8.json"):
        (out / name).unlink()
    third = predict(cache, ScoreWriter(str(out), SelectionConfig(ks=[8])))
    assert third.seen == [] and (out / "selection.json").read_text() == (clean / "selection.json").read_text()


def test_missing_samples_raise_and_write_nothing(tmp_path, cache) -> None:
    out = tmp_path / "scores"
    with pytest.raises(DataError, match=f"{2 * BATCH} of {POOL} pool samples have no scores"):
        predict(cache, ScoreWriter(str(out), SelectionConfig(ks=[8])), limit_predict_batches=3)
    assert sorted(p.name for p in out.iterdir()) == ["fingerprint.json", "shards"]


def test_fingerprint_mismatch_overwrites_nothing(tmp_path, cache) -> None:
    out = tmp_path / "scores"
    predict(cache, ScoreWriter(str(out), SelectionConfig(ks=[8])))
    before = snapshot(out)
    with pytest.raises(DataError, match=r"fingerprint.json.*scoring: \{.*'rollouts': 4.*\} there vs \{.*'rollouts': 2"):
        predict(cache, ScoreWriter(str(out), SelectionConfig(ks=[8])), FakeScorer(rollouts=2))
    assert snapshot(out) == before


def test_settings_errors_before_anything_is_written(tmp_path, cache) -> None:
    out = tmp_path / "scores"
    with pytest.raises(DataError, match=r"selection.ks: subset sizes \[41\] exceed the scoring pool of 40"):
        predict(cache, ScoreWriter(str(out), SelectionConfig(ks=[8, 41])))
    assert not out.exists()
    for kwargs, message in (
        ({"ks": [0]}, "selection.ks"), ({"ks": []}, "selection.ks"), ({"ks": [8, 8]}, "selection.ks"),
        ({"ks": [3], "num_stages": 4}, r"selection.num_stages: must lie in 1..3"),
        ({"strategy": "full"}, "data.subset: all"), ({"curriculum": "zigzag"}, "selection.curriculum"),
        ({"selection_dtype": "int8"}, "selection.selection_dtype"),
    ):
        with pytest.raises(DataError, match=message):
            ScoreWriter(str(out), SelectionConfig(**kwargs))
    ScoreWriter(str(out), SelectionConfig(ks=[3], num_stages=4, strategy="minirec_no_curriculum"))  # no stages: fine


def test_bad_prediction_is_named(tmp_path, cache) -> None:
    class Broken(FakeScorer):
        def predict_step(self, batch, batch_idx):
            out = super().predict_step(batch, batch_idx)
            del out["rep_vec"]
            return out

    with pytest.raises(DataError, match=r"predict_step must return a dict with .*'rep_vec'"):
        predict(cache, ScoreWriter(str(tmp_path / "scores"), SelectionConfig(ks=[8])), Broken())


def test_two_processes_give_the_single_process_table(tmp_path, cache) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, __file__, cache, str(tmp_path / "ddp")], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = {p.name.split("-")[0] for p in (tmp_path / "ddp" / "shards").glob("*.pt")}
    assert shards == {"rank0", "rank1"}
    predict(cache, ScoreWriter(str(tmp_path / "one"), SelectionConfig(ks=[8])))
    for name in ("scores.csv", "selection.json"):
        assert (tmp_path / "ddp" / name).read_text() == (tmp_path / "one" / name).read_text()


if __name__ == "__main__":  # the 2-process predict of the test above
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ScoreWriter(sys.argv[2], SelectionConfig(ks=[8]))])
    trainer.predict(FakeScorer(), datamodule=make_dm(sys.argv[1]), return_predictions=False)
