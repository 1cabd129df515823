"""RecDataModule: processed dataset on disk -> prompt token ids, item catalogue, subsets and curriculum stages."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from minirec.curriculum import PACINGS, active_ids, current_stage
from minirec.io import ConfigError, DataError, allow_in_checkpoints
from minirec.processing import ProcessingConfig, build_dataset
from minirec.prompts import PromptBuilder, PromptConfig
from minirec.subsets import Selection

SPLITS = ("train", "valid", "test")
allow_in_checkpoints(ProcessingConfig, PromptConfig)


class PromptDataset(Dataset):
    """Rows of one split, in a given order, turned into user-prompt token ids when accessed."""

    def __init__(self, rows, order: Sequence[int], builder: PromptBuilder, titles: Sequence[str]) -> None:
        self.rows, self.order, self.builder, self.titles = rows, list(order), builder, titles

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[self.order[i]]
        history = row["history"]
        ids = self.builder.user_prompt_ids(
            [self.titles[h] for h in history], row["history_ratings"], row["history_timestamps"], row["target_timestamp"]
        )
        return {"sample_id": row["sample_id"], "prompt_ids": ids, "target": row["target"], "history": history}


class ItemDataset(Dataset):
    """The item catalogue (ids 1..N) as item-prompt token ids ending with the answer marker (tokenised once each)."""

    def __init__(self, items, builder: PromptBuilder) -> None:
        self.items, self.builder = items, builder
        self.cache: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i not in self.cache:
            it = self.items[i]
            self.cache[i] = self.builder.item_prompt_ids(
                it["title"], it["average_rating"], it["rating_number"], it["description"]
            )
        return {"item_id": i + 1, "prompt_ids": self.cache[i]}


class EpochOrder(DistributedSampler):
    """Order of one training epoch, rebuilt from (seed, epoch) alone: a seeded permutation (or the fixed order), from
    global position `skip` on, then padded (by repeating its start) and sharded `rank::world`. Rebuilding the order
    instead of restoring an RNG state makes a mid-epoch resume exact. Being a DistributedSampler that shards itself,
    Lightning leaves it in place under DDP / DeepSpeed."""

    def __init__(self, size: int, shuffle: bool, seed: int, epoch: Callable[[], int], world: int, rank: int) -> None:
        super().__init__(range(size), num_replicas=world, rank=rank, shuffle=False)
        self.size, self.shuffle_order, self.seed, self.epoch_of, self.skip = size, shuffle, seed, epoch, 0

    def __iter__(self) -> Iterator[int]:
        if self.shuffle_order:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch_of())
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        order, self.skip = order[self.skip :], 0
        pad = -len(order) % self.num_replicas  # equal batch counts on every rank (collectives in training_step)
        order += (order * (pad // max(len(order), 1) + 1))[:pad]
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)


class ShardOrder(DistributedSampler):
    """Order of an evaluation or scoring loader: this rank's share `rank::world` of positions 0..size-1 (no padding, so
    over all ranks every sample is served once), cut into batches of `batch_size`, less the batches for which
    `skip(positions)` is true. A resumed scoring run skips whole batches it has scored, so what is left keeps the
    batches (and so the random draws) of an unbroken run. Being a DistributedSampler, Lightning leaves it in place."""

    def __init__(self, size: int, batch_size: int, world: int, rank: int,
                 skip: Callable[[list[int]], bool] | None = None) -> None:
        super().__init__(range(size), num_replicas=world, rank=rank, shuffle=False)
        mine = list(range(rank, size, world))
        batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
        self.positions = [p for batch in batches if skip is None or not skip(batch) for p in batch]

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)


class ResumableLoader(DataLoader):
    """Train loader whose position is saved in Lightning checkpoints (`state_dict` / `load_state_dict`): the epoch and
    the number of batches the training loop has processed in it; on resume the same epoch order continues there."""

    def __init__(self, dataset: Dataset, order: EpochOrder, position: Callable[[], tuple[int, int, int]], **kw) -> None:
        super().__init__(dataset, sampler=order, **kw)
        self.order, self.position = order, position

    def state_dict(self) -> dict[str, int]:
        epoch, batches, world = self.position()
        return {"epoch": epoch, "batches": batches, "world_size": world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, _, world = self.position()
        # a checkpoint from the epoch's last batch: Lightning goes on to the next epoch, which starts at its beginning
        if state["epoch"] == epoch and state["batches"] < len(self):
            # samples consumed over all ranks, before the distributed sampler shards them
            self.order.skip = state["batches"] * self.batch_size * state.get("world_size", world)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists -> (ids [B, P], mask [B, P])."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, width - len(s):] = 1
    return ids, mask


class Collator:
    """Batches of PromptDataset / ItemDataset items: left-padded `prompt_ids`/`prompt_mask`; `history` 0-padded [B, L]."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = left_pad([it["prompt_ids"] for it in items], self.pad_id)
        batch = {"prompt_ids": ids, "prompt_mask": mask}
        if "item_id" in items[0]:
            batch["item_id"] = torch.tensor([it["item_id"] for it in items], dtype=torch.long)
            return batch
        width = max(1, max(len(it["history"]) for it in items))
        history = torch.zeros((len(items), width), dtype=torch.long)
        for b, it in enumerate(items):
            if it["history"]:
                history[b, : len(it["history"])] = torch.tensor(it["history"], dtype=torch.long)
        batch.update(
            sample_id=torch.tensor([it["sample_id"] for it in items], dtype=torch.long),
            target=torch.tensor([it["target"] for it in items], dtype=torch.long),
            history=history,
        )
        return batch


class RecDataModule(L.LightningDataModule):
    """Builds or reuses the processed dataset, tokenises prompts, and serves train/valid/test/predict/item loaders.

    Subsets of the training split: `all`, `random:<k>` (seeded), or a selection file (`selection.json`: sample ids in
    order, a stage per id, the curriculum mode). Curriculum: `set_stage(s)` makes the train loader serve the unlocked
    stages (`pacing: cumulative` = stages ≤ s, `exclusive` = stage s; None = every selected sample); a `folds`
    selection is served in its fixed order without shuffling. Validation, test and predict are sharded by rank without
    padding, so under several processes every sample is seen exactly once. Batches: `sample_id` [B], `prompt_ids` /
    `prompt_mask` [B, P] left-padded, `target` [B], `history` [B, L] (0-padded item ids, for masking in ranking).
    """

    def __init__(
        self,
        processing: ProcessingConfig = ProcessingConfig(),
        prompts: PromptConfig = PromptConfig(),
        tokenizer: str = "tiny-random-qwen2",
        cache_dir: str = "data_cache",
        subset: str = "all",
        pacing: str = "cumulative",
        predict_split: str = "train",
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        max_test_samples: int | None = None,
        max_predict_samples: int | None = None,
        seed: int = 0,
        train_batch_size: int = 4,
        eval_batch_size: int = 8,
        item_batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            processing: how raw files become the processed dataset (METHOD.md §2); its fingerprint keys the cache.
            prompts: prompt templates and lengths (METHOD.md §3).
            tokenizer: model preset, local folder or hub id whose tokenizer renders the prompts (same as the policy's).
            cache_dir: folder of processed datasets, one sub-folder per processing fingerprint.
            subset: training samples used: `all`, `random:<k>`, or the path of a selection file.
            pacing: curriculum pacing for stage selections: `cumulative` or `exclusive`.
            predict_split: split served by `predict_dataloader` (the scoring pool; normally `train`).
            max_train_samples: seeded cap on the training pool before the subset is taken (None = no cap).
            max_val_samples: seeded cap on validation samples.
            max_test_samples: seeded cap on test samples.
            max_predict_samples: seeded cap on predict samples.
            seed: seed for caps, random subsets and shuffling.
            train_batch_size: prompts per training batch (each gets G rollouts).
            eval_batch_size: prompts per validation/test/predict batch.
            item_batch_size: item prompts per catalogue-encoding batch.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        if pacing not in PACINGS:
            raise ConfigError(f"data.pacing: must be one of {PACINGS}, got {pacing!r}")
        if predict_split not in SPLITS:
            raise ConfigError(f"data.predict_split: must be one of {SPLITS}, got {predict_split!r}")
        self.save_hyperparameters()
        self.processing, self.prompts = processing, prompts
        self.cache_dir = Path(cache_dir)
        self.data = None
        self.stage: int | None = None
        self.epochs_per_stage: int | None = None
        self.predict_done: set[int] = set()

    # -- building -------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build the processed dataset once (on local rank 0), or reuse it from the cache."""
        build_dataset(self.processing, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load the processed dataset, the tokenizer and the training subset (idempotent)."""
        if self.data is not None:
            return
        from minirec.models import load_tokenizer

        self.data, self.data_path = build_dataset(self.processing, self.cache_dir)
        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        self.builder = PromptBuilder(self.prompts, self.tokenizer)
        self.titles = [""] + list(self.data["items"]["title"])  # index = item id
        self.collate = Collator(self.tokenizer.pad_token_id)
        self.items = ItemDataset(self.data["items"], self.builder)
        self.rows = {s: self.data[s] for s in SPLITS}
        caps = {"train": "max_train_samples", "valid": "max_val_samples", "test": "max_test_samples"}
        self.split_order = {
            s: self._capped(list(range(len(self.data[s]))), self.hparams[caps[s]], caps[s]) for s in SPLITS
        }
        self.train_ids, self.train_stages, self.curriculum = self._subset(self.split_order["train"])

    def _capped(self, rows: list[int], cap: int | None, setting: str) -> list[int]:
        """A seeded sample of `cap` of the given row indices, kept in their order (all of them when cap is None)."""
        if cap is not None and cap < 1:
            raise ConfigError(f"data.{setting} must be ≥ 1, got {cap}")
        if cap is None or cap >= len(rows):
            return list(rows)
        keep = set(random.Random(self.hparams.seed).sample(range(len(rows)), cap))
        return [r for i, r in enumerate(rows) if i in keep]

    def _subset(self, pool_rows: list[int]) -> tuple[list[int], list[int], str]:
        """(training row indices in order, stage per row, curriculum mode) for the configured subset."""
        spec = self.hparams.subset
        if spec == "all":
            return pool_rows, [0] * len(pool_rows), "none"
        if spec.startswith("random:"):
            try:
                k = int(spec.split(":", 1)[1])
            except ValueError:
                raise ConfigError(f"data.subset: expected 'random:<k>' with an integer k, got {spec!r}") from None
            if not 1 <= k <= len(pool_rows):
                raise ConfigError(f"data.subset: random:{k} needs 1 ≤ k ≤ pool size {len(pool_rows)}")
            chosen = sorted(random.Random(self.hparams.seed).sample(pool_rows, k))
            return chosen, [0] * k, "none"
        return self._selection_file(Path(spec), pool_rows)

    def _selection_file(self, path: Path, pool_rows: list[int]) -> tuple[list[int], list[int], str]:
        sel = Selection.load(path, fingerprint=self.processing.fingerprint())
        row_of = {sid: r for r, sid in enumerate(self.data["train"]["sample_id"])}
        unknown = [i for i in sel.ids if i not in row_of]
        if unknown:
            raise DataError(f"{path}: field 'ids' names {len(unknown)} unknown training sample id(s), e.g. {unknown[:5]}")
        return [row_of[i] for i in sel.ids], sel.stages, sel.curriculum

    # -- curriculum -----------------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Number of curriculum stages in the training subset (1 when there is no curriculum)."""
        return max(self.train_stages) + 1 if self.train_stages else 1

    def set_stage(self, stage: int | None) -> None:
        """Serve the stages unlocked at `stage` from the next train loader on; None = all selected samples."""
        if stage is not None and not 0 <= stage < self.num_stages:
            raise ConfigError(f"curriculum stage {stage} out of range 0..{self.num_stages - 1}")
        self.stage = stage

    def set_schedule(self, epochs_per_stage: int | None) -> None:
        """Derive the stage from the epoch whenever the train loader is built (stage s at epoch s·epochs_per_stage,
        everything after the last stage); None = the stage is only changed through `set_stage`."""
        self.epochs_per_stage = epochs_per_stage

    def active_train_rows(self) -> list[int]:
        """Training row indices served now, in subset order."""
        return active_ids(self.train_ids, self.train_stages, self.stage, self.curriculum, self.hparams.pacing)

    # -- loaders --------------------------------------------------------------------------------------------------
    def _eval_loader(self, split: str, order: Sequence[int],
                     skip: Callable[[list[int]], bool] | None = None) -> DataLoader:
        """Validation / test / predict rows in order, sharded by rank without padding (each sample exactly once);
        batches whose positions `skip` is true for are left out (see `ShardOrder`)."""
        ds = PromptDataset(self.rows[split], order, self.builder, self.titles)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        bs = self.hparams.eval_batch_size
        return DataLoader(ds, batch_size=bs, sampler=ShardOrder(len(ds), bs, world, rank, skip),
                          collate_fn=self.collate, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Active training rows; shuffled per epoch from (seed, epoch) except for `folds` selections (fixed order)."""
        if self.epochs_per_stage and self.curriculum == "stages" and self.trainer is not None:
            self.set_stage(current_stage(self.trainer.current_epoch, self.epochs_per_stage, self.num_stages))
        rows = self.active_train_rows()
        epoch = lambda: self.trainer.current_epoch if self.trainer is not None else 0  # noqa: E731
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        order = EpochOrder(len(rows), self.curriculum != "folds", self.hparams.seed, epoch, world, rank)
        return ResumableLoader(
            PromptDataset(self.rows["train"], rows, self.builder, self.titles), order, self._train_position,
            batch_size=self.hparams.train_batch_size, collate_fn=self.collate, num_workers=self.hparams.num_workers,
        )

    def _train_position(self) -> tuple[int, int, int]:
        """(epoch, batches the training loop has processed in it, world size) of the attached trainer."""
        if self.trainer is None:
            return 0, 0, 1
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return self.trainer.current_epoch, progress.processed, self.trainer.world_size

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid", self.split_order["valid"])

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", self.split_order["test"])

    def predict_pool_ids(self) -> list[int]:
        """Sample ids of the predict pool (the scoring pool), in order."""
        rows = self._predict_rows()
        return [int(i) for i in self.rows[self.hparams.predict_split].select(rows)["sample_id"]] if rows else []

    def exclude_predict_ids(self, done: set[int]) -> None:
        """Skip the predict batches made only of these sample ids in the next predict loader (a resumed scoring run
        scores only what is left, in the batches of an unbroken run)."""
        self.predict_done = set(done)

    def _predict_rows(self) -> list[int]:
        """The scoring pool: the split's rows (the training subset when predicting on train), then the predict cap."""
        split = self.hparams.predict_split
        rows = self.train_ids if split == "train" else self.split_order[split]
        return self._capped(rows, self.hparams.max_predict_samples, "max_predict_samples")

    def predict_dataloader(self) -> DataLoader:
        split, rows, done = self.hparams.predict_split, self._predict_rows(), self.predict_done
        ids = self.rows[split].select(rows)["sample_id"] if rows and done else []
        return self._eval_loader(split, rows, (lambda batch: all(ids[p] in done for p in batch)) if done else None)

    def item_dataloader(self) -> DataLoader:
        """The whole catalogue, item ids 1..N in order (every rank encodes all of it)."""
        return DataLoader(
            self.items,
            batch_size=self.hparams.item_batch_size,
            shuffle=False,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
        )

    def item_prompt_batch(self, item_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded item prompts (ids [U, P], mask [U, P]) for the given item ids (1..N)."""
        batch = self.collate([self.items[i - 1] for i in item_ids])
        return batch["prompt_ids"], batch["prompt_mask"]

    def item_popularity(self) -> torch.Tensor:
        """How often each item is a target in the whole training split: counts `[N+1]` (row 0, padding, is 0); the
        popularity baseline's scores."""
        counts = torch.bincount(torch.tensor(self.data["train"]["target"], dtype=torch.long), minlength=self.num_items + 1)
        counts[0] = 0
        return counts

    @property
    def num_items(self) -> int:
        """Catalogue size N (item ids 1..N; 0 is padding)."""
        return len(self.data["items"])

