"""From a score table to training subsets (METHOD.md §5): the selection settings, the selection file, and the pure
selection core shared by the score writer and the data-efficiency benchmark.

- `SelectionConfig`: strategy, subset sizes, the L / q parameters, the curriculum, the greedy dtype.
- `ScoreTable`: the merged per-sample scores of a pool (what scoring produced), saved as `score_table.pt`.
- `select_subsets(table, config)`: L, R, q, one greedy run for the largest k (smaller ks are its prefixes) and each
  k's curriculum, as `Selection` records. No files, no Lightning.
- `Selection`: one selection file (`selection.json`): sample ids in curriculum order, a stage per id, the dataset
  fingerprint it was made on, and how it was made; `save` / `load` (with validation) are its only readers and writers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from minirec.curriculum import CURRICULUM_MODES, selection_records
from minirec.io import ConfigError, DataError, atomic_file, atomic_write_json, read_json
from minirec.selection import STRATEGIES, learnability, representativeness, value_scores

SELECTION_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SelectionConfig:
    """How a scored pool becomes training subsets.

    Args:
        ks: subset sizes (prefixes of one greedy run); the first is the one a pipeline trains.
        strategy: one of `minirec`, `minirec_no_curriculum`, `random`, `learnability`, `representativeness`,
            `diversity` (`full` needs no scoring: train with `data.subset: all`).
        alpha: weight of learnability in q = alpha·L + R.
        mu: reward at which learnability peaks.
        sigma: learnability width; null = the standard deviation of r̄ over the pool.
        curriculum: `stages`, `folds` or `none` (`minirec_no_curriculum` always uses `none`).
        num_stages: curriculum stages (`stages` mode); at most the smallest k.
        fold_size: samples per fold (`folds` mode).
        seed: seed of the `random` strategy (the `folds` order is fixed: METHOD.md §5.6).
        selection_dtype: dtype of the normalised embeddings in greedy selection (`float32`, `float16`, `bfloat16`).
    """

    ks: tuple[int, ...] = (256,)
    strategy: str = "minirec"
    alpha: float = 1.0
    mu: float = 0.5
    sigma: float | None = None
    curriculum: str = "stages"
    num_stages: int = 4
    fold_size: int = 64
    seed: int = 0
    selection_dtype: str = "float32"

    def __post_init__(self) -> None:
        ks = list(self.ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks) or len(set(ks)) < len(ks):
            raise ConfigError(f"selection.ks: need distinct positive integer subset sizes, got {ks}")
        object.__setattr__(self, "ks", tuple(ks))
        if self.strategy not in STRATEGIES or self.strategy == "full":
            choices = ", ".join(s for s in STRATEGIES if s != "full")
            raise ConfigError(f"selection.strategy: choose one of {choices} (got {self.strategy!r}); "
                              "'full' needs no scoring: train with data.subset: all")
        if self.curriculum not in CURRICULUM_MODES:
            raise ConfigError(f"selection.curriculum: choose one of {', '.join(CURRICULUM_MODES)}, "
                              f"got {self.curriculum!r}")
        if self.selection_dtype not in SELECTION_DTYPES:
            raise ConfigError(f"selection.selection_dtype: choose one of {', '.join(SELECTION_DTYPES)}, "
                              f"got {self.selection_dtype!r}")
        if self.fold_size < 1:
            raise ConfigError(f"selection.fold_size: must be >= 1, got {self.fold_size}")
        if self.mode == "stages" and not 1 <= self.num_stages <= min(ks):
            raise ConfigError(f"selection.num_stages: must lie in 1..{min(ks)} (the smallest of ks), "
                              f"got {self.num_stages}")

    @property
    def mode(self) -> str:
        """The curriculum the selections get (`none` for `minirec_no_curriculum`)."""
        return "none" if self.strategy == "minirec_no_curriculum" else self.curriculum


@dataclass(frozen=True)
class ScoreTable:
    """Per-sample scores of a pool, in pool order: sample_id `[N]`, rewards `[N, n]` (the n rollouts' rewards),
    mean_reward `[N]`, user_emb `[N, H]` (diversity), rep_vec `[N, D]` (representativeness vector u)."""

    sample_id: torch.Tensor
    rewards: torch.Tensor
    mean_reward: torch.Tensor
    user_emb: torch.Tensor
    rep_vec: torch.Tensor

    def save(self, path: str | Path) -> None:
        with atomic_file(path) as tmp:
            torch.save(asdict(self), tmp)

    @classmethod
    def load(cls, path: str | Path) -> ScoreTable:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DataError(f"{path}: no score table (score the pool first)") from None
        except Exception as e:
            raise DataError(f"{path}: unreadable score table ({e})") from None
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise DataError(f"{path}: missing field(s) {missing}")
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Selection:
    """One training subset (a selection file; `data.subset: <path>` trains on it).

    Args:
        ids: sample ids in curriculum order.
        stages: the curriculum stage of each id.
        curriculum: `stages`, `folds` or `none`.
        fingerprint: the processing fingerprint of the dataset the ids belong to.
        k: subset size.
        strategy: the selection strategy.
        selection_order: the ids in selection (greedy) order.
        pool_size: samples of the pool it was chosen from.
        config: the selection and scoring settings it was made with.
        proxy_checkpoint: the proxy that scored the pool (None when no proxy was used).
    """

    ids: list[int]
    stages: list[int]
    curriculum: str
    fingerprint: str
    k: int
    strategy: str
    selection_order: list[int]
    pool_size: int
    config: dict[str, Any] | None = None
    proxy_checkpoint: str | None = None

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, asdict(self))

    def digest(self) -> str:
        """12 hex digits of what a fit reads from the selection (dataset, ids in order, stages, curriculum): equal
        digests train alike, whatever settings chose them."""
        what = json.dumps([self.fingerprint, self.ids, self.stages, self.curriculum])
        return hashlib.sha256(what.encode()).hexdigest()[:12]

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> Selection:
        """Read and check a selection file (every field present, one stage per id, a known curriculum, and, when
        `fingerprint` is given, made on that dataset); a bad file is a DataError naming it and the field."""
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: not a selection file (expected a JSON object)")
        for name in ("ids", "stages", "fingerprint"):
            if name not in data:
                raise DataError(f"{path}: missing field '{name}'")
        if fingerprint is not None and data["fingerprint"] != fingerprint:
            raise DataError(f"{path}: made for dataset fingerprint {data['fingerprint']}, but data.processing has "
                            f"{fingerprint}; use a selection made on this dataset")
        if len(data["ids"]) != len(data["stages"]):
            raise DataError(f"{path}: 'ids' has {len(data['ids'])} entries but 'stages' has {len(data['stages'])}")
        curriculum = data.get("curriculum", "stages")
        if curriculum not in CURRICULUM_MODES:
            raise DataError(f"{path}: field 'curriculum' must be one of {CURRICULUM_MODES}, got {curriculum!r}")
        ids, stages = [int(i) for i in data["ids"]], [int(s) for s in data["stages"]]
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "ids": ids, "stages": stages,
                      "curriculum": curriculum, "k": int(data.get("k", len(ids))),
                      "strategy": data.get("strategy", "unknown"), "selection_order": data.get("selection_order", ids),
                      "pool_size": int(data.get("pool_size", len(ids)))})


@dataclass(frozen=True)
class SubsetResult:
    """What `select_subsets` decides for a pool of N: L, R, q `[N]`; order `[max k]` pool indices in selection order;
    one Selection per k."""

    L: torch.Tensor
    R: torch.Tensor
    q: torch.Tensor
    order: torch.Tensor
    selections: dict[int, Selection]


def select_subsets(table: ScoreTable, selection: SelectionConfig, fingerprint: str, **record: Any) -> SubsetResult:
    """L (from the mean rewards), R (from the representativeness vectors), q, one selection for the largest of
    `selection.ks` (smaller ks are its prefixes) and each k's curriculum, on the dataset `fingerprint`. `record` adds
    fields to every Selection (config, proxy_checkpoint)."""
    c, mean = selection, table.mean_reward.float()
    L = learnability(mean, c.mu, c.sigma)
    R = representativeness(table.rep_vec)
    q = value_scores(L, R, c.alpha)
    order, records = selection_records(
        c.strategy, list(c.ks), table.sample_id, mean, mode=c.mode, num_stages=c.num_stages, fold_size=c.fold_size,
        seed=c.seed, L=L, R=R, emb=table.user_emb, alpha=c.alpha, dtype=SELECTION_DTYPES[c.selection_dtype])
    pool = table.sample_id.numel()
    selections = {k: Selection(fingerprint=fingerprint, pool_size=pool, **rec, **record) for k, rec in records.items()}
    return SubsetResult(L, R, q, order, selections)
