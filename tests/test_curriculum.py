"""Curriculum construction and the per-epoch schedule (METHOD.md §5.6)."""

from __future__ import annotations

import random

import pytest
import torch

from minirec.curriculum import active_ids, build_curriculum, current_stage, selection_records
from minirec.io import DataError

SELECTED = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # pool ids in selection order
REWARDS = [0.1, 0.9, 0.5, 0.5, 0.0, 0.7, 0.3, 0.9, 0.2, 0.6]  # aligned with SELECTED
# sorted by r̄ descending, ties in selection order: .9 (11), .9 (17), .7 (15), .6 (19), .5 (12), .5 (13), .3 (16),
# .2 (18), .1 (10), 0 (14)
BY_REWARD = [11, 17, 15, 19, 12, 13, 16, 18, 10, 14]


def test_stages_sort_and_chunking() -> None:
    # 10 ids in 4 stages: 10 = 4*2 + 2 -> sizes 3, 3, 2, 2 (larger chunks first)
    ids, stages = build_curriculum(SELECTED, REWARDS, mode="stages", num_stages=4)
    assert ids == BY_REWARD
    assert stages == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    # the same from a mapping pool id -> r̄ and from tensors
    by_id = dict(zip(SELECTED, REWARDS))
    assert build_curriculum(SELECTED, by_id) == (ids, stages)
    assert build_curriculum(torch.tensor(SELECTED), torch.tensor(REWARDS)) == (ids, stages)
    # 1 stage: everything in stage 0; k stages: one id each
    assert build_curriculum(SELECTED, REWARDS, num_stages=1) == (BY_REWARD, [0] * 10)
    assert build_curriculum(SELECTED, REWARDS, num_stages=10) == (BY_REWARD, list(range(10)))
    # 3 stages: 10 = 3*3 + 1 -> sizes 4, 3, 3
    assert build_curriculum(SELECTED, REWARDS, num_stages=3)[1] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def _published_folds(ids: list[int], reward: dict[int, float]) -> list[int]:
    """The published ordering, literally: ascending ids, random.seed(42); random.shuffle, K = n // 64 folds of n // K
    (the last takes the rest), each sorted by r̄ descending."""
    state = random.getstate()
    ids = sorted(ids)
    random.seed(42)
    random.shuffle(ids)
    random.setstate(state)
    num_folds = max(1, len(ids) // 64)
    size = len(ids) // num_folds
    ordered = []
    for f in range(num_folds):
        fold = ids[f * size :] if f == num_folds - 1 else ids[f * size : (f + 1) * size]
        ordered += sorted(fold, key=lambda i: reward[i], reverse=True)
    return ordered


def test_seeded_random_instance_equals_global_seed() -> None:
    ids, state = list(range(300)), random.getstate()
    random.seed(42)
    random.shuffle(ids)
    random.setstate(state)
    other = list(range(300))
    random.Random(42).shuffle(other)
    assert other == ids


@pytest.mark.parametrize("n,fold_sizes", [(256, [64] * 4), (200, [66, 66, 68]), (100, [100]), (40, [40])])
def test_folds_reproduce_the_published_order(n: int, fold_sizes: list[int]) -> None:
    g = torch.Generator().manual_seed(n)
    pool_ids = (torch.randperm(5 * n, generator=g)[:n] + 1000).tolist()  # selection order, not ascending
    rewards = (torch.randint(0, 5, (n,), generator=g) / 4).tolist()  # many ties: the fold sort must be stable
    reward = dict(zip(pool_ids, rewards))
    ids, stages = build_curriculum(pool_ids, rewards, mode="folds")
    assert ids == _published_folds(pool_ids, reward)
    assert stages == [f for f, size in enumerate(fold_sizes) for _ in range(size)]
    perm = torch.randperm(n, generator=g).tolist()  # another selection order of the same ids
    assert build_curriculum([pool_ids[p] for p in perm], reward, mode="folds") == (ids, stages)
    # the run seed (of the random strategy) does not move the fold order
    for seed in (0, 1, 7):
        _, records = selection_records("learnability", [n], torch.tensor(pool_ids), torch.tensor(rewards),
                                       mode="folds", seed=seed, L=torch.tensor(rewards))
        assert (records[n]["ids"], records[n]["stages"]) == (ids, stages)


def test_folds_with_other_fold_sizes() -> None:
    # 10 ids, fold_size 4 -> K = 2 folds of 5; fold_size 64 -> one fold: a plain stable sort by r̄
    ids, stages = build_curriculum(SELECTED, REWARDS, mode="folds", fold_size=4)
    rewards = dict(zip(SELECTED, REWARDS))
    shuffled = sorted(SELECTED)
    random.Random(42).shuffle(shuffled)
    assert stages == [0] * 5 + [1] * 5
    assert ids == sorted(shuffled[:5], key=lambda i: -rewards[i]) + sorted(shuffled[5:], key=lambda i: -rewards[i])
    one_ids, one_stages = build_curriculum(SELECTED, REWARDS, mode="folds")
    assert one_ids == sorted(shuffled, key=lambda i: -rewards[i]) and one_stages == [0] * 10


def test_none_keeps_selection_order() -> None:
    assert build_curriculum(SELECTED, REWARDS, mode="none") == (SELECTED, [0] * 10)


def test_build_curriculum_errors() -> None:
    for bad in (0, 11):
        with pytest.raises(DataError, match="num_stages must lie in 1..10"):
            build_curriculum(SELECTED, REWARDS, num_stages=bad)
    with pytest.raises(DataError, match="unknown curriculum mode 'random'"):
        build_curriculum(SELECTED, REWARDS, mode="random")
    with pytest.raises(DataError, match="fold_size"):
        build_curriculum(SELECTED, REWARDS, mode="folds", fold_size=0)
    with pytest.raises(DataError, match="unique"):
        build_curriculum([1, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="empty"):
        build_curriculum([], [])
    with pytest.raises(DataError, match="9 mean rewards for 10 selected ids"):
        build_curriculum(SELECTED, REWARDS[:9])
    with pytest.raises(DataError, match=r"no mean reward for selected ids \[19\]"):
        build_curriculum(SELECTED, dict(zip(SELECTED[:9], REWARDS)))


def test_current_stage() -> None:
    assert [current_stage(e, 1, 4) for e in range(6)] == [0, 1, 2, 3, None, None]
    assert [current_stage(e, 2, 3) for e in range(8)] == [0, 0, 1, 1, 2, 2, None, None]
    with pytest.raises(DataError, match="epochs_per_stage >= 1"):
        current_stage(0, 0, 4)
    with pytest.raises(DataError, match="epoch >= 0"):
        current_stage(-1, 1, 4)


def test_active_ids_cumulative_and_exclusive() -> None:
    ids, stages = build_curriculum(SELECTED, REWARDS, num_stages=4)  # stages [0,0,0,1,1,1,2,2,3,3]
    # 2 epochs per stage: epochs 0-1 stage 0, 2-3 stage 1, 4-5 stage 2, 6-7 stage 3, 8+ everything (stage None)
    at = [current_stage(e, 2, 4) for e in range(10)]
    assert at == [0, 0, 1, 1, 2, 2, 3, 3, None, None]
    cumulative = [active_ids(ids, stages, s, "stages") for s in at]
    assert cumulative[0] == cumulative[1] == BY_REWARD[:3]
    assert cumulative[2] == cumulative[3] == BY_REWARD[:6]
    assert cumulative[4] == BY_REWARD[:8]
    assert cumulative[6] == cumulative[8] == cumulative[9] == BY_REWARD
    exclusive = [active_ids(ids, stages, s, "stages", pacing="exclusive") for s in at]
    assert exclusive[1] == BY_REWARD[:3]
    assert exclusive[2] == [19, 12, 13]
    assert exclusive[5] == [16, 18]
    assert exclusive[7] == [10, 14]
    assert exclusive[8] == exclusive[9] == BY_REWARD  # after the last stage: all selected samples
    # folds / none: every id in the fixed order at every stage
    f_ids, f_stages = build_curriculum(SELECTED, REWARDS, mode="folds", fold_size=4)
    for s in (0, 1, None):
        assert active_ids(f_ids, f_stages, s, "folds") == f_ids
        assert active_ids(SELECTED, [0] * 10, s, "none", pacing="exclusive") == SELECTED


def test_active_ids_errors() -> None:
    ids, stages = build_curriculum(SELECTED, REWARDS, num_stages=4)
    with pytest.raises(DataError, match="pacing 'linear'"):
        active_ids(ids, stages, 0, "stages", pacing="linear")
    with pytest.raises(DataError, match="mode 'easy'"):
        active_ids(ids, stages, 0, "easy")
    with pytest.raises(DataError, match="10 ids but 9 stage"):
        active_ids(ids, stages[:9], 0, "stages")
    with pytest.raises(DataError, match="stage 4 out of range 0..3"):
        active_ids(ids, stages, 4, "stages")
    with pytest.raises(DataError, match="epoch >= 0"):
        current_stage(-1, 1, 4)