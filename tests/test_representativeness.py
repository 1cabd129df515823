"""Representativeness vectors (METHOD.md §5.3): the hidden-space HVP against autograd and finite differences, the
LoRA-space gradient / HVP, and the Rademacher projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minirec.io import DataError
from minirec.representativeness import RademacherProjection, hidden_hvp_vectors, parameter_space_vector

# ---------------------------------------------------------------- hidden-space HVP


def _reference_loss(h, items, target, history, tau, loss, batch_size):
    """Independent float64 re-statement of ℓ(h) (sum over rows), written without the project's scoring helpers."""
    hn, en = F.normalize(h, dim=1), F.normalize(items, dim=1)
    total = h.new_zeros(())
    for start in range(0, h.shape[0], batch_size):
        rows = range(start, min(start + batch_size, h.shape[0]))
        if loss == "full":
            for r in rows:
                s = en @ hn[r] / tau
                keep = torch.ones_like(s, dtype=torch.bool)
                keep[0] = False
                keep[history[r]] = False
                keep[target[r]] = True
                s = s.masked_fill(~keep, float("-inf"))
                total = total - torch.log_softmax(s, 0)[target[r]]
        else:
            cands = sorted(set(target[list(rows)].tolist()))
            for r in rows:
                s = en[cands] @ hn[r] / tau
                total = total - torch.log_softmax(s, 0)[cands.index(int(target[r]))]
    return total


def _hvp_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, hdim, m = 7, 6, 12
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    items = torch.randn(m + 1, hdim, generator=g, dtype=torch.float64)
    target = torch.tensor([3, 5, 3, 12, 1, 5, 7])  # duplicates: in_batch must use unique candidates
    history = torch.tensor([[1, 2, 0], [4, 5, 6], [7, 0, 0], [2, 9, 11], [10, 0, 0], [1, 3, 8], [0, 0, 0]])
    return h, items, target, history  # row 1 has its target 5 in its history: the target stays rankable


@pytest.mark.parametrize("loss,batch_size,tau", [("full", 256, 0.5), ("full", 3, 0.02), ("in_batch", 4, 0.5)])
def test_hidden_hvp_matches_autograd_hvp_and_finite_differences(loss: str, batch_size: int, tau: float) -> None:
    h, items, target, history = _hvp_problem()

    def f(x):
        return _reference_loss(x, items, target, history, tau, loss, batch_size)

    def grad(x):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(f(x), x)[0]

    u = hidden_hvp_vectors(h, items, target, history, tau=tau, loss=loss, batch_size=batch_size)
    assert u.shape == h.shape and u.dtype == torch.float64
    g = grad(h)
    assert g.norm() > 1e-3  # a real signal, not an all-zero check
    # torch.autograd.functional.hvp of the summed loss along v = g: rows are independent, so this is H_i g_i per row
    _, hvp_ref = torch.autograd.functional.hvp(f, h, v=g)
    # central differences of g along direction g, float64: (g(h + eps g) - g(h - eps g)) / (2 eps) ~= H g
    eps = 1e-6 * h.norm() / g.norm()
    fd = (grad(h + eps * g) - grad(h - eps * g)) / (2 * eps)
    assert torch.allclose(hvp_ref, fd, rtol=1e-5, atol=1e-6 * fd.abs().max())
    # the project scores in float32 (minirec.rewards), so compare at float32 accuracy, relative to the whole matrix
    assert ((u - hvp_ref).norm(dim=1) / hvp_ref.norm(dim=1)).max() < 1e-4
    assert ((u - fd).norm(dim=1) / fd.norm(dim=1)).max() < 1e-4


def test_hidden_hvp_full_is_batch_independent_and_in_batch_is_not() -> None:
    h, items, target, history = _hvp_problem(1)
    full_1 = hidden_hvp_vectors(h, items, target, history, tau=0.3, batch_size=1)
    full_all = hidden_hvp_vectors(h, items, target, history, tau=0.3, batch_size=256)
    torch.testing.assert_close(full_1, full_all, rtol=1e-5, atol=1e-6)
    in_2 = hidden_hvp_vectors(h, items, target, history, tau=0.3, loss="in_batch", batch_size=2)
    in_all = hidden_hvp_vectors(h, items, target, history, tau=0.3, loss="in_batch", batch_size=256)
    assert not torch.allclose(in_2, in_all)


def test_hidden_hvp_inside_inference_mode() -> None:
    h, items, target, history = _hvp_problem(2)
    expected = hidden_hvp_vectors(h.float(), items.float(), target, history)
    with torch.inference_mode():  # as in a Lightning predict_step: inputs are inference tensors
        got = hidden_hvp_vectors(h.float().clone(), items.float().clone(), target.clone(), history.clone())
    torch.testing.assert_close(got, expected)


