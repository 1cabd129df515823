"""Baselines and intervals of the test report: random expectation, candidate counts, bootstrap, per-sample metrics."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from minirec.evaluation import (
    bootstrap_intervals,
    candidate_counts,
    comparison_table,
    metric_names,
    paired_differences,
    per_sample_metrics,
    random_expectation,
)
from minirec.metrics import RankingMetrics


def test_random_expectation_equals_the_average_over_every_rank() -> None:
    ks = (1, 3, 10)
    for n in (1, 2, 7, 40):
        exact = per_sample_metrics(torch.arange(1, n + 1), ks).double().mean(0)  # the target at each rank equally often
        assert torch.allclose(random_expectation(torch.tensor([n]), ks)[0].double(), exact, atol=1e-6), n
    assert random_expectation(torch.tensor([560]), (10,))[0, 1].item() == pytest.approx(10 / 560)


def test_candidate_counts_drop_distinct_history_but_keep_the_target() -> None:
    history = torch.tensor([[0, 0, 3], [2, 2, 5], [4, 1, 4]])
    target = torch.tensor([7, 9, 4])  # the last target is also in its history: a repeat stays rankable
    assert candidate_counts(history, target, num_items=10).tolist() == [9, 8, 9]


def test_per_sample_metrics_average_to_the_ranking_metric() -> None:
    ranks = torch.tensor([1, 3, 7, 60, 12, 2])
    metric = RankingMetrics((5, 10, 50))
    metric.update(ranks)
    means = per_sample_metrics(ranks, (5, 10, 50)).mean(0)
    expected = metric.compute()
    for i, name in enumerate(metric_names((5, 10, 50))):
        assert means[i].item() == pytest.approx(expected[name].item())


def test_bootstrap_is_seeded_shared_across_methods_and_shrinks_with_samples() -> None:
    gen = torch.Generator().manual_seed(1)
    a = (torch.rand(400, 2, generator=gen) < 0.3).float()
    out1 = bootstrap_intervals({"x": a, "y": a.clone()}, seed=3)
    out2 = bootstrap_intervals({"x": a, "y": a.clone()}, seed=3)
    for (m1, lo1, hi1), (m2, lo2, hi2) in itertools.product(out1.values(), out2.values()):
        assert torch.equal(lo1, lo2) and torch.equal(hi1, hi2)  # same data -> same interval, run to run and per method
    mean, lo, hi = out1["x"]
    assert torch.all(lo <= mean) and torch.all(mean <= hi)
    half = (hi - lo) / 2
    assert half[0].item() == pytest.approx(1.96 * math.sqrt(0.3 * 0.7 / 400), rel=0.25)  # ≈ normal approximation
    _, lo_s, hi_s = bootstrap_intervals({"x": a[:40]}, seed=3)["x"]
    assert torch.all(hi_s - lo_s > hi - lo)
    with pytest.raises(ValueError, match="same samples"):
        bootstrap_intervals({"x": a, "y": a[:10]})


def test_paired_difference_detects_a_consistent_gain_that_overlapping_intervals_hide() -> None:
    """The policy hits every sample the baseline hits plus 12 more of 200: the two intervals overlap, the paired
    difference's interval excludes 0; a policy equal to the baseline gets a difference of exactly 0."""
    gen = torch.Generator().manual_seed(0)
    base = (torch.rand(200, 1, generator=gen) < 0.1).float()
    policy = base.clone()
    policy[(base[:, 0] == 0).nonzero()[:12, 0]] = 1.0
    out = bootstrap_intervals({"policy": policy, "zero_shot": base,
                               **paired_differences({"policy": policy, "zero_shot": base})})
    (_, lo_p, _), (_, _, hi_b) = out["policy"], out["zero_shot"]
    assert lo_p.item() < hi_b.item()  # separate intervals overlap
    mean, lo, hi = out["policy-zero_shot"]
    assert mean.item() == pytest.approx(12 / 200) and lo.item() > 0
    same = paired_differences({"policy": base, "popularity": base})["policy-popularity"]
    assert (same == 0).all()


def test_comparison_table_has_a_cell_per_method_and_metric() -> None:
    vals = {"policy": torch.ones(5, 2), "random": torch.zeros(5, 2)}
    table = comparison_table(bootstrap_intervals(vals), ["ndcg@10", "hr@10"], 5)
    assert "| policy | 1.0000 [1.0000, 1.0000] | 1.0000 [1.0000, 1.0000] |" in table
    assert "| random | 0.0000 [0.0000, 0.0000] |" in table and "Test samples: 5" in table
