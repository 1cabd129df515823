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
    for r in rows:
        if r["measure"] in bench.TOKEN_MEASURES:  # measured against a positive bound
            assert float(r["bound_tokens_per_s"]) > 0
            share = float(r["tokens_per_s"]) / float(r["bound_tokens_per_s"])
            assert float(r["share_of_bound"]) == pytest.approx(share, rel=1e-6)
    bounds = [float(r["bound_tokens_per_s"]) for r in rollouts]
    assert bounds == sorted(bounds)  # more sequences per decode step: a higher (or the FLOP-capped) bound
    by_measure = {r["measure"]: r for r in rows}
    for full, part in (("fwd+bwd joined", "fwd+bwd prefix-shared"), ("item encode full", "item encode prefix-shared"),
                       ("item encode+bwd full", "item encode+bwd prefix-shared")):  # the shared tokens run once
        assert by_measure[full]["batch"] == by_measure[part]["batch"]
        assert float(by_measure[part]["tokens"]) < float(by_measure[full]["tokens"])
    assert int(by_measure["item encode+bwd full"]["batch"]) == bench.REC_ITEMS
    two, one = by_measure["reason+encode two passes"], by_measure["reason+encode one prefill"]
    assert two["batch"] == one["batch"] and two["tokens"] == one["tokens"]  # the same users, the same work
    steps = {r["measure"]: r for r in rows if r["measure"] not in bench.TOKEN_MEASURES}
    assert set(steps) == {"scoring (hidden)", "scoring (lora)", "training step"}
    for r in steps.values():
        assert int(r["runs"]) == plan.steps - 1  # the warm-up batch is not counted
        assert float(r["samples_per_s"]) == pytest.approx(int(r["batch"]) / float(r["seconds"]), rel=1e-6)
    parts = [float(steps["training step"][k]) for k in bench.BREAKDOWN]
    assert all(p >= 0 for p in parts) and 0 < sum(parts) <= float(steps["training step"]["seconds"])
    md = (out / "throughput.md").read_text()
    assert "Measured bound of this machine: peak matmul" in md and "share of bound" in md
    assert "vs float32 hf training step" in md and "throughput.py --quick" in md
    for png in ("rollout_tokens_per_s.png", "scoring_vs_training.png"):
        assert (out / png).stat().st_size > 10_000


def test_cuda_without_a_gpu_is_one_clean_error(bench, tmp_path: Path, capsys) -> None:
    """`--device cuda` on a machine without CUDA: one error line, exit status 2, nothing written."""
    from minirec.io import run_command

    if bench.torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit) as exit_:
        run_command(bench.main, ["--device", "cuda", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --device cuda: no CUDA device is visible"
    assert not (tmp_path / "out").exists()