def test_hidden_hvp_errors() -> None:
    h, items, target, history = _hvp_problem()
    with pytest.raises(DataError, match="'full' or 'in_batch'"):
        hidden_hvp_vectors(h, items, target, history, loss="softmax")
    with pytest.raises(DataError, match="target ids"):
        hidden_hvp_vectors(h, items, torch.tensor([0, 5, 3, 12, 1, 5, 7]), history)
    with pytest.raises(DataError, match="target ids"):
        hidden_hvp_vectors(h, items, torch.tensor([3, 5, 3, 13, 1, 5, 7]), history)
    with pytest.raises(DataError, match=r"target \[7\]"):
        hidden_hvp_vectors(h, items, target[:3], history)
    with pytest.raises(DataError, match="width"):
        hidden_hvp_vectors(h, items[:, :4], target, history)
    with pytest.raises(DataError, match="batch_size"):
        hidden_hvp_vectors(h, items, target, history, batch_size=0)


# ---------------------------------------------------------------- LoRA-space helpers


def test_parameter_space_vector_gradient_and_hvp() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    theta = torch.randn(12, generator=gen, dtype=torch.float64)  # w [3, 2] | b [2] | an unused block of 4

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        w, b = flat[:6].view(3, 2), flat[6:8]
        return (torch.tanh(x @ w + b) ** 2).sum() + (w**3).sum()

    flat = theta.clone().requires_grad_(True)
    grad_ref = torch.autograd.grad(loss_of(flat), flat)[0]
    _, hvp_ref = torch.autograd.functional.hvp(loss_of, theta, v=grad_ref)
    assert grad_ref[:8].abs().min() > 0 and torch.equal(grad_ref[8:], torch.zeros(4))

    def as_params() -> list[torch.Tensor]:  # the same numbers as separate leaf tensors, like LoRA A/B matrices
        return [theta[:6].view(3, 2).clone().requires_grad_(True), theta[6:8].clone().requires_grad_(True),
                theta[8:].clone().requires_grad_(True)]

    params = as_params()
    got_g = parameter_space_vector(loss_of(torch.cat([p.reshape(-1) for p in params])), params)
    torch.testing.assert_close(got_g, grad_ref)
    params = as_params()
    got_u = parameter_space_vector(loss_of(torch.cat([p.reshape(-1) for p in params])), params, hvp=True)
    torch.testing.assert_close(got_u, hvp_ref)  # H g, g = ∂loss/∂θ; zeros on the unused block
    assert got_u[:8].abs().max() > 0 and torch.equal(got_u[8:], torch.zeros(4))
    # a parameter the loss never touches is allowed and gives zeros
    w = theta[:6].view(3, 2).clone().requires_grad_(True)
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    got = parameter_space_vector((w**2).sum(), [w, unused], hvp=True)
    torch.testing.assert_close(got, torch.cat([4 * w.detach().reshape(-1), torch.zeros(3, dtype=torch.float64)]))
    # a loss linear in θ has H = 0
    torch.testing.assert_close(parameter_space_vector((3 * w).sum(), [w], hvp=True), torch.zeros(6, dtype=torch.float64))


def test_rademacher_projection_is_fixed_blockwise_and_norm_preserving() -> None:
    proj = RademacherProjection(dim_in=300, dim_out=4096, seed=7)
    p = proj.matrix()
    assert p.shape == (300, 4096)
    assert set(torch.unique(p).tolist()) == {-1 / 64, 1 / 64}  # ±1/sqrt(4096)
    assert abs(float(p.sign().mean())) < 0.01  # balanced signs (1.2M entries: std of the mean ~ 0.001)
    gram = p @ p.T  # rows nearly orthonormal: E[p_i·p_j] = δ_ij, std 1/sqrt(4096) = 0.016
    assert torch.allclose(gram.diagonal(), torch.ones(300))
    assert gram.fill_diagonal_(0).abs().max() < 0.1
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(1))
    y = proj(x)
    torch.testing.assert_close(y, x @ p)
    # same seed -> same result whatever the block size; another seed -> another matrix
    torch.testing.assert_close(RademacherProjection(300, 4096, seed=7, block_rows=13)(x), y)
    assert not torch.equal(RademacherProjection(300, 4096, seed=8).matrix(0, 5), p[:5])
    torch.testing.assert_close(proj.matrix(100, 120), p[100:120])
    # Johnson-Lindenstrauss: norms and inner products survive (relative std sqrt(2/4096) = 2 %)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=0.1)
    assert abs(float(y[0] @ y[1] - x[0] @ x[1])) < 0.1 * float(x[0].norm() * x[1].norm())
    # a single vector [D] -> [d']
    torch.testing.assert_close(proj(x[0]), y[0])
    with pytest.raises(DataError, match="length 300"):
        proj(torch.zeros(299))
    with pytest.raises(DataError, match="dim_in"):
        RademacherProjection(0)
