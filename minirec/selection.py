"""MiniRec sample selection (METHOD.md §5): learnability, representativeness and value scores, greedy selection,
baselines.

Pure torch, any device. Pool size N; every score vector is `[N]` and aligned with the pool.

- Learnability L = min-max(exp(-(r̄ - mu)^2 / (2 sigma^2))), sigma = population std of r̄ over the pool by default,
  computed in a form that cannot underflow.
- Representativeness R = min-max((cos(u, mean u) + 1) / 2), u = H·g per sample (the vectors u come from
  `minirec.representativeness`, in the hidden or the LoRA parameter space).
- Value q = alpha·L + R; greedy selection maximises v(x)·q(x), v = min cosine distance to the selected set divided
  by its maximum over the pool (`greedy_value_selection`). Diversity only: farthest-point k-center
  (`k_center_selection`). `select` runs any of `STRATEGIES`.

Min-max of a constant vector gives all ones (as the published code does): a score that cannot tell samples apart
then adds the same amount to every q and leaves the ranking to the other terms.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from minirec.io import ConfigError, DataError

STRATEGIES = (
    "minirec",
    "random",
    "full",
    "learnability",
    "representativeness",
    "diversity",
    "minirec_no_curriculum",
)


def checked_vector(x: torch.Tensor, name: str, n: int | None = None) -> torch.Tensor:
    """Check a finite 1-D score vector (of length n if given) and return it as a floating tensor."""
    x = torch.as_tensor(x)
    if x.dim() != 1 or x.numel() == 0:
        raise DataError(f"{name} must be a non-empty 1-D tensor, got shape {list(x.shape)}")
    if n is not None and x.numel() != n:
        raise DataError(f"{name} has {x.numel()} entries but the pool has {n} samples")
    if not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        raise DataError(f"{name} contains NaN or infinite values")
    return x


def checked_matrix(x: torch.Tensor, name: str, n: int | None = None) -> torch.Tensor:
    """Check a finite 2-D embedding matrix `[n, d]` and return it as a floating tensor."""
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{name} must be a non-empty 2-D tensor [N, d], got shape {list(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise DataError(f"{name} has {x.shape[0]} rows but the pool has {n} samples")
    if not x.is_floating_point():
        x = x.float()
    # finite iff every row's squared norm is finite (a NaN or inf entry makes its row's sum non-finite); this avoids
    # an [N, d] boolean temporary, which dominated peak memory for very large pools
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.promote_types(x.dtype, torch.float32))
    if not torch.isfinite(norms).all():
        raise DataError(f"{name} contains NaN or infinite values")
    return x


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise `[N]` to [0, 1]; a constant vector gives all ones (published-code parity)."""
    lo, hi = x.min(), x.max()
    if hi == lo:
        return torch.ones_like(x)
    return (x - lo) / (hi - lo)


def learnability(mean_rewards: torch.Tensor, mu: float = 0.5, sigma: float | None = None) -> torch.Tensor:
    """L = min-max(exp(z)) over the pool, z = -(r̄ - mu)^2 / (2 sigma^2): mean_rewards `[N]` -> `[N]` in [0, 1].

    sigma=None uses the population standard deviation of r̄ over the pool (numpy's `std`, as the published code);
    if every r̄ is equal (std 0) every sample is alike and all scores are 1. A fixed sigma must be > 0.
    exp(z) itself underflows for a weak proxy or a small sigma (to 0 below z ≈ -104 in float32, -745 in float64), so
    L is computed in float64 as (e^z - e^lo) / (e^hi - e^lo) = e^(z - hi) · (1 - e^(lo - z)) / (1 - e^(lo - hi)),
    lo / hi = min / max of z: exact up to rounding for any z (a constant z gives all ones, as `min_max`).
    """
    r = checked_vector(mean_rewards, "mean_rewards")
    dtype = torch.promote_types(r.dtype, torch.float32)
    r64 = r.to("cpu", torch.float64)  # N values; float64 is missing on some devices (MPS)
    if sigma is None:
        if r64.min() == r64.max():
            return torch.ones_like(r, dtype=dtype)
        sigma = float(r64.std(correction=0))
    elif not sigma > 0 or not math.isfinite(sigma):
        raise DataError(f"learnability sigma must be a positive number or null (pool std), got {sigma}")
    z = -((r64 - mu) ** 2) / (2.0 * sigma**2)
    lo, hi = z.min(), z.max()
    if lo == hi:
        return torch.ones_like(r, dtype=dtype)
    L = torch.exp(z - hi) * torch.expm1(lo - z) / torch.expm1(lo - hi)
    return L.to(r.device, dtype)


