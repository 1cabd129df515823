"""benchmarks/selection_cost.py runs end to end in --quick mode and writes consistent, plausible measurements."""

from __future__ import annotations

import csv
import math
import multiprocessing
import time

import pytest
import torch



@pytest.fixture(scope="module")
def bench(import_benchmark):
    return import_benchmark("selection_cost")


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    """One --quick run into a temporary folder -> (output folder, CSV rows, wall seconds)."""
    out = tmp_path_factory.mktemp("selection_cost")
    start = time.perf_counter()
    assert bench.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    wall = time.perf_counter() - start
    with open(out / "selection_cost.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.COLUMNS
        rows = list(reader)
    return out, rows, wall


def _num(row: dict[str, str], key: str) -> float:
    value = float(row[key])
    assert math.isfinite(value), (key, row)
    return value


def test_quick_run_writes_all_outputs_fast(quick_run) -> None:
    out, rows, wall = quick_run
    assert wall < 30
    for name in ("selection_time_vs_n.png", "selection_time_vs_k.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["op"] for r in rows} == {"bandwidth", "greedy", "k_center", "hvp", "learnability", "representativeness"}
    assert {r["dtype"] for r in rows if r["op"] == "greedy"} == {"float32", "float16"}
    assert {r["loss"] for r in rows if r["op"] == "hvp"} == {"full", "in_batch"}
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_measurements_are_positive_finite_and_consistent(bench, quick_run) -> None:
    _, rows, _ = quick_run
    (bw_row,) = [r for r in rows if r["op"] == "bandwidth"]
    bandwidth = _num(bw_row, "read_gb_s") * 1e9
    assert bandwidth > 0
    for r in rows:
        t, lo, hi = _num(r, "time_s"), _num(r, "time_min_s"), _num(r, "time_max_s")
        assert 0 < lo <= t <= hi
        assert int(r["runs"]) >= 1 and _num(r, "input_mb") > 0 and _num(r, "peak_rss_mb") >= 0
        n = int(r["n"])
        if r["op"] in ("greedy", "k_center"):
            k, d = int(r["k"]), int(r["dim"])
            size = torch.finfo(getattr(torch, r["dtype"])).bits // 8
            assert _num(r, "bound_s") == pytest.approx(k * n * d * size / bandwidth, rel=1e-6)
            assert _num(r, "time_over_bound") == pytest.approx(t / _num(r, "bound_s"), rel=1e-6)
            assert _num(r, "per_unit_ms") == pytest.approx(t / k * 1e3, rel=1e-6)
            # the normalised copy of the pool [N, d] in the selection dtype is resident during the call
            assert _num(r, "peak_rss_mb") >= n * d * size / 1e6
        elif r["op"] == "hvp":
            assert _num(r, "per_unit_ms") == pytest.approx(t / n * 1e3, rel=1e-6)
            assert _num(r, "peak_rss_mb") > 0


def test_markdown_describes_run_and_tabulates_every_row(quick_run) -> None:
    out, rows, _ = quick_run
    text = (out / "selection_cost.md").read_text()
    assert "python benchmarks/selection_cost.py --quick --threads 1" in text
    assert f"torch {torch.__version__}" in text and "logical cores" in text and "RAM" in text
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    if cpu:
        assert cpu in text
    assert "Read bandwidth" in text and "GB/s" in text
    for op in ("greedy", "k_center"):
        assert text.count(f"| {op} |") == sum(r["op"] == op for r in rows)
    assert text.count("| full |") + text.count("| in_batch |") == sum(r["op"] == "hvp" for r in rows)


def test_negative_threads_is_rejected(bench, tmp_path) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--threads", "-1", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_a_failing_measurement_raises_instead_of_hanging(bench) -> None:
    ctx = multiprocessing.get_context("forkserver")
    with pytest.raises(RuntimeError, match="op=no_such_op"):
        bench._measure_in_fresh_process(ctx, bench.Case("no_such_op", 1), 1, 1.0, 1)
