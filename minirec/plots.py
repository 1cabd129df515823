"""PNG plots of a MiniRec selection (METHOD.md §5.7): reward histogram, L vs R, selected vs pool, curriculum order.

Each function takes plain arrays (numpy, torch or lists) and a path, draws with matplotlib's object API on the Agg
canvas (no pyplot, no display, safe in worker processes), and writes the PNG atomically (temp file + rename).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minirec.io import DataError, atomic_file

POOL_COLOR, SELECTED_COLOR = "#9aa5b1", "#d1495b"


def _numpy(x: Any, dtype: type) -> np.ndarray:
    """A numpy array of `x` (numpy, torch tensor on any device, or list)."""
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=dtype)


def _array(x: Any, name: str, ndim: int) -> np.ndarray:
    """x as a finite float64 array with `ndim` dimensions and at least one row."""
    a = _numpy(x, np.float64)
    if a.ndim != ndim or a.shape[0] == 0:
        raise DataError(f"plot: {name} must be a non-empty {ndim}-D array, got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise DataError(f"plot: {name} contains NaN or infinite values")
    return a


def _mask(selected: Any, n: int) -> np.ndarray:
    """Boolean `[n]` mask from pool indices of the selected samples."""
    idx = _numpy(selected, np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"plot: selected indices must lie in 0..{n - 1}")
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return mask


def _save(fig: Figure, path: str | os.PathLike) -> None:
    """Render `fig` to PNG at `path` through a temp file in the same folder and an atomic rename."""
    FigureCanvasAgg(fig)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def pca_2d(x: Any) -> np.ndarray:
    """Project rows `[N, d]` on their first two principal components -> `[N, 2]` (zeros where the data has none).

    Eigenvectors of the smaller of the d x d covariance and the N x N Gram matrix (fast for 10k x 4k pools); signs
    are fixed (largest-magnitude loading positive) so the picture is reproducible.
    """
    a = _array(x, "embeddings", 2)
    a = a - a.mean(axis=0, keepdims=True)
    gram = a.shape[0] < a.shape[1]
    w, v = np.linalg.eigh(a @ a.T if gram else a.T @ a)
    top = np.argsort(w)[::-1][:2]
    top = top[w[top] > 1e-12 * max(float(w.max()), 1e-300)]
    comps = a.T @ v[:, top] if gram else v[:, top]  # [d, c]
    comps = comps / np.linalg.norm(comps, axis=0, keepdims=True)
    comps = comps * np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(comps.shape[1])])
    out = np.zeros((a.shape[0], 2))
    out[:, : comps.shape[1]] = a @ comps
    return out


def reward_histogram(mean_rewards: Any, path: str | os.PathLike, bins: int = 40) -> None:
    """Histogram of the proxy's mean reward r̄ over the pool `[N]`, with the share of r̄ = 0 in the title."""
    r = _array(mean_rewards, "mean_rewards", 1)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(r, bins=bins, color=POOL_COLOR, edgecolor="black", linewidth=0.3)
    ax.set(xlabel="mean reward r̄ (proxy, N rollouts)", ylabel="samples",
           title=f"pool of {r.size}: mean r̄ {r.mean():.3f}, r̄ = 0 for {np.mean(r == 0):.0%}")
    fig.tight_layout()
    _save(fig, path)


def learnability_vs_representativeness(L: Any, R: Any, selected: Any, path: str | os.PathLike) -> None:
    """Scatter of learnability L `[N]` against representativeness R `[N]`; `selected` (pool indices) highlighted."""
    L, R = _array(L, "L", 1), _array(R, "R", 1)
    if L.shape != R.shape:
        raise DataError(f"plot: L has {L.size} entries but R has {R.size}")
    mask = _mask(selected, L.size)
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.scatter(L[~mask], R[~mask], s=6, color=POOL_COLOR, label="pool")
    ax.scatter(L[mask], R[mask], s=10, color=SELECTED_COLOR, label=f"selected ({mask.sum()})")
    ax.set(xlabel="learnability L", ylabel="representativeness R", title="L vs R")
    ax.legend(loc="best")
    fig.tight_layout()
    _save(fig, path)


