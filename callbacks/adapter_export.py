"""Export the best LoRA adapter in the Hugging Face PEFT folder layout (opens with `PeftModel.from_pretrained`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class AdapterExport(L.Callback):
    """After each validation, if `monitor` improved, save the policy's adapter (and tokenizer) to `dirpath`.

    Args:
        dirpath: export folder; default `<trainer.log_dir>/adapter_best`.
        monitor: logged metric that decides "best".
        mode: `max` or `min`.
    """

    def __init__(self, dirpath: str | None = None, monitor: str = "val/ndcg@10", mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"AdapterExport.mode must be 'max' or 'min', got {mode!r}")
        self.dirpath, self.monitor, self.mode = dirpath, monitor, mode
        self.best: float | None = None

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "adapter_best")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if not better:
            return
        self.best = value
        if trainer.is_global_zero:
            folder = self._folder(trainer)
            pl_module.policy.save_adapter(folder)
            (folder / "metric.txt").write_text(f"{self.monitor} {value:.6f} step {trainer.global_step}\n")
        trainer.strategy.barrier()

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")


