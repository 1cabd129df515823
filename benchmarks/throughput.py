"""Throughput benchmark: rollout tokens/s, and MiniRec scoring vs a RecPO training step on the same samples.

On MovieLens-100K prompts (k-core 50), for each model:
- rollout tokens/s of `Policy.generate` (sampling, G completions per prompt) for several prompt batch sizes B;
- samples/s of the ScoringModule's `predict_step` (N rollouts, greedy pass, representativeness in the `hidden` and
  `lora` spaces) and of the GRPOModule's `training_step` (G rollouts, rewards, backward, optimizer step), both run by a
  Lightning Trainer over the same pool samples, B per batch; the first batch of each is a warm-up and not counted.

    python benchmarks/throughput.py [--quick] [--out benchmarks/results/throughput]

Writes throughput.csv, throughput.md, rollout_tokens_per_s.png and scoring_vs_training.png into --out.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch

from bench_common import machine, markdown_table, run_header, save_figure, write_csv
from datamodules import RecDataModule
from lightning_modules import GRPOModule, ScoringModule
from lightning_modules.grpo import OptimConfig
from minirec.io import atomic_write_json, atomic_write_text
from minirec.policy import Policy, PolicyConfig
from minirec.processing import ProcessingConfig
from minirec.prompts import PromptConfig
from minirec.recpo import SamplingConfig

COLUMNS = ("model", "measure", "batch", "group", "max_new_tokens", "runs", "seconds", "tokens", "tokens_per_s",
           "samples_per_s")  # fmt: skip
PROCESSING = ProcessingConfig(dataset="movielens-100k", time_window=None, require_price=False, k_core=50)
PROMPTS = PromptConfig(category="movies", item="movie", item_plural="movies", prompt_window=5, max_item_tokens=96)


@dataclass(frozen=True)
class Plan:
    """What to measure. models: (preset, prompts per step B); each step has `steps` batches (one warm-up)."""

    models: tuple[tuple[str, int], ...]
    rollout_batches: tuple[int, ...]
    group: int
    max_new_tokens: int
    steps: int
    repeats: int


def make_plan(quick: bool) -> Plan:
    if quick:
        return Plan(models=(("tiny-random-qwen2", 2),), rollout_batches=(1, 2), group=2, max_new_tokens=4, steps=2,
                    repeats=1)
    return Plan(models=(("tiny-random-qwen2", 8), ("smollm2-135m-instruct", 4)), rollout_batches=(1, 2, 4, 8),
                group=4, max_new_tokens=32, steps=3, repeats=2)


class StepTimer(L.Callback):
    """Wall seconds of every training / predict batch (hooks around the step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.start = 0.0

    def _begin(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def _end(self, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self.start)

    on_train_batch_start = on_predict_batch_start = _begin
    on_train_batch_end = on_predict_batch_end = _end


def _datamodule(model: str, cache: str, batch: int, pool: int, subset: str = "all") -> RecDataModule:
    dm = RecDataModule(processing=PROCESSING, prompts=PROMPTS, tokenizer=model, cache_dir=cache, subset=subset,
                       max_predict_samples=pool, max_val_samples=batch, train_batch_size=batch, eval_batch_size=batch,
                       item_batch_size=112)
    dm.prepare_data()
    dm.setup("predict")
    return dm


def _policy_config(model: str) -> PolicyConfig:
    return PolicyConfig(pretrained=model, lora_r=8, lora_alpha=16, lora_dropout=0.0)


def measure_rollouts(model: str, plan: Plan, cache: str) -> list[dict[str, Any]]:
    """Generated tokens per second of sampled rollouts for each prompt batch size (median over repeats)."""
    policy = Policy(_policy_config(model))
    batch = next(iter(_datamodule(model, cache, max(plan.rollout_batches), max(plan.rollout_batches))
                      .predict_dataloader()))
    rows = []
    with torch.no_grad():
        policy.generate(batch["prompt_ids"][:1], batch["prompt_mask"][:1], num_samples=1, max_new_tokens=2)  # warm-up
        for b in plan.rollout_batches:
            runs = []
            for r in range(plan.repeats):
                torch.manual_seed(r)
                start = time.perf_counter()
                _, mask = policy.generate(batch["prompt_ids"][:b], batch["prompt_mask"][:b], num_samples=plan.group,
                                          max_new_tokens=plan.max_new_tokens)
                runs.append((time.perf_counter() - start, int(mask.sum())))
            seconds, tokens = statistics.median(s for s, _ in runs), statistics.median(t for _, t in runs)
            rows.append({"model": model, "measure": "rollout", "batch": b, "group": plan.group,
                         "max_new_tokens": plan.max_new_tokens, "runs": len(runs), "seconds": seconds,
                         "tokens": tokens, "tokens_per_s": tokens / seconds, "samples_per_s": b / seconds})
    return rows


def _timed(trainer_kw: dict[str, Any], run) -> list[float]:
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        callbacks=[timer], **trainer_kw)
    run(trainer)
    return timer.seconds[1:]  # the first batch is a warm-up


def measure_steps(model: str, batch: int, plan: Plan, cache: str, work: Path) -> list[dict[str, Any]]:
    """Samples/s of scoring (hidden and lora spaces) and of a training step over the same `batch`·`steps` samples."""
    pool = batch * plan.steps
    policy = _policy_config(model)
    sampling = SamplingConfig(group_size=plan.group, max_new_tokens=plan.max_new_tokens)
    ids = _datamodule(model, cache, batch, pool).predict_pool_ids()
    selection = work / f"{model}_pool.json"
    atomic_write_json(selection, {"fingerprint": PROCESSING.fingerprint(), "ids": ids, "stages": [0] * len(ids),
                                  "curriculum": "none"})
    common = {"model": model, "batch": batch, "group": plan.group, "max_new_tokens": plan.max_new_tokens,
              "tokens": float("nan"), "tokens_per_s": float("nan")}
    rows = []
    for space in ("hidden", "lora"):
        module = ScoringModule(policy=policy, sampling=sampling, num_rollouts=plan.group, space=space,
                               projection_dim=1024, eval_max_new_tokens=plan.max_new_tokens)
        dm = _datamodule(model, cache, batch, pool)
        seconds = _timed({}, lambda t: t.predict(module, datamodule=dm, return_predictions=False))
        rows.append({**common, "measure": f"scoring ({space})", "runs": len(seconds),
                     "seconds": statistics.mean(seconds), "samples_per_s": batch / statistics.mean(seconds)})
    module = GRPOModule(policy, sampling, optim=OptimConfig(lr=1e-4, micro_batch_size=batch * plan.group),
                        eval_max_new_tokens=plan.max_new_tokens)
    dm = _datamodule(model, cache, batch, pool, subset=str(selection))
    seconds = _timed({"max_steps": plan.steps, "limit_val_batches": 0, "default_root_dir": str(work)},
                     lambda t: t.fit(module, datamodule=dm))
    rows.append({**common, "measure": "training step", "runs": len(seconds), "seconds": statistics.mean(seconds),
                 "samples_per_s": batch / statistics.mean(seconds)})
    return rows


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    """rollout_tokens_per_s.png (tokens/s vs B per model) and scoring_vs_training.png (samples/s per measure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, model in enumerate(models):
        line = [r for r in rows if r["model"] == model and r["measure"] == "rollout"]
        ax.plot([r["batch"] for r in line], [r["tokens_per_s"] for r in line], "o-", color=f"C{i}", label=model)
    ax.set(xscale="log", yscale="log", xlabel="prompts per generate call B (x G completions)",
           ylabel="generated tokens / s", title="Rollout throughput (CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "rollout_tokens_per_s.png")
    plt.close(fig)

    measures = ["scoring (hidden)", "scoring (lora)", "training step"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        values = [next(r["samples_per_s"] for r in rows if r["model"] == model and r["measure"] == m) for m in measures]
        ax.bar(range(len(measures)), values, color=["C0", "C1", "C3"])
        ax.set_xticks(range(len(measures)), measures, rotation=15)
        ax.set(ylabel="samples / s", title=model)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "scoring_vs_training.png")
    plt.close(fig)


def write_markdown(path: Path, rows: list[dict[str, Any]], plan: Plan, info: dict[str, Any]) -> None:
    steps = [r for r in rows if r["measure"] != "rollout"]
    train = {r["model"]: r["samples_per_s"] for r in steps if r["measure"] == "training step"}
    steps = [{**r, "vs_training": r["samples_per_s"] / train[r["model"]]} for r in steps]
    text = [
        *run_header("Throughput benchmark", info),
        f"MovieLens-100K prompts (k-core 50, 5 history lines); G = N = {plan.group} completions per prompt, at most "
        f"{plan.max_new_tokens} new tokens (sampling, temperature 1.5, top-k 200); LoRA r 8 on all projections; "
        "float32.", "",
        "## Rollout tokens/s (`Policy.generate`)", "",
        markdown_table([r for r in rows if r["measure"] == "rollout"], {
            "model": "model", "batch": "prompts B", "group": "G", "tokens": "tokens generated",
            "seconds": "seconds (median)", "tokens_per_s": "tokens/s"}), "",
        "## Scoring vs a training step on the same samples", "",
        f"Mean over {plan.steps - 1} batch(es) after one warm-up batch, run by a Lightning Trainer.", "",
        markdown_table(steps, {"model": "model", "measure": "measure", "batch": "samples per batch",
                               "seconds": "s per batch", "samples_per_s": "samples/s",
                               "vs_training": "speed vs training step"}), "",
        "![rollout tokens/s](rollout_tokens_per_s.png)", "", "![scoring vs training](scoring_vs_training.png)", "",
    ]
    atomic_write_text(path, "\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny sizes (seconds), for tests")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput"), help="output folder")
    parser.add_argument("--cache_dir", default="data_cache", help="processed-dataset cache")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    plan = make_plan(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as work:
        for model, batch in plan.models:
            rows += measure_rollouts(model, plan, args.cache_dir)
            rows += measure_steps(model, batch, plan, args.cache_dir, Path(work))
    info = {"command": shlex.join(["python", "benchmarks/throughput.py", *argv]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": time.perf_counter() - start,
            "machine": machine(torch.get_num_threads())}
    write_csv(args.out / "throughput.csv", rows, COLUMNS)
    write_markdown(args.out / "throughput.md", rows, plan, info)
    plot(rows, args.out)
    print((args.out / "throughput.md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from minirec.io import run_command  # a user error: one `error: ...` line, exit status 2 (--debug: traceback)

    sys.exit(run_command(main))
