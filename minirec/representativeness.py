"""Representativeness vectors u = H·g per sample (METHOD.md §5.3), the input of the representativeness score R
(`minirec.selection.representativeness`).

- Hidden space (`hidden_hvp_vectors`): g = ∂ℓ/∂h of the recommendation loss at the user embedding h, u = H·g by
  double backward; cheap (H is the hidden width).
- LoRA parameter space (`parameter_space_vector` + `RademacherProjection`): the gradient (or H·g) of a sample's loss
  w.r.t. the LoRA weights, randomly projected to a fixed width by a Rademacher matrix generated block by block from a
  counter hash (never stored whole, identical on every device and run).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from minirec.io import DataError
from minirec.rewards import mask_history, score_items
from minirec.selection import checked_matrix


def _hidden_rec_loss(
    h: torch.Tensor, items: torch.Tensor, target: torch.Tensor, history: torch.Tensor, tau: float, loss: str
) -> torch.Tensor:
    """Summed recommendation loss of rows h `[B, H]`: cross entropy of the target over the masked full catalogue
    (`full`), or over the batch's unique targets without history masking (`in_batch`, as in the published code)."""
    if loss == "full":
        scores = mask_history(score_items(h, items, tau), history, target)
        return F.cross_entropy(scores, target, reduction="sum")
    candidates, label = torch.unique(target, return_inverse=True)
    return F.cross_entropy(score_items(h, items[candidates], tau), label, reduction="sum")


