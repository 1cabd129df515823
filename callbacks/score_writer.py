"""ScoreWriter: MiniRec per-sample scores from `trainer.predict` -> a selection, its curriculum, tables and plots.

Flow (METHOD.md §5 steps 5-7):
1. `setup("predict")` (before Lightning requests the predict loader): check the settings against the pool size, check
   or write `fingerprint.json`, and tell the datamodule which samples earlier (killed) runs already scored.
2. `write_on_batch_end`: every rank writes each batch atomically as `shards/rank{R}-{first_sample_id}.pt`.
3. `teardown("predict")` (after a predict without error): barrier; rank 0 merges the shards (each pool sample exactly
   once, in pool order) into `score_table.pt`, computes L, R, q, selects once for the largest k (smaller ks are
   prefixes), builds each curriculum and writes the artefacts (`write_selection_artefacts`).
`reselect` selects again from a complete score folder when only the selection settings changed.
"""

from __future__ import annotations

import csv
from dataclasses import asdict
import hashlib
import io
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from minirec import plots
from minirec.io import DataError, as_json, atomic_file, atomic_write_json, atomic_write_text, read_json
from minirec.subsets import ScoreTable, Selection, SelectionConfig, select_subsets

# predict_step output per batch: name -> number of dimensions (first dimension = batch size B)
PREDICTION_FIELDS = {"sample_id": 1, "rewards": 2, "mean_reward": 1, "user_emb": 2, "rep_vec": 2}
CSV_COLUMNS = ("sample_id", "rewards", "mean_reward", "L", "R", "q", "selected_rank", "stage")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` through a hidden temp file in the same folder and an atomic rename."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


class ScoreWriter(BasePredictionWriter):
    """Writes the ScoringModule's per-sample scores and turns them into MiniRec selections (METHOD.md §5).

    Expects `trainer.predict(scoring_module, datamodule=dm)` where `predict_step` returns per batch a dict of tensors
    `sample_id` [B], `rewards` [B, N], `mean_reward` [B], `user_emb` [B, H] (diversity vector), `rep_vec` [B, D]
    (representativeness vector u), the module has `scoring_config() -> dict` (its `proxy`, the checkpoint or adapter
    scored with, is recorded as the selections' `proxy_checkpoint`), and the datamodule has
    `processing.fingerprint()`, `predict_pool_ids()` and `exclude_predict_ids(done)` (RecDataModule).

    Writes into `output_dir`: `fingerprint.json`, `shards/`, `score_table.pt` (the merged `ScoreTable`), `scores.csv`,
    `selection_k{k}.json` per k, the plots `reward_hist.png`, `l_vs_r.png`, `selected_vs_pool.png`, `curriculum.png`
    (for the largest k), `summary.json`, and last `selection.json` (= the selection for the first k, the one the next
    stage trains on). The selections come from `minirec.subsets.select_subsets`. A killed predict resumes: shards
    already written are not scored again.

    Args:
        output_dir: folder of the artefacts; reuse it only for the same dataset, scoring settings and pool.
        selection: how the scored pool becomes selections (strategy, ks, L / q parameters, curriculum).
    """

    def __init__(self, output_dir: str, selection: SelectionConfig = SelectionConfig()) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.shard_dir = self.output_dir / "shards"
        self.selection = selection
        self.fingerprint: dict[str, Any] = {}
        self.previously_scored = 0
        self.start_time = 0.0

    # -- before the predict loader exists ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Validate against the pool, check/write the fingerprint, skip already-scored samples (on every rank).

        Runs here rather than in `on_predict_start`: Lightning requests the predict loader in between.
        """
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        self.start_time = time.perf_counter()
        dm = trainer.datamodule
        if not all(hasattr(dm, a) for a in ("processing", "predict_pool_ids", "exclude_predict_ids")):
            raise DataError("ScoreWriter needs trainer.predict(..., datamodule=RecDataModule(...)): a datamodule with "
                            "processing, predict_pool_ids() and exclude_predict_ids()")
        if not callable(getattr(pl_module, "scoring_config", None)):
            raise DataError(f"ScoreWriter needs a scoring module with scoring_config(); got {type(pl_module).__name__}")
        pool = dm.predict_pool_ids()
        check_ks(self.selection, len(pool))
        self.fingerprint = as_json({
            "dataset": dm.processing.fingerprint(),
            "scoring": pl_module.scoring_config(),
            "pool": {
                "split": dm.hparams.get("predict_split"),
                "size": len(pool),
                "ids_sha256": hashlib.sha256(",".join(map(str, pool)).encode()).hexdigest()[:16],
            },
        })
        self._check_fingerprint(trainer)
        if trainer.is_global_zero:
            for stale in self.shard_dir.glob(".*.tmp"):  # temp files of a killed run (no rank writes during setup)
                stale.unlink(missing_ok=True)
        done = self._scored_ids()
        self.previously_scored = len(done & set(pool))
        dm.exclude_predict_ids(done)

    def _check_fingerprint(self, trainer: L.Trainer) -> None:
        path = self.output_dir / "fingerprint.json"
        if path.exists():
            old = read_json(path)
            if old != self.fingerprint:
                old = old if isinstance(old, dict) else {"fingerprint.json": old}
                diff = {k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k)}
                shown = "; ".join(f"{k}: {old.get(k)} there vs {self.fingerprint.get(k)} now" for k in sorted(diff))
                raise DataError(f"{path}: scores in {self.output_dir} were made with other settings ({shown}); "
                                "use a new output_dir (or delete this one to re-score)")
        elif trainer.is_global_zero:
            atomic_write_json(path, self.fingerprint)

    def _shards(self) -> list[Path]:
        return sorted(self.shard_dir.glob("rank*-*.pt"))

    @staticmethod
    def _load(path: Path) -> dict[str, torch.Tensor]:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"{path}: unreadable score shard ({e}); delete it to score its samples again") from None

    def _scored_ids(self) -> set[int]:
        return {int(i) for path in self._shards() for i in self._load(path)["sample_id"].tolist()}

    # -- during predict -----------------------------------------------------------------------------------------------
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Save this rank's batch as `shards/rank{R}-{first_sample_id}.pt` (atomic; never another rank's name)."""
        shard = self._check_prediction(prediction)
        first = int(shard["sample_id"][0])
        atomic_torch_save(shard, self.shard_dir / f"rank{trainer.global_rank}-{first}.pt")

    @staticmethod
    def _check_prediction(prediction: Any) -> dict[str, torch.Tensor]:
        """The predict_step output as compact CPU tensors, after checking its fields and shapes."""
        if not isinstance(prediction, Mapping) or not set(PREDICTION_FIELDS) <= set(prediction):
            got = sorted(prediction) if isinstance(prediction, Mapping) else type(prediction).__name__
            raise DataError(f"ScoreWriter: predict_step must return a dict with {list(PREDICTION_FIELDS)}, got {got}")
        shard = {k: torch.as_tensor(prediction[k]).detach().cpu().clone() for k in PREDICTION_FIELDS}
        b = shard["sample_id"].shape[0] if shard["sample_id"].dim() == 1 else -1
        for key, ndim in PREDICTION_FIELDS.items():
            if shard[key].dim() != ndim or shard[key].shape[0] != b or b == 0:
                raise DataError(f"ScoreWriter: predict_step field '{key}' has shape {list(shard[key].shape)}; "
                                f"expected {ndim}-D with the batch size first (sample_id has {b})")
        shard["sample_id"] = shard["sample_id"].long()
        return shard

    # -- after predict ------------------------------------------------------------------------------------------------
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """After a predict that ended without error: barrier, then rank 0 merges and writes; a failure there is
        raised on every rank (no rank left waiting).

        Here rather than in `on_predict_end`, which Lightning skips on a rank with no batches left (a resumed run
        whose samples were all scored, or an uneven last shard); `teardown` runs on every rank after success only.
        """
        if stage != "predict":
            return
        trainer.strategy.barrier("ScoreWriter.merge")
        error: Exception | None = None
        if trainer.is_global_zero:
            try:
                self._merge(trainer.datamodule.predict_pool_ids())
            except Exception as e:
                error = e
        message = trainer.strategy.broadcast(None if error is None else f"{type(error).__name__}: {error}", src=0)
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"ScoreWriter: rank 0 failed to merge the scores: {message}")

    def merged_table(self, pool: Sequence[int]) -> dict[str, torch.Tensor]:
        """All shards merged into one table in pool order, field -> `[N, ...]`; a repeated sample id keeps one copy.

        DataError if a pool sample has no scores, a shard names a sample outside the pool, or shard widths differ.
        """
        shards = self._shards()
        parts = [self._load(p) for p in shards]
        for path, part in zip(shards, parts):
            for key in ("rewards", "user_emb", "rep_vec"):
                if part[key].shape[1:] != parts[0][key].shape[1:]:
                    raise DataError(f"{path}: field '{key}' has width {list(part[key].shape[1:])} but "
                                    f"{shards[0].name} has {list(parts[0][key].shape[1:])}")
        first: dict[int, int] = {}
        ids = [int(i) for part in parts for i in part["sample_id"].tolist()]
        for row, sid in enumerate(ids):
            first.setdefault(sid, row)
        missing = [s for s in pool if s not in first]
        if missing:
            raise DataError(f"{self.shard_dir}: {len(missing)} of {len(pool)} pool samples have no scores "
                            f"(e.g. sample ids {missing[:5]}); run predict again to score them")
        extra = sorted(set(first) - set(pool))
        if extra:
            raise DataError(f"{self.shard_dir}: shards hold {len(extra)} sample ids outside the scoring pool "
                            f"(e.g. {extra[:5]}); this folder belongs to another pool")
        index = torch.tensor([first[s] for s in pool], dtype=torch.long)
        return {k: torch.cat([part[k] for part in parts])[index] for k in PREDICTION_FIELDS}

    def _merge(self, pool: list[int]) -> None:
        table = ScoreTable(**self.merged_table(pool))
        write_selection_artefacts(self.output_dir, table, self.selection, self.fingerprint, {
            "previously_scored": self.previously_scored, "seconds": round(time.perf_counter() - self.start_time, 3)})


def check_ks(config: SelectionConfig, pool_size: int) -> None:
    """A DataError when a subset size exceeds the scoring pool."""
    too_big = [k for k in config.ks if k > pool_size]
    if too_big:
        raise DataError(f"selection.ks: subset sizes {too_big} exceed the scoring pool of {pool_size} samples")


def write_selection_artefacts(output_dir: Path, table: ScoreTable, config: SelectionConfig,
                              fingerprint: dict[str, Any], scoring: dict[str, Any]) -> None:
    """The selection artefacts of a scored pool (`ScoreTable`, N samples) in `output_dir`, once the selection
    succeeded: `score_table.pt`, `scores.csv`, `selection_k{k}.json` per k, the plots, `summary.json` (with the
    scoring's `scoring` numbers) and last `selection.json`; `fingerprint` is the score folder's (dataset and scoring
    settings)."""
    pool = table.sample_id.tolist()
    check_ks(config, len(pool))
    result = select_subsets(table, config, fingerprint["dataset"],
                            config={**asdict(config), "scoring": fingerprint["scoring"]},
                            proxy_checkpoint=fingerprint["scoring"].get("proxy"))
    ids, rewards, mean = table.sample_id, table.rewards.float(), table.mean_reward.float()
    order, selections = result.order, result.selections
    per_k = {str(k): {name: float(v[order[:k]].mean()) for name, v in
                      (("mean_reward", mean), ("mean_L", result.L), ("mean_R", result.R), ("mean_q", result.q))}
             for k in selections}
    row_of = {int(s): r for r, s in enumerate(pool)}
    k_max = max(config.ks)
    rank = torch.full((len(pool),), -1, dtype=torch.long)
    rank[order] = torch.arange(k_max)
    stage = torch.full((len(pool),), -1, dtype=torch.long)
    curriculum_rows = [row_of[i] for i in selections[k_max].ids]
    stage[curriculum_rows] = torch.tensor(selections[k_max].stages)

    table.save(output_dir / "score_table.pt")
    _write_csv(output_dir, ids, rewards, mean, result.L, result.R, result.q, rank, stage)
    plots.reward_histogram(mean, output_dir / "reward_hist.png")
    plots.learnability_vs_representativeness(result.L, result.R, order, output_dir / "l_vs_r.png")
    plots.selected_vs_pool(table.user_emb, order, output_dir / "selected_vs_pool.png")
    plots.curriculum_order(mean[curriculum_rows], selections[k_max].stages, output_dir / "curriculum.png")
    for k, sel in selections.items():
        sel.save(output_dir / f"selection_k{k}.json")
    atomic_write_json(output_dir / "summary.json", {
        "pool_size": len(pool), "num_rollouts": rewards.shape[1], "mean_reward": float(mean.mean()),
        "frac_all_rewards_zero": float((rewards == 0).all(dim=1).float().mean()),
        "pool_mean_L": float(result.L.mean()), "pool_mean_R": float(result.R.mean()),
        "strategy": config.strategy, "curriculum": config.mode, "per_k": per_k, **scoring,
    })
    selections[config.ks[0]].save(output_dir / "selection.json")  # last: marks the selection done


def reselect(output_dir: str | Path, config: SelectionConfig) -> bool:
    """Select again from a complete score folder whose `selection.json` was made with other selection settings
    than `config` (the scores do not depend on them: the merged `score_table.pt` is reused); -> whether it did."""
    output_dir = Path(output_dir)
    made = Selection.load(output_dir / "selection.json").config or {}
    if {k: v for k, v in made.items() if k != "scoring"} == as_json(config):
        return False
    summary = read_json(output_dir / "summary.json")
    write_selection_artefacts(output_dir, ScoreTable.load(output_dir / "score_table.pt"), config,
                     read_json(output_dir / "fingerprint.json"),
                     {k: summary[k] for k in ("previously_scored", "seconds") if k in summary})
    return True


def _write_csv(output_dir: Path, ids: torch.Tensor, rewards: torch.Tensor, mean: torch.Tensor, L_: torch.Tensor,
               R_: torch.Tensor, q: torch.Tensor, rank: torch.Tensor, stage: torch.Tensor) -> None:
    """scores.csv: one row per pool sample (pool order), rewards space-separated; rank/stage -1 = not selected."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(CSV_COLUMNS)
    g = lambda x: f"{x:.9g}"  # noqa: E731
    columns = zip(ids.tolist(), rewards.tolist(), mean.tolist(), L_.tolist(), R_.tolist(), q.tolist(),
                  rank.tolist(), stage.tolist())
    for sid, rs, m, lv, rv, qv, rk, st in columns:
        out.writerow([sid, " ".join(map(g, rs)), g(m), g(lv), g(rv), g(qv), rk, st])
    atomic_write_text(output_dir / "scores.csv", buf.getvalue())
