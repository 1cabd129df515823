"""ResumeCheckpoint: the `last.ckpt` a killed fit resumes from, written on a step interval and at every epoch end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from minirec.io import ConfigError


class ResumeCheckpoint(L.Callback):
    """Writes `dirpath/last.ckpt` every `every_n_steps` optimizer steps (mid-epoch too), after every validation and at
    the end of every epoch; `trainer.fit(..., ckpt_path=<it>)` then continues exactly where the killed fit was (with
    the data loader position, the module's per-step seeding and its saved catalogue, the result equals an unbroken
    fit's). With a ModelCheckpoint writing to the same `dirpath`, `ckpt_path="last"` (`minirec fit --ckpt_path last`)
    finds it.

    Two moments are left to a later write, because Lightning resumes them wrongly: a step followed by a validation (a
    fit resumed from there skips that validation, so it is saved once the validation has run), and an epoch's last
    step (resumed as if the next epoch had as many batches as this one, which a curriculum breaks; saved at the epoch
    end). The file is replaced atomically (Lightning writes it through a transaction): a kill while saving keeps the
    previous one.

    Args:
        dirpath: folder of `last.ckpt`.
        every_n_steps: optimizer steps between writes (a kill loses at most this many).
    """

    def __init__(self, dirpath: str, every_n_steps: int = 10) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(f"ResumeCheckpoint.every_n_steps: must be an integer ≥ 1, got {every_n_steps!r}")
        self.path, self.every_n_steps = Path(dirpath) / "last.ckpt", every_n_steps

    @staticmethod
    def _epoch_ends(trainer: L.Trainer) -> bool:
        return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loop = trainer.fit_loop
        validates = loop.epoch_loop._should_check_val_fx(loop._data_fetcher)  # Lightning's own rule, after this hook
        if trainer.global_step % self.every_n_steps == 0 and not validates and not self._epoch_ends(trainer):
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not self._epoch_ends(trainer):
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