def hidden_hvp_vectors(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    target: torch.Tensor,
    history: torch.Tensor,
    tau: float = 0.02,
    loss: str = "full",
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample curvature-weighted gradients in the hidden space, u = H·g with g = ∂ℓ/∂h, H = ∂²ℓ/∂h².

    user_emb `[N, H]`, item_emb `[M + 1, H]` (constant; row 0 padding), target `[N]` in 1..M, history `[N, L]`
    -> u `[N, H]` in user_emb's dtype (at least float32). ℓ is a sum over rows, so one double backward of
    d(g·g)/dh / 2 gives every row's own H_i g_i. `loss="full"` is independent of `batch_size`; `"in_batch"` uses each
    batch's unique targets.
    Works under `torch.no_grad()` / `torch.inference_mode()` (e.g. inside a Lightning predict_step).
    """
    if loss not in ("full", "in_batch"):
        raise DataError(f"representativeness loss must be 'full' or 'in_batch', got {loss!r}")
    if batch_size < 1:
        raise DataError(f"representativeness batch_size must be >= 1, got {batch_size}")
    user_emb = checked_matrix(user_emb, "user_emb")
    item_emb = checked_matrix(item_emb, "item_emb")
    n, m = user_emb.shape[0], item_emb.shape[0] - 1
    target = torch.as_tensor(target).long()
    history = torch.as_tensor(history).long()
    if item_emb.shape[1] != user_emb.shape[1]:
        raise DataError(f"item_emb width {item_emb.shape[1]} differs from user_emb width {user_emb.shape[1]}")
    if target.shape != (n,) or history.dim() != 2 or history.shape[0] != n:
        raise DataError(f"need target [{n}] and history [{n}, L], got {list(target.shape)} and {list(history.shape)}")
    if target.min() < 1 or target.max() > m or (history.numel() and (history.min() < 0 or history.max() > m)):
        raise DataError(f"target ids must lie in 1..{m} and history ids in 0..{m} (0 is padding)")
    dtype = torch.promote_types(user_emb.dtype, torch.float32)
    out = []
    with torch.inference_mode(False), torch.enable_grad():
        # clones: inference tensors (from a predict_step) cannot enter an autograd graph
        items = item_emb.to(device=user_emb.device, dtype=dtype).clone()
        target, history = target.to(user_emb.device).clone(), history.to(user_emb.device).clone()
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            h = user_emb[rows].to(dtype).clone().requires_grad_(True)
            ell = _hidden_rec_loss(h, items, target[rows], history[rows], tau, loss)
            (g,) = torch.autograd.grad(ell, h, create_graph=True)
            (u,) = torch.autograd.grad(0.5 * (g * g).sum(), h)
            out.append(u.detach())
    return torch.cat(out)


def _grads(out: torch.Tensor, params: list[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    """∂out/∂p for each p; zeros where out does not depend on p (or on anything)."""
    if not out.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(out, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def parameter_space_vector(loss: torch.Tensor, params: Sequence[torch.Tensor], hvp: bool = False) -> torch.Tensor:
    """One sample's flat parameter-space vector: g = ∂loss/∂θ over `params` (e.g. the LoRA weights) `[D]`, or with
    `hvp=True` u = H·g = ∂(g·g)/∂θ / 2 by double backward (the graph must support it: eager attention / SDPA math).
    Parameters the loss does not reach contribute zeros. Feed the result to `RademacherProjection`."""
    params = list(params)
    grads = _grads(loss, params, create_graph=hvp)
    if hvp:
        grads = _grads(0.5 * sum((g * g).sum() for g in grads), params)
    return torch.cat([g.detach().reshape(-1) for g in grads])


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) without int64 overflow (c split into 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash (C. Wellons) of int64 values in [0, 2^32): identical on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class RademacherProjection:
    """Fixed random projection of flat gradients `[..., dim_in] -> [..., dim_out]` by a ±1/sqrt(dim_out) matrix P.

    Entry P[i, j] comes from a counter-based hash of (seed, i, j), so the matrix never exists whole: it is generated in
    row blocks of `block_rows` on the device that computes, and the result is the same for the same seed on every
    device and for every block size. E||x P||² = ||x||² (Johnson-Lindenstrauss).

    Args:
        dim_in: length D of the flat gradient.
        dim_out: projected width d' (8192 in the method).
        seed: fixes the matrix.
        device: where the projection runs and its result lives; None = the input's device.
        block_rows: rows of P generated at once (None: about 1M entries per block, so the int64 temporaries of
            8 MB stay below the allocator's mmap threshold; 4M-entry blocks ran 6x slower on CPU).
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int = 8192,
        seed: int = 0,
        device: torch.device | str | None = None,
        block_rows: int | None = None,
    ) -> None:
        if not 1 <= dim_in < 2**32 or dim_out < 1:
            raise DataError(f"projection needs 1 <= dim_in < 2^32 and dim_out >= 1, got {dim_in}, {dim_out}")
        self.dim_in, self.dim_out, self.seed = dim_in, dim_out, seed
        self.device = None if device is None else torch.device(device)
        self.block_rows = block_rows or max(1, 2**20 // dim_out)
        self._seed_key = int(_hash32(torch.tensor(seed & _MASK32)))

    def matrix(self, start: int = 0, stop: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        """Rows start..stop of P as float32 `[stop - start, dim_out]`."""
        stop = self.dim_in if stop is None else stop
        rows = torch.arange(start, stop, device=device, dtype=torch.int64)
        cols = torch.arange(self.dim_out, device=device, dtype=torch.int64)
        row_key = _hash32(rows ^ self._seed_key)
        col_key = _hash32((cols + 0x9E3779B9) & _MASK32)
        bits = (_hash32(row_key[:, None] ^ col_key[None, :]) >> 31).to(torch.float32)
        return (1.0 - 2.0 * bits) / math.sqrt(self.dim_out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., dim_in]` -> x P `[..., dim_out]` in float32."""
        if x.shape[-1] != self.dim_in:
            raise DataError(f"projection expects vectors of length {self.dim_in}, got {x.shape[-1]}")
        device = self.device or x.device
        flat = x.reshape(-1, self.dim_in).to(device=device, dtype=torch.float32)
        out = torch.zeros(flat.shape[0], self.dim_out, device=device)
        for start in range(0, self.dim_in, self.block_rows):
            stop = min(start + self.block_rows, self.dim_in)
            out += flat[:, start:stop] @ self.matrix(start, stop, device)
        return out.reshape(*x.shape[:-1], self.dim_out)
