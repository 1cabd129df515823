"""ScoringModule: MiniRec's per-sample scores in `predict_step`, with the proxy policy (METHOD.md §5 steps 2-4).

For each sample of the pool: N sampled rollouts (same sampling as training) and their rewards, the mean r̄
(learnability); one greedy pass giving the user embedding (diversity); and the representativeness vector:
`space: hidden` — u = H·g with g = ∂ℓ/∂h of the recommendation loss at the user embedding h (double backward; `full`
catalogue softmax or `in_batch`); `space: lora` — the gradient of the sample's RL loss (token loss of its rollouts with
their group advantages + recommendation loss) w.r.t. the LoRA weights, optionally H·g, randomly projected to
`projection_dim`. Each rank scores its shard and encodes the catalogue by itself (no collectives, so a resumed run with
uneven shards cannot hang). Pair with `callbacks.ScoreWriter`.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.policy_module import PolicyModule
from minirec.io import ConfigError, load_checkpoint
from minirec.losses import LossConfig, RecPOLoss
from minirec.policy import PolicyConfig
from minirec.recpo import (
    RewardConfig, Rollouts, SamplingConfig, reseed, rollout_forward, sample_rollouts, score_rollouts,
)
from minirec.rewards import catalog_negatives
from minirec.representativeness import RademacherProjection, hidden_hvp_vectors, parameter_space_vector


def load_proxy(proxy: str, policy: PolicyConfig) -> tuple[PolicyConfig, dict[str, torch.Tensor] | None]:
    """The policy config that loads the proxy, and its LoRA weights when they are not in an adapter folder: an
    exported PEFT adapter folder (-> `adapter_path`), or a GRPOModule `.ckpt` (its saved policy config, and its
    LoRA state dict; the file is read once)."""
    path = Path(proxy)
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"model.proxy={proxy!r}: folder without adapter_config.json (not an exported PEFT adapter)")
        return PolicyConfig(**{**asdict(policy), "adapter_path": str(path)}), None
    if not path.is_file():
        raise ConfigError(f"model.proxy={proxy!r}: no such checkpoint file or adapter folder")
    ckpt = load_checkpoint(path)
    saved = ckpt.get("hyper_parameters", {}).get("policy")
    if isinstance(saved, dict):  # saved by LightningCLI as the parsed config
        saved = PolicyConfig(**{k: v for k, v in saved.items() if k in PolicyConfig.__dataclass_fields__})
    state = {k.removeprefix("policy.model."): v for k, v in ckpt["state_dict"].items()}
    return (saved if isinstance(saved, PolicyConfig) else policy), state


class ScoringModule(PolicyModule):
    """Scores every pool sample with the proxy policy; `predict_step` returns the fields `ScoreWriter` stores."""

    def __init__(
        self,
        proxy: str | None = None,
        policy: PolicyConfig = PolicyConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        reward: RewardConfig = RewardConfig(),
        loss: LossConfig = LossConfig(),
        num_rollouts: int = 4,
        space: str = "hidden",
        rep_loss: str = "full",
        projection_dim: int = 8192,
        lora_hvp: bool = False,
        projection_seed: int = 0,
        eval_max_new_tokens: int = 256,
    ) -> None:
        """
        Args:
            proxy: the proxy policy: an exported adapter folder or a GRPOModule checkpoint (None = the base policy).
            policy: policy settings (replaced by the checkpoint's own when `proxy` is a checkpoint).
            sampling: rollout sampling (as in training); `group_size` is replaced by `num_rollouts`.
            reward: score temperature and reward mix (as in training).
            loss: the RecPO objective (as in training): its advantages and token loss make the `lora` space's
                per-sample loss.
            num_rollouts: N sampled rollouts per sample for r̄.
            space: representativeness space: `hidden` (HVP at the user embedding) or `lora` (projected LoRA gradient).
            rep_loss: `hidden` space loss: `full` (softmax over the catalogue) or `in_batch` (published code's parity).
            projection_dim: `lora` space: projected width d'.
            lora_hvp: `lora` space: use H·g instead of g (double backward; needs eager attention on CPU).
            projection_seed: seed of the Rademacher projection.
            eval_max_new_tokens: longest greedy reasoning of the diversity pass.
        """
        if space not in ("hidden", "lora"):
            raise ConfigError(f"model.space must be 'hidden' or 'lora', got {space!r}")
        if rep_loss not in ("full", "in_batch"):
            raise ConfigError(f"model.rep_loss must be 'full' or 'in_batch', got {rep_loss!r}")
        if num_rollouts < 1:
            raise ConfigError(f"model.num_rollouts must be ≥ 1, got {num_rollouts}")
        state = None
        if proxy is not None:
            policy, state = load_proxy(proxy, policy)
        super().__init__(policy, reward, eval_max_new_tokens)
        self.save_hyperparameters()
        if state is not None:
            self.policy.load_trainable_state_dict(state)
        self.sampling = SamplingConfig(**{**asdict(sampling), "group_size": num_rollouts})
        self.loss = RecPOLoss(loss, num_rollouts, reward.tau)
        self.projection: RademacherProjection | None = None

    def scoring_config(self) -> dict[str, Any]:
        """Settings that change the scores (stored in the score folder's fingerprint)."""
        h = self.hparams
        return {
            "proxy": h.proxy, "pretrained": self.policy_config.pretrained, "sampling": asdict(self.sampling),
            "reward": asdict(self.reward), "num_rollouts": h.num_rollouts, "space": h.space, "rep_loss": h.rep_loss,
            "projection_dim": h.projection_dim, "lora_hvp": h.lora_hvp, "projection_seed": h.projection_seed,
            "eval_max_new_tokens": h.eval_max_new_tokens,
            **({"loss": asdict(self.loss.config)} if h.space == "lora" else {}),
        }

    def on_predict_start(self) -> None:
        """Encode the catalogue; warn when the reward's NDCG cutoff covers it (every rollout is rewarded)."""
        self.catalog = self.ranking_catalog(shard=False)
        items, k = self.catalog.shape[0] - 1, self.reward.ndcg_k
        if k >= items:
            rank_zero_warn(f"reward.ndcg_k {k} ≥ the catalogue's {items} items: every rollout earns NDCG reward, so "
                           "learnability has no unrewarded samples to prune (METHOD.md §5); set a smaller ndcg_k")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns sample_id [B], rewards [B, N], mean_reward [B], user_emb [B, H], rep_vec [B, D]."""
        n = self.sampling.group_size
        reseed(self.run_seed, int(batch["sample_id"][0]))  # a resumed scoring run draws what an unbroken one does
        ro = sample_rollouts(self.policy, batch, self.sampling, engine=self.rollout_engine(self.sampling))
        _, h_roll = rollout_forward(self.policy, ro, ro.rows)
        rewards, _ = score_rollouts(h_roll, self.catalog, ro.target, ro.history, self.reward)
        user_emb, user_seq, user_mask = self.user_embeddings(batch)
        if self.hparams.space == "hidden":
            rep_vec = hidden_hvp_vectors(
                user_emb, self.catalog, batch["target"], batch["history"], self.reward.tau, loss=self.hparams.rep_loss
            )
        else:
            rep_vec = self._lora_vectors(batch, ro, (user_seq, user_mask), rewards.view(-1, n))
        return {
            "sample_id": batch["sample_id"].cpu(),
            "rewards": rewards.view(-1, n).cpu(),
            "mean_reward": rewards.view(-1, n).mean(1).cpu(),
            "user_emb": user_emb.cpu(),
            "rep_vec": rep_vec.float().cpu(),
        }

    def _lora_vectors(self, batch, rollouts, users: tuple, rewards: torch.Tensor) -> torch.Tensor:
        """Projected per-sample LoRA gradients (or H·g) of the sample's RL loss: [B, projection_dim].

        rollouts: the batch's `Rollouts` (B x N rows); users: greedy user sequences (ids, mask) [B, S']; rewards
        [B, N]. Loss of sample b = the RecPO token loss of its N rollouts with their group advantages (ρ = 1) + the
        recommendation loss of its greedy user embedding against the whole catalogue (history masked).
        """
        n = self.sampling.group_size
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.projection is None:
            dim_in = sum(p.numel() for p in params)
            self.projection = RademacherProjection(
                dim_in, self.hparams.projection_dim, self.hparams.projection_seed, device=self.device
            )
        # predict runs under inference mode; its tensors must be cloned outside it before they enter autograd
        with torch.inference_mode(False), torch.enable_grad():
            rollouts = Rollouts(*(getattr(rollouts, f.name).clone() for f in fields(rollouts)))
            useq, umask = (x.clone() for x in users)
            catalog, target, history = self.catalog.clone(), batch["target"].clone(), batch["history"].clone()
            rewards = rewards.clone()
            vectors = []
            for b, (_, sample) in enumerate(rollouts.prompt_slices(n)):
                lp, _ = sample.forward(self.policy)
                adv, _, _ = self.loss.weights(rewards[b])
                token_loss, _ = self.loss.token_loss(lp, lp.detach(), adv, sample.completion_mask)
                h = self.policy.encode(useq[b : b + 1], umask[b : b + 1])
                negatives, ids, blocked = catalog_negatives(catalog, history[b : b + 1])
                rec_loss = self.loss.rec_ce(
                    h, catalog[target[b : b + 1]], torch.zeros(1, dtype=torch.long, device=h.device),
                    extra_negatives=negatives, item_ids=target[b : b + 1], extra_ids=ids, extra_mask=blocked,
                ).sum()  # one row, weight 1
                vectors.append(parameter_space_vector(token_loss + rec_loss, params, hvp=self.hparams.lora_hvp))
        return self.projection(torch.stack(vectors))  # one pass over P for the batch: generating P dominates
