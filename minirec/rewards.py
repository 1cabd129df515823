"""Scoring against the full catalogue, history masking, the target's rank and the RecPO reward (METHOD.md §1, §4).

One ranking implementation shared by the training reward, the evaluation metric (`metrics.RankingMetrics`) and sample
scoring. Scores are computed in float32 whatever the embedding dtype (bfloat16 cosines collide too often to rank).

Ties: the rank is *pessimistic*, rank = #items whose score is >= the target's (the target included), i.e.
1 + #(strictly higher) + #(other items with an equal score). A model that scores everything alike (e.g. collapsed
embeddings) therefore gets the worst rank, never a free rank 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minirec.io import ConfigError, DataError


def score_items(user_emb: torch.Tensor, item_emb: torch.Tensor, tau: float = 0.02) -> torch.Tensor:
    """Cosine similarity over temperature, s(u, i) = cos(h_u, e_i) / tau, in float32.

    user_emb `[R, H]`, item_emb `[N + 1, H]` (row 0 is the padding item) -> scores `[R, N + 1]`.
    """
    if tau <= 0:
        raise ConfigError(f"tau must be > 0, got {tau}")
    u = F.normalize(user_emb.float(), dim=-1)
    e = F.normalize(item_emb.float(), dim=-1)
    return u @ e.T / tau


def mask_history(scores: torch.Tensor, history: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Set the padding item 0 and every history item to -inf (returns a new tensor).

    scores `[R, N + 1]`, history `[R, L]` item ids (0 = padding), target `[R]` or None -> `[R, N + 1]`.
    When `target` is given it is never masked, even if it is in the history (a repeat purchase stays rankable).
    """
    masked = torch.zeros_like(scores, dtype=torch.bool)
    masked.scatter_(1, history.long().to(scores.device), True)
    masked[:, 0] = True
    if target is not None:
        masked[torch.arange(scores.shape[0], device=scores.device), target.long().to(scores.device)] = False
    return scores.masked_fill(masked, float("-inf"))


def item_negatives(
    item_emb: torch.Tensor, item_ids: torch.Tensor, history: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Items as extra negatives of `rec_infonce_loss` for rows with `history` `[R, L]`: returns their embeddings
    `[E, H]`, ids `[E]` and the per-row mask `[R, E]` (True = a history item of that row, not a negative)."""
    width = int(max(item_ids.max(), history.max())) + 1
    blocked = mask_history(torch.zeros(history.shape[0], width, device=history.device), history).isinf()
    return item_emb, item_ids, blocked[:, item_ids.to(history.device)]


def catalog_negatives(catalog: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The catalogue `[N+1, H]` (row 0 = padding, dropped) as extra negatives: `item_negatives` of items 1..N."""
    return item_negatives(catalog[1:], torch.arange(1, catalog.shape[0], device=catalog.device), history)


def _target_scores(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The target's score per row: scores `[R, N + 1]`, target `[R]` in 1..N -> `[R]`. Bad ids raise DataError."""
    target = target.long().to(scores.device)
    if target.shape != scores.shape[:1]:
        raise DataError(f"target must have shape [{scores.shape[0]}], got {list(target.shape)}")
    if target.numel() and (target.min() < 1 or target.max() >= scores.shape[1]):
        raise DataError(f"target item ids must lie in 1..{scores.shape[1] - 1} (0 is padding)")
    return scores.gather(1, target[:, None]).squeeze(1)


def target_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based pessimistic rank of the target: #items with a score >= the target's (see module docstring).

    scores `[R, N + 1]` (history already masked), target `[R]` -> LongTensor `[R]`. No sort; one comparison pass.
    """
    return _rank(scores, _target_scores(scores, target))


def _rank(scores: torch.Tensor, s_t: torch.Tensor) -> torch.Tensor:
    """#items per row with a score >= the target's score s_t `[R]` -> LongTensor `[R]`."""
    return (scores >= s_t[:, None]).sum(dim=1)


def ndcg_at_rank(rank: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """NDCG with one relevant item: 1 / log2(rank + 1) if rank <= k else 0, in float32.

    rank `[R]` (1-based) and k broadcast together (e.g. rank `[R, 1]` with k `[K]` -> `[R, K]`).
    """
    rank = rank.float()
    return torch.where(rank <= k, 1.0 / torch.log2(rank + 1.0), torch.zeros_like(rank))


def recpo_reward(
    scores: torch.Tensor, target: torch.Tensor, ndcg_k: int = 1000, softmax_weight: float = 0.05
) -> torch.Tensor:
    """RecPO reward r = (1 - w) * NDCG@K(rank) + w * softmax(scores)[target], in float32.

    scores `[R, N + 1]` (history masked: -inf entries get probability 0), target `[R]` -> rewards `[R]`.
    """
    s_t = _target_scores(scores, target)
    ndcg = ndcg_at_rank(_rank(scores, s_t), ndcg_k)
    s_t = s_t.float()
    log_norm = torch.logsumexp(scores.float(), dim=1)
    prob = torch.where(torch.isfinite(s_t), torch.exp(s_t - log_norm), torch.zeros_like(s_t))
    return (1.0 - softmax_weight) * ndcg + softmax_weight * prob


def misses_top_k(rewards: torch.Tensor, ndcg_k: int, softmax_weight: float) -> torch.Tensor:
    """Whether each `recpo_reward` comes from a rank beyond `ndcg_k` (no NDCG part): rewards `[...]` -> bool `[...]`.

    A rank within the top k earns at least (1 - w) / log2(k + 1), a rank beyond it at most w (the softmax share), so
    the split is exact while w < (1 - w) / log2(k + 1) (w = 0.05: any k below 2^19); otherwise a ConfigError.
    """
    floor = (1.0 - softmax_weight) * float(ndcg_at_rank(torch.tensor(ndcg_k), ndcg_k))  # rank k, softmax share 0
    if softmax_weight >= floor:
        raise ConfigError(f"reward: softmax_weight {softmax_weight} ≥ the smallest NDCG@{ndcg_k} share {floor:.4f}: "
                          "rewards do not tell whether a rank reached the top ndcg_k")
    return rewards < (softmax_weight + floor) / 2
