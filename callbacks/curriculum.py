"""CurriculumCallback: unlocks the selection's curriculum stages by epoch (METHOD.md §5.6)."""

from __future__ import annotations

from typing import Any

import lightning as L

from minirec.curriculum import current_stage
from minirec.io import DataError


class CurriculumCallback(L.Callback):
    """Sets the datamodule's curriculum stage for each training epoch: stage s unlocks at epoch s·epochs_per_stage,
    and after the last stage every selected sample is served (`current_stage`).

    Lightning (2.6) rebuilds the train loader in `FitLoop.on_advance_start` *before* it calls `on_train_epoch_start`,
    so the stage of epoch e is set at the end of epoch e - 1 (`on_train_epoch_end`), and the first epoch's in
    `on_fit_start`. The datamodule must be rebuilt every epoch: a `stages` selection with more than one stage needs
    `trainer.reload_dataloaders_every_n_epochs=1`. `folds` and `none` selections have a fixed order: nothing to do.

    State (`epoch`: the epoch the stage is set for, `stage`) is saved in checkpoints, so a resumed run continues at the
    right stage. Strategies that restore after `on_fit_start` (DeepSpeed) get the same result from the datamodule's
    own saved stage. Logs `curriculum/stage` each epoch (the number of stages once all are unlocked).

    Args:
        epochs_per_stage: epochs spent on each stage before the next one unlocks.
    """

    def __init__(self, epochs_per_stage: int = 1) -> None:
        if isinstance(epochs_per_stage, bool) or not isinstance(epochs_per_stage, int) or epochs_per_stage < 1:
            raise DataError(f"CurriculumCallback.epochs_per_stage: must be an integer >= 1, got {epochs_per_stage!r}")
        self.epochs_per_stage = epochs_per_stage
        self.epoch = 0
        self.stage: int | None = None

    @staticmethod
    def _datamodule(trainer: L.Trainer) -> Any:
        dm = trainer.datamodule
        if not all(hasattr(dm, a) for a in ("set_stage", "num_stages", "curriculum")):
            raise DataError("CurriculumCallback needs trainer.fit(..., datamodule=RecDataModule(...)): a datamodule "
                            "with set_stage(), num_stages and curriculum")
        return dm

    def _set(self, trainer: L.Trainer, epoch: int) -> None:
        """Remember `epoch` and, for a `stages` curriculum, serve its stage from the next train loader on."""
        self.epoch = epoch
        dm = self._datamodule(trainer)
        if dm.curriculum == "stages":
            self.stage = current_stage(epoch, self.epochs_per_stage, dm.num_stages)
            dm.set_stage(self.stage)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # a fresh fit starts at epoch 0; a checkpoint restore (after setup) overrides this
            self.epoch, self.stage = 0, None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._datamodule(trainer)
        if dm.curriculum == "stages" and dm.num_stages > 1 and trainer.reload_dataloaders_every_n_epochs != 1:
            raise DataError(
                f"the training selection has {dm.num_stages} curriculum stages, which needs the train loader rebuilt "
                f"every epoch: set trainer.reload_dataloaders_every_n_epochs=1 "
                f"(got {trainer.reload_dataloaders_every_n_epochs})"
            )
        self._set(trainer, self.epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._datamodule(trainer)
        if dm.curriculum == "stages":
            shown = dm.num_stages if self.stage is None else self.stage
            pl_module.log("curriculum/stage", float(shown), on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(trainer, trainer.current_epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "stage": self.stage}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch, self.stage = int(state_dict["epoch"]), state_dict["stage"]