def selected_vs_pool(emb: Any, selected: Any, path: str | os.PathLike) -> None:
    """2-D PCA of the diversity embeddings `[N, d]` with the `selected` pool indices highlighted."""
    xy = pca_2d(emb)
    mask = _mask(selected, xy.shape[0])
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.scatter(xy[~mask, 0], xy[~mask, 1], s=6, color=POOL_COLOR, label="pool")
    ax.scatter(xy[mask, 0], xy[mask, 1], s=10, color=SELECTED_COLOR, label=f"selected ({mask.sum()})")
    ax.set(xlabel="PC 1", ylabel="PC 2", title="selected vs pool (user embeddings, PCA)")
    ax.legend(loc="best")
    fig.tight_layout()
    _save(fig, path)


def curriculum_order(mean_rewards: Any, stages: Any, path: str | os.PathLike) -> None:
    """r̄ `[k]` of the selected samples by curriculum position, coloured by stage `[k]` (stage or fold index)."""
    r = _array(mean_rewards, "mean_rewards", 1)
    s = _numpy(stages, np.int64).reshape(-1)
    if s.size != r.size:
        raise DataError(f"plot: {r.size} mean rewards but {s.size} stage indices")
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    n = int(s.max()) + 1
    points = ax.scatter(np.arange(r.size), r, c=s, s=8, cmap=colormaps["viridis"].resampled(n), vmin=-0.5,
                        vmax=n - 0.5)
    fig.colorbar(points, ax=ax, label="stage", ticks=range(0, n, max(1, n // 10)))
    ax.set(xlabel="position in curriculum", ylabel="mean reward r̄", title=f"curriculum of {r.size} samples")
    fig.tight_layout()
    _save(fig, path)


TRAINING_CURVES = (
    ("train/reward_mean", "mean reward"),
    ("train/reward_group_std", "reward spread within groups"),
    ("train/zero_spread_groups", "share of zero-spread groups"),
    ("train/rec_loss", "rec loss (weighted)"),
    ("train/rec_ce", "target cross-entropy among candidates"),
    ("train/token_loss", "token loss"),
    ("train/completion_len", "completion length (tokens)"),
)


def resumed_log_rows(metrics_csvs: Sequence[str | os.PathLike]) -> list[dict[str, str]]:
    """The rows of a fit's CSVLogger `metrics.csv` files (one per launch, oldest first) as one log: a resumed launch
    logs again from its checkpoint's step, so the earlier launches' rows from that step on are dropped."""
    import csv

    rows: list[dict[str, str]] = []
    for metrics_csv in metrics_csvs:
        with open(metrics_csv, newline="") as f:
            new = [r for r in csv.DictReader(f) if r.get("step") not in (None, "")]
        if new:
            start = min(int(r["step"]) for r in new)
            rows = [r for r in rows if int(r["step"]) < start] + new
    return rows


def training_curves(metrics_csvs: Sequence[str | os.PathLike], path: str | os.PathLike) -> None:
    """Per-step learning signals of a fit from its CSVLogger `metrics.csv` files (`resumed_log_rows`): the
    `TRAINING_CURVES` columns against the step, with validation NDCG@10 on the reward panel's second axis."""
    rows = resumed_log_rows(metrics_csvs)
    if not rows:
        raise DataError(f"{', '.join(map(str, metrics_csvs))}: no logged steps to plot")
    fig = Figure(figsize=(16, 6))
    axes = fig.subplots(2, 4).reshape(-1)
    for ax in axes[len(TRAINING_CURVES):]:
        ax.set_axis_off()
    for ax, (key, title) in zip(axes, TRAINING_CURVES):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pts:
            ax.plot(*zip(*pts), marker=".", color=SELECTED_COLOR)
        ax.set(title=title, xlabel="step")
    val = [(int(r["step"]), float(r["val/ndcg@10"])) for r in rows if r.get("val/ndcg@10") not in (None, "")]
    if val:
        twin = axes[0].twinx()
        twin.plot(*zip(*val), marker="s", color=POOL_COLOR, label="val NDCG@10")
        twin.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)
