"""Helpers shared by the benchmark scripts: machine description, CSV / markdown tables, atomic figure saving."""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from minirec.evaluation import comparison_table
from minirec.io import atomic_file, atomic_write_json, atomic_write_text


def proc_bytes(path: str, field: str) -> int:
    """A kB field of a /proc file in bytes: `/proc/meminfo` (MemTotal, MemAvailable) or `/proc/self/status`
    (VmRSS, VmHWM); Linux only."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{path} has no {field}: this measurement needs Linux")


def run_header(title: str, info: dict[str, Any]) -> list[str]:
    """Markdown lines opening a results file: title, command, date, wall time and machine of `info`."""
    return [
        f"# {title}", "",
        f"Command: `{info['command']}`  ", f"Date: {info['date']}; wall time {info['wall_s'] / 60:.1f} min  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info["machine"].items()), "",
    ]


def device_kind() -> str:
    """"cuda" where a CUDA device is visible, else "cpu" (what an `auto` / `gpu` accelerator runs on)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine(threads: int, device: str = "cpu") -> dict[str, str]:
    """CPU model, cores, torch threads, RAM, torch / Python / OS versions of this machine; with `device` "cuda", the
    GPU's name, memory and CUDA version first."""
    cpu = platform.processor() or "unknown"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = {}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = {"GPU": f"{props.name} ({props.total_memory / 2**30:.0f} GiB)", "CUDA": str(torch.version.cuda)}
    return {
        **gpu,
        "CPU": cpu,
        "logical cores": str(os.cpu_count()),
        "torch threads": str(threads),
        "RAM": f"{proc_bytes('/proc/meminfo', 'MemTotal') / 2**30:.1f} GiB",
        "torch": torch.__version__,
        "Python": platform.python_version(),
        "OS": platform.platform(),
    }


def fmt(x: Any) -> str:
    """A table cell: floats with 3 significant digits (whole numbers from 1e4), NaN as empty."""
    if isinstance(x, float):
        if math.isnan(x):
            return ""
        return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def markdown_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """Markdown table of `rows` with {key: header} columns."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[key]) for key in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """rows -> CSV with `columns` (other keys left out, NaN written as empty), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: ("" if isinstance(v, float) and math.isnan(v) else v) for key, v in r.items() if key in columns}
                     for r in rows)
    atomic_write_text(path, buf.getvalue())


def write_comparison(
    out: Path, name: str, title: str, command: str, start: float, intro: str, intervals: dict, names: Sequence[str],
    samples: int, notes: Sequence[str] = (), **extra: Any,
) -> dict[str, dict[str, float]]:
    """Write `out/<name>.md` (header: `command`, date, wall time since `start` (a `time.perf_counter()`), machine;
    `intro`; the comparison table of `intervals` {method: (mean, lo, hi)} over `names`; `notes` lines) and
    `out/metrics.json` (means, intervals, `test_samples` and `extra`); returns {method: {metric: mean}}."""
    info = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": time.perf_counter() - start, "machine": machine(torch.get_num_threads())}
    text = run_header(title, info) + [intro, "", comparison_table(intervals, names, samples), *notes]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.md", "\n".join(text))
    summary = {m: dict(zip(names, (float(v) for v in mean))) for m, (mean, _, _) in intervals.items()}
    bounds = {m: {n: [float(a), float(b)] for n, a, b in zip(names, lo, hi)} for m, (_, lo, hi) in intervals.items()}
    atomic_write_json(out / "metrics.json", {"summary": summary, "intervals": bounds, "test_samples": samples, **extra})
    return summary


def data_parser(prog: str, doc: str) -> Any:
    """The argument parser of a benchmark over one dataset: `--config` and `--data` (a RecDataModule), the first
    paragraph of `doc` as its description."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from datamodules import RecDataModule

    parser = ArgumentParser(prog=prog, description=doc.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(RecDataModule, "data", required=True)
    return parser


def print_summary(summary: dict[str, dict[str, float]]) -> None:
    """One line per method: NDCG@10 and HR@10."""
    width = max(map(len, summary))
    for method, metrics in summary.items():
        print(f"{method:>{width}}  NDCG@10 {metrics['ndcg@10']:.4f}  HR@10 {metrics['hr@10']:.4f}")


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically (temp file in the same folder + rename)."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
