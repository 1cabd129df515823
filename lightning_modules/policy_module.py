"""PolicyModule: what GRPOModule and ScoringModule share: the policy, the catalogue encoding and greedy user
embeddings."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict
from typing import TYPE_CHECKING

import lightning as L
import torch

from minirec.io import ConfigError, allow_in_checkpoints
from minirec.policy import Policy, PolicyConfig, eval_mode
from minirec.recpo import RewardConfig, SamplingConfig

if TYPE_CHECKING:
    from minirec.vllm_engine import VLLMEngine

allow_in_checkpoints(PolicyConfig, SamplingConfig, RewardConfig)

_BASE_CATALOG: dict[str, torch.Tensor] = {}  # this process's base-model catalogue [N+1, H] (CPU), by `_base_key`


class PolicyModule(L.LightningModule):
    """A LightningModule around a `Policy` (causal LM + LoRA): the item catalogue encoded in eval mode and sharded over
    devices, and greedy reasoning then encoding for user embeddings. `run_seed` is the seed_everything seed at
    construction; subclasses reseed from it per step or batch (`minirec.recpo.reseed`).

    Args:
        policy: model, LoRA and answer-marker settings.
        reward: score temperature and reward mix.
        eval_max_new_tokens: longest greedy reasoning of user embeddings.
    """

    def __init__(self, policy: PolicyConfig, reward: RewardConfig, eval_max_new_tokens: int) -> None:
        super().__init__()
        self.policy_config, self.reward, self.eval_max_new_tokens = policy, reward, eval_max_new_tokens
        self.policy = Policy(policy)
        self.catalog: torch.Tensor | None = None  # [N+1, H], row 0 = padding
        self.run_seed = torch.initial_seed()
        self._engine: VLLMEngine | None = None  # the vLLM rollout engine, started at the first rollout that needs it

    def rollout_engine(self, sampling: SamplingConfig) -> VLLMEngine | None:
        """The engine that samples rollouts: None for `sampling.engine: hf` (the policy itself), else this process's
        vLLM engine, started on first use (it loads the base model once more)."""
        if sampling.engine == "hf":
            return None
        if self._engine is None:
            from minirec.vllm_engine import VLLMEngine

            self._engine = VLLMEngine(self.policy, sampling.vllm_kv_cache_gb, sampling.vllm_max_model_len,
                                      sampling.vllm_weight_sync)
        return self._engine

    def teardown(self, stage: str) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def setup(self, stage: str) -> None:
        """The datamodule must render prompts the way this policy reads them: the same answer marker and a tokenizer
        that tokenizes like the policy's (checked on a probe text)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "prompts"):
            return
        if dm.prompts.answer_marker != self.policy.answer_marker:
            raise ConfigError(f"data.prompts.answer_marker={dm.prompts.answer_marker!r} differs from the policy's "
                              f"model.policy.answer_marker={self.policy.answer_marker!r}; set both to the same text")
        probe = f"Recommend the next item {self.policy.answer_marker} Caf\u00e9 \u00b7 2023-10-01 123"
        if dm.tokenizer(probe)["input_ids"] != self.policy.tokenizer(probe)["input_ids"]:
            raise ConfigError(f"data.tokenizer={dm.hparams.tokenizer!r} tokenizes differently from the policy's model "
                              f"({self.policy_config.pretrained!r}); set data.tokenizer to the policy's model")

    @torch.no_grad()
    def encode_catalog(self, shard: bool = True) -> torch.Tensor:
        """Encode all items in eval mode (no dropout, like user embeddings): [N+1, H] (row 0 zeros). `shard`: split the
        items over ranks and all_gather (every rank must call); otherwise this rank encodes the whole catalogue alone
        (no collectives). Non-finite embeddings raise FloatingPointError."""
        dm = self.trainer.datamodule
        n, bs = dm.num_items, dm.hparams.item_batch_size
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if shard else (1, 0)
        per_rank = math.ceil(n / world)
        mine = list(range(1 + rank * per_rank, 1 + min(n, (rank + 1) * per_rank)))
        by_length = sorted(range(len(mine)), key=lambda i: len(dm.items[mine[i] - 1]["prompt_ids"]))  # less padding
        local = torch.zeros(len(mine), self.policy.hidden_size, device=self.device)
        with eval_mode(self.policy):
            for start in range(0, per_rank, bs):
                rows = by_length[start : start + bs]
                prompt_ids, prompt_mask = dm.item_prompt_batch([mine[i] for i in rows] or [1])  # same calls per rank
                emb = self.policy.encode(prompt_ids.to(self.device), prompt_mask.to(self.device)).float()
                local[rows] = emb[: len(rows)]
        if not torch.isfinite(local).all():
            bad = [mine[i] for i in torch.nonzero(~torch.isfinite(local).all(1)).flatten().tolist()[:5] if i < len(mine)]
            raise FloatingPointError(f"non-finite item embeddings at global step {self.global_step}; item ids {bad}")
        padded = torch.zeros(per_rank, local.shape[1], device=self.device)
        padded[: len(local)] = local
        gathered = self.all_gather(padded) if world > 1 else padded[None]
        catalog = torch.zeros(n + 1, local.shape[1], device=self.device)
        catalog[1:] = gathered.reshape(-1, local.shape[1])[:n]
        return catalog

    def encode_base_catalog(self, shard: bool = True) -> torch.Tensor:
        """The catalogue as the base model (adapter off) encodes it, `[N+1, H]`: encoded once per process for a given
        model, device layout and set of item prompts, since every fit starts from the base model (a fresh adapter
        computes exactly what the base does) and every test's zero-shot reference is the base model."""
        dm = self.trainer.datamodule
        prompts = [dm.items[i]["prompt_ids"] for i in range(dm.num_items)]
        key = hashlib.sha256(repr((asdict(self.policy_config), str(self.device), self.trainer.world_size, shard,
                                   prompts)).encode()).hexdigest()
        if key not in _BASE_CATALOG:
            with self.policy.model.disable_adapter():
                catalog = self.encode_catalog(shard)
            _BASE_CATALOG.clear()  # one model per process at a time
            _BASE_CATALOG[key] = catalog.cpu().clone()
        return _BASE_CATALOG[key].to(self.device, copy=True)  # a copy: training refreshes rows of its catalogue

    def ranking_catalog(self, shard: bool = True) -> torch.Tensor:
        """The catalogue `[N+1, H]` users are ranked against: the policy's own encoding, or the base model's with
        `policy.item_encoder: base` (fixed for the whole run) or while the adapter is the identity (the same numbers,
        encoded once per process)."""
        if self.items_fixed or self.policy.adapter_is_identity():
            return self.encode_base_catalog(shard)
        return self.encode_catalog(shard)

    @property
    def items_fixed(self) -> bool:
        """True when item embeddings come from the base model and never change (`policy.item_encoder: base`)."""
        return self.policy_config.item_encoder == "base"

    @torch.no_grad()
    def user_embeddings(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy reasoning then encoding (each prompt run once: `Policy.reason_and_encode`): user embeddings [B, H]
        and the user sequences (ids, mask [B, S])."""
        emb, comp, comp_mask = self.policy.reason_and_encode(batch["prompt_ids"], batch["prompt_mask"],
                                                             self.eval_max_new_tokens)
        seq, mask, _ = self.policy.join(batch["prompt_ids"], batch["prompt_mask"], comp, comp_mask)
        return emb.float(), seq, mask
