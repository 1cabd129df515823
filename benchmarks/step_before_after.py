"""The RecPO training step before and after the rollout-speed work, measured in one run on this machine.

The code of an earlier commit (`--before`, default 32d814d, whose throughput table gave the 0.108 samples/s the speed
work started from) runs from a temporary git worktree, this checkout runs in each `--specs` dtype:engine; every
measurement is its own process over the same settings: SmolLM2-135M-Instruct with LoRA r 8 (no dropout) on the same
12 MovieLens-100K pool samples (k-core 50), 4 prompts x G = 4 rollouts of at most 32 tokens per step, in-batch
negatives, 3 steps of which the first is a warm-up.

    python benchmarks/step_before_after.py [--before 32d814d] [--specs float32:hf bfloat16:hf] \
        [--out benchmarks/results/step_before_after]

Writes step_before_after.md (seconds per step, samples/s and the ratio to the earlier code, with the per-phase
breakdown that the newer code logs), step_before_after.csv and step_before_after.png. Needs the commit in the git
history; vLLM specs (`bfloat16:vllm-merged`) need the vLLM environment (scripts/setup.sh vllm).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("time_generate_s", "time_score_s", "time_update_s", "time_refresh_s")  # logged by GRPOModule today
COLUMNS = {"code": "code", "dtype": "dtype", "engine": "engine", "seconds": "s per step (mean)",
           "samples_per_s": "samples/s", "vs_before": "vs before", **{p: p.removeprefix("time_") for p in PHASES}}


def measure(spec: str, quick: bool, cache: str, out: Path) -> None:
    """Time the training step of the code on sys.path (this checkout or the earlier one: only interfaces both have)
    in `spec` = "dtype:engine"; writes {seconds: [per measured step], breakdown: {phase: mean s}} to `out`."""
    import lightning as L

    from datamodules import RecDataModule
    from lightning_modules import GRPOModule
    from lightning_modules.grpo import OptimConfig
    from minirec.io import atomic_write_json
    from minirec.policy import PolicyConfig
    from minirec.processing import ProcessingConfig
    from minirec.prompts import PromptConfig
    from minirec.recpo import SamplingConfig

    dtype, engine = spec.split(":")
    model, batch, group, tokens, steps = ("tiny-random-qwen2", 2, 2, 4, 2) if quick else \
        ("smollm2-135m-instruct", 4, 4, 32, 3)
    processing = ProcessingConfig(dataset="movielens-100k", time_window=None, require_price=False, k_core=50)
    prompts = PromptConfig(category="movies", item="movie", item_plural="movies", prompt_window=5, max_item_tokens=96)

    def datamodule(subset: str) -> RecDataModule:
        dm = RecDataModule(processing=processing, prompts=prompts, tokenizer=model, cache_dir=cache, subset=subset,
                           max_predict_samples=batch * steps, max_val_samples=batch, train_batch_size=batch,
                           eval_batch_size=batch, item_batch_size=112)
        dm.prepare_data()
        dm.setup("predict")
        return dm

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []  # per step
            self.logged: list[dict[str, float]] = []  # per step: the phases the code logs

        def on_train_batch_start(self, *args) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
            self.seconds.append(time.perf_counter() - self.start)
            self.logged.append({p: float(v) for p in PHASES if (v := trainer.callback_metrics.get(f"train/{p}"))
                                is not None})

    with tempfile.TemporaryDirectory(prefix="step-") as work:
        ids = datamodule("all").predict_pool_ids()
        selection = Path(work) / "pool.json"
        atomic_write_json(selection, {"fingerprint": processing.fingerprint(), "ids": ids, "stages": [0] * len(ids),
                                      "curriculum": "none"})
        vllm = {} if engine == "hf" else {"engine": "vllm", "vllm_max_model_len": 1024,
                                          "vllm_weight_sync": "merged" if engine == "vllm-merged" else "lora"}
        module = GRPOModule(PolicyConfig(pretrained=model, lora_r=8, lora_alpha=16, lora_dropout=0.0, dtype=dtype),
                            SamplingConfig(group_size=group, max_new_tokens=tokens, **vllm),
                            optim=OptimConfig(lr=1e-4, micro_batch_size=batch * group), eval_max_new_tokens=tokens)
        timer = Timer()
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                            max_steps=steps, limit_val_batches=0, default_root_dir=work, callbacks=[timer])
        trainer.fit(module, datamodule=datamodule(str(selection)))
    measured = timer.logged[1:]  # the first step is a warm-up
    out.write_text(json.dumps({"ids": ids, "batch": batch, "seconds": timer.seconds[1:], "breakdown": {
        p: statistics.mean(m[p] for m in measured) for p in PHASES if all(p in m for m in measured)}}))


def run_child(tree: Path, spec: str, quick: bool, cache: str, work: Path) -> dict:
    """`measure(spec)` in a fresh process with `tree`'s code first on the path; returns its JSON."""
    out = work / f"{len(list(work.iterdir()))}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", spec, "--cache_dir", cache,
           "--measure_out", str(out), *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        from minirec.io import DataError

        last = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"{spec} step of {tree} failed: {last[0]}")
    return json.loads(out.read_text())


