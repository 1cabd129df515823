"""Lightning data modules."""

from datamodules.rec_datamodule import RecDataModule

__all__ = ["RecDataModule"]
