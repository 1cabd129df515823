"""CurriculumCallback with the real RecDataModule on synthetic data: Lightning's loader/hook order, stage unlocking
(cumulative, exclusive, several epochs per stage), fixed folds order, resume from a checkpoint, and settings errors."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from callbacks.curriculum import CurriculumCallback
from datamodules import RecDataModule
from minirec.curriculum import build_curriculum
from minirec.io import DataError
from minirec.processing import ProcessingConfig

SYNTH = ProcessingConfig(dataset="synthetic", synthetic_users=60, synthetic_items=24)
K, STAGES = 16, 4


class Recorder(L.LightningModule):
    """A linear layer with a dummy loss that records the sample ids of every training batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: dict[int, list[int]] = defaultdict(list)

    def training_step(self, batch, batch_idx):
        self.seen[self.current_epoch] += batch["sample_id"].tolist()
        return self.layer(torch.ones(1, 1)).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class LoaderLog(RecDataModule):
    """RecDataModule that logs each train-loader build with the stage it serves."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        self.events.append(("loader", self.stage))
        return loader


class EpochStartLog(L.Callback):
    def __init__(self, events: list) -> None:
        self.events = events

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.events.append(("epoch_start", trainer.current_epoch))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """Processed synthetic dataset, built once for the module."""
    path = str(tmp_path_factory.mktemp("cache"))
    RecDataModule(processing=SYNTH, cache_dir=path).prepare_data()
    return path


@pytest.fixture(scope="module")
def train_sample_ids(cache: str) -> list[int]:
    dm = RecDataModule(processing=SYNTH, cache_dir=cache)
    dm.setup()
    return list(dm.data["train"]["sample_id"])


def selection(path: Path, sample_ids: list[int], mode: str) -> tuple[list[int], list[int]]:
    """Write a selection file of K training samples with made-up rewards; -> (ordered ids, stages)."""
    ids = sample_ids[:K]
    rewards = [((7 * i) % 13) / 13 for i in range(K)]
    ordered, stages = build_curriculum(ids, rewards, mode, num_stages=STAGES, fold_size=4)
    path.write_text(json.dumps({"fingerprint": SYNTH.fingerprint(), "ids": ordered, "stages": stages,
                                "curriculum": mode}))
    return ordered, stages


def fit(dm: RecDataModule, max_epochs: int, callbacks: list, reload: int = 1, ckpt_path: str | None = None,
        logger=False) -> Recorder:
    model = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, reload_dataloaders_every_n_epochs=reload,
                        logger=logger, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_stage_is_set_before_lightning_builds_the_epoch_loader(tmp_path, cache, train_sample_ids) -> None:
    """Lightning 2.6 builds the train loader before on_train_epoch_start; each build must already see its stage."""
    selection(tmp_path / "sel.json", train_sample_ids, "stages")
    dm = LoaderLog(processing=SYNTH, cache_dir=cache, subset=str(tmp_path / "sel.json"))
    dm.events = []
    fit(dm, 3, [CurriculumCallback(), EpochStartLog(dm.events)])
    assert dm.events == [("loader", 0), ("epoch_start", 0), ("loader", 1), ("epoch_start", 1),
                         ("loader", 2), ("epoch_start", 2)]


@pytest.mark.parametrize("pacing,epochs_per_stage", [("cumulative", 1), ("exclusive", 1), ("exclusive", 2)])
def test_stages_unlock_by_epoch(tmp_path, cache, train_sample_ids, pacing, epochs_per_stage) -> None:
    ordered, stages = selection(tmp_path / "sel.json", train_sample_ids, "stages")
    dm = RecDataModule(processing=SYNTH, cache_dir=cache, subset=str(tmp_path / "sel.json"), pacing=pacing)
    epochs = (STAGES + 1) * epochs_per_stage
    model = fit(dm, epochs, [CurriculumCallback(epochs_per_stage)], logger=CSVLogger(tmp_path, name="log"))
    stage_of = dict(zip(ordered, stages))
    for epoch in range(epochs):
        stage = epoch // epochs_per_stage
        if stage >= STAGES:  # every stage done: all selected samples
            expected = set(ordered)
        elif pacing == "cumulative":
            expected = {i for i in ordered if stage_of[i] <= stage}
        else:
            expected = {i for i in ordered if stage_of[i] == stage}
        seen = model.seen[epoch]
        assert len(seen) == len(set(seen)) and set(seen) == expected, (epoch, stage)
    with open(tmp_path / "log" / "version_0" / "metrics.csv") as f:
        logged = {int(r["epoch"]): float(r["curriculum/stage"]) for r in csv.DictReader(f) if r["curriculum/stage"]}
    assert logged == {e: float(min(e // epochs_per_stage, STAGES)) for e in range(epochs)}


def test_folds_are_served_in_fixed_order(tmp_path, cache, train_sample_ids) -> None:
    ordered, stages = selection(tmp_path / "sel.json", train_sample_ids, "folds")
    assert max(stages) == K // 4 - 1  # folds of 4
    dm = RecDataModule(processing=SYNTH, cache_dir=cache, subset=str(tmp_path / "sel.json"), train_batch_size=3)
    model = fit(dm, 3, [CurriculumCallback()], reload=0)  # fixed order: no reload needed
    assert [model.seen[e] for e in range(3)] == [ordered] * 3


def test_resume_from_checkpoint_continues_at_the_right_stage(tmp_path, cache, train_sample_ids) -> None:
    ordered, stages = selection(tmp_path / "sel.json", train_sample_ids, "stages")
    stage_of = dict(zip(ordered, stages))
    make = lambda: RecDataModule(processing=SYNTH, cache_dir=cache, subset=str(tmp_path / "sel.json"),  # noqa: E731
                                 pacing="exclusive")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = fit(make(), 2, [CurriculumCallback(), ckpt])
    assert sorted(first.seen) == [0, 1]

    # a validation-time checkpoint (saved before on_train_epoch_end) resumes at the right stage too
    resumed = fit(make(), 5, [CurriculumCallback()], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert sorted(resumed.seen) == [2, 3, 4]
    assert {stage_of[i] for i in resumed.seen[2]} == {2}
    assert {stage_of[i] for i in resumed.seen[3]} == {3}
    assert sorted(resumed.seen[4]) == sorted(ordered)


def test_settings_errors(tmp_path, cache, train_sample_ids) -> None:
    selection(tmp_path / "sel.json", train_sample_ids, "stages")
    dm = RecDataModule(processing=SYNTH, cache_dir=cache, subset=str(tmp_path / "sel.json"))
    with pytest.raises(DataError, match=r"4 curriculum stages.*reload_dataloaders_every_n_epochs=1 \(got 0\)"):
        fit(dm, 2, [CurriculumCallback()], reload=0)
    with pytest.raises(DataError, match="epochs_per_stage: must be an integer >= 1, got 0"):
        CurriculumCallback(0)
