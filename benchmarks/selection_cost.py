"""Selection cost and scaling benchmark: wall time and peak memory of MiniRec's selection math vs pool size.

On synthetic vectors of the real hidden sizes (SmolLM2-135M: 576, Gemma-2-2b: 2304) it measures
- `greedy_value_selection` (and `k_center_selection`) for pool sizes N, subset sizes k, float32 / float16, against the
  memory-bandwidth bound k·N·d·bytes / B of reading the embeddings once per step (B = measured read bandwidth of a
  large contiguous float32 `torch.sum`);
- `hidden_hvp_vectors` (the scoring cost of representativeness) for catalogue sizes M, `full` vs `in_batch` loss;
- `learnability` and `representativeness` on the largest pool.

Every configuration runs in a fresh process forked from a clean fork server (torch imported, nothing computed yet):
one small warm-up call, then up to `repeats` timed calls (fewer once their total passes `budget_s`); the median is
reported. Peak memory is the growth of the process's resident set during a call, the largest over the repeats: the
kernel's high-water mark is reset through /proc/self/clear_refs just before the call, and peak = VmHWM after - VmRSS
before (Linux). Unlike tracemalloc it sees torch's allocations. Timings depend on the values only through ties, so
N(0, 1) vectors stand in for real hidden states.

    python benchmarks/selection_cost.py [--quick] [--out benchmarks/results/selection_cost]

Writes selection_cost.csv, selection_cost.md, selection_time_vs_n.png and selection_time_vs_k.png into --out.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from bench_common import machine, markdown_table, proc_bytes, save_figure, write_csv
from minirec.io import atomic_write_text
from minirec.representativeness import hidden_hvp_vectors
from minirec.selection import greedy_value_selection, k_center_selection, learnability, representativeness

DTYPES = {"float32": torch.float32, "float16": torch.float16}
SELECTION_OPS = ("greedy", "k_center")
HISTORY = 20  # history length of the synthetic hvp samples
WARM_ROWS = 64  # rows of the warm-up call (small, so it leaves no freed memory that the measured call could reuse)
COLUMNS = (
    "op", "n", "dim", "k", "catalogue", "loss", "dtype", "runs", "time_s", "time_min_s", "time_max_s",
    "per_unit_ms", "bound_s", "time_over_bound", "read_gb_s", "peak_rss_mb", "input_mb",
)  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One configuration. op: bandwidth (n float32 values summed), greedy / k_center (pool n x dim, subset k, dtype),
    hvp (n users x dim, catalogue M items, loss), learnability (n), representativeness (n x dim)."""

    op: str
    n: int
    dim: int = 0
    k: int = 0
    dtype: str = "float32"
    catalogue: int = 0
    loss: str = ""


@dataclass(frozen=True)
class Plan:
    """The cases of one run, its repeat policy, the embedding width plotted, and notes on what was left out."""

    cases: tuple[Case, ...]
    repeats: int
    budget_s: float
    plot_dim: int
    notes: tuple[str, ...]


def make_plan(quick: bool) -> Plan:
    """The measured grid: `quick` is a seconds-long smoke run; the full grid takes about 10 minutes on 2 CPU cores."""
    if quick:
        pools = [(1_000, 576, (16, 64)), (4_000, 576, (16, 64))]
        cases = [Case("bandwidth", 2**24)]
        cases += [Case("greedy", n, d, k, dt) for n, d, ks in pools for k in ks for dt in DTYPES]
        cases += [Case("k_center", 4_000, 576, 16), Case("learnability", 4_000), Case("representativeness", 4_000, 576)]
        cases += [Case("hvp", 256, 64, catalogue=1_000, loss=loss) for loss in ("full", "in_batch")]
        return Plan(tuple(cases), repeats=2, budget_s=1.0, plot_dim=576, notes=("Quick smoke run: tiny grid.",))
    pools = [
        (1_000, 576, (256,)),
        (10_000, 576, (256, 1024, 4096)),
        (100_000, 576, (256, 1024)),
        (1_000_000, 576, (256,)),
        (1_000, 2304, (256,)),
        (10_000, 2304, (256, 1024)),
    ]
    cases = [Case("bandwidth", 2**28)]
    cases += [Case("greedy", n, d, k, dt) for n, d, ks in pools for k in ks for dt in DTYPES]
    cases += [Case("k_center", n, 576, 256) for n in (10_000, 100_000)]
    cases += [Case("learnability", 1_000_000), Case("representativeness", 1_000_000, 576)]
    cases += [
        Case("hvp", 10_000, 576, catalogue=10_000, loss="full"),
        Case("hvp", 10_000, 576, catalogue=10_000, loss="in_batch"),
        Case("hvp", 10_000, 576, catalogue=100_000, loss="full"),
        Case("hvp", 10_000, 576, catalogue=100_000, loss="in_batch"),
    ]
    notes = (
        "Left out to keep the run near 10 minutes on a 2-core machine: k = 1024 / 4096 at N = 1e6, k = 4096 at "
        "N = 1e5, d = 2304 at N >= 1e5. Greedy time is linear in k (one pass over the pool per step), so those cost "
        "about ms/step x k of the same pool.",
        "d = 2304 at N = 1e6 would not fit in 24 GiB: 9.2 GB of float32 embeddings plus the transient of validating "
        "and normalising them (peak MB / input MB in the table).",
    )
    return Plan(tuple(cases), repeats=3, budget_s=10.0, plot_dim=576, notes=notes)


# ----------------------------------------------------------------------------------------------- worker side


def _reset_peak_rss() -> None:
    """Reset this process's resident-set high-water mark (VmHWM) to the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _prepare(case: Case) -> tuple[Callable[[], Any], Callable[[], Any], int]:
    """(warm-up call, measured call, input bytes) for `case`; inputs are made here, outside the timing."""
    g = torch.Generator().manual_seed(0)
    if case.op == "bandwidth":
        x = torch.randn(case.n, generator=g)
        return x.sum, x.sum, x.nbytes
    if case.op == "learnability":
        r = torch.rand(case.n, generator=g)
        return lambda: learnability(r[:WARM_ROWS]), lambda: learnability(r), r.nbytes
    if case.op == "representativeness":
        u = torch.randn(case.n, case.dim, generator=g)
        return lambda: representativeness(u[:WARM_ROWS]), lambda: representativeness(u), u.nbytes
    if case.op in SELECTION_OPS:
        dtype = DTYPES[case.dtype]
        emb = torch.randn(case.n, case.dim, generator=g, dtype=dtype)
        q = torch.rand(case.n, generator=g)
        if case.op == "greedy":
            return (
                lambda: greedy_value_selection(q[:WARM_ROWS], emb[:WARM_ROWS], 2, dtype=dtype),
                lambda: greedy_value_selection(q, emb, case.k, dtype=dtype),
                emb.nbytes + q.nbytes,
            )
        return lambda: k_center_selection(emb[:WARM_ROWS], 2), lambda: k_center_selection(emb, case.k), emb.nbytes
    if case.op == "hvp":
        users = torch.randn(case.n, case.dim, generator=g)
        items = torch.randn(case.catalogue + 1, case.dim, generator=g)
        target = torch.randint(1, case.catalogue + 1, (case.n,), generator=g)
        history = torch.randint(0, case.catalogue + 1, (case.n, HISTORY), generator=g)

        def hvp(rows: slice) -> torch.Tensor:
            return hidden_hvp_vectors(users[rows], items, target[rows], history[rows], loss=case.loss)

        size = sum(t.nbytes for t in (users, items, target, history))
        return lambda: hvp(slice(0, 8)), lambda: hvp(slice(None)), size
    raise ValueError(f"unknown benchmark op {case.op!r}")


def measure(case: Case, repeats: int, budget_s: float, threads: int = 0) -> dict[str, Any]:
    """Run `case` in this process (with `threads` torch threads, 0 = torch's default): times of each timed call (s),
    largest peak RSS growth (bytes), input bytes, threads used."""
    if threads > 0:
        torch.set_num_threads(threads)
    warm, call, input_bytes = _prepare(case)
    warm()
    times: list[float] = []
    peak = 0
    while len(times) < repeats and sum(times) < budget_s:
        _reset_peak_rss()
        before = proc_bytes("/proc/self/status", "VmRSS")
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        peak = max(peak, proc_bytes("/proc/self/status", "VmHWM") - before)
    return {"times": times, "peak_bytes": peak, "input_bytes": input_bytes, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------- driver side


def _fits(case: Case) -> str | None:
    """None if `case` should fit in the memory available now, else why it is skipped."""
    if case.op not in SELECTION_OPS + ("representativeness",):
        return None
    # input + ~7-8 bytes/element transient (isfinite check, float32 normalised copy, cast) measured by this benchmark
    need = case.n * case.dim * (torch.finfo(DTYPES[case.dtype]).bits // 8 + 10)
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    if need > 0.8 * available:
        return f"needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
    return None


def _send_measurement(conn: Any, *args: Any) -> None:
    """Worker process body: measure and send the result back to the driver."""
    conn.send(measure(*args))
    conn.close()


def _measure_in_fresh_process(ctx: Any, case: Case, *args: Any) -> dict[str, Any]:
    """`measure(case, *args)` in a new process forked from the fork server; a worker that dies (an exception, or
    killed for memory) raises RuntimeError naming the case."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_send_measurement, args=(send, case, *args))
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        result = None
    proc.join()
    if result is None or proc.exitcode:
        raise RuntimeError(f"measuring {_label(case)} failed: worker exit code {proc.exitcode}")
    return result


def run_cases(plan: Plan, threads: int = 0) -> tuple[list[dict[str, Any]], list[str], int]:
    """Measure every case, each in a fresh process forked from a clean fork server, with `threads` torch threads
    (0: torch's default) -> (CSV rows, skipped cases with the reason, threads used)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "minirec.selection", "minirec.representativeness"])
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    used = 0
    bandwidth = math.nan
    for case in plan.cases:
        why = _fits(case)
        if why:
            skipped.append(f"{_label(case)}: {why}")
            continue
        print(f"[selection_cost] {_label(case)}", file=sys.stderr, flush=True)
        result = _measure_in_fresh_process(ctx, case, plan.repeats, plan.budget_s, threads)
        used = result["threads"]
        row = _row(case, result, bandwidth)
        if case.op == "bandwidth":
            bandwidth = row["read_gb_s"] * 1e9
        rows.append(row)
    return rows, skipped, used


def _label(case: Case) -> str:
    return " ".join(f"{f.name}={getattr(case, f.name)}" for f in fields(case) if getattr(case, f.name) not in (0, ""))


def _row(case: Case, result: dict[str, Any], bandwidth: float) -> dict[str, Any]:
    """CSV row: the case, median / min / max time, per step (selection) or per sample (hvp) cost, the bandwidth
    bound k·N·d·bytes / B with the effective read rate (selection), peak RSS growth and input size in MB."""
    times = result["times"]
    median = statistics.median(times)
    row: dict[str, Any] = asdict(case) | {
        "runs": len(times),
        "time_s": median,
        "time_min_s": min(times),
        "time_max_s": max(times),
        "per_unit_ms": math.nan,
        "bound_s": math.nan,
        "time_over_bound": math.nan,
        "read_gb_s": math.nan,
        "peak_rss_mb": result["peak_bytes"] / 1e6,
        "input_mb": result["input_bytes"] / 1e6,
    }
    if case.op == "bandwidth":
        row["read_gb_s"] = result["input_bytes"] / median / 1e9
    elif case.op in SELECTION_OPS:
        read = case.k * case.n * case.dim * torch.finfo(DTYPES[case.dtype]).bits // 8
        row |= {
            "per_unit_ms": median / case.k * 1e3,
            "bound_s": read / bandwidth,
            "time_over_bound": median * bandwidth / read,
            "read_gb_s": read / median / 1e9,
        }
    elif case.op == "hvp":
        row["per_unit_ms"] = median / case.n * 1e3
    return row


def write_markdown(path: Path, rows: list[dict[str, Any]], plan: Plan, info: dict[str, Any]) -> None:
    """The run's header (command, date, machine, bandwidth, method) and one table per kind of measurement."""
    by_op = {op: [r for r in rows if r["op"] == op] for op in ("bandwidth", *SELECTION_OPS, "hvp")}
    bandwidth = by_op["bandwidth"][0]
    selection = by_op["greedy"] + by_op["k_center"]
    scores = [r for r in rows if r["op"] in ("learnability", "representativeness")]
    text = [
        "# Selection cost and scaling",
        "",
        f"- Command: `{info['command']}`",
        f"- Date: {info['date']}; wall time {info['wall_s']:.0f} s; 1-minute load average {info['load'][0]:.2f} at "
        f"start, {info['load'][1]:.2f} at end (any other processes on the machine included)",
        "- Machine: " + "; ".join(f"{k} {v}" for k, v in info["machine"].items()),
        f"- Read bandwidth: **{bandwidth['read_gb_s']:.1f} GB/s** (median of {bandwidth['runs']} `torch.sum` over "
        f"a contiguous float32 tensor of {bandwidth['input_mb']:.0f} MB)",
        "- Bound: k·N·d·bytes / bandwidth, the time to read the embeddings once per greedy step; x bound = "
        "measured / bound. Selection time includes validating and normalising the embeddings.",
        "- Time: median of up to "
        f"{plan.repeats} calls after a warm-up (fewer when the calls passed {plan.budget_s:g} s in total); each "
        "configuration in a fresh process.",
        "- Peak memory: growth of the process's resident set during the call (VmHWM reset via /proc/self/clear_refs "
        "before the call, VmHWM after minus VmRSS before), the largest over the calls; inputs are excluded (input MB).",
        "- Inputs: N(0, 1) synthetic vectors of the real hidden sizes (576 = SmolLM2-135M, 2304 = Gemma-2-2b).",
        "",
        "## Greedy value selection / k-center",
        "",
        markdown_table(
            selection,
            {
                "op": "op", "n": "N", "dim": "d", "k": "k", "dtype": "dtype", "runs": "runs", "time_s": "time s",
                "time_min_s": "min s", "time_max_s": "max s", "per_unit_ms": "ms/step", "bound_s": "bound s",
                "time_over_bound": "x bound", "read_gb_s": "eff. GB/s", "peak_rss_mb": "peak MB",
                "input_mb": "input MB",
            },  # fmt: skip
        ),
        "",
        f"## `hidden_hvp_vectors` (representativeness scoring; batch 256, history {HISTORY})",
        "",
        markdown_table(
            by_op["hvp"],
            {
                "n": "N", "dim": "H", "catalogue": "M", "loss": "loss", "runs": "runs", "time_s": "time s",
                "per_unit_ms": "ms/sample", "peak_rss_mb": "peak MB", "input_mb": "input MB",
            },  # fmt: skip
        ),
        "",
        "## Score normalisation",
        "",
        markdown_table(
            scores,
            {"op": "op", "n": "N", "dim": "d", "runs": "runs", "time_s": "time s", "peak_rss_mb": "peak MB",
             "input_mb": "input MB"},  # fmt: skip
        ),
        "",
        "## Notes",
        "",
        *[f"- {note}" for note in plan.notes],
        *[f"- Skipped ({line})" for line in info["skipped"]],
        "",
    ]
    atomic_write_text(path, "\n".join(text))


def plot(rows: list[dict[str, Any]], out: Path, dim: int) -> None:
    """selection_time_vs_n.png (time vs N per k) and selection_time_vs_k.png (time vs k per N), one panel per dtype,
    log-log, greedy selection at width `dim`; dashed lines are the bandwidth bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    greedy = [r for r in rows if r["op"] == "greedy" and r["dim"] == dim]
    for x_key, line_key, name in (("n", "k", "selection_time_vs_n.png"), ("k", "n", "selection_time_vs_k.png")):
        fig, axes = plt.subplots(1, len(DTYPES), figsize=(11, 4.5), sharey=True, squeeze=False)
        for ax, dtype in zip(axes[0], DTYPES):
            sub = [r for r in greedy if r["dtype"] == dtype]
            for i, value in enumerate(sorted({r[line_key] for r in sub})):
                line = sorted((r for r in sub if r[line_key] == value), key=lambda r: r[x_key])
                xs = [r[x_key] for r in line]
                color = f"C{i}"
                ax.plot(xs, [r["time_s"] for r in line], "o-", color=color, label=f"{line_key}={value:g}")
                ax.plot(xs, [r["bound_s"] for r in line], "x--", color=color, alpha=0.7)
            ax.set(xscale="log", yscale="log", xlabel="pool size N" if x_key == "n" else "subset size k")
            if x_key == "k":
                ax.set_xticks(sorted({r["k"] for r in sub}))
                ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(f"greedy_value_selection, d={dim}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(title="dashed: bandwidth bound", fontsize=8)
        axes[0][0].set_ylabel("wall time (s)")
        fig.tight_layout()
        save_figure(fig, out / name)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its CSV, markdown table and plots into --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid (seconds), for tests and smoke runs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/selection_cost"), help="output folder")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per measurement (0: torch's default, one per core)"
    )
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    argv = sys.argv[1:] if argv is None else argv
    plan = make_plan(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    rows, skipped, threads = run_cases(plan, args.threads)
    info = {
        "command": shlex.join(["python", "benchmarks/selection_cost.py", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": time.perf_counter() - start,
        "load": (load_start, os.getloadavg()[0]),
        "machine": machine(threads),
        "skipped": skipped,
    }
    write_csv(args.out / "selection_cost.csv", rows, COLUMNS)
    write_markdown(args.out / "selection_cost.md", rows, plan, info)
    plot(rows, args.out, plan.plot_dim)
    print(f"[selection_cost] wrote {args.out} in {info['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from minirec.io import run_command  # a user error: one `error: ...` line, exit status 2 (--debug: traceback)

    sys.exit(run_command(main))