def representativeness(u: torch.Tensor) -> torch.Tensor:
    """R = min-max((cos(u_i, ū) + 1) / 2) with ū the pool mean: u `[N, D]` -> `[N]` in [0, 1]."""
    u = checked_matrix(u, "representativeness vectors")
    u = u.to(torch.promote_types(u.dtype, torch.float32))
    mean = u.mean(dim=0)
    # (u @ ū) / (|u_i| |ū|): no [N, D] temporaries (F.cosine_similarity builds several)
    cos = (u @ mean) / (torch.linalg.vector_norm(u, dim=1) * torch.linalg.vector_norm(mean)).clamp_min(1e-12)
    return min_max((cos + 1.0) / 2.0)


def value_scores(L: torch.Tensor, R: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """q = alpha·L + R: L `[N]`, R `[N]` -> `[N]`. alpha must be >= 0."""
    L = checked_vector(L, "learnability scores L")
    R = checked_vector(R, "representativeness scores R", L.numel())
    if not alpha >= 0 or not math.isfinite(alpha):
        raise ConfigError(f"selection alpha must be a finite number >= 0, got {alpha}")
    return alpha * L + R


def _cosine_distance(e: torch.Tensor, s: torch.Tensor, tol: float) -> torch.Tensor:
    """1 - cos of unit rows e `[N, d]` with unit s `[d]` -> float32 `[N]`; distances below `tol` (rounding) are 0."""
    dist = 1.0 - (e @ s).float()
    return torch.where(dist < tol, torch.zeros_like(dist), dist)


def _greedy(q: torch.Tensor, e: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Shared loop: start at `first`, then add argmax over unselected x of v(x)·q(x), v = min-dist / max min-dist.

    q `[N]` >= 0, e `[N, d]` unit rows -> LongTensor `[k]` on CPU. Ties go to the lowest index; if every remaining
    sample duplicates a selected one (max min-dist 0), v = 1 and q alone decides.
    """
    tol = 8 * torch.finfo(e.dtype).eps
    chosen = torch.zeros(q.numel(), dtype=torch.bool, device=q.device)
    order = [first]
    chosen[first] = True
    min_dist = _cosine_distance(e, e[first], tol).masked_fill(chosen, 0.0)
    for _ in range(k - 1):
        top = min_dist.max()
        v = min_dist / top if top > 0 else torch.ones_like(min_dist)
        nxt = int((v * q).masked_fill(chosen, float("-inf")).argmax())
        order.append(nxt)
        chosen[nxt] = True
        min_dist = torch.minimum(min_dist, _cosine_distance(e, e[nxt], tol)).masked_fill(chosen, 0.0)
    return torch.tensor(order, dtype=torch.long)


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise DataError(f"subset size k must be an integer in 1..{n} (the pool size), got {k!r}")


def _unit_rows(emb: torch.Tensor, dtype: torch.dtype, chunk: int = 65536) -> torch.Tensor:
    """Normalise rows in float32, chunk by chunk into a `dtype` tensor (peak memory ≈ the result plus one float32
    chunk); all-zero rows stay zero: distance 1 to everything."""
    if not dtype.is_floating_point:
        raise ConfigError(f"selection dtype must be a floating type, got {dtype}")
    out = torch.empty(emb.shape, dtype=dtype, device=emb.device)
    for start in range(0, emb.shape[0], chunk):
        out[start : start + chunk] = F.normalize(emb[start : start + chunk].float(), dim=1).to(dtype)
    return out


def greedy_value_selection(
    q: torch.Tensor, emb: torch.Tensor, k: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """MiniRec greedy selection: S = {argmax q}, then repeatedly add argmax_{x∉S} v(x)·q(x) with
    v(x) = min_{s∈S} dist(x, s) / max_y min_{s∈S} dist(y, s), dist = 1 - cos.

    q `[N]` (>= 0), emb `[N, d]` on any device, k -> pool indices LongTensor `[k]` (CPU) in selection order. O(k·N·d)
    with a running minimum distance; deterministic (ties: lowest index), so the result for k is a prefix of the result
    for any larger k. `dtype=torch.float16` halves the memory of the normalised embeddings for very large pools
    (distances below ~8e-3 then count as 0).
    """
    q = checked_vector(q, "value scores q")
    emb = checked_matrix(emb, "selection embeddings", q.numel())
    _check_k(k, q.numel())
    if (q < 0).any():
        raise DataError("value scores q must be >= 0 (q = alpha*L + R with alpha >= 0)")
    e = _unit_rows(emb, dtype)
    return _greedy(q.to(device=e.device, dtype=torch.float32), e, k, int(q.argmax()))


def k_center_selection(emb: torch.Tensor, k: int, first: int | None = None) -> torch.Tensor:
    """Diversity only: farthest-point k-center under 1 - cos. emb `[N, d]` -> LongTensor `[k]` (CPU), selection order.

    Starts at `first`, or by default at the sample nearest (in cosine) the mean of the normalised embeddings; then adds
    the sample farthest from the selected set (ties: lowest index).
    """
    emb = checked_matrix(emb, "selection embeddings")
    n = emb.shape[0]
    _check_k(k, n)
    e = _unit_rows(emb, torch.float32)
    if first is None:
        first = int((e @ e.mean(dim=0)).argmax())
    elif not 0 <= first < n:
        raise DataError(f"k-center start index must lie in 0..{n - 1}, got {first}")
    return _greedy(torch.ones(n, device=e.device), e, k, first)


def select(
    strategy: str,
    k: int | None,
    *,
    mean_rewards: torch.Tensor,
    L: torch.Tensor | None = None,
    R: torch.Tensor | None = None,
    emb: torch.Tensor | None = None,
    seed: int = 0,
    alpha: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pick k pool samples with one of `STRATEGIES`; returns pool indices LongTensor `[k]` (CPU) in selection order.

    mean_rewards `[N]` fixes the pool size N; L, R `[N]` and emb `[N, d]` are needed by the strategies that use them.
    random: seeded permutation prefix; full: all N in pool order (k ignored); learnability / representativeness: top-k
    by that score (stable: ties keep pool order); diversity: k-center on emb; minirec and minirec_no_curriculum:
    greedy value selection on q = alpha·L + R and emb (the two differ only in the curriculum that follows), with the
    normalised embeddings in `dtype`.
    """
    if strategy not in STRATEGIES:
        raise DataError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    n = checked_vector(mean_rewards, "mean_rewards").numel()
    if strategy == "full":
        return torch.arange(n)
    _check_k(k, n)
    needs = {
        "learnability": ("L",),
        "representativeness": ("R",),
        "diversity": ("emb",),
        "minirec": ("L", "R", "emb"),
        "minirec_no_curriculum": ("L", "R", "emb"),
    }.get(strategy, ())
    given = {"L": L, "R": R, "emb": emb}
    missing = [name for name in needs if given[name] is None]
    if missing:
        raise ConfigError(f"selection strategy {strategy!r} needs {', '.join(missing)}, which was not given")
    if strategy == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    if strategy in ("learnability", "representativeness"):
        score = checked_vector(given[needs[0]], needs[0], n).cpu()
        return torch.sort(score, descending=True, stable=True).indices[:k]
    if strategy == "diversity":
        return k_center_selection(checked_matrix(emb, "emb", n), k)
    q = value_scores(checked_vector(L, "L", n), checked_vector(R, "R", n), alpha)
    return greedy_value_selection(q, checked_matrix(emb, "emb", n), k, dtype)
