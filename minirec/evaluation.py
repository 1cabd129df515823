"""Test-time comparison against baselines, with bootstrap intervals (METHOD.md §4, "Evaluation").

Every test report reads the trained policy against three references on the same samples and metric:
- `zero_shot`: the untrained policy (the base model, adapter off) with the same prompts and greedy reasoning;
- `popularity`: items ranked by their count as training-split targets, history masked (the ranking of `rewards.py`,
  ties pessimistic like every other rank);
- `random`: the expected value of a uniformly random ranking of the sample's candidates (catalogue minus history).
Each mean comes with a 95 % percentile bootstrap interval over test samples (one set of resamples for every method and
metric, so the intervals of two methods are comparable), and so does each paired difference `policy-<baseline>`: the
per-sample difference resampled with the same indices, whose interval excluding 0 says the policy differs from that
baseline beyond resampling noise (a sharper test than comparing two overlapping intervals).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from minirec.rewards import mask_history, ndcg_at_rank, target_rank

METHODS = ("policy", "zero_shot", "popularity", "random")


def metric_names(ks: Sequence[int]) -> list[str]:
    """Column names in report order: ndcg@K for every K, then hr@K."""
    return [f"ndcg@{k}" for k in ks] + [f"hr@{k}" for k in ks]


def per_sample_metrics(rank: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """1-based ranks `[S]` -> per-sample NDCG@K and HR@K `[S, 2·len(ks)]` (float32, columns as `metric_names`)."""
    rank = rank.reshape(-1, 1).to(torch.float32)
    k = torch.tensor(list(ks), dtype=torch.float32, device=rank.device)
    return torch.cat([ndcg_at_rank(rank, k), (rank <= k).float()], dim=1)


def random_expectation(candidates: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Expected NDCG@K and HR@K `[S, 2·len(ks)]` of a uniformly random ranking of `candidates` `[S]` items per sample.

    With n candidates the target's rank is uniform on 1..n: E[HR@K] = min(K, n) / n and
    E[NDCG@K] = (1/n) Σ_{r ≤ min(K, n)} 1 / log2(r + 1).
    """
    n = candidates.reshape(-1, 1).to(torch.float64).clamp(min=1)
    k_max = max(ks)
    discounts = torch.cumsum(1.0 / torch.log2(torch.arange(2, k_max + 2, dtype=torch.float64, device=n.device)), 0)  # [K_max]
    cols_ndcg, cols_hr = [], []
    for k in ks:
        top = torch.minimum(n, torch.tensor(float(k), dtype=torch.float64))  # [S, 1]
        cols_ndcg.append(discounts[top.long() - 1] / n)
        cols_hr.append(top / n)
    return torch.cat(cols_ndcg + cols_hr, dim=1).float()


def candidate_counts(history: torch.Tensor, target: torch.Tensor, num_items: int) -> torch.Tensor:
    """Items a sample is ranked against `[R]`: the catalogue minus its distinct history items (the target stays).

    history `[R, L]` item ids (0 = padding), target `[R]`.
    """
    open_ = mask_history(torch.zeros(history.shape[0], num_items + 1, device=history.device), history, target)
    return torch.isfinite(open_).sum(dim=1)


def popularity_ranks(counts: torch.Tensor, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Ranks `[R]` of the popularity baseline: items scored by training-split counts `[N+1]`, history `[R, L]`
    masked."""
    scores = mask_history(counts.float().to(history.device).expand(len(target), -1), history, target)
    return target_rank(scores, target)


def paired_differences(values: Mapping[str, torch.Tensor], of: str = "policy") -> dict[str, torch.Tensor]:
    """Per-sample differences `<of>-<method>` `[S, M]` of method `of` against every other method of `values`
    {method: `[S, M]`}."""
    return {f"{of}-{m}": values[of] - v for m, v in values.items() if m != of}


def bootstrap_intervals(
    values: Mapping[str, torch.Tensor], n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Mean and percentile bootstrap interval per method: values {method: `[S, M]`} -> {method: (mean, lo, hi) `[M]`}.

    Every method is resampled with the same sample indices (the samples are shared), seeded, so the result is
    deterministic. S = 0 gives NaN.
    """
    sizes = {v.shape[0] for v in values.values()}
    if len(sizes) != 1:
        raise ValueError(f"every method needs the same samples, got sizes {sorted(sizes)}")
    s = sizes.pop()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, max(s, 1), (n_resamples, s), generator=gen)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    out = {}
    for name, v in values.items():
        v = v.detach().cpu().to(torch.float64)
        if s == 0:
            nan = torch.full((v.shape[1],), float("nan"), dtype=torch.float64)
            out[name] = (nan, nan, nan)
            continue
        means = v[idx].mean(dim=1)  # [n_resamples, M]
        lo, hi = torch.quantile(means, q, dim=0)
        out[name] = (v.mean(dim=0), lo, hi)
    return out


def comparison_table(
    intervals: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], names: Sequence[str], samples: int
) -> str:
    """Markdown table: one row per method, each cell `mean [lo, hi]`."""
    lines = [f"Test samples: {samples}; 95 % bootstrap intervals over samples.", "",
             "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method, (mean, lo, hi) in intervals.items():
        cells = [f"{m:.4f} [{a:.4f}, {b:.4f}]" for m, a, b in zip(mean.tolist(), lo.tolist(), hi.tolist())]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
