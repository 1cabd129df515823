"""CurriculumCallback: unlocks the selection's curriculum stages by epoch (METHOD.md §5.6)."""

from __future__ import annotations

from typing import Any

import lightning as L

from minirec.io import ConfigError, DataError


class CurriculumCallback(L.Callback):
    """Unlocks the selection's curriculum stages by epoch: stage s at epoch s·epochs_per_stage, then (after the last
    stage) every selected sample (`minirec.curriculum.current_stage`).

    The stage is a pure function of the epoch: the callback hands the schedule to the datamodule, which computes the
    stage from `trainer.current_epoch` each time Lightning rebuilds the train loader. Lightning restores the epoch from
    a checkpoint before it builds the first loader, so a resumed run continues at the right stage whatever order
    checkpoints and callbacks run in. A `stages` selection with more than one stage needs
    `trainer.reload_dataloaders_every_n_epochs=1`; `folds` and `none` selections have a fixed order. Logs
    `curriculum/stage` each epoch (the number of stages once all are unlocked).

    Args:
        epochs_per_stage: epochs spent on each stage before the next one unlocks.
    """

    def __init__(self, epochs_per_stage: int = 1) -> None:
        if isinstance(epochs_per_stage, bool) or not isinstance(epochs_per_stage, int) or epochs_per_stage < 1:
            raise ConfigError(f"CurriculumCallback.epochs_per_stage: must be an integer >= 1, got {epochs_per_stage!r}")
        self.epochs_per_stage = epochs_per_stage

    @staticmethod
    def _datamodule(trainer: L.Trainer) -> Any:
        dm = trainer.datamodule
        if not all(hasattr(dm, a) for a in ("set_schedule", "num_stages", "curriculum")):
            raise DataError("CurriculumCallback needs trainer.fit(..., datamodule=RecDataModule(...)): a datamodule "
                            "with set_schedule(), num_stages and curriculum")
        return dm

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._datamodule(trainer)
        if dm.curriculum == "stages" and dm.num_stages > 1 and trainer.reload_dataloaders_every_n_epochs != 1:
            raise DataError(
                f"the training selection has {dm.num_stages} curriculum stages, which needs the train loader rebuilt "
                f"every epoch: set trainer.reload_dataloaders_every_n_epochs=1 "
                f"(got {trainer.reload_dataloaders_every_n_epochs})"
            )
        dm.set_schedule(self.epochs_per_stage)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._datamodule(trainer)
        if dm.curriculum == "stages":
            shown = dm.num_stages if dm.stage is None else dm.stage
            pl_module.log("curriculum/stage", float(shown), on_step=False, on_epoch=True)
