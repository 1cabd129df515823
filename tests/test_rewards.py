"""Scoring, history masking, pessimistic ranks and the RecPO reward on a hand-computed 5-item catalogue."""

from __future__ import annotations

import math

import pytest
import torch

from minirec.io import ConfigError, DataError
from minirec.rewards import (
    catalog_negatives, item_negatives, mask_history, misses_top_k, ndcg_at_rank, recpo_reward, score_items, target_rank,
)

# Catalogue (H = 2): row 0 = padding (zero vector), items 1..5.
ITEMS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 4.0], [4.0, 3.0]])
# u1 = (2, 0) -> cos with items 1..5: 1, 0, -1, 3/5, 4/5.  u2 = (0, 1) -> 0, 1, 0, 4/5, 3/5.
USERS = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
NEG = float("-inf")


def test_score_items_exact_cosines_over_tau():
    s = score_items(USERS, ITEMS, tau=0.5)  # cos / 0.5 = 2 * cos
    expected = torch.tensor([[0.0, 2.0, 0.0, -2.0, 1.2, 1.6], [0.0, 0.0, 2.0, 0.0, 1.6, 1.2]])
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, expected)
    # default tau = 0.02: cos * 50
    torch.testing.assert_close(score_items(USERS, ITEMS)[0, 1:], torch.tensor([50.0, 0.0, -50.0, 30.0, 40.0]))


def test_score_items_bfloat16_inputs_score_in_float32():
    u, e = USERS.bfloat16(), ITEMS.bfloat16()  # these values are exact in bfloat16
    s = score_items(u, e, tau=0.5)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, score_items(USERS, ITEMS, tau=0.5))


def test_mask_history_masks_padding_and_history_but_never_the_target():
    s = score_items(USERS, ITEMS, tau=0.5)
    history = torch.tensor([[5, 4, 0], [2, 0, 0]])
    # row 0: target 5 is in the history (repeat purchase) -> 5 stays, 4 and padding 0 masked.
    masked = mask_history(s, history, target=torch.tensor([5, 1]))
    expected = torch.tensor([[NEG, 2.0, 0.0, -2.0, NEG, 1.6], [NEG, 0.0, NEG, 0.0, 1.6, 1.2]])
    torch.testing.assert_close(masked, expected)
    # without a target every history item is masked; the input is left untouched.
    no_target = mask_history(s, history)
    assert no_target[0, 5] == NEG and s[0, 5] == pytest.approx(1.6)


def test_item_negatives_mask_each_rows_history():
    history = torch.tensor([[5, 4, 0], [2, 0, 0]])
    emb, ids, blocked = item_negatives(ITEMS[[4, 1, 5]], torch.tensor([4, 1, 5]), history)
    assert torch.equal(emb, ITEMS[[4, 1, 5]]) and ids.tolist() == [4, 1, 5]
    assert blocked.tolist() == [[True, False, True], [False, False, False]]
    emb, ids, blocked = catalog_negatives(ITEMS, history)  # items 1..5, padding row dropped
    assert torch.equal(emb, ITEMS[1:]) and ids.tolist() == [1, 2, 3, 4, 5]
    assert blocked.tolist() == [[False, False, False, True, True], [False, True, False, False, False]]


def test_target_rank_pessimistic_ties_and_ndcg():
    s = score_items(USERS, ITEMS, tau=0.5)
    history = torch.tensor([[1, 0], [2, 0]])
    masked = mask_history(s, history, target=torch.tensor([5, 1]))
    # row 0 (u1, target 5 = 1.6): items left 2:0, 3:-2, 4:1.2, 5:1.6 -> nothing higher -> rank 1.
    # row 1 (u2, target 1 = 0): items left 1:0, 3:0, 4:1.6, 5:1.2 -> 2 higher + 1 tie (item 3) -> rank 1 + 2 + 1 = 4.
    rank = target_rank(masked, torch.tensor([5, 1]))
    assert rank.dtype == torch.long and rank.tolist() == [1, 4]
    # NDCG: 1/log2(1+1) = 1; 1/log2(4+1) = 0.43068; rank 4 > K = 3 -> 0.
    torch.testing.assert_close(ndcg_at_rank(rank, 10), torch.tensor([1.0, 1.0 / math.log2(5.0)]))
    torch.testing.assert_close(ndcg_at_rank(rank, 3), torch.tensor([1.0, 0.0]))
    # target in history (u1, history [5, 4], target 5): left 1:2, 2:0, 3:-2, 5:1.6 -> rank 2.
    masked = mask_history(s[:1], torch.tensor([[5, 4]]), target=torch.tensor([5]))
    assert target_rank(masked, torch.tensor([5])).tolist() == [2]


