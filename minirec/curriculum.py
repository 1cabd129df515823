"""Curriculum over the selected samples, easy -> hard by the proxy's mean reward r̄ (METHOD.md §5.6).

- `stages` (default): sort by r̄ descending, cut into `num_stages` nearly equal consecutive chunks (stage 0 = easiest);
  stage s unlocks at epoch s·epochs_per_stage; `cumulative` pacing trains on all unlocked stages, `exclusive` on the
  current one only; after the last stage every selected sample is active.
- `folds` (the published ordering, reproduced exactly): the ids in ascending order, shuffled by `random.Random(42)`
  (= `random.seed(42); random.shuffle`), cut into K = max(1, n // fold_size) folds, each sorted by r̄ descending,
  trained in that fixed order every epoch (no shuffling); independent of the run seed; stage index = fold index.
- `none`: selection order, one stage.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

import torch

from minirec.io import ConfigError, DataError
from minirec.selection import select

CURRICULUM_MODES = ("stages", "folds", "none")
PACINGS = ("cumulative", "exclusive")


def _rewards_of(ids: list[int], mean_rewards: Mapping[int, float] | Sequence[float] | torch.Tensor) -> list[float]:
    """r̄ of each id: a mapping is keyed by pool id; a sequence / tensor is aligned with `ids` (same order)."""
    if isinstance(mean_rewards, Mapping):
        missing = [i for i in ids if i not in mean_rewards]
        if missing:
            raise DataError(f"curriculum: no mean reward for selected ids {missing[:5]}")
        return [float(mean_rewards[i]) for i in ids]
    values = torch.as_tensor(mean_rewards, dtype=torch.float64).reshape(-1).tolist()
    if len(values) != len(ids):
        raise DataError(f"curriculum: {len(values)} mean rewards for {len(ids)} selected ids (must be aligned)")
    return values


def _by_reward_desc(ids: list[int], rewards: dict[int, float]) -> list[int]:
    """ids sorted by reward descending; ties keep their order (stable)."""
    return sorted(ids, key=lambda i: -rewards[i])


def build_curriculum(
    selected: Sequence[int] | torch.Tensor,
    mean_rewards: Mapping[int, float] | Sequence[float] | torch.Tensor,
    mode: str = "stages",
    num_stages: int = 4,
    fold_size: int = 64,
) -> tuple[list[int], list[int]]:
    """Order the selected pool ids and give each a stage: -> (ordered ids, stage index per id), both of length k.

    selected: pool ids in selection order (unique). mean_rewards: a mapping pool id -> r̄, or a sequence / tensor
    aligned with `selected`. stages: stable sort by r̄ descending, `num_stages` chunks whose sizes differ by at most one
    (larger ones first). folds: the ids in ascending order shuffled by `random.Random(42)`, K = max(1, n // fold_size)
    folds of n // K ids (the last takes the remainder), each stably sorted by r̄ descending; stage = fold index.
    none: selection order, all stage 0.
    """
    ids = [int(i) for i in torch.as_tensor(selected).reshape(-1).tolist()]
    if not ids:
        raise DataError("curriculum: the selection is empty")
    if len(set(ids)) != len(ids):
        raise DataError("curriculum: selected ids must be unique")
    rewards = dict(zip(ids, _rewards_of(ids, mean_rewards)))
    if mode == "none":
        return ids, [0] * len(ids)
    if mode == "stages":
        if not 1 <= num_stages <= len(ids):
            raise ConfigError(f"curriculum num_stages must lie in 1..{len(ids)} (the subset size), got {num_stages}")
        ordered = _by_reward_desc(ids, rewards)
        base, extra = divmod(len(ordered), num_stages)
        stages = [s for s in range(num_stages) for _ in range(base + (s < extra))]
        return ordered, stages
    if mode == "folds":
        if fold_size < 1:
            raise ConfigError(f"curriculum fold_size must be >= 1, got {fold_size}")
        shuffled = sorted(ids)
        random.Random(42).shuffle(shuffled)
        num_folds = max(1, len(ids) // fold_size)
        size = len(ids) // num_folds
        ordered, stages = [], []
        for f in range(num_folds):
            fold = _by_reward_desc(shuffled[f * size : None if f == num_folds - 1 else (f + 1) * size], rewards)
            ordered += fold
            stages += [f] * len(fold)
        return ordered, stages
    raise ConfigError(f"unknown curriculum mode {mode!r}; choose one of {', '.join(CURRICULUM_MODES)}")


def current_stage(epoch: int, epochs_per_stage: int, num_stages: int) -> int | None:
    """The stage unlocked last at `epoch` (epoch // epochs_per_stage), or None once every stage is unlocked and done."""
    if epoch < 0 or epochs_per_stage < 1 or num_stages < 1:
        raise DataError(
            f"curriculum needs epoch >= 0, epochs_per_stage >= 1, num_stages >= 1; "
            f"got {epoch}, {epochs_per_stage}, {num_stages}"
        )
    stage = epoch // epochs_per_stage
    return stage if stage < num_stages else None


def active_ids(
    ids: Sequence[int], stages: Sequence[int], stage: int | None, mode: str, pacing: str = "cumulative"
) -> list[int]:
    """The ids trained on while `stage` is the last unlocked one (None = all unlocked), in curriculum order.

    stages mode: cumulative -> ids with stage <= `stage`, exclusive -> stage == `stage`; None -> all ids.
    folds / none: all ids, fixed order.
    """
    if len(ids) != len(stages):
        raise DataError(f"curriculum: {len(ids)} ids but {len(stages)} stage indices")
    if pacing not in PACINGS:
        raise ConfigError(f"unknown curriculum pacing {pacing!r}; choose one of {', '.join(PACINGS)}")
    if mode not in CURRICULUM_MODES:
        raise ConfigError(f"unknown curriculum mode {mode!r}; choose one of {', '.join(CURRICULUM_MODES)}")
    ids = [int(i) for i in ids]
    if mode != "stages" or stage is None:
        return ids
    num_stages = max(stages) + 1 if len(stages) else 1
    if not 0 <= stage < num_stages:
        raise ConfigError(f"curriculum stage {stage} out of range 0..{num_stages - 1}")
    if pacing == "cumulative":
        return [i for i, s in zip(ids, stages) if s <= stage]
    return [i for i, s in zip(ids, stages) if s == stage]


def selection_records(
    strategy: str,
    ks: Sequence[int],
    ids: torch.Tensor,
    mean_rewards: torch.Tensor,
    *,
    mode: str,
    num_stages: int = 4,
    fold_size: int = 64,
    seed: int = 0,
    **scores: object,
) -> tuple[torch.Tensor, dict[int, dict]]:
    """One selection for max(ks) (smaller ks are its prefixes), each with its curriculum.

    ids `[N]` pool sample ids, mean_rewards `[N]` r̄; `seed` is the `random` strategy's (curricula do not use it);
    `scores` are `select`'s L, R, emb, alpha, dtype. Returns the pool indices `[max(ks)]` in selection order and, per
    k, the selection-file fields `ids` (curriculum order), `stages`, `curriculum`, `k`, `strategy`, `selection_order`
    (sample ids in selection order).
    """
    order = select(strategy, max(ks), mean_rewards=mean_rewards, seed=seed, **scores)
    records = {}
    for k in ks:
        chosen = order[:k]
        ordered, stages = build_curriculum(ids[chosen], mean_rewards[chosen], mode, num_stages, fold_size)
        records[k] = {"ids": ordered, "stages": stages, "curriculum": mode, "k": k, "strategy": strategy,
                      "selection_order": ids[chosen].tolist()}
    return order, records
