"""minirec.plots: each plot is a real PNG written atomically (no temp files left, an old file replaced whole), the PCA
projection is right, and bad arrays give a DataError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from minirec import plots
from minirec.io import DataError


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # something was drawn
    assert not list(path.parent.glob(".*.tmp"))


def test_every_plot_writes_a_png(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    n = 50
    r = torch.rand(n, generator=g) * (torch.arange(n) % 3 != 0)
    L, R = torch.rand(n, generator=g), torch.rand(n, generator=g)
    selected = torch.tensor([3, 7, 11, 20])
    plots.reward_histogram(r, tmp_path / "hist.png")
    plots.learnability_vs_representativeness(L, R, selected, tmp_path / "sub" / "lr.png")  # creates the folder
    plots.selected_vs_pool(torch.randn(n, 16, generator=g), selected.numpy(), tmp_path / "pool.png")
    plots.curriculum_order(np.sort(r[selected].numpy())[::-1], [0, 0, 1, 1], tmp_path / "curr.png")
    for name in ("hist.png", "sub/lr.png", "pool.png", "curr.png"):
        check_png(tmp_path / name)


def test_replaces_an_existing_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "hist.png"
    path.write_bytes(b"old")
    plots.reward_histogram([0.0, 0.1, 0.5, 0.9], path)
    check_png(path)


def test_pca_finds_the_main_directions() -> None:
    g = np.random.default_rng(0)
    basis = np.linalg.qr(g.normal(size=(6, 6)))[0]  # orthonormal directions
    coords = g.normal(size=(200, 6)) * np.array([10.0, 3.0, 0.1, 0.1, 0.1, 0.1])
    xy = plots.pca_2d(coords @ basis.T + 5.0)
    assert xy.shape == (200, 2)
    assert np.allclose(np.abs(np.corrcoef(xy[:, 0], coords[:, 0])[0, 1]), 1.0, atol=1e-3)
    assert np.allclose(np.abs(np.corrcoef(xy[:, 1], coords[:, 1])[0, 1]), 1.0, atol=1e-2)
    assert xy[:, 0].var() > xy[:, 1].var()
    assert np.array_equal(plots.pca_2d(torch.ones(3, 1)), np.zeros((3, 2)))  # nothing to project on
    for shape in ((30, 4), (5, 20)):  # covariance and Gram-matrix routes agree with an SVD
        x = g.normal(size=shape)
        c = x - x.mean(axis=0)
        u, sv, _ = np.linalg.svd(c, full_matrices=False)
        assert np.allclose(np.abs(plots.pca_2d(x)), np.abs(u[:, :2] * sv[:2]), atol=1e-8)


def test_bad_arrays_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="L has 3 entries but R has 2"):
        plots.learnability_vs_representativeness([0, 1, 2], [0, 1], [0], tmp_path / "x.png")
    with pytest.raises(DataError, match="selected indices must lie in 0..2"):
        plots.selected_vs_pool(np.ones((3, 2)), [5], tmp_path / "x.png")
    with pytest.raises(DataError, match="mean_rewards contains NaN"):
        plots.reward_histogram([0.1, float("nan")], tmp_path / "x.png")
    with pytest.raises(DataError, match="2 mean rewards but 3 stage indices"):
        plots.curriculum_order([0.5, 0.2], [0, 0, 1], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_training_curves_from_a_csv_log(tmp_path: Path) -> None:
    """The learning signals of every step (and validation NDCG@10, logged on other rows) become one PNG."""
    keys = [k for k, _ in plots.TRAINING_CURVES]
    lines = ["step," + ",".join(keys) + ",val/ndcg@10"]
    lines += [f"{s}," + ",".join(str(0.1 * s + i) for i in range(len(keys))) + "," for s in range(6)]
    lines += ["5," + "," * len(keys) + "0.03"]
    (tmp_path / "metrics.csv").write_text("\n".join(lines) + "\n")
    plots.training_curves([tmp_path / "metrics.csv"], tmp_path / "curves.png")
    check_png(tmp_path / "curves.png")
    (tmp_path / "empty.csv").write_text("step\n")
    with pytest.raises(DataError, match="no logged steps"):
        plots.training_curves([tmp_path / "empty.csv"], tmp_path / "none.png")


def test_resumed_launches_make_one_log(tmp_path: Path) -> None:
    """A launch killed at step 4 and resumed from its step-2 checkpoint: steps 0-1 from the first launch, 2-5 from
    the resumed one (the first launch's steps 2-4 were redone)."""
    (tmp_path / "a.csv").write_text("step,x\n" + "".join(f"{s},first\n" for s in range(5)))
    (tmp_path / "b.csv").write_text("step,x\n" + "".join(f"{s},resumed\n" for s in range(2, 6)))
    rows = plots.resumed_log_rows([tmp_path / "a.csv", tmp_path / "b.csv"])
    assert [(int(r["step"]), r["x"]) for r in rows] == [(0, "first"), (1, "first")] + [(s, "resumed") for s in range(2, 6)]
