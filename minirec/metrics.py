"""The one ranking metric: NDCG@K and HR@K (= Recall@K with one target) from the target's rank (METHOD.md §4)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torchmetrics import Metric

from minirec.io import DataError
from minirec.rewards import ndcg_at_rank


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
        rank = rank.reshape(-1, 1).to(self.ndcg_sum.device)
        ks = torch.tensor(self.ks, device=rank.device)
        # out-of-place: states reset under Lightning's inference mode must not be updated in place outside it
        self.ndcg_sum = self.ndcg_sum + ndcg_at_rank(rank, ks).sum(dim=0)
        self.hit_sum = self.hit_sum + (rank <= ks).sum(dim=0)
        self.count = self.count + rank.shape[0]

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
