"""RankingMetrics: known ranks -> known NDCG/HR, merging states across simulated devices, dtype safety."""

from __future__ import annotations

import math

import pytest
import torch

from minirec.io import DataError
from minirec.metrics import RankingMetrics
from minirec.rewards import mask_history, target_rank

RANKS = torch.tensor([1, 3, 7, 60, 12])
# NDCG terms 1/log2(rank + 1): rank 1 -> 1, rank 3 -> 1/2, rank 7 -> 1/3, rank 12 -> 1/log2(13), rank 60 -> 1/log2(61)
EXPECTED = {
    "ndcg@5": (1 + 0.5) / 5,  # 0.3
    "ndcg@10": (1 + 0.5 + 1 / 3) / 5,  # 0.36667
    "ndcg@20": (1 + 0.5 + 1 / 3 + 1 / math.log2(13)) / 5,
    "ndcg@50": (1 + 0.5 + 1 / 3 + 1 / math.log2(13)) / 5,  # rank 60 > 50 still misses
    "hr@5": 2 / 5,
    "hr@10": 3 / 5,
    "hr@20": 4 / 5,
    "hr@50": 4 / 5,
}


def _assert_expected(out: dict[str, torch.Tensor]) -> None:
    assert set(out) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert out[key].item() == pytest.approx(value, rel=1e-6), key


def test_known_ranks_give_known_ndcg_and_hr():
    metric = RankingMetrics()
    metric.update(RANKS[:2])
    metric.update(RANKS[2:])
    _assert_expected(metric.compute())
    metric.reset()
    metric.update(torch.tensor([1]))
    assert metric.compute()["ndcg@5"].item() == 1.0 and metric.compute()["hr@50"].item() == 1.0


def test_merging_two_devices_equals_one_metric_over_the_union():
    device0, device1 = RankingMetrics(), RankingMetrics()
    device0.update(RANKS[:3])
    device1.update(RANKS[3:])
    device0.merge_state(device1)
    _assert_expected(device0.compute())
    # merging plain state dicts (as gathered with dist_reduce_fx="sum")
    a, b = RankingMetrics(), RankingMetrics()
    a.update(RANKS[:1])
    b.update(RANKS[1:])
    a.merge_state({"ndcg_sum": b.ndcg_sum, "hit_sum": b.hit_sum, "count": b.count})
    _assert_expected(a.compute())


def test_metric_from_scores_uses_the_shared_ranking():
    # scores of 2 users over padding + 4 items; history masked; target ranks 1 and 3 (tie counted pessimistically)
    scores = torch.tensor([[9.0, 0.1, 0.9, 0.5, 0.2], [9.0, 0.4, 0.4, 0.8, 0.1]])
    target = torch.tensor([2, 1])
    rank = target_rank(mask_history(scores, torch.tensor([[0], [4]]), target), target)
    assert rank.tolist() == [1, 3]  # row 1: item 3 higher (0.8), item 2 tied (0.4)
    metric = RankingMetrics(ks=(1, 2, 3))
    metric.update(rank)
    out = metric.compute()
    assert list(out) == ["ndcg@1", "ndcg@2", "ndcg@3", "hr@1", "hr@2", "hr@3"]
    assert out["hr@1"].item() == 0.5 and out["hr@2"].item() == 0.5 and out["hr@3"].item() == 1.0
    assert out["ndcg@3"].item() == pytest.approx((1 + 0.5) / 2)  # 1/log2(2) = 1, 1/log2(4) = 0.5


def test_states_keep_their_dtype_when_the_module_is_cast():
    metric = RankingMetrics().to(torch.bfloat16)  # Lightning's bf16-true casts every submodule
    assert metric.ndcg_sum.dtype == torch.float32 and metric.hit_sum.dtype == torch.long
    metric.update(RANKS)
    _assert_expected(metric.compute())


def test_bad_cutoffs_rejected():
    with pytest.raises(DataError, match="ks"):
        RankingMetrics(ks=(0, 5))
    with pytest.raises(DataError, match="ks"):
        RankingMetrics(ks=())
