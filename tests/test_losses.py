"""RecPO losses against hand-computed values: advantages, relabel, clipped token loss, InfoNCE, loss_impl modes; the
combined objective (`RecPOLoss`) over micro-batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minirec.io import DataError
from minirec.losses import (
    LossConfig,
    RecPOLoss,
    dedupe_targets,
    group_advantages,
    loss_weights,
    policy_token_loss,
    rec_infonce_loss,
    relabel_mask,
)

# Two groups of G = 4. Group 1: [1, 2, 3, 6], mean 3, deviations [-2, -1, 0, 3], sum of squares 14,
# unbiased std sqrt(14 / 3) = 2.16025. Group 2: [0, 1, 0, 0], mean 0.25, deviations [-.25, .75, -.25, -.25],
# sum of squares 0.75, unbiased std sqrt(0.75 / 3) = 0.5.
REWARDS = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 1.0, 0.0, 0.0])
STD1 = math.sqrt(14 / 3)
GAUSSIAN = torch.tensor([-2 / STD1, -1 / STD1, 0.0, 3 / STD1, -0.5, 1.5, -0.5, -0.5])


def test_gaussian_advantages():
    torch.testing.assert_close(group_advantages(REWARDS, 4, "gaussian"), GAUSSIAN)
    # a constant group has zero advantage (0 / (0 + eps)), not NaN
    torch.testing.assert_close(group_advantages(torch.full((4,), 0.7), 4), torch.zeros(4))


def test_leave_one_out_advantages():
    # r - mean(others): 1 - 11/3 = -8/3, 2 - 10/3 = -4/3, 3 - 9/3 = 0, 6 - 6/3 = 4;
    # group 2: 0 - 1/3, 1 - 0, 0 - 1/3, 0 - 1/3
    expected = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, -1 / 3, 1.0, -1 / 3, -1 / 3])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "leave_one_out"), expected)


@pytest.mark.parametrize("mode", ["gaussian", "leave_one_out"])
def test_group_of_one_gives_advantage_one(mode):
    torch.testing.assert_close(group_advantages(torch.tensor([0.3, 0.0, 0.9]), 1, mode), torch.ones(3))


def test_advantages_bfloat16_and_bad_settings():
    assert group_advantages(REWARDS.bfloat16(), 4).dtype == torch.float32
    with pytest.raises(DataError, match="group_size"):
        group_advantages(REWARDS, 3)
    with pytest.raises(DataError, match="advantage mode"):
        group_advantages(REWARDS, 4, "rloo")


def test_relabel_mask_top_k_with_stable_ties():
    r = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0])
    # group 1: tie 0.3 at indices 1 and 2 -> lowest index 1; group 2 all tied -> index 0
    assert relabel_mask(r, 4).tolist() == [False, True, False, False, True, False, False, False]
    # top 2: {1, 2} and {0, 1}
    assert relabel_mask(r, 4, topk=2).tolist() == [False, True, True, False, True, True, False, False]
    assert relabel_mask(r, 4, topk=9).all()
    assert not relabel_mask(r, 4, topk=0).any()


# Hand-picked ratios (old logp = 0, logp = log rho), eps_low 0.2, eps_high 0.28 -> clip range [0.8, 1.28].
# Row 0, A = +1: rho 1.5 -> min(1.5, 1.28) = 1.28 (high clip active); rho 0.5 -> min(0.5, 0.8) = 0.5 (unclipped);
#                rho 1.0 (masked out). Per-token loss -1.28, -0.5.
# Row 1, A = -2: rho 0.5 -> min(-1.0, -1.6) = -1.6 (low clip active); rho 1.5 -> min(-3.0, -2.56) = -3.0;
#                rho 1.1 -> -2.2. Per-token loss 1.6, 3.0, 2.2.
RATIOS = torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.5, 1.1]])
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
TOKEN_SUM = -1.28 - 0.5 + 1.6 + 3.0 + 2.2  # = 5.02 over 5 tokens


@pytest.mark.parametrize(
    ("agg", "max_len", "expected"),
    [
        ("token_mean", None, TOKEN_SUM / 5),  # 1.004
        ("seq_mean", None, ((-1.28 - 0.5) / 2 + (1.6 + 3.0 + 2.2) / 3) / 2),  # (-0.89 + 2.26667) / 2 = 0.68833
        ("dr_grpo", None, TOKEN_SUM / (2 * 3)),  # 0.83667
        ("dr_grpo", 4, TOKEN_SUM / (2 * 4)),  # 0.6275
    ],
)
def test_policy_token_loss_clipping_and_aggregation(agg, max_len, expected):
    loss, stats = policy_token_loss(RATIOS.log(), torch.zeros(2, 3), ADV, MASK, agg=agg, max_len=max_len)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)  # row 0 token 0 (high), row 1 token 0 (low)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5, rel=1e-5)
    assert stats["kl"].item() == 0.0


def test_policy_token_loss_kl_k3():
    logp = RATIOS.log()
    # ref - logp = ln 2 on every token -> k3 = e^{ln 2} - ln 2 - 1 = 1 - ln 2 = 0.30685
    loss, stats = policy_token_loss(logp, torch.zeros(2, 3), ADV, MASK, ref_logprobs=logp + math.log(2), kl_beta=0.1)
    assert stats["kl"].item() == pytest.approx(1 - math.log(2), rel=1e-5)
    assert loss.item() == pytest.approx(TOKEN_SUM / 5 + 0.1 * (1 - math.log(2)), rel=1e-5)
    # the KL term pulls logp towards ref: gradient of beta * k3 w.r.t. logp = beta * (1 - e^{ref - logp}) = -0.1
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = policy_token_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2),
                                ref_logprobs=torch.full((1, 2), math.log(2)), kl_beta=0.1)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.full((1, 2), 0.1 * (1 - 2) / 2))


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-6), (torch.bfloat16, 4e-3)])
def test_policy_token_loss_on_policy_gradient_is_minus_advantage(dtype, rtol):
    # ppo_epochs = 1: old = logp.detach() -> rho = 1, loss = -sum_r A_r * n_r / #tokens, dL/dlogp = -A_r / #tokens.
    logp = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    loss, stats = policy_token_loss(logp, logp.detach(), ADV, MASK)
    assert loss.item() == pytest.approx(-(1.0 * 2 + -2.0 * 3) / 5)  # = 0.8
    assert stats["clip_frac"].item() == 0.0 and stats["ratio_mean"].item() == 1.0
    loss.backward()
    assert logp.grad.dtype == dtype
    # row 0: -1/5 = -0.2 on its 2 tokens, 0 on the masked one; row 1: 2/5 = 0.4 (bfloat16 stores these rounded)
    torch.testing.assert_close(logp.grad.float(), -ADV[:, None] * MASK / 5, rtol=rtol, atol=0.0)


def test_policy_token_loss_rejects_unknown_aggregation():
    with pytest.raises(DataError, match="aggregation"):
        policy_token_loss(RATIOS.log(), torch.zeros(2, 3), ADV, MASK, agg="sum")


def _manual_infonce(user, candidates, index, weights, tau):
    logits = torch.stack([torch.stack([F.cosine_similarity(u, c, dim=0) for c in candidates]) for u in user]) / tau
    ce = torch.stack([-torch.log_softmax(logits[r], dim=0)[index[r]] for r in range(len(user))])
    return (weights * ce).sum() / len(user)


def test_rec_infonce_matches_manual_cross_entropy_and_gradients():
    g = torch.Generator().manual_seed(1)
    user = torch.randn(3, 4, generator=g)
    items = torch.randn(2, 4, generator=g, requires_grad=True)
    extra = torch.randn(2, 4, generator=g, requires_grad=True)
    index, weights = torch.tensor([0, 1, 0]), torch.tensor([1.0, 0.5, 2.0])
    loss = rec_infonce_loss(user, items, index, weights, tau=0.1, extra_negatives=extra)
    expected = _manual_infonce(user, torch.cat([items, extra]).detach(), index, weights, 0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert items.grad is not None and items.grad.abs().sum() > 0
    assert extra.grad is not None and extra.grad.abs().sum() > 0  # sampled negatives learn like the targets
    # without extra negatives: softmax over the 2 in-batch items only
    torch.testing.assert_close(rec_infonce_loss(user, items, index, weights, tau=0.1),
                               _manual_infonce(user, items.detach(), index, weights, 0.1))
    # zero weights -> zero loss (normaliser is R, not the weight sum)
    assert rec_infonce_loss(user, items, index, torch.zeros(3)).item() == 0.0


def test_rec_infonce_duplicate_targets_are_deduplicated():
    # rows 0 and 2 share target item 7: candidates are the unique items [3, 7] so item 7 is not its own negative
    unique, index = dedupe_targets(torch.tensor([7, 3, 7]))
    assert unique.tolist() == [3, 7] and index.tolist() == [1, 0, 1]
    g = torch.Generator().manual_seed(2)
    catalogue = torch.randn(10, 4, generator=g)
    user = torch.randn(3, 4, generator=g)
    w = torch.ones(3)
    loss = rec_infonce_loss(user, catalogue[unique], index, w, tau=0.1)
    torch.testing.assert_close(loss, _manual_infonce(user, catalogue[[3, 7]], index, w, 0.1))
    # extra negatives repeating an in-batch item (7) or each other (5, 5) are dropped: same as extras = [item 5]
    extra_ids = torch.tensor([7, 5, 5])
    with_dups = rec_infonce_loss(user, catalogue[unique], index, w, tau=0.1, extra_negatives=catalogue[extra_ids],
                                 item_ids=unique, extra_ids=extra_ids)
    torch.testing.assert_close(with_dups, _manual_infonce(user, catalogue[[3, 7, 5]], index, w, 0.1))


def test_rec_infonce_bfloat16_embeddings():
    g = torch.Generator().manual_seed(3)
    user, items = torch.randn(4, 8, generator=g), torch.randn(3, 8, generator=g)
    index, w = torch.tensor([0, 1, 2, 1]), torch.tensor([1.0, -1.0, 0.5, 0.0])
    ref = rec_infonce_loss(user.bfloat16().float(), items.bfloat16().float(), index, w)
    bf = rec_infonce_loss(user.bfloat16(), items.bfloat16(), index, w)
    assert bf.dtype == torch.float32
    torch.testing.assert_close(bf, ref)


def test_loss_weights_intended():
    relabel = relabel_mask(REWARDS, 4)  # argmax of each group: index 3 and index 5
    token_adv, rec_w = loss_weights(GAUSSIAN, relabel, 4, "intended")
    torch.testing.assert_close(token_adv, GAUSSIAN)
    torch.testing.assert_close(rec_w, torch.tensor([0, 0, 0, 3 / STD1, 0, 1.5, 0, 0]))


def test_loss_weights_reference_broadcast():
    adv = group_advantages(REWARDS, 4)
    relabel = relabel_mask(REWARDS, 4)
    token_adv, rec_w = loss_weights(adv, relabel, 4, "reference")
    # token term: every row gets mean(A) = 0 (each gaussian group sums to 0) -> cancels per group
    assert token_adv.view(2, 4).sum(dim=1).abs().max() < 1e-6
    # rec weight: one shared scalar = mean(A * relabel) = (3 / 2.16025 + 1.5) / 8 = 0.36109
    torch.testing.assert_close(rec_w, torch.full((8,), (3 / STD1 + 1.5) / 8))
    # with rho = 1 the reference token loss gives (almost) no gradient
    logp = torch.randn(8, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    loss, _ = policy_token_loss(logp, logp.detach(), token_adv, torch.ones(8, 5))
    loss.backward()
    assert logp.grad.abs().max() < 1e-7
    # leave-one-out groups also sum to 0 -> same cancellation
    loo = group_advantages(REWARDS, 4, "leave_one_out")
    assert loss_weights(loo, relabel, 4, "reference")[0].abs().max() < 1e-6
    with pytest.raises(DataError, match="loss_impl"):
        loss_weights(adv, relabel, 4, "published")


def test_reference_rec_weights_reproduce_published_broadcast_gradient():
    # Published code: item_loss = -min(coef[j] * Aw[i], clip(coef[j]) * Aw[i]) over an [R, R] broadcast, meaned,
    # with coef = p / p.detach(). Its gradient must equal that of our weighted InfoNCE with the shared weight.
    g = torch.Generator().manual_seed(5)
    user = torch.randn(8, 4, generator=g, requires_grad=True)
    items = torch.randn(2, 4, generator=g)
    index = torch.arange(2).repeat_interleave(4)
    adv, relabel = group_advantages(REWARDS, 4), relabel_mask(REWARDS, 4)
    aw = (adv * relabel.float())[:, None]
    probs = (F.normalize(user, dim=-1) @ F.normalize(items, dim=-1).T / 0.02).softmax(-1).gather(1, index[:, None])
    coef = probs / probs.detach()
    published = -torch.min(coef * aw.unsqueeze(-1), coef.clamp(0.8, 1.28) * aw.unsqueeze(-1)).sum(-1).mean()
    (grad_published,) = torch.autograd.grad(published, user)
    _, rec_w = loss_weights(adv, relabel, 4, "reference")
    (grad_ours,) = torch.autograd.grad(rec_infonce_loss(user, items, index, rec_w), user)
    torch.testing.assert_close(grad_ours, grad_published)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "dr_grpo"])
def test_recpo_loss_over_micro_batches_is_the_batch_loss(agg: str) -> None:
    """Backward on each micro-batch's loss gives the gradient of the whole batch's loss (shares by tokens or rows),
    and the loss is the token loss plus the weighted rec loss of `weights`."""
    g = torch.Generator().manual_seed(0)
    rows, width, hidden = 8, 5, 6
    objective = RecPOLoss(LossConfig(loss_agg=agg, rec_loss_weight=0.5), group_size=4, tau=0.1)
    adv, token_adv, rec_w = objective.weights(REWARDS)
    torch.testing.assert_close(adv, GAUSSIAN)
    torch.testing.assert_close(rec_w, GAUSSIAN * relabel_mask(REWARDS, 4, 1).float())
    mask = (torch.rand(rows, width, generator=g) > 0.3).float()
    mask[:, 0] = 1
    targets = torch.tensor([3, 3, 3, 3, 7, 7, 7, 7])
    uniq, index = dedupe_targets(targets)

    def run(chunks: list[slice]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logp = torch.linspace(-3, -0.1, rows * width).view(rows, width).requires_grad_()
        users = torch.linspace(-1, 1, rows * hidden).view(rows, hidden).sin().requires_grad_()
        items = torch.linspace(-1, 1, 2 * hidden).view(2, hidden).cos().requires_grad_()
        total, ce = torch.zeros(()), torch.zeros(())
        for sl in chunks:
            loss, stats = objective(logp[sl], logp[sl].detach(), mask[sl], token_adv[sl], users[sl], items, index[sl],
                                    rec_w[sl], batch_rows=rows, batch_tokens=mask.sum(), max_len=width)
            torch.testing.assert_close(loss.detach(), stats["token_loss"] + 0.5 * stats["rec_loss"])
            loss.backward()
            total, ce = total + loss.detach(), ce + stats["rec_ce"]
        # the logged cross-entropy is the unweighted rec loss: every row's, whatever its advantage
        torch.testing.assert_close(ce, rec_infonce_loss(users.detach(), items.detach(), index, torch.ones(rows), 0.1))
        return total, logp.grad, users.grad

    whole = run([slice(0, rows)])
    parts = run([slice(0, 3), slice(3, 6), slice(6, 8)])
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b)
    assert whole[1].abs().sum() > 0 and whole[2].abs().sum() > 0  # both terms carry gradient
