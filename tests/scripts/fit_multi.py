"""Fit GRPOModule on 2 CPU processes with DDP or DeepSpeed ZeRO-2 (the shipped strategy presets); ranks write JSON.

    python tests/scripts/fit_multi.py <ddp|zero2> <workdir> [--resume] [--sgd]

A first run trains to step 2 and checkpoints (`<workdir>/ckpt/last.ckpt`); `--resume` continues from `ckpt_path="last"`
to step 4. `--sgd` trains with plain SGD and no gradient clipping instead of AdamW with clipping: the update is then
lr times the gradient, scale included, so two strategies' updates can be compared (AdamW's first step is lr·sign(g)
and turns summation-order noise in near-zero gradients into full-size differences; clipping hides a wrong scale). Validation (1 batch per rank) runs every 2 steps. Each rank writes `<workdir>/<fit|resume>-rank<r>.json`:
global step, world size, the in-batch targets of this rank and the extra negatives gathered from the other rank in the
last micro-batch, the validation metrics and (zero2) the DeepSpeed engine's accumulation counters; its LoRA weights at
train start and end go to `<workdir>/<fit|resume>-rank<r>-lora.pt`. Lightning's launcher re-runs this file
for rank 1, so it is a script, not a test. Needs PYTHONPATH=<project root> (and DS_ACCELERATOR=cpu for zero2).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from datamodules import RecDataModule
from lightning_modules import GRPOModule
from lightning_modules.grpo import OptimConfig
from minirec.io import atomic_write_json
from minirec.policy import PolicyConfig
from minirec.processing import ProcessingConfig
from minirec.recpo import SamplingConfig
from tests.cpu_deepspeed import CPUDeepSpeedStrategy, preset_init_args

STEPS = {False: 2, True: 4}  # max_steps of the first run and of the resumed run


def lora_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable (LoRA) tensors by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class RecordingGRPO(GRPOModule):
    """GRPOModule that remembers its LoRA weights at train start (after any checkpoint restore) and, per micro-batch,
    its own in-batch target ids and the negatives gathered from the other ranks; optionally optimised with SGD."""

    sgd = False

    def configure_optimizers(self) -> dict:
        if not self.sgd:
            return super().configure_optimizers()
        opt = torch.optim.SGD([p for p in self.policy.parameters() if p.requires_grad], lr=self.optim.lr)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ConstantLR(opt, 1.0), "interval": "step"}}

    def on_train_start(self) -> None:
        self.lora_at_start = lora_weights(self)
        super().on_train_start()

    def _other_ranks(self, item_emb: torch.Tensor, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra, extra_ids = super()._other_ranks(item_emb, item_ids)  # never None: this script always runs 2 ranks
        self.seen = {
            "own_ids": item_ids.tolist(),
            "extra_ids": extra_ids.tolist(),
            "extra_shape": list(extra.shape),  # [E, H]
            "extra_requires_grad": extra.requires_grad,
        }
        return extra, extra_ids


def main(mode: str, workdir: Path, resume: bool, sgd: bool) -> None:
    t0 = time.perf_counter()
    L.seed_everything(0)
    dm = RecDataModule(  # same settings as tests/test_grpo.py make_dm
        processing=ProcessingConfig(dataset="synthetic", synthetic_users=160, synthetic_items=32),
        cache_dir=str(workdir / "data_cache"), max_val_samples=48, train_batch_size=8, eval_batch_size=16,
        item_batch_size=32,
    )
    module = RecordingGRPO(  # same settings as tests/test_grpo.py make_module
        policy=PolicyConfig(pretrained="tiny-random-qwen2", lora_r=8, lora_alpha=16, lora_dropout=0.0),
        sampling=SamplingConfig(group_size=2, max_new_tokens=4),
        optim=OptimConfig(lr=3e-3, micro_batch_size=8, grad_clip=0.0 if sgd else 1.0),
        eval_max_new_tokens=4,
    )
    module.sgd = sgd
    if mode == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo", **preset_init_args("ddp"))
    elif mode == "zero2":
        args = preset_init_args("deepspeed-zero2")
        if sgd:  # DeepSpeed asks for the flag before it wraps an optimizer other than Adam(W) / Lamb / Adagrad
            args["config"].update(zero_allow_untested_optimizer=True, gradient_clipping=0.0)
        strategy = CPUDeepSpeedStrategy(**args)
    else:
        raise SystemExit(f"mode must be ddp or zero2, got {mode!r}")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS[resume], val_check_interval=2,
        check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(workdir),
        callbacks=[ModelCheckpoint(dirpath=workdir / "ckpt", save_last=True, every_n_train_steps=2)],
    )
    trainer.fit(module, datamodule=dm, ckpt_path="last" if resume else None)
    tag = f"{'resume' if resume else 'fit'}-rank{trainer.global_rank}"
    lora = lora_weights(module)
    torch.save({"start": module.lora_at_start, "end": lora}, workdir / f"{tag}-lora.pt")
    engine = trainer.strategy.model if mode == "zero2" else None  # the DeepSpeedEngine
    torch_opt = engine.optimizer.optimizer if engine else trainer.optimizers[0]  # the torch optimizer (ZeRO: of the shards)
    atomic_write_json(
        workdir / f"{tag}.json",
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "seen": module.seen,
            "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
            "n_trainable": len(lora),
            "adamw_steps": max((int(st["step"]) for st in torch_opt.state.values() if "step" in st), default=0),
            "deepspeed": engine and {
                "managed_gradient_accumulation": engine.managed_gradient_accumulation(),
                "gradient_clipping": engine.gradient_clipping(),
                "optimizer": type(engine.optimizer).__name__,
                "base_optimizer": type(torch_opt).__name__,
                "global_steps": engine.global_steps,
                "global_samples": engine.global_samples,  # unmanaged accumulation: counts every backward
                "train_batch_size": engine.train_batch_size(),
            },
            "last_ckpt": trainer.checkpoint_callback.last_model_path,
            "seconds": time.perf_counter() - t0,
        },
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], Path(args[1]), "--resume" in args[2:], "--sgd" in args[2:])
