"""GRPOModule: RecPO training (GRPO-family RL with a ranking reward) and full-catalogue evaluation (METHOD.md §1, §4).

Features: G sampled rollouts per prompt inside `training_step` (manual optimisation); rewards from the full catalogue with
the history masked; gaussian or leave-one-out group advantages; clipped token loss (asymmetric ε, `ppo_epochs`, three
aggregation modes, optional KL to the frozen base model); recommendation InfoNCE loss on the top rollouts of each group,
with item embeddings computed with gradient for this device's targets and detached copies from other devices as extra
negatives; micro-batched backward with gradient clipping; `loss_impl: reference` to reproduce the published code's
broadcast. The catalogue is encoded at train start and at every validation (sharded over devices), its in-batch target
rows are refreshed after each step, and it is fully re-encoded every `catalog_refresh_every_n_steps`. With
`policy.item_encoder: base` the items are the base model's, encoded once and never refreshed, without gradient.
Validation and test: greedy reasoning, user embedding, full ranking with history masked, NDCG@K and HR@K for K in 5,
10, 20, 50.
Checkpoints hold only the trainable (LoRA) weights with the optimizer and loop state, and the cached catalogue. Each
training step reseeds torch from (run seed, step, rank), so a fit resumed from any checkpoint ends where an unbroken one
does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_modules.policy_module import PolicyModule
from minirec.evaluation import (
    bootstrap_intervals,
    candidate_counts,
    comparison_table,
    metric_names,
    paired_differences,
    per_sample_metrics,
    popularity_ranks,
    random_expectation,
)
from minirec.io import ConfigError, allow_in_checkpoints, atomic_write_json, atomic_write_text
from minirec.losses import LossConfig, RecPOLoss, dedupe_targets
from minirec.metrics import RankingMetrics, TestRecords
from minirec.policy import PolicyConfig, eval_mode
from minirec.recpo import (
    RewardConfig,
    Rollouts,
    SamplingConfig,
    reseed,
    rollout_forward,
    sample_rollouts,
    score_rollouts,
)
from minirec.rewards import item_negatives


@dataclass(frozen=True)
class OptimConfig:
    """RecPO optimisation settings (the objective's are in `LossConfig`).

    Args:
        lr: AdamW learning rate (constant schedule after `warmup_steps`).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps (0 = constant from the start).
        grad_clip: gradient-norm clip (0 = off).
        micro_batch_size: rollout rows per forward/backward, in whole groups (at least one prompt with its G rows).
        ppo_epochs: updates per rollout batch; with 1 the ratio ρ is exactly 1.
        catalog_refresh_every_n_steps: full catalogue re-encode period in steps (0 = only at train start/validation).
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    ppo_epochs: int = 1
    catalog_refresh_every_n_steps: int = 0

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.ppo_epochs < 1:
            raise ConfigError("model.optim.micro_batch_size and model.optim.ppo_epochs must be ≥ 1")


allow_in_checkpoints(LossConfig, OptimConfig)


class GRPOModule(PolicyModule):
    """RecPO policy training and evaluation; see the module docstring for the feature list."""

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        reward: RewardConfig = RewardConfig(),
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        eval_max_new_tokens: int = 256,
        ks: tuple[int, ...] = (5, 10, 20, 50),
        test_baselines: bool = True,
    ) -> None:
        """
        Args:
            policy: model, LoRA and answer-marker settings.
            sampling: rollout sampling (G, temperature, top-k, top-p, max new tokens).
            reward: score temperature and reward mix.
            loss: the RecPO objective (advantages, clipping, aggregation, KL, rec loss and its negatives).
            optim: optimiser, clipping, micro-batches, PPO epochs, catalogue refresh.
            eval_max_new_tokens: longest greedy reasoning in validation / test.
            ks: cut-offs of the NDCG@K / HR@K metrics.
            test_baselines: test also the zero-shot policy (adapter off) and popularity on the same samples (the
                random expectation is always reported); writes `test_report.md` / `test_metrics.json` with 95 %
                bootstrap intervals to the trainer's `default_root_dir`.
        """
        super().__init__(policy, reward, eval_max_new_tokens)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.sampling, self.optim = sampling, optim
        self.loss = RecPOLoss(loss, sampling.group_size, reward.tau)
        self.val_metrics = RankingMetrics(ks)
        self.test_records = TestRecords()
        self.zero_shot_catalog: torch.Tensor | None = None  # [N+1, H], the base model's (adapter off), test only
        self.popularity: torch.Tensor | None = None  # [N+1] training-split target counts, test only
        self.zero_shot_is_policy = False  # a fresh adapter at test start: zero-shot ranks are the policy's
        self.restored_catalog: torch.Tensor | None = None  # [N+1, H] from the checkpoint a fit resumes from

    # -- catalogue ------------------------------------------------------------------------------------------------
    def _item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [U, H] of the given item ids, with gradient."""
        prompt_ids, prompt_mask = self.trainer.datamodule.item_prompt_batch(item_ids.tolist())
        return self.policy.encode(prompt_ids.to(self.device), prompt_mask.to(self.device))

    def on_fit_start(self) -> None:
        self.policy.train()  # the policy loads in eval mode; LoRA dropout is on while fitting

    def on_train_start(self) -> None:
        """Encode the catalogue, unless a resumed fit restored the one the interrupted run was using (a fresh adapter:
        the base model's, encoded once per process)."""
        restored, self.restored_catalog = self.restored_catalog, None
        if restored is not None:
            self.catalog = restored.to(self.device)
        else:
            self.catalog = self.ranking_catalog()

    def on_validation_epoch_start(self) -> None:
        self.catalog = self.ranking_catalog()

    def on_test_epoch_start(self) -> None:
        """The policy's catalogue, and with `test_baselines` the zero-shot one and popularity. A fresh adapter computes
        exactly what the base model does, so then the policy's ranks are also the zero-shot ones, not computed twice."""
        self.zero_shot_is_policy = self.policy.adapter_is_identity()
        self.catalog = self.ranking_catalog()
        if self.hparams.test_baselines:
            self.zero_shot_catalog = self.encode_base_catalog()
            self.popularity = self.trainer.datamodule.item_popularity().float().to(self.device)

    # -- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Rollout → reward → loss → update: G rollouts per prompt, their rewards against the cached catalogue, then
        `ppo_epochs` updates of the RecPO loss over micro-batches of rows, and the in-batch catalogue rows refreshed.
        The rewards come from a scoring pass before the update, or from the update's own forward where that gives
        the same ones (`separate_scoring_pass`)."""
        opt, sched, mb = self.optimizers(), self.lr_schedulers(), self.optim.micro_batch_size
        reseed(self.run_seed, self.global_step, self.global_rank)
        every = self.optim.catalog_refresh_every_n_steps
        if self.catalog is None or (every and self.global_step > 0 and self.global_step % every == 0):
            self.catalog = self.ranking_catalog()

        t0 = time.perf_counter()
        ro = sample_rollouts(self.policy, batch, self.sampling, engine=self.rollout_engine(self.sampling))
        t1 = time.perf_counter()
        scored = None  # (rewards, advantages, token-loss advantages, rec-loss weights), each [R], from a scoring pass
        if self.separate_scoring_pass:
            old_lp, h = rollout_forward(self.policy, ro, mb)
            scored = self._rewards(h, ro, batch)
        ref_lp = None
        if self.loss.config.kl_beta > 0:
            with self.policy.model.disable_adapter():
                ref_lp, _ = rollout_forward(self.policy, ro, mb)

        t2 = time.perf_counter()
        uniq, t_index = dedupe_targets(ro.target)
        neg_ids = self._sampled_negatives(uniq)
        n_tokens = ro.completion_mask.sum().clamp(min=1)
        for _ in range(self.optim.ppo_epochs):
            totals: dict[str, torch.Tensor] = {}
            # the items are encoded once per update: each micro-batch's backward stops at `items` and collects its
            # gradient there, and one backward through the encoder passes the sum on to the weights (fixed base-model
            # items are catalogue rows without gradient)
            ids = uniq if neg_ids is None else torch.cat([uniq, neg_ids])
            emb = None if self.items_fixed else self._item_embeddings(ids)
            items = self.catalog[ids] if emb is None else emb.detach().requires_grad_()
            item_emb, neg_emb = items[: uniq.shape[0]], items[uniq.shape[0]:]
            parts = []  # per micro-batch (rewards, advantages, token-loss advantages, rec-loss weights)
            for sl, part in ro.prompt_slices(mb):
                extra, extra_ids, extra_mask = self._extra_negatives(item_emb, uniq, part.history, neg_ids, neg_emb)
                lp, h_mb = part.forward(self.policy)
                parts.append([x[sl] for x in scored] if scored else self._rewards(h_mb.detach(), part, batch))
                _, _, token_adv, rec_weights = parts[-1]
                old = lp.detach() if self.optim.ppo_epochs == 1 else old_lp[sl]
                loss, stats = self.loss(
                    lp, old, part.completion_mask, token_adv, h_mb, item_emb, t_index[sl], rec_weights,
                    batch_rows=ro.rows, batch_tokens=n_tokens, max_len=ro.completion_ids.shape[1],
                    ref_logprobs=None if ref_lp is None else ref_lp[sl], extra_negatives=extra, item_ids=uniq,
                    extra_ids=extra_ids, extra_mask=extra_mask,
                )
                self._check_finite("loss", loss, batch)
                self.manual_backward(loss)
                stats["loss"] = loss.detach()
                for key in ("loss", "token_loss", "rec_loss", "rec_ce"):
                    totals[key] = totals.get(key, 0) + stats[key]
            if items.grad is not None:
                self.manual_backward((emb.float() * items.grad.float()).sum())
            if self.optim.grad_clip > 0:
                self.clip_gradients(opt, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()
        sched.step()
        t3 = time.perf_counter()
        if not self.items_fixed:
            with torch.no_grad(), eval_mode(self.policy):
                self.catalog[uniq] = self._item_embeddings(uniq).float()

        rewards, adv = (torch.cat(x) for x in list(zip(*parts))[:2])
        lengths = ro.lengths.float()
        groups = rewards.view(-1, self.sampling.group_size)
        self.log_dict(
            {
                "train/loss": totals["loss"],
                "train/token_loss": totals["token_loss"],
                "train/rec_loss": totals["rec_loss"],
                "train/rec_ce": totals["rec_ce"],  # unweighted: falls when user embeddings pick their targets
                "train/reward_mean": rewards.mean(),
                "train/reward_std": rewards.std(unbiased=False),
                "train/reward_group_std": groups.std(1, unbiased=False).mean(),
                "train/reward_max": rewards.max(),
                "train/adv_mean": adv.mean(),
                "train/adv_abs_mean": adv.abs().mean(),
                "train/zero_spread_groups": (groups.max(1).values == groups.min(1).values).float().mean(),
                "train/completion_len": lengths.mean(),
                "train/rollout_tokens_per_s": lengths.sum() / max(t1 - t0, 1e-9),
                "train/time_generate_s": torch.tensor(t1 - t0),
                "train/time_score_s": torch.tensor(t2 - t1),  # scoring pass (old log-probs, rewards), if any
                "train/time_update_s": torch.tensor(t3 - t2),  # loss forward (+ rewards), backward, optimizer
                "train/time_refresh_s": torch.tensor(time.perf_counter() - t3),  # in-batch catalogue rows
                "train/clip_frac": stats["clip_frac"],
                "train/lr": torch.tensor(opt.param_groups[0]["lr"]),
            },
            prog_bar=False,
            on_step=True,
            batch_size=batch["target"].shape[0],
        )
        self.log("reward", rewards.mean(), prog_bar=True, on_step=True, batch_size=batch["target"].shape[0])

    @property
    def separate_scoring_pass(self) -> bool:
        """Whether the rewards need a no-grad, eval-mode forward of the rollouts before the update. Not when the
        update's own forward gives the same user embeddings (no LoRA dropout) and each micro-batch's advantages
        follow from its own groups (one update per batch, per-row advantages): then the update scores each micro-batch
        from its forward, and the rollouts run once instead of twice."""
        return (self.optim.ppo_epochs > 1 or self.loss.config.loss_impl != "intended"
                or self.policy.config.lora_dropout > 0)

    def _rewards(self, h: torch.Tensor, ro: Rollouts, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Rollout user embeddings `[R, H]` -> [rewards, advantages, token-loss advantages, rec-loss weights], each
        `[R]`, against the cached catalogue."""
        rewards, _ = score_rollouts(h, self.catalog, ro.target, ro.history, self.reward)
        self._check_finite("reward", rewards, batch)
        return [rewards, *self.loss.weights(rewards)]

    def _sampled_negatives(self, targets: torch.Tensor) -> torch.Tensor | None:
        """`rec_negatives: sampled`: ids `[K]` of this step's random catalogue items other than the in-batch `targets`,
        or None in the other modes. They are encoded with the targets, by the model being trained and with gradient:
        negatives without gradient (or from the cached catalogue) let the rec loss fall by pulling every target
        towards the users alike, a shift common to all items that ranks nothing better."""
        if self.loss.config.rec_negatives != "sampled":
            return None
        free = torch.ones(self.catalog.shape[0], dtype=torch.bool, device=self.device)
        free[0], free[targets] = False, False
        pool = free.nonzero().squeeze(1)
        return pool[torch.randperm(pool.shape[0], device=self.device)[: self.loss.config.sampled_negatives]]

    def _extra_negatives(
        self, item_emb: torch.Tensor, item_ids: torch.Tensor, history: torch.Tensor,
        neg_ids: torch.Tensor | None, neg_emb: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Extra negatives of the rec loss for rows with `history` `[R, L]`: embeddings `[E, H]`, ids `[E]` and a
        per-row mask `[R, E]` (True = history item, not a negative), or Nones when there are none. The sampled
        negatives `neg_emb` `[K, H]` keep their gradient; other devices' in-batch targets arrive without."""
        if neg_ids is not None:
            return item_negatives(neg_emb, neg_ids, history)
        extra, extra_ids = self._other_ranks(item_emb.detach(), item_ids)
        return extra, extra_ids, None

    def _other_ranks(self, item_emb: torch.Tensor, item_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Detached embeddings [E, H] and ids [E] of the other ranks' in-batch targets (None, None on one device)."""
        if self.trainer.world_size == 1:
            return None, None
        counts = self.all_gather(torch.tensor([item_emb.shape[0]], device=self.device)).flatten()
        width = int(counts.max())  # pad to a common length: ranks have different numbers of unique targets
        emb = torch.zeros(width, item_emb.shape[1], device=self.device, dtype=item_emb.dtype)
        ids = torch.zeros(width, dtype=torch.long, device=self.device)
        emb[: item_emb.shape[0]], ids[: item_ids.shape[0]] = item_emb, item_ids
        all_emb, all_ids = self.all_gather(emb), self.all_gather(ids)  # [W, width, H], [W, width]
        others = [r for r in range(all_emb.shape[0]) if r != self.global_rank]
        return (
            torch.cat([all_emb[r, : int(counts[r])] for r in others]),
            torch.cat([all_ids[r, : int(counts[r])] for r in others]),
        )

    def _check_finite(self, what: str, value: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        if not torch.isfinite(value).all():
            raise FloatingPointError(
                f"non-finite {what} at global step {self.global_step}; sample ids {batch['sample_id'].tolist()}. "
                "The last good checkpoint is kept; lower the learning rate or check the data."
            )

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _ranks(self, catalog: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Greedy reasoning, user embeddings and the target's rank `[B]` against `catalog` (history masked)."""
        h, _, _ = self.user_embeddings(batch)
        self._check_finite("user embedding", h, batch)
        return score_rollouts(h, catalog, batch["target"], batch["history"], self.reward)[1]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_metrics.update(self._ranks(self.catalog, batch))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Ranks of the policy, and with `test_baselines` of the zero-shot policy and popularity: `[B, M]`."""
        target, history = batch["target"], batch["history"]
        ranks = [self._ranks(self.catalog, batch)]
        if self.hparams.test_baselines:
            if self.zero_shot_is_policy:
                ranks.append(ranks[0])
            else:
                with self.policy.model.disable_adapter():
                    ranks.append(self._ranks(self.zero_shot_catalog, batch))
            ranks.append(popularity_ranks(self.popularity, history, target))
        self.test_records.update(torch.stack(ranks, 1), candidate_counts(history, target, self.catalog.shape[0] - 1))

    def on_validation_epoch_end(self) -> None:
        for k, v in self.val_metrics.compute().items():
            self.log(f"val/{k}", v, prog_bar=k == "ndcg@10")
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        """Means of every method and of the paired differences `policy-<baseline>`, with 95 % bootstrap intervals:
        logged (`test/<metric>` for the policy, `test/<method>/<metric>` for the others) and written to
        `test_report.md` / `test_metrics.json` (with every method's per-sample target ranks, for paired comparisons
        across runs on the same samples)."""
        ranks, candidates = self.test_records.compute()
        self.test_records.reset()
        ks, names = self.hparams.ks, metric_names(self.hparams.ks)
        methods = ("policy", "zero_shot", "popularity")[: ranks.shape[1] if ranks.numel() else 1]
        values = {m: per_sample_metrics(ranks[:, i], ks) for i, m in enumerate(methods)}
        values["random"] = random_expectation(candidates, ks)
        intervals = bootstrap_intervals({**values, **paired_differences(values)}, seed=0)
        for method, (mean, _, _) in intervals.items():
            prefix = "test/" if method == "policy" else f"test/{method}/"
            self.log_dict({prefix + n: float(v) for n, v in zip(names, mean)})
        if self.trainer.is_global_zero:
            table = comparison_table(intervals, names, len(candidates))
            out = Path(self.trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "test_report.md", "# Test: policy against baselines\n\n" + table)
            atomic_write_json(out / "test_metrics.json", {
                "samples": len(candidates), "metrics": names,
                "methods": {m: {n: {"mean": float(a), "lo": float(b), "hi": float(c)}
                                for n, a, b, c in zip(names, mean, lo, hi)} for m, (mean, lo, hi) in intervals.items()},
                "ranks": {m: ranks[:, i].tolist() for i, m in enumerate(methods)},
            })
            print("\n" + table)

    # -- optimisation and checkpoints -----------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        warm = self.optim.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights, and the cached catalogue `[N+1, H]` (float32; its rows were encoded at
        different steps, so a resumed fit could not rebuild it)."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.catalog is not None:
            checkpoint["catalog"] = self.catalog.detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restored_catalog = checkpoint.get("catalog")  # used by the resumed fit's `on_train_start`
