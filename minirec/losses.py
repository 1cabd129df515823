"""RecPO losses (METHOD.md §4): group advantages, relabel mask, clipped token policy loss, recommendation InfoNCE,
and the objective that combines them (`RecPOLoss`, settings in `LossConfig`).

Rollouts are laid out group-major: rows `[B x G]` are B prompts times G rollouts, rollouts of one prompt adjacent.
All arithmetic is float32 whatever the input dtype (bfloat16 works).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minirec.io import ConfigError, DataError

ADVANTAGE_MODES = ("gaussian", "leave_one_out")
AGG_MODES = ("token_mean", "seq_mean", "dr_grpo")
LOSS_IMPLS = ("intended", "reference")
REC_NEGATIVES = ("in_batch", "sampled")


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[B x G]` -> `[B, G]` float32; raises DataError if the length is not a multiple of group_size."""
    if group_size < 1 or x.dim() != 1 or x.numel() % group_size:
        raise DataError(f"group_size={group_size} must be >= 1 and divide the number of rollouts ({x.numel()})")
    return x.float().view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, mode: str = "gaussian", eps: float = 1e-8
) -> torch.Tensor:
    """Per-group advantages. rewards `[B x G]` -> `[B x G]` float32; G = 1 gives A = 1 in both modes.

    gaussian: (r - mean_G) / (std_G + eps) with the unbiased (Bessel, /(G - 1)) std, as torch.std in the published code.
    leave_one_out: r - mean of the other G - 1 rewards of the group (= G / (G - 1) * (r - mean_G)).
    """
    if mode not in ADVANTAGE_MODES:
        raise ConfigError(f"advantage mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    r = _groups(rewards, group_size)
    if group_size == 1:
        return torch.ones_like(r).view(-1)
    mean = r.mean(dim=1, keepdim=True)
    if mode == "gaussian":
        adv = (r - mean) / (r.std(dim=1, keepdim=True) + eps)
    else:
        adv = r - (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return adv.view(-1)


def relabel_mask(rewards: torch.Tensor, group_size: int, topk: int = 1) -> torch.Tensor:
    """Marks the top-`topk` rollouts of each group by reward (ties: lowest index first). `[B x G]` -> bool `[B x G]`."""
    if topk < 0:
        raise ConfigError(f"relabel_topk must be >= 0, got {topk}")
    r = _groups(rewards, group_size)
    order = torch.sort(r, dim=1, descending=True, stable=True).indices[:, : min(topk, group_size)]
    mask = torch.zeros_like(r, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask.view(-1)


def policy_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    agg: str = "token_mean",
    ref_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss on completion tokens.

    logprobs / old_logprobs / ref_logprobs `[R, T]`, advantages `[R]`, mask `[R, T]` (1 = completion token).
    Per token: -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A), rho = exp(logp - old_logp), plus
    kl_beta * (exp(ref - logp) - (ref - logp) - 1) (k3 estimator) when ref_logprobs is given. Aggregation `agg`:
    token_mean = sum / #tokens; seq_mean = mean over rows of each row's token mean; dr_grpo = sum / (R * max_len),
    max_len = T if None. With old_logprobs = logprobs.detach() (ppo_epochs = 1), rho = 1 and the gradient is -A dlogp.
    Returns (loss, stats) with detached stats: clip_frac (share of tokens where the clipped side is active),
    ratio_mean, kl (token means; kl is 0 without a reference).
    """
    if agg not in AGG_MODES:
        raise ConfigError(f"loss aggregation must be one of {AGG_MODES}, got {agg!r}")
    logp = logprobs.float()
    m = mask.float()
    adv = advantages.float()[:, None]
    ratio = torch.exp(logp - old_logprobs.float())
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp)
    if ref_logprobs is not None:
        delta = ref_logprobs.float() - logp
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_beta * kl

    n_tokens = m.sum().clamp(min=1.0)
    if agg == "token_mean":
        loss = (per_token * m).sum() / n_tokens
    elif agg == "seq_mean":
        loss = ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).mean()
    else:
        loss = (per_token * m).sum() / (logp.shape[0] * (max_len if max_len is not None else logp.shape[1]))

    with torch.no_grad():
        is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
        stats = {
            "clip_frac": (is_clipped.float() * m).sum() / n_tokens,
            "ratio_mean": (ratio * m).sum() / n_tokens,
            "kl": (kl * m).sum() / n_tokens,
        }
    return loss, stats


def dedupe_targets(target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique in-batch target items. target_ids `[R]` -> (unique ids `[M]` sorted, target_index `[R]` into them).

    Encode only the unique items and pass target_index to `rec_infonce_loss`, so a row's own target is never also
    one of its negatives.
    """
    unique, index = torch.unique(target_ids, sorted=True, return_inverse=True)
    return unique, index


def rec_infonce_ce(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    target_index: torch.Tensor,
    tau: float = 0.02,
    extra_negatives: torch.Tensor | None = None,
    item_ids: torch.Tensor | None = None,
    extra_ids: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row InfoNCE cross-entropy `[R]` of each user embedding against the in-batch target items (+ extra negatives).

    user_emb `[R, H]`; item_emb `[M, H]` the UNIQUE in-batch target items of this device (with grad); target_index `[R]`
    into item_emb; extra_negatives `[E, H]` (sampled catalogue items, with grad, or other devices' targets, gathered
    without; the loss keeps whatever gradient they carry). Logits are cos / tau over the M + E candidates. When
    item_ids `[M]` and extra_ids `[E]` are given, extra negatives that repeat an in-batch item or an earlier extra
    negative are dropped, so no item is a candidate twice. extra_mask `[R, E]` (True = not a candidate of that row)
    drops per-row extra negatives, e.g. the row's history items.
    """
    if tau <= 0:
        raise ConfigError(f"tau must be > 0, got {tau}")
    candidates = item_emb.float()
    drop = None
    if extra_negatives is not None:
        candidates = torch.cat([candidates, extra_negatives.float()], dim=0)
        if item_ids is not None and extra_ids is not None:
            in_batch = (extra_ids[:, None] == item_ids[None, :]).any(dim=1)
            seen_before = (extra_ids[:, None] == extra_ids[None, :]).tril(diagonal=-1).any(dim=1)
            drop = torch.cat([torch.zeros_like(item_ids, dtype=torch.bool), in_batch | seen_before])
    logits = F.normalize(user_emb.float(), dim=-1) @ F.normalize(candidates, dim=-1).T / tau
    if drop is not None:
        logits = logits.masked_fill(drop[None, :], float("-inf"))
    if extra_mask is not None:
        row_drop = torch.cat([extra_mask.new_zeros(extra_mask.shape[0], item_emb.shape[0]), extra_mask.bool()], dim=1)
        logits = logits.masked_fill(row_drop, float("-inf"))
    return F.cross_entropy(logits, target_index.long(), reduction="none")


def rec_infonce_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    target_index: torch.Tensor,
    weights: torch.Tensor,
    tau: float = 0.02,
    **negatives: torch.Tensor | None,
) -> torch.Tensor:
    """Weighted InfoNCE: sum_r w_r * CE_r / R over the rows' `rec_infonce_ce` (arguments there); weights `[R]`
    (A * relabel). The normaliser is the number of rows R, zero-weight rows included."""
    return weighted_rows(rec_infonce_ce(user_emb, item_emb, target_index, tau, **negatives), weights)


def weighted_rows(ce: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_r w_r * ce_r / R for per-row losses ce and weights `[R]`."""
    return (weights.float() * ce).sum() / ce.shape[0]


def loss_weights(
    advantages: torch.Tensor, relabel: torch.Tensor, group_size: int, loss_impl: str = "intended"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weights of the two loss terms. advantages, relabel `[B x G]` -> (token_adv, rec_weights) `[B x G]`.

    intended (default): token_adv = A, rec_weights = A * relabel.
    reference (only to reproduce published numbers): the published RecPO code multiplies a `[R, 1, 1]` advantage with
    `[R, T]` / `[R, 1]` tensors, broadcasting to `[R, R, T]` / `[R, R, 1]`. Its gradient equals giving EVERY row the
    mean over the rows passed in: token_adv = mean(A) for all rows (with gaussian or leave-one-out advantages each
    group sums to 0, so the token term cancels up to rounding) and rec_weights = mean(A * relabel) for all rows (the
    rec loss applies to every rollout with one shared weight). The published code takes these means over one
    optimisation mini-batch (the rec weight over the mini-batches of all devices, gathered), so pass rows accordingly.
    """
    if loss_impl not in LOSS_IMPLS:
        raise ConfigError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
    adv = _groups(advantages, group_size).view(-1)
    weighted = adv * relabel.float()
    if loss_impl == "intended":
        return adv, weighted
    return adv.mean().expand_as(adv).clone(), weighted.mean().expand_as(adv).clone()


@dataclass(frozen=True)
class LossConfig:
    """Settings of the RecPO objective (METHOD.md §4), shared by training and the LoRA-space scoring.

    Args:
        advantage: group advantages: `gaussian` or `leave_one_out`.
        relabel_topk: rollouts per group that receive the recommendation loss.
        eps_low: lower clip ε of the token ratio.
        eps_high: upper clip ε of the token ratio.
        loss_agg: token loss aggregation: `token_mean`, `seq_mean` or `dr_grpo`.
        kl_beta: weight of the KL to the frozen base model (0 = none, no reference forward).
        rec_loss_weight: weight of the recommendation loss in the total loss.
        rec_negatives: negatives of the recommendation loss: `in_batch` (the method's: the other in-batch targets, and
            other devices' targets) or `sampled` (the in-batch targets and `sampled_negatives` catalogue items drawn at
            random each step and encoded with the targets by the current model, with gradient, the row's history
            masked; for small batches, where in-batch negatives are too few to rank the catalogue).
        sampled_negatives: items drawn per step for `rec_negatives: sampled`.
        loss_impl: `intended` (per-row advantages) or `reference` (the published code's broadcast; for parity only).
    """

    advantage: str = "gaussian"
    relabel_topk: int = 1
    eps_low: float = 0.2
    eps_high: float = 0.28
    loss_agg: str = "token_mean"
    kl_beta: float = 0.0
    rec_loss_weight: float = 1.0
    rec_negatives: str = "in_batch"
    sampled_negatives: int = 64
    loss_impl: str = "intended"

    def __post_init__(self) -> None:
        checks = {"advantage": ADVANTAGE_MODES, "loss_agg": AGG_MODES, "loss_impl": LOSS_IMPLS,
                  "rec_negatives": REC_NEGATIVES}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.loss.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.sampled_negatives < 1:
            raise ConfigError(f"model.loss.sampled_negatives must be ≥ 1, got {self.sampled_negatives}")
        if self.relabel_topk < 0:
            raise ConfigError(f"model.loss.relabel_topk must be ≥ 0, got {self.relabel_topk}")


class RecPOLoss(nn.Module):
    """The RecPO objective of one rollout batch (B prompts × G rollouts, group-major rows R = B·G), computed per
    micro-batch of rows so that backward can run on each: the micro-batch losses add up to the batch loss.

    `weights(rewards)` turns the batch's rewards `[R]` into its advantages and the per-row weights of the two terms.
    `forward` gives one micro-batch's loss, `token_share · token_loss + rec_loss_weight · rec_share · rec_loss`, where
    token_loss is the clipped policy loss of its completion tokens (with the KL to the base model when
    `kl_beta > 0`), rec_loss the weighted InfoNCE of its user embeddings against the in-batch target items (plus any
    detached extra negatives), and the shares are its part of the batch (completion tokens for `token_mean`, rows
    otherwise; rows for the rec loss).

    Args:
        config: the objective's settings.
        group_size: G, rollouts per prompt.
        tau: cosine temperature of the recommendation loss.
    """

    def __init__(self, config: LossConfig, group_size: int, tau: float) -> None:
        super().__init__()
        self.config, self.group_size, self.tau = config, group_size, tau

    def weights(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rewards `[R]` -> (advantages A, token-loss advantages, rec-loss weights A·relabel), each `[R]` float32
        (`loss_impl: reference` replaces the last two by their batch means, see `loss_weights`)."""
        c = self.config
        adv = group_advantages(rewards, self.group_size, c.advantage)
        relabel = relabel_mask(rewards, self.group_size, c.relabel_topk)
        token_adv, rec_weights = loss_weights(adv, relabel, self.group_size, c.loss_impl)
        return adv, token_adv, rec_weights

    def token_loss(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   completion_mask: torch.Tensor, ref_logprobs: torch.Tensor | None = None,
                   max_len: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`policy_token_loss` with this objective's clip, aggregation and KL settings (shapes there)."""
        c = self.config
        return policy_token_loss(logprobs, old_logprobs, advantages, completion_mask, c.eps_low, c.eps_high,
                                 agg=c.loss_agg, ref_logprobs=ref_logprobs, kl_beta=c.kl_beta, max_len=max_len)

    def rec_ce(self, user_emb: torch.Tensor, item_emb: torch.Tensor, target_index: torch.Tensor,
               **negatives: torch.Tensor | None) -> torch.Tensor:
        """Per-row `rec_infonce_ce` `[r]` at this objective's temperature; `negatives`: its extra_negatives /
        item_ids / extra_ids / extra_mask (shapes there). The rec loss weights these rows (`weighted_rows`)."""
        return rec_infonce_ce(user_emb, item_emb, target_index, self.tau, **negatives)

    def forward(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        completion_mask: torch.Tensor,
        token_adv: torch.Tensor,
        user_emb: torch.Tensor,
        item_emb: torch.Tensor,
        target_index: torch.Tensor,
        rec_weights: torch.Tensor,
        batch_rows: int,
        batch_tokens: torch.Tensor,
        max_len: int,
        ref_logprobs: torch.Tensor | None = None,
        **negatives: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch of r rows and its detached stats.

        logprobs / old_logprobs / ref_logprobs / completion_mask `[r, T]`; token_adv, rec_weights, target_index `[r]`
        (from `weights`); user_emb `[r, H]` with grad; item_emb `[M, H]` the unique in-batch targets with grad;
        batch_rows R and batch_tokens (completion tokens of the whole batch) set the shares; max_len the batch's
        completion width (`dr_grpo`); `negatives` as in `rec_ce`. Stats: token_loss, rec_loss and rec_ce (the rec
        loss with every weight 1: the target's cross-entropy among the candidates; each times its share, so they add
        up over micro-batches), clip_frac, ratio_mean, kl.
        """
        rows = logprobs.shape[0]
        tok, stats = self.token_loss(logprobs, old_logprobs, token_adv, completion_mask, ref_logprobs, max_len)
        ce = self.rec_ce(user_emb, item_emb, target_index, **negatives)
        rec = weighted_rows(ce, rec_weights)
        token_share = completion_mask.sum() / batch_tokens if self.config.loss_agg == "token_mean" else rows / batch_rows
        rec_share = rows / batch_rows
        loss = tok * token_share + self.config.rec_loss_weight * rec * rec_share
        stats = {**stats, "token_loss": (tok * token_share).detach(), "rec_loss": (rec * rec_share).detach(),
                 "rec_ce": ce.detach().mean() * rec_share}  # how well each row's user embedding picks its target
        return loss, stats
