"""RecPO rollouts (G sampled completions per prompt, each prompt run once for its group) and their scoring, shared
by training, scoring and evaluation (METHOD.md §4); sampling and reward settings."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from minirec.io import ConfigError
from minirec.policy import Policy, eval_mode
from minirec.rewards import mask_history, recpo_reward, score_items, target_rank

if TYPE_CHECKING:
    from minirec.vllm_engine import VLLMEngine


@dataclass(frozen=True)
class SamplingConfig:
    """How rollouts are sampled.

    Args:
        group_size: G, rollouts per prompt.
        temperature: sampling temperature.
        top_k: top-k filter (0 = off).
        top_p: nucleus filter (1.0 = off).
        max_new_tokens: longest reasoning, in tokens, before the marker is appended.
        engine: what samples the rollouts: "hf" (the policy itself, each prompt prefilled once for its G samples) or
            "vllm" (a vLLM engine beside training following the policy's LoRA weights; `minirec.vllm_engine`).
        vllm_kv_cache_gb: memory of the vLLM engine's KV cache (CPU RAM or GPU memory).
        vllm_max_model_len: longest prompt + reasoning the vLLM engine accepts, in tokens.
        vllm_weight_sync: how the policy's LoRA weights reach the vLLM engine: "lora" (a LoRA adapter, applied
            unmerged like the HF policy does, at the cost of the engine's LoRA path) or "merged" (base + LoRA update
            merged in the base weights' dtype and loaded into the engine, which then runs at base-model speed; in
            bfloat16 the merge rounds small updates, so rollouts come from a close approximation of the policy).
    """

    group_size: int = 4
    temperature: float = 1.5
    top_k: int = 200
    top_p: float = 1.0
    max_new_tokens: int = 256
    engine: str = "hf"
    vllm_kv_cache_gb: float = 2.0
    vllm_max_model_len: int = 4096
    vllm_weight_sync: str = "lora"

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ConfigError(f"sampling.group_size must be ≥ 1, got {self.group_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"sampling.temperature must be > 0, got {self.temperature}")
        if self.engine not in ("hf", "vllm"):
            raise ConfigError(f"sampling.engine must be 'hf' or 'vllm', got {self.engine!r}")
        if self.vllm_weight_sync not in ("lora", "merged"):
            raise ConfigError(f"sampling.vllm_weight_sync must be 'lora' or 'merged', got {self.vllm_weight_sync!r}")
        if self.vllm_kv_cache_gb <= 0 or self.vllm_max_model_len <= self.max_new_tokens:
            raise ConfigError(f"sampling.vllm_kv_cache_gb must be > 0 and sampling.vllm_max_model_len > "
                              f"max_new_tokens, got {self.vllm_kv_cache_gb} and {self.vllm_max_model_len}")


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
    """B prompts × n sampled completions each, group-major (row b·n + j is completion j of prompt b).

    prompt_ids / prompt_mask `[B, P]` left-padded prompts; completion_ids / completion_mask `[R, T]` right-padded
    completions (R = B·n), each ending with the marker (the log-prob targets); target `[R]` and history `[R, L]` of
    each row's prompt.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    target: torch.Tensor
    history: torch.Tensor

    @property
    def rows(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def per_prompt(self) -> int:
        return self.rows // self.prompt_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Completion tokens per row `[R]`."""
        return self.completion_mask.sum(1)

    def prompt_slices(self, max_rows: int) -> Iterator[tuple[slice, Rollouts]]:
        """Consecutive whole groups, at most `max_rows` rows (at least one prompt): (row slice, their rollouts)."""
        n = self.per_prompt
        step = max(1, max_rows // n)
        for start in range(0, self.prompt_ids.shape[0], step):
            p, r = slice(start, start + step), slice(start * n, (start + step) * n)
            yield r, Rollouts(self.prompt_ids[p], self.prompt_mask[p], self.completion_ids[r],
                              self.completion_mask[r], self.target[r], self.history[r])

    def forward(self, policy: Policy) -> tuple[torch.Tensor, torch.Tensor]:
        """Token log-probs `[R, T]` and user embeddings `[R, H]` of these rollouts (each prompt run once)."""
        return policy.forward_groups(self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask)


def sample_rollouts(policy: Policy, batch: dict[str, torch.Tensor], sampling: SamplingConfig,
                    num_samples: int | None = None, engine: VLLMEngine | None = None) -> Rollouts:
    """Sample `num_samples` (default G = sampling.group_size) completions per prompt of `batch` (`prompt_ids` /
    `prompt_mask` `[B, P]`, `target` `[B]`, `history` `[B, L]`) with the policy, or with `engine` when given (which
    first takes the policy's current LoRA weights). The sampling draws from torch's global generator (seed it with
    `reseed`)."""
    n = num_samples or sampling.group_size
    args = dict(num_samples=n, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                max_new_tokens=sampling.max_new_tokens)
    if engine is None:
        comp, comp_mask = policy.generate(batch["prompt_ids"], batch["prompt_mask"], do_sample=True, **args)
    else:
        generated = engine.generate(policy, batch["prompt_ids"], batch["prompt_mask"], **args)
        comp, comp_mask = policy.completions(generated, batch["prompt_ids"].device)
    rep = lambda x: x.repeat_interleave(n, dim=0)  # noqa: E731  [B, ...] -> [B x G, ...]
    return Rollouts(batch["prompt_ids"], batch["prompt_mask"], comp, comp_mask, rep(batch["target"]),
                    rep(batch["history"]))


@torch.no_grad()
def rollout_forward(policy: Policy, rollouts: Rollouts, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad forward of the rollouts in eval mode (no dropout), whole groups of at most `micro_batch_size` rows at
    a time: token log-probs `[R, T]` (0 on padding) and user embeddings `[R, H]` float32."""
    logprobs, embeddings = [], []
    with eval_mode(policy):
        for _, part in rollouts.prompt_slices(micro_batch_size):
            lp, h = part.forward(policy)
            logprobs.append(lp)
            embeddings.append(h.float())
    return torch.cat(logprobs), torch.cat(embeddings)
