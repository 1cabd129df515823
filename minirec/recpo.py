"""RecPO settings and the rollout scoring shared by training, scoring and evaluation (METHOD.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minirec.io import DataError
from minirec.rewards import mask_history, recpo_reward, score_items, target_rank


@dataclass(frozen=True)
class SamplingConfig:
    """How rollouts are sampled.

    Args:
        group_size: G, rollouts per prompt.
        temperature: sampling temperature.
        top_k: top-k filter (0 = off).
        top_p: nucleus filter (1.0 = off).
        max_new_tokens: longest reasoning, in tokens, before the marker is appended.
    """

    group_size: int = 4
    temperature: float = 1.5
    top_k: int = 200
    top_p: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise DataError(f"sampling.group_size must be ≥ 1, got {self.group_size}")
        if self.max_new_tokens < 1:
            raise DataError(f"sampling.max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise DataError(f"sampling.temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class RewardConfig:
    """How a user embedding is scored against the catalogue.

    Args:
        tau: cosine temperature τ (score = cos / τ).
        ndcg_k: K_r, NDCG cut-off inside the reward.
        softmax_weight: w, weight of softmax(s)[target] in the reward.
    """

    tau: float = 0.02
    ndcg_k: int = 1000
    softmax_weight: float = 0.05


def reseed(run_seed: int, *position: int) -> None:
    """Seed torch's generators (CPU and accelerators) from the run seed and a position in the run (a training step and
    rank, or a scoring batch's first sample id). Every random draw of that step or batch (sampling, dropout) is then a
    function of where it is in the run, not of what ran before it in this process: a run resumed from a checkpoint,
    or a scoring run resumed from its shards, draws exactly what an unbroken run draws."""
    seed = run_seed
    for key in position:
        seed = (seed * 1_000_003 + key + 1) % 2**63
    torch.manual_seed(seed)


def score_rollouts(
    user_emb: torch.Tensor, catalog: torch.Tensor, target: torch.Tensor, history: torch.Tensor, cfg: RewardConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [R] and 1-based target ranks [R] of user embeddings [R, H] against the catalogue [N+1, H].

    `target` [R] and `history` [R, L] are per row (repeat them G times for grouped rollouts); history is masked out.
    """
    scores = mask_history(score_items(user_emb.float(), catalog.float(), cfg.tau), history, target)
    return recpo_reward(scores, target, cfg.ndcg_k, cfg.softmax_weight), target_rank(scores, target)
