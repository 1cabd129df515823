"""benchmarks/embedding_probe.py on a tiny model and synthetic data: the marker state at the last layer is the
method's item embedding, the user rows rank as the method does, the report lists every row against the baselines, and
an impossible held-out share is one clean error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules import RecDataModule
from lightning_modules.policy_module import PolicyModule
from minirec.evaluation import candidate_counts, random_expectation
from minirec.io import ConfigError
from minirec.policy import PolicyConfig
from minirec.processing import ProcessingConfig
from minirec.recpo import RewardConfig

DATA = {"processing": {"dataset": "synthetic", "synthetic_users": 80, "synthetic_items": 24},
        "max_val_samples": 8, "max_test_samples": 16, "tokenizer": "tiny-random-qwen2"}


@pytest.fixture(scope="module")
def bench(import_benchmark):
    return import_benchmark("embedding_probe")


def data_args(folder: Path) -> list[str]:
    """Command-line arguments of the `DATA` settings, cache under `folder`."""
    proc = [f"--data.init_args.processing.{k}={v}" for k, v in DATA["processing"].items()]
    rest = [f"--data.init_args.{k}={v}" for k, v in DATA.items() if k != "processing"]
    return ["--data.class_path=datamodules.RecDataModule", f"--data.init_args.cache_dir={folder / 'cache'}", *proc,
            *rest]


def datamodule(folder: Path) -> RecDataModule:
    """The `DATA` datamodule, set up with its cache in `folder`."""
    dm = RecDataModule(cache_dir=str(folder), **{**DATA, "processing": ProcessingConfig(**DATA["processing"])})
    dm.prepare_data()
    dm.setup()
    return dm


def test_marker_state_is_the_method_item_embedding(bench, tmp_path) -> None:
    dm = datamodule(tmp_path)
    module = PolicyModule(PolicyConfig(pretrained="tiny-random-qwen2"), RewardConfig(), 3)
    items = bench.item_states(module, dm, [-1, 1])
    assert list(items) == ["marker L2", "mean L2", "marker L1", "mean L1"]
    ids, mask = dm.item_prompt_batch(range(1, dm.num_items + 1))
    with torch.no_grad():
        expected = module.policy.encode(ids, mask).float()
    assert items["marker L2"].shape == (dm.num_items + 1, expected.shape[1])
    assert not items["marker L2"][0].any()  # row 0 is padding
    torch.testing.assert_close(items["marker L2"][1:], expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(items["mean L2"][1:], expected, atol=1e-2)  # pooling changes the embedding


def test_report_lists_every_row_against_baselines(bench, tmp_path) -> None:
    out = tmp_path / "out"
    args = data_args(tmp_path) + ["--policy.pretrained", "tiny-random-qwen2", "--eval_max_new_tokens", "3",
                                  "--data.init_args.max_predict_samples", "24", "--linear_map", "true",
                                  "--linear_map_batch_size", "4", "--linear_map_steps", "12",
                                  "--linear_map_heldout", "0.25",
                                  "--out", str(out)]
    assert bench.main(args) == 0
    report = (out / "embedding_probe.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    lines = report.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("| method"))):]
    table = table[: next(i for i, line in enumerate(table) if not line.startswith("|"))]
    rows = [line.split(" | ")[0][2:] for line in table[2:]]  # the results table, in its order
    assert rows[:9] == ["user: marker L2", "user: mean L2", "user: marker L1", "user: mean L1",
                        "user: marker L2, common direction", "user: marker L2, centred",
                        "user: marker L2 vs items: mean L2", "user: marker L2 vs items: mean L2, both centred",
                        "user: marker L2, linear map"]
    assert "Linear map: fitted on 18 training samples (6 held out), 12 Adam steps of 4 samples" in report
    assert "| sample visits | validation | held-out training samples | test |" in report
    assert "| 48 | " in report  # the last step: 12 steps x 4 samples
    methods = 9 + 8 + 2  # users, items (2 layers x 2 poolings x raw / centred), popularity and random
    assert rows[methods - 2: methods] == ["popularity", "random"]
    assert rows[methods:] == [f"user: marker L2-{row}" for row in rows[1:methods]]  # paired with the method's row
    assert set(rows) == set(metrics["summary"])
    assert metrics["test_samples"] == 16
    for row in rows[:methods]:
        assert all(0.0 <= v <= 1.0 for v in metrics["summary"][row].values()), row
    for row in rows[1:methods]:
        assert metrics["summary"][f"user: marker L2-{row}"]["ndcg@10"] == pytest.approx(
            metrics["summary"]["user: marker L2"]["ndcg@10"] - metrics["summary"][row]["ndcg@10"], abs=1e-6)
    # the random row is the expectation over the same samples' candidates
    dm = datamodule(tmp_path / "cache")
    rows_test = dm.rows["test"].select(dm.split_order["test"])
    history = torch.nn.utils.rnn.pad_sequence([torch.tensor(h) for h in rows_test["history"]], batch_first=True)
    target = torch.tensor(rows_test["target"])
    expected = random_expectation(candidate_counts(history, target, dm.num_items), (10, 50)).mean(0)
    assert metrics["summary"]["random"]["ndcg@10"] == pytest.approx(float(expected[0]), abs=1e-6)
    # centring removes the items' common direction: mean item-item cosine near 0, far below the raw one
    cos = metrics["item_item_cosine"]
    assert abs(cos["items: marker L2, centred"]) < 0.1 < cos["items: marker L2"]


def test_linear_map_recovers_a_planted_map_and_keeps_its_best_epoch(bench) -> None:
    """Users that are their targets' item embeddings through an unknown rotation rank at chance as they are, and the
    fitted affine map undoes the rotation; the map kept is the one of the best validation epoch."""
    gen = torch.Generator().manual_seed(0)
    items = torch.randn(41, 16, generator=gen)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]

    def users(n: int) -> tuple[torch.Tensor, ...]:
        target = torch.randint(1, 41, (n,), generator=gen)
        emb = items[target] @ rotation.T + 0.1 * torch.randn(n, 16, generator=gen)
        return emb, torch.zeros(n, 1, dtype=torch.long), target

    train, val = users(400), users(100)
    w, b, curve = bench.fit_linear_map(train, {"validation": val}, items, steps=200, lr=1e-2)
    ndcg = [c["validation"] for c in curve]
    assert ndcg[0] < 0.3 < 0.9 < max(ndcg), (ndcg[0], max(ndcg))
    ranks = bench.ranks_of(val[0] @ w + b, items, val[1], val[2])
    got = float(bench.per_sample_metrics(ranks, (10,))[:, 0].mean())
    assert got == pytest.approx(max(ndcg), abs=1e-6)
    # mini-batches: the same map is learnt from seeded batches, each step counting the samples it saw
    w, b, curve = bench.fit_linear_map(train, {"validation": val}, items, steps=400, batch_size=16, lr=1e-2)
    assert [c["visits"] for c in curve] == [16 * i for i in range(401)]
    assert max(c["validation"] for c in curve) > 0.9
    again = bench.fit_linear_map(train, {"validation": val}, items, steps=400, batch_size=16, lr=1e-2)[2]
    assert again == curve


def test_holding_out_every_training_sample_is_a_clean_error(bench, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"linear_map_heldout=1.0: must be at least 0 and below 1"):
        bench.main(data_args(tmp_path) + ["--linear_map", "true", "--linear_map_heldout", "1.0",
                                          "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