def test_target_rank_matches_sorting_without_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, generator=g)
    target = torch.randint(1, 50, (6,), generator=g)
    masked = mask_history(scores, torch.randint(0, 50, (6, 8), generator=g), target)
    order = masked.argsort(dim=1, descending=True)
    expected = (order == target[:, None]).nonzero()[:, 1] + 1
    assert target_rank(masked, target).tolist() == expected.tolist()


def test_target_rank_rejects_padding_or_out_of_range_targets():
    s = torch.zeros(2, 6)
    with pytest.raises(DataError, match="1..5"):
        target_rank(s, torch.tensor([0, 3]))
    with pytest.raises(DataError, match="1..5"):
        recpo_reward(s, torch.tensor([6, 3]))


def test_recpo_reward_hand_computed():
    s = score_items(USERS, ITEMS, tau=0.5)
    target = torch.tensor([5, 1])
    masked = mask_history(s, torch.tensor([[1, 0], [2, 0]]), target)
    # row 0: softmax over {2:0, 3:-2, 4:1.2, 5:1.6}: p5 = e^1.6 / (e^0 + e^-2 + e^1.2 + e^1.6) = 0.52644
    p0 = math.exp(1.6) / (1 + math.exp(-2) + math.exp(1.2) + math.exp(1.6))
    # row 1: softmax over {1:0, 3:0, 4:1.6, 5:1.2}: p1 = 1 / (1 + 1 + e^1.6 + e^1.2) = 0.09612, rank 4
    p1 = 1.0 / (2 + math.exp(1.6) + math.exp(1.2))
    r = recpo_reward(masked, target, ndcg_k=1000, softmax_weight=0.05)
    torch.testing.assert_close(r, torch.tensor([0.95 * 1.0 + 0.05 * p0, 0.95 / math.log2(5) + 0.05 * p1]))
    # K = 3 cuts row 1's NDCG (rank 4) -> reward is the softmax part only
    r3 = recpo_reward(masked, target, ndcg_k=3, softmax_weight=0.05)
    torch.testing.assert_close(r3[1], torch.tensor(0.05 * p1))
    # w = 0 -> pure NDCG; w = 1 -> pure probability
    torch.testing.assert_close(recpo_reward(masked, target, softmax_weight=0.0), ndcg_at_rank(torch.tensor([1, 4]), 1000))
    torch.testing.assert_close(recpo_reward(masked, target, softmax_weight=1.0), torch.tensor([p0, p1]))


def test_recpo_reward_bfloat16_scores():
    s = score_items(USERS, ITEMS, tau=0.5)
    target = torch.tensor([5, 1])
    masked = mask_history(s, torch.tensor([[1, 0], [2, 0]]), target)
    r = recpo_reward(masked.bfloat16(), target)
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, recpo_reward(masked, target), atol=2e-3, rtol=0)


@pytest.mark.parametrize("ndcg_k", [1, 10, 49])
def test_misses_top_k_reads_the_rank_cutoff_from_the_reward(ndcg_k):
    """Rewards of ranks beyond ndcg_k (softmax share only) are told from those within it, rank = k included."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(400, 51, generator=g) * 5
    scores[:, 0] = NEG  # padding
    target = torch.randint(1, 51, (400,), generator=g)
    rewards = recpo_reward(scores, target, ndcg_k=ndcg_k, softmax_weight=0.05)
    rank = target_rank(scores, target)
    assert (rank == ndcg_k).any() and (rank > ndcg_k).any()
    assert torch.equal(misses_top_k(rewards, ndcg_k, 0.05), rank > ndcg_k)


def test_misses_top_k_refuses_an_ambiguous_softmax_weight():
    with pytest.raises(ConfigError, match="softmax_weight 0.5"):
        misses_top_k(torch.zeros(3), 1000, 0.5)  # 0.5 / log2(1001) < 0.5: a softmax share can pass for a rank