def worktree(commit: str, folder: Path) -> Path:
    """A detached git worktree of `commit` in `folder` (ConfigError if git does not know the commit)."""
    from minirec.io import ConfigError

    done = subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        raise ConfigError(f"--before {commit}: no such commit in this clone's history "
                          f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'git failed'})")
    return folder


def plot(rows: list[dict], out: Path) -> None:
    """step_before_after.png: samples/s of each code and dtype / engine, labelled with the ratio to the earlier code."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench_common import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    labels = [f"{r['code']}\n{r['dtype']} {r['engine']}" for r in rows]
    bars = ax.bar(labels, [r["samples_per_s"] for r in rows], color=["grey"] + ["tab:blue"] * (len(rows) - 1))
    ax.bar_label(bars, [f"{r['vs_before']:.2f}x" for r in rows])
    ax.set_ylabel("samples / s")
    ax.margins(y=0.15)  # room for the ratio labels
    ax.set_title("RecPO training step, same samples and settings")
    fig.tight_layout()
    save_figure(fig, out / "step_before_after.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="32d814d", help="the earlier commit (float32, HF generate)")
    parser.add_argument("--specs", nargs="+", default=["float32:hf", "bfloat16:hf"],
                        help="dtype:engine of this checkout (engine: hf, vllm, vllm-merged)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_before_after"))
    parser.add_argument("--cache_dir", default="data_cache", help="processed-dataset cache")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps (seconds), for tests")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement in this process
    parser.add_argument("--measure_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.measure:
        measure(args.measure, args.quick, args.cache_dir, args.measure_out)
        return 0
    # imported here, not at the top: a measurement runs with the earlier tree's minirec, which bench_common may not fit
    import torch

    from bench_common import machine, markdown_table, run_header, write_csv
    from minirec.io import atomic_write_text

    start = time.perf_counter()
    cache = str(Path(args.cache_dir).resolve())
    with tempfile.TemporaryDirectory(prefix="before-after-") as work:
        tree = worktree(args.before, Path(work) / "before")
        try:
            runs = [("before " + args.before, "float32:hf", run_child(tree, "float32:hf", args.quick, cache, Path(work)))]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        runs += [("this checkout", spec, run_child(ROOT, spec, args.quick, cache, Path(work))) for spec in args.specs]
    if len({json.dumps(r["ids"]) for _, _, r in runs}) != 1:
        from minirec.io import DataError

        raise DataError("the two code trees trained on different samples; the comparison would not be fair")
    rows = []
    for code, spec, r in runs:
        seconds = statistics.mean(r["seconds"])
        rows.append({"code": code, "dtype": spec.split(":")[0], "engine": spec.split(":")[1], "seconds": seconds,
                     "samples_per_s": r["batch"] / seconds, **{p: r["breakdown"].get(p, float("nan")) for p in PHASES}})
    for row in rows:
        row["vs_before"] = row["samples_per_s"] / rows[0]["samples_per_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"command": shlex.join(["python", "benchmarks/step_before_after.py", *argv]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": time.perf_counter() - start,
            "machine": machine(torch.get_num_threads())}
    write_csv(args.out / "step_before_after.csv", rows, list(COLUMNS))
    text = run_header("RecPO training step before and after the speed work", info) + [
        f"Each row is its own process over the same {runs[0][2]['batch'] * (len(runs[0][2]['seconds']) + 1)} pool "
        "samples and settings; mean over the measured steps after one warm-up step. The phases (seconds) are what "
        "the newer code logs: generate = sampling the rollouts, score = a scoring pass before the update (old "
        "log-probs, user embeddings, rewards; none where the update's own forward gives the rewards), update = loss "
        "forward (with the rewards), backward and optimizer, refresh = re-encoding the batch's catalogue rows.", "",
        markdown_table(rows, COLUMNS), "", "![samples/s](step_before_after.png)", ""]
    atomic_write_text(args.out / "step_before_after.md", "\n".join(text))
    plot(rows, args.out)
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "--measure" in sys.argv:  # one measurement, in a code tree that may predate run_command
        sys.exit(main())
    from minirec.io import run_command  # a user error: one `error: ...` line, exit status 2 (--debug: traceback)

    sys.exit(run_command(main))
