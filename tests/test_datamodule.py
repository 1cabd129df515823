"""RecDataModule on real MovieLens-100K and synthetic data: batches, item catalogue, caps, subsets, curriculum stages,
selection-file errors, and 2-process predict sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules import RecDataModule
from minirec.io import DataError
from minirec.processing import ProcessingConfig

SYNTH = ProcessingConfig(dataset="synthetic", synthetic_users=60, synthetic_items=24)


def make_dm(tmp_path: Path, processing: ProcessingConfig = SYNTH, **kw) -> RecDataModule:
    dm = RecDataModule(processing=processing, cache_dir=str(tmp_path / "cache"), **kw)
    dm.prepare_data()
    dm.setup()
    return dm


def test_movielens_batches(tmp_path: Path) -> None:
    ml = ProcessingConfig(dataset="movielens-100k", time_window=None, require_price=False)
    dm = make_dm(tmp_path, ml, max_val_samples=16, eval_batch_size=4)
    assert dm.num_items == 1682
    batch = next(iter(dm.val_dataloader()))
    assert batch["prompt_ids"].shape == batch["prompt_mask"].shape and batch["prompt_ids"].shape[0] == 4
    # left padding: every row ends with a real token, padding only at the start
    assert (batch["prompt_mask"][:, -1] == 1).all()
    assert (batch["prompt_mask"].diff(dim=1) >= 0).all()
    rows = {r["sample_id"]: r for r in dm.data["valid"]}
    for b in range(4):
        row = rows[int(batch["sample_id"][b])]
        assert int(batch["target"][b]) == row["target"]
        hist = batch["history"][b]
        assert hist[: len(row["history"])].tolist() == row["history"] and (hist[len(row["history"]):] == 0).all()
        text = dm.tokenizer.decode(batch["prompt_ids"][b][batch["prompt_mask"][b] == 1])
        assert f"[{dm.titles[row['history'][-1]]}]" in text  # the most recent history item is shown
    assert sum(len(b["sample_id"]) for b in dm.val_dataloader()) == 16
    items = next(iter(dm.item_dataloader()))
    assert items["item_id"].tolist() == list(range(1, 33))
    text = dm.tokenizer.decode(items["prompt_ids"][0][items["prompt_mask"][0] == 1])
    assert f"Title: {dm.titles[1]}" in text and text.endswith("<answer>")


def test_caps_and_random_subset_are_seeded(tmp_path: Path) -> None:
    a = make_dm(tmp_path, max_train_samples=40, subset="random:10", seed=3)
    b = make_dm(tmp_path, max_train_samples=40, subset="random:10", seed=3)
    c = make_dm(tmp_path, max_train_samples=40, subset="random:10", seed=4)
    assert a.train_ids == b.train_ids != c.train_ids
    assert len(a.train_ids) == 10 and set(a.train_ids) <= set(a.split_order["train"])
    with pytest.raises(DataError, match="random:100 needs 1 ≤ k ≤ pool size 40"):
        make_dm(tmp_path, max_train_samples=40, subset="random:100")
    with pytest.raises(DataError, match="expected 'random:<k>'"):
        make_dm(tmp_path, subset="random:many")


def _selection(dm: RecDataModule, path: Path, curriculum: str, **overrides) -> str:
    ids = dm.data["train"]["sample_id"][:8]
    sel = {"fingerprint": dm.processing.fingerprint(), "ids": ids, "stages": [0, 0, 0, 1, 1, 2, 2, 2],
           "curriculum": curriculum, **overrides}
    path.write_text(json.dumps(sel))
    return str(path)


def test_selection_file_and_stage_api(tmp_path: Path) -> None:
    base = make_dm(tmp_path)
    ids = base.data["train"]["sample_id"][:8]
    dm = make_dm(tmp_path, subset=_selection(base, tmp_path / "sel.json", "stages"), train_batch_size=8)
    served = lambda: [int(i) for b in dm.train_dataloader() for i in b["sample_id"]]  # noqa: E731
    assert dm.num_stages == 3
    dm.set_stage(0)
    assert sorted(served()) == sorted(ids[:3])
    dm.set_stage(1)
    assert sorted(served()) == sorted(ids[:5])
    dm.set_stage(None)
    assert sorted(served()) == sorted(ids)
    with pytest.raises(DataError, match="stage 3 out of range 0..2"):
        dm.set_stage(3)
    ex = make_dm(tmp_path, subset=_selection(base, tmp_path / "sel.json", "stages"), pacing="exclusive")
    ex.set_stage(1)
    assert sorted(int(i) for b in ex.train_dataloader() for i in b["sample_id"]) == sorted(ids[3:5])
    # folds: fixed order, no shuffle, every epoch
    folds = make_dm(tmp_path, subset=_selection(base, tmp_path / "folds.json", "folds"), train_batch_size=3)
    order = [int(i) for b in folds.train_dataloader() for i in b["sample_id"]]
    assert order == ids == [int(i) for b in folds.train_dataloader() for i in b["sample_id"]]


def test_selection_file_errors(tmp_path: Path) -> None:
    base = make_dm(tmp_path)
    with pytest.raises(DataError, match=r"unknown\.json: file not found"):
        make_dm(tmp_path, subset=str(tmp_path / "unknown.json"))
    bad = _selection(base, tmp_path / "bad.json", "stages", ids=[10**9] + base.data["train"]["sample_id"][:7])
    with pytest.raises(DataError, match=r"bad\.json: field 'ids' names 1 unknown training sample id"):
        make_dm(tmp_path, subset=bad)
    other = _selection(base, tmp_path / "other.json", "stages", fingerprint="0123456789abcdef")
    with pytest.raises(DataError, match="made for dataset fingerprint 0123456789abcdef"):
        make_dm(tmp_path, subset=other)
    short = _selection(base, tmp_path / "short.json", "stages", stages=[0])
    with pytest.raises(DataError, match="'ids' has 8 entries but 'stages' has 1"):
        make_dm(tmp_path, subset=short)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.json:1: malformed JSON"):
        make_dm(tmp_path, subset=str(tmp_path / "broken.json"))


def test_two_process_predict_sharding(tmp_path: Path) -> None:
    """Two CPU processes (DDP) predict over the pool: every sample exactly once, none dropped or duplicated."""
    make_dm(tmp_path)  # build the cache once, as prepare_data would on rank 0
    script = Path(__file__).parent / "scripts" / "predict_shard.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "cache"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    expected = torch.load(out / "expected.pt", weights_only=True)
    assert len(expected) == 37  # max_predict_samples
    assert sorted(seen[0] + seen[1]) == sorted(expected)
