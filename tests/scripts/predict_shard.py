"""Run predict on 2 CPU processes (DDP) over the synthetic pool; each rank writes the sample ids it saw."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from datamodules import RecDataModule
from minirec.processing import ProcessingConfig


class IdModule(L.LightningModule):
    """Predicts nothing but the sample ids of its batches."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        return batch["sample_id"].tolist()


if __name__ == "__main__":
    cache, out = sys.argv[1], Path(sys.argv[2])
    processing = ProcessingConfig(dataset="synthetic", synthetic_users=60, synthetic_items=24)
    dm = RecDataModule(processing=processing, cache_dir=cache, eval_batch_size=4, max_predict_samples=37)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    preds = trainer.predict(IdModule(), datamodule=dm)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps([i for p in preds for i in p]))
    if trainer.global_rank == 0:
        torch.save(dm.predict_pool_ids(), out / "expected.pt")
