"""The one ranking metric: NDCG@K and HR@K (= Recall@K with one target) from the target's rank (METHOD.md §4)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torchmetrics import Metric

from minirec.evaluation import per_sample_metrics
from minirec.io import DataError


class RankingMetrics(Metric):
    """NDCG@K and HR@K over full-catalogue ranks, as sum states (dist_reduce_fx="sum") plus a sample count.

    `update(rank)` takes 1-based ranks `[R]` from `rewards.target_rank` (history masked); score matrices are never
    stored, so the metric is O(len(ks)) memory and merges across devices by summing. `compute()` returns
    {"ndcg@K": tensor, "hr@K": tensor, ...} in the order of `ks`.

    Args:
        ks: cut-offs K, positive integers.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (5, 10, 20, 50), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not ks or any(int(k) != k or k < 1 for k in ks):
            raise DataError(f"ks must be a non-empty list of positive integers, got {list(ks)}")
        self.ks = tuple(int(k) for k in ks)
        self.add_state("ndcg_sum", torch.zeros(len(self.ks), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("hit_sum", torch.zeros(len(self.ks), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, rank: torch.Tensor) -> None:
        """Add a batch of 1-based target ranks `[R]`."""
        values = per_sample_metrics(rank.to(self.ndcg_sum.device), self.ks).sum(dim=0)  # [2K]: NDCG sums, hits
        n = len(self.ks)
        # out-of-place: states reset under Lightning's inference mode must not be updated in place outside it
        self.ndcg_sum = self.ndcg_sum + values[:n]
        self.hit_sum = self.hit_sum + values[n:].round().long()
        self.count = self.count + rank.numel()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> RankingMetrics:
        """Keep the NDCG sum float32 when the module is cast (Lightning's bf16-true calls `.to(torch.bfloat16)`)."""
        this = super()._apply(fn, *args, **kwargs)
        this.ndcg_sum = this.ndcg_sum.float()
        this._defaults["ndcg_sum"] = this._defaults["ndcg_sum"].float()
        return this

    def compute(self) -> dict[str, torch.Tensor]:
        """Means over all updated samples (NaN before any update)."""
        ndcg = self.ndcg_sum / self.count
        hit = self.hit_sum.float() / self.count
        out = {f"ndcg@{k}": ndcg[i] for i, k in enumerate(self.ks)}
        out.update({f"hr@{k}": hit[i] for i, k in enumerate(self.ks)})
        return out


class TestRecords(Metric):
    """Per-sample test records gathered over devices (cat states): ranks of several methods and candidate counts.

    `update(ranks [B, M], candidates [B])`; `compute()` -> (ranks `[S, M]`, candidates `[S]`), empty when nothing was
    updated. M is fixed by the caller (e.g. policy, zero-shot, popularity).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("ranks", default=[], dist_reduce_fx="cat")
        self.add_state("candidates", default=[], dist_reduce_fx="cat")

    def update(self, ranks: torch.Tensor, candidates: torch.Tensor) -> None:
        self.ranks.append(ranks.long())
        self.candidates.append(candidates.long())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        cat = lambda x: x if isinstance(x, torch.Tensor) else torch.cat(x) if x else torch.zeros(0, dtype=torch.long)  # noqa: E731
        return cat(self.ranks), cat(self.candidates)
