"""benchmarks/throughput.py runs end to end in --quick mode and writes consistent measurements, tables and plots."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest



@pytest.fixture(scope="module")
def bench(import_benchmark):
    return import_benchmark("throughput")


def test_quick_run(bench, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert bench.main(["--quick", "--out", str(out), "--cache_dir", str(tmp_path / "cache")]) == 0
    plan = bench.make_plan(quick=True)
    with open(out / "throughput.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.COLUMNS
        rows = list(reader)
    rollouts = [r for r in rows if r["measure"] == "rollout"]
    assert [int(r["batch"]) for r in rollouts] == list(plan.rollout_batches)
    for r in rollouts:  # at most B x G completions of max_new_tokens (+ the marker) tokens
        assert 0 < float(r["tokens"]) <= int(r["batch"]) * plan.group * (plan.max_new_tokens + 8)
        assert float(r["tokens_per_s"]) == pytest.approx(float(r["tokens"]) / float(r["seconds"]), rel=1e-6)
    steps = {r["measure"]: r for r in rows if r["measure"] != "rollout"}
    assert set(steps) == {"scoring (hidden)", "scoring (lora)", "training step"}
    for r in steps.values():
        assert int(r["runs"]) == plan.steps - 1  # the warm-up batch is not counted
        assert float(r["samples_per_s"]) == pytest.approx(int(r["batch"]) / float(r["seconds"]), rel=1e-6)
    md = (out / "throughput.md").read_text()
    assert "## Rollout tokens/s" in md and "speed vs training step" in md and "throughput.py --quick" in md
    for png in ("rollout_tokens_per_s.png", "scoring_vs_training.png"):
        assert (out / png).stat().st_size > 10_000
