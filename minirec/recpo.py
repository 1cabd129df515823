"""RecPO rollouts (sample G completions per prompt, join, forward) and their scoring, shared by training, scoring
and evaluation (METHOD.md §4); sampling and reward settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minirec.io import ConfigError
from minirec.policy import Policy, eval_mode
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
            raise ConfigError(f"sampling.group_size must be ≥ 1, got {self.group_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"sampling.temperature must be > 0, got {self.temperature}")


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


@dataclass(frozen=True)
class Rollouts:
    """B prompts × G sampled completions, joined to their prompts, group-major (the G rows of a prompt adjacent).

    seq / mask `[R, S]` left-padded joined sequences (R = B·G); completion `[R, S]` bool, True on generated tokens
    (the log-prob targets); lengths `[R]` generated tokens per row; target `[R]` and history `[R, L]` of each row's
    prompt.
    """

    seq: torch.Tensor
    mask: torch.Tensor
    completion: torch.Tensor
    lengths: torch.Tensor
    target: torch.Tensor
    history: torch.Tensor

    @property
    def rows(self) -> int:
        return self.seq.shape[0]


def sample_rollouts(policy: Policy, batch: dict[str, torch.Tensor], sampling: SamplingConfig,
                    num_samples: int | None = None) -> Rollouts:
    """Sample `num_samples` (default G = sampling.group_size) completions per prompt of `batch` (`prompt_ids` /
    `prompt_mask` `[B, P]`, `target` `[B]`, `history` `[B, L]`) and join them to their prompts. The sampling draws
    from torch's global generator (seed it with `reseed`)."""
    n = num_samples or sampling.group_size
    comp, comp_mask = policy.generate(
        batch["prompt_ids"], batch["prompt_mask"], num_samples=n, do_sample=True, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
    )
    rep = lambda x: x.repeat_interleave(n, dim=0)  # noqa: E731  [B, ...] -> [B x G, ...]
    seq, mask, completion = policy.join(rep(batch["prompt_ids"]), rep(batch["prompt_mask"]), comp, comp_mask)
    return Rollouts(seq, mask, completion, comp_mask.sum(1), rep(batch["target"]), rep(batch["history"]))


@torch.no_grad()
def rollout_forward(policy: Policy, rollouts: Rollouts, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad forward of the rollouts in eval mode (no dropout), `micro_batch_size` rows at a time: token log-probs
    `[R, S]` (0 off the completion) and user embeddings `[R, H]` float32."""
    logprobs, embeddings = [], []
    with eval_mode(policy):
        for start in range(0, rollouts.rows, micro_batch_size):
            rows = slice(start, start + micro_batch_size)
            lp, h = policy.forward_sequences(rollouts.seq[rows], rollouts.mask[rows], rollouts.completion[rows])
            logprobs.append(lp)
            embeddings.append(h.float())
    return torch.cat(logprobs), torch.cat(embeddings)
