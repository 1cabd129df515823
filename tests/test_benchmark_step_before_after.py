"""benchmarks/step_before_after.py in --quick mode: the earlier code runs from a git worktree (here HEAD, the only
commit a fresh clone surely has), the table compares both trees on the same samples, and an unknown commit is one
clean error."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

from minirec.io import ConfigError


@pytest.fixture(scope="module")
def bench(import_benchmark):
    return import_benchmark("step_before_after")


def test_quick_run_compares_both_trees(bench, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--quick", "--before", "HEAD", "--specs", "float32:hf", "--out", str(out), "--cache_dir",
            str(tmp_path / "cache")]
    assert bench.main(args) == 0
    rows = list(csv.DictReader((out / "step_before_after.csv").open()))
    assert [(r["code"], r["dtype"], r["engine"]) for r in rows] == [("before HEAD", "float32", "hf"),
                                                                  ("this checkout", "float32", "hf")]
    for r in rows:
        assert float(r["seconds"]) > 0
        assert float(r["samples_per_s"]) == pytest.approx(2 / float(r["seconds"]), rel=1e-3)  # 2 prompts per step
        assert float(r["vs_before"]) == pytest.approx(float(r["samples_per_s"]) / float(rows[0]["samples_per_s"]),
                                                      rel=1e-3)
        phases = [float(r[p]) for p in bench.PHASES]
        assert all(p >= 0 for p in phases) and sum(phases) <= float(r["seconds"])  # HEAD logs its phases
    assert (out / "step_before_after.png").stat().st_size > 0
    assert "step_before_after.py --quick" in (out / "step_before_after.md").read_text()
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=bench.ROOT, capture_output=True, text=True).stdout
    assert "before-after-" not in worktrees  # the temporary worktree is removed


def test_unknown_commit_is_one_clean_error(bench, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--before 0123abc: no such commit"):
        bench.main(["--quick", "--before", "0123abc", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing written
