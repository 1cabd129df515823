"""Throughput benchmark against the machine's bound: rollouts, prefill, a RecPO step and its breakdown, scoring.

On MovieLens-100K prompts (k-core 50), for each model and base-weight dtype (float32, and bfloat16 where the CPU has
fast bf16):
- the machine's bound, measured here: peak matmul GFLOP/s per dtype and memory bandwidth (GB/s, a large copy);
- rollout tokens/s of each rollout engine (`hf`: `Policy.generate`; `vllm`: the vLLM engine, where installed; both
  from the base model, so `vllm-merged` rollouts are those of `vllm`) when sampling G completions per prompt, for
  prompt batches B up to B x G = 64, against the decode roofline: each decode step reads every weight once and does
  2 FLOPs per weight per sequence, so tokens/s <= min(B x G x bandwidth / weight bytes, peak FLOP/s / (2 x params));
- prefill tokens/s (one forward over B prompts) against the FLOP bound peak / (2 x params);
- items/s of encoding a batch of catalogue item prompts, each row run in full vs their shared first tokens run once
  (`Policy.encode`);
- forward + backward of B x G rollouts as G joined sequences per prompt vs each prompt run once with its G
  completions (the training path), on the same completions;
- samples/s of a GRPOModule `training_step` (G rollouts, rewards, backward, optimizer step) per dtype and engine
  (`vllm` = weights sent as a LoRA adapter, `vllm-merged` = merged weights loaded in place), with its time breakdown
  (generation; old log-prob / embedding forward and rewards; loss forward, backward and optimizer; catalogue-row
  refresh), and of the ScoringModule's `predict_step` (N rollouts, greedy pass, representativeness in the `hidden`
  and `lora` spaces) on the same samples, in the default (`auto`) dtype; each run by a Lightning Trainer, B per
  batch, the first batch a warm-up and not counted.

    python benchmarks/throughput.py [--quick] [--device cpu|cuda] [--engines hf vllm vllm-merged]
        [--out benchmarks/results/throughput]

(`--engines hf vllm vllm-merged` in the vLLM environment, `.venv-vllm/bin/python`, compares the engines in one run;
`--device cuda` measures SmolLM2 on one GPU, with B x G up to 64: benchmarks/gpu_check.sh.)

Writes throughput.csv, throughput.md, rollout_tokens_per_s.png and scoring_vs_training.png into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
from minirec.io import ConfigError, atomic_write_json, atomic_write_text
from minirec.policy import Policy, PolicyConfig, auto_dtype, shared_prefix
from minirec.processing import ProcessingConfig
from minirec.prompts import PromptConfig
from minirec.recpo import SamplingConfig, sample_rollouts
from minirec.vllm_engine import VLLMEngine

COLUMNS = ("model", "dtype", "engine", "measure", "batch", "group", "max_new_tokens", "runs", "seconds", "tokens",
           "tokens_per_s", "samples_per_s", "bound_tokens_per_s", "share_of_bound", "time_generate_s",
           "time_score_s", "time_update_s", "time_refresh_s")  # fmt: skip
TOKEN_MEASURES = ("rollout", "prefill", "item encode full", "item encode prefix-shared", "item encode+bwd full",
                  "item encode+bwd prefix-shared", "reason+encode two passes", "reason+encode one prefill",
                  "fwd+bwd joined", "fwd+bwd prefix-shared")  # the tokens/s table
ITEM_BATCH = 64  # item prompts per catalogue-encoding batch (the quickstart's `item_batch_size`)
REC_ITEMS = 18  # items a quickstart rec loss encodes with gradient (2 targets + 16 sampled negatives)
EVAL_NEW_TOKENS = 8  # greedy reasoning tokens at evaluation (the quickstart's `eval_max_new_tokens`)
BREAKDOWN = ("time_generate_s", "time_score_s", "time_update_s", "time_refresh_s")  # logged by GRPOModule
PROCESSING = ProcessingConfig(dataset="movielens-100k", time_window=None, require_price=False, k_core=50)
PROMPTS = PromptConfig(category="movies", item="movie", item_plural="movies", prompt_window=5, max_item_tokens=96)


@dataclass(frozen=True)
class Plan:
    """What to measure. models: (preset, prompts per step B); each step has `steps` batches (one warm-up)."""

    models: tuple[tuple[str, int], ...]
    dtypes: tuple[str, ...]
    engines: tuple[str, ...]
    rollout_batches: tuple[int, ...]
    group: int
    max_new_tokens: int
    steps: int
    repeats: int
    matmul_size: int
    copy_mib: int
    device: str = "cpu"


def make_plan(quick: bool, engines: tuple[str, ...] = ("hf",), device: str = "cpu") -> Plan:
    if quick:
        return Plan(models=(("tiny-random-qwen2", 2),), dtypes=("float32",), engines=engines, rollout_batches=(1, 2),
                    group=2, max_new_tokens=4, steps=2, repeats=1, matmul_size=256, copy_mib=16, device=device)
    if device == "cuda":
        return Plan(models=(("smollm2-135m-instruct", 16),), dtypes=("float32", "bfloat16"), engines=engines,
                    rollout_batches=(1, 4, 16), group=4, max_new_tokens=32, steps=4, repeats=2, matmul_size=8192,
                    copy_mib=2048, device=device)
    dtypes = ("float32", "bfloat16") if auto_dtype() == "bfloat16" else ("float32",)
    return Plan(models=(("tiny-random-qwen2", 8), ("smollm2-135m-instruct", 4)), dtypes=dtypes, engines=engines,
                rollout_batches=(1, 4, 16), group=4, max_new_tokens=32, steps=3, repeats=2, matmul_size=2048,
                copy_mib=512)


def _sync() -> None:
    """Wait for queued GPU work (no-op without CUDA), so that wall-clock timers see it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best


def hardware_bounds(plan: Plan) -> dict[str, float]:
    """Peak matmul GFLOP/s per dtype (`gflops_<dtype>`, square n x n matmul) and copy bandwidth (`bandwidth_gbs`,
    bytes read + written), best of 5."""
    n = plan.matmul_size
    bounds = {}
    for dtype in plan.dtypes:
        a, b = (torch.randn(n, n, device=plan.device).to(getattr(torch, dtype)) for _ in range(2))
        bounds[f"gflops_{dtype}"] = 2 * n**3 / _best_seconds(lambda: a @ b, 5) / 1e9
    x = torch.ones(plan.copy_mib * 2**20 // 4, device=plan.device)
    y = torch.empty_like(x)
    bounds["bandwidth_gbs"] = 2 * x.numel() * 4 / _best_seconds(lambda: y.copy_(x), 5) / 1e9
    return bounds


def _weights(policy: Policy) -> tuple[int, int]:
    """(parameter count, bytes) of the policy's weights (base and LoRA)."""
    params = list(policy.model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


class StepTimer(L.Callback):
    """Wall seconds of every training / predict batch (hooks around the step), and the GRPOModule's logged time
    breakdown of every training step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.breakdown: list[dict[str, float]] = []
        self.start = 0.0

    def _begin(self, *args: Any) -> None:
        _sync()
        self.start = time.perf_counter()

    def _end(self, trainer: L.Trainer, *args: Any) -> None:
        _sync()
        self.seconds.append(time.perf_counter() - self.start)
        logged = trainer.callback_metrics
        self.breakdown.append({k: float(logged[f"train/{k}"]) for k in BREAKDOWN if f"train/{k}" in logged})

    on_train_batch_start = on_predict_batch_start = _begin
    on_train_batch_end = on_predict_batch_end = _end


def _datamodule(model: str, cache: str, batch: int, pool: int, subset: str = "all") -> RecDataModule:
    dm = RecDataModule(processing=PROCESSING, prompts=PROMPTS, tokenizer=model, cache_dir=cache, subset=subset,
                       max_predict_samples=pool, max_val_samples=batch, train_batch_size=batch, eval_batch_size=batch,
                       item_batch_size=112)
    dm.prepare_data()
    dm.setup("predict")
    return dm


def _policy_config(model: str, dtype: str = "auto") -> PolicyConfig:
    return PolicyConfig(pretrained=model, lora_r=8, lora_alpha=16, lora_dropout=0.0, dtype=dtype)


def _rollout_tokens(policy: Policy, engine: VLLMEngine | None, batch: dict[str, torch.Tensor], group: int,
                    max_new_tokens: int) -> int:
    """Sample `group` completions per prompt of `batch` with the policy (engine None) or the vLLM engine, as training
    does (`sample_rollouts`): completion tokens, each row ending with the marker."""
    sampling = SamplingConfig(group_size=group, max_new_tokens=max_new_tokens)
    return int(sample_rollouts(policy, batch, sampling, engine=engine).completion_mask.sum())


def measure_rollouts(model: str, dtype: str, plan: Plan, cache: str, bounds: dict[str, float]) -> list[dict[str, Any]]:
    """Generated tokens/s of sampled rollouts for each engine and prompt batch size (median over repeats), and prefill
    tokens/s of the largest batch, each against its bound."""
    policy = Policy(_policy_config(model, dtype))
    policy.model.to(plan.device)
    params, weight_bytes = _weights(policy)
    flop_bound = bounds[f"gflops_{dtype}"] * 1e9 / (2 * params)  # tokens/s
    dm = _datamodule(model, cache, max(plan.rollout_batches), max(plan.rollout_batches))
    batch = next(iter(dm.predict_dataloader()))
    batch = {k: v.to(plan.device) for k, v in batch.items()}
    common = {"model": model, "dtype": dtype, "engine": "hf", "group": plan.group,
              "max_new_tokens": plan.max_new_tokens}
    rows = []
    with torch.no_grad():
        for name in (e for e in plan.engines if e != "vllm-merged"):  # base-model rollouts: the same as vllm
            engine = None if name == "hf" else VLLMEngine(policy, kv_cache_gb=2.0, max_model_len=1024)
            _rollout_tokens(policy, engine, {k: v[:1] for k, v in batch.items()}, 1, 2)  # warm-up
            for b in plan.rollout_batches:
                runs = []
                for r in range(plan.repeats):
                    torch.manual_seed(r)
                    _sync()
                    start = time.perf_counter()
                    tokens = _rollout_tokens(policy, engine, {k: v[:b] for k, v in batch.items()}, plan.group,
                                             plan.max_new_tokens)
                    runs.append((time.perf_counter() - start, tokens))
                seconds, tokens = statistics.median(s for s, _ in runs), statistics.median(t for _, t in runs)
                bound = min(b * plan.group * bounds["bandwidth_gbs"] * 1e9 / weight_bytes, flop_bound)
                rows.append({**common, "engine": name, "measure": "rollout", "batch": b, "runs": len(runs),
                             "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                             "samples_per_s": b / seconds, "bound_tokens_per_s": bound,
                             "share_of_bound": tokens / seconds / bound})
            if engine is not None:
                engine.close()
        ids, mask = batch["prompt_ids"], batch["prompt_mask"]
        seconds = _best_seconds(lambda: policy.model(input_ids=ids, attention_mask=mask), plan.repeats)
        tokens = int(mask.sum())
        rows.append({**common, "group": float("nan"), "measure": "prefill", "batch": ids.shape[0],
                     "runs": plan.repeats, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                     "samples_per_s": ids.shape[0] / seconds,
                     "bound_tokens_per_s": flop_bound, "share_of_bound": tokens / seconds / flop_bound})
    decoder_bound = bounds[f"gflops_{dtype}"] * 1e9 / (2 * _decoder_params(policy))  # tokens/s without LM head
    rows += measure_item_encoding(policy, dm, plan, common, decoder_bound)
    rows += measure_evaluation(policy, batch, plan, common, decoder_bound)
    return rows + measure_train_forward(policy, batch, plan, common, flop_bound / 2)


def _decoder_params(policy: Policy) -> int:
    """The decoder's matmul parameters: what an embedding runs per token (no LM head; the input embedding is a
    lookup)."""
    decoder = policy.model.get_base_model().get_decoder()
    return sum(p.numel() for p in decoder.parameters()) - decoder.get_input_embeddings().weight.numel()


def measure_item_encoding(policy: Policy, dm: RecDataModule, plan: Plan, common: dict[str, Any],
                          bound: float) -> list[dict[str, Any]]:
    """Items/s of encoding item prompts (padded to the longest) with the full forward of every row against
    `Policy.encode`, which runs the rows' shared first tokens once: a catalogue batch (the first `ITEM_BATCH` items,
    no gradient) and the items of one rec loss (the first `REC_ITEMS`, forward + backward to the LoRA weights, in
    training mode). Tokens = tokens run (padding included); `bound`: tokens/s at peak FLOP/s / (2 x
    `_decoder_params`), halved with backward (the frozen base's backward computes activation gradients only)."""
    rows = []
    for label, items, grad in (("item encode", ITEM_BATCH, False), ("item encode+bwd", REC_ITEMS, True)):
        ids, mask = dm.item_prompt_batch(list(range(1, min(items, dm.num_items) + 1)))
        ids, mask = ids.to(plan.device), mask.to(plan.device)
        _, lengths, prefix = shared_prefix(ids, mask)
        shared_tokens = prefix + len(ids) * (int(lengths.max()) - prefix)  # the prefix once, each row's rest padded
        row_bound = bound / 2 if grad else bound

        def run(encode) -> None:
            with torch.set_grad_enabled(grad):
                emb = encode()
                if grad:
                    emb.sum().backward()
                    policy.model.zero_grad(set_to_none=True)

        policy.train(grad)
        for kind, encode, tokens in (
            ("full", lambda: policy.forward_sequences(ids, mask)[1], ids.numel()),
            ("prefix-shared", lambda: policy.encode(ids, mask), shared_tokens),
        ):
            seconds = _best_seconds(lambda: run(encode), plan.repeats)
            rows.append({**common, "group": float("nan"), "measure": f"{label} {kind}", "batch": len(ids),
                         "runs": plan.repeats, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                         "samples_per_s": len(ids) / seconds, "bound_tokens_per_s": row_bound,
                         "share_of_bound": tokens / seconds / row_bound})
    policy.eval()
    return rows


def measure_evaluation(policy: Policy, batch: dict[str, torch.Tensor], plan: Plan, common: dict[str, Any],
                       bound: float) -> list[dict[str, Any]]:
    """Users/s of what validation, test and scoring run per batch: greedy reasoning (`EVAL_NEW_TOKENS`) then the
    user embedding, as greedy `generate` + `encode` of the joined rows (each prompt run twice) against
    `Policy.reason_and_encode` (each prompt once). Tokens = the user sequences' (prompt + completion, padding
    included) for both, so tokens/s reads as the work done, not the tokens run; `bound` as for item encoding (the
    LM head runs only for the reasoning tokens)."""
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]

    def two_passes() -> tuple[torch.Tensor, torch.Tensor]:
        comp, comp_mask = policy.generate(ids, mask, do_sample=False, max_new_tokens=EVAL_NEW_TOKENS)
        with torch.no_grad():
            policy.encode(*policy.join(ids, mask, comp, comp_mask)[:2])
        return comp, comp_mask

    tokens = ids.numel() + two_passes()[0].numel()  # the user sequences, whichever way they run
    rows = []
    for measure, run in (("reason+encode two passes", two_passes),
                         ("reason+encode one prefill", lambda: policy.reason_and_encode(ids, mask, EVAL_NEW_TOKENS))):
        seconds = _best_seconds(run, plan.repeats)
        rows.append({**common, "group": float("nan"), "measure": measure, "batch": ids.shape[0], "runs": plan.repeats,
                     "max_new_tokens": EVAL_NEW_TOKENS, "seconds": seconds, "tokens": tokens,
                     "tokens_per_s": tokens / seconds, "samples_per_s": ids.shape[0] / seconds,
                     "bound_tokens_per_s": bound, "share_of_bound": tokens / seconds / bound})
    return rows


def measure_train_forward(policy: Policy, batch: dict[str, torch.Tensor], plan: Plan, common: dict[str, Any],
                          bound: float) -> list[dict[str, Any]]:
    """Forward + backward (LoRA gradients) of B x G rollouts, B the middle rollout batch: the G joined sequences
    per prompt (`forward_sequences`) against each prompt run once with its G completions (`forward_groups`), both
    on the same sampled completions. Bound: peak FLOP/s / (4 x params) per token run (the frozen base's backward
    computes activation gradients only)."""
    b = plan.rollout_batches[len(plan.rollout_batches) // 2]
    ids, mask = batch["prompt_ids"][:b], batch["prompt_mask"][:b]
    torch.manual_seed(0)
    comp, cmask = policy.generate(ids, mask, num_samples=plan.group, max_new_tokens=plan.max_new_tokens)
    joined = policy.join(ids.repeat_interleave(plan.group, 0), mask.repeat_interleave(plan.group, 0), comp, cmask)

    def forward_backward(forward) -> None:
        logps, emb = forward()
        (logps.sum() + emb.sum()).backward()
        policy.model.zero_grad(set_to_none=True)

    rows = []
    for measure, forward, tokens in (
        ("fwd+bwd joined", lambda: policy.forward_sequences(*joined), int(joined[1].sum())),
        ("fwd+bwd prefix-shared", lambda: policy.forward_groups(ids, mask, comp, cmask), int(mask.sum() + cmask.sum())),
    ):
        seconds = _best_seconds(lambda: forward_backward(forward), plan.repeats)
        rows.append({**common, "measure": measure, "batch": b, "runs": plan.repeats, "seconds": seconds,
                     "tokens": tokens, "tokens_per_s": tokens / seconds, "samples_per_s": b / seconds,
                     "bound_tokens_per_s": bound, "share_of_bound": tokens / seconds / bound})
    return rows


def _timed(device: str, trainer_kw: dict[str, Any], run) -> StepTimer:
    """A Trainer on `device` (cpu or cuda) with a StepTimer runs `run(trainer)`; the timer's first batch (a warm-up)
    is dropped."""
    timer = StepTimer()
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        callbacks=[timer], **trainer_kw)
    run(trainer)
    timer.seconds, timer.breakdown = timer.seconds[1:], timer.breakdown[1:]
    return timer


def measure_steps(model: str, batch: int, plan: Plan, cache: str, work: Path) -> list[dict[str, Any]]:
    """Samples/s of a training step in each dtype and engine (with its time breakdown), and of scoring (hidden and
    lora spaces) in the default dtype, over the same `batch`·`steps` samples."""
    pool = batch * plan.steps
    sampling = SamplingConfig(group_size=plan.group, max_new_tokens=plan.max_new_tokens, vllm_max_model_len=1024)
    ids = _datamodule(model, cache, batch, pool).predict_pool_ids()
    selection = work / f"{model}_pool.json"
    atomic_write_json(selection, {"fingerprint": PROCESSING.fingerprint(), "ids": ids, "stages": [0] * len(ids),
                                  "curriculum": "none"})
    common = {"model": model, "batch": batch, "group": plan.group, "max_new_tokens": plan.max_new_tokens}
    rows = []
    for dtype, engine in itertools.product(plan.dtypes, plan.engines):
        engine_settings = {"engine": engine.split("-")[0], "vllm_weight_sync": "merged" if "merged" in engine else "lora"}
        module = GRPOModule(_policy_config(model, dtype), dataclasses.replace(sampling, **engine_settings),
                            optim=OptimConfig(lr=1e-4, micro_batch_size=batch * plan.group),
                            eval_max_new_tokens=plan.max_new_tokens)
        dm = _datamodule(model, cache, batch, pool, subset=str(selection))
        timer = _timed(plan.device, {"max_steps": plan.steps, "limit_val_batches": 0, "default_root_dir": str(work)},
                       lambda t: t.fit(module, datamodule=dm))  # the first step (a warm-up) starts the vLLM engine
        seconds = statistics.mean(timer.seconds)
        rows.append({**common, "dtype": dtype, "engine": engine, "measure": "training step",
                     "runs": len(timer.seconds), "seconds": seconds, "samples_per_s": batch / seconds,
                     **{k: statistics.mean(b[k] for b in timer.breakdown) for k in BREAKDOWN}})
    dtype = auto_dtype()
    for space in ("hidden", "lora"):
        module = ScoringModule(policy=_policy_config(model), sampling=sampling, num_rollouts=plan.group, space=space,
                               projection_dim=1024, eval_max_new_tokens=plan.max_new_tokens)
        dm = _datamodule(model, cache, batch, pool)
        seconds = statistics.mean(_timed(plan.device, {}, lambda t: t.predict(module, datamodule=dm, return_predictions=False))
                                  .seconds)
        rows.append({**common, "dtype": dtype, "engine": "hf", "measure": f"scoring ({space})",
                     "runs": plan.steps - 1, "seconds": seconds, "samples_per_s": batch / seconds})
    return rows


def plot(rows: list[dict[str, Any]], out: Path, device: str) -> None:
    """rollout_tokens_per_s.png (tokens/s vs B x G per model and dtype, with the decode bound dashed) and
    scoring_vs_training.png (seconds per batch per measure, training steps split into their breakdown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lines = list(dict.fromkeys((r["model"], r["dtype"], r["engine"]) for r in rows if r["measure"] == "rollout"))
    for i, (model, dtype, engine) in enumerate(lines):
        line = [r for r in rows if r["measure"] == "rollout" and (r["model"], r["dtype"], r["engine"]) == lines[i]]
        x = [r["batch"] * r["group"] for r in line]
        ax.plot(x, [r["tokens_per_s"] for r in line], "o-", color=f"C{i}", label=f"{model} {dtype} {engine}")
        ax.plot(x, [r["bound_tokens_per_s"] for r in line], "--", color=f"C{i}", alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="sequences per generate call (B x G)", ylabel="generated tokens / s",
           title=f"Rollout throughput ({device.upper()}); dashed: decode bound")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "rollout_tokens_per_s.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        steps = [r for r in rows if r["model"] == model and r["measure"] not in TOKEN_MEASURES]
        labels = [f"{r['measure']}\n{r['dtype']} {r['engine']}" for r in steps]
        for j, r in enumerate(steps):
            if r["measure"] != "training step":
                ax.bar(j, r["seconds"], color="C7")
                continue
            bottom = 0.0
            for k, key in enumerate(BREAKDOWN):
                ax.bar(j, r[key], bottom=bottom, color=f"C{k}", label=key[5:-2] if j == 0 else None)
                bottom += r[key]
            ax.bar(j, r["seconds"] - bottom, bottom=bottom, color="C9", label="other" if j == 0 else None)
        ax.set_xticks(range(len(steps)), labels, fontsize=7)
        ax.set(ylabel="seconds per batch", title=model)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "scoring_vs_training.png")
    plt.close(fig)


def write_markdown(path: Path, rows: list[dict[str, Any]], plan: Plan, info: dict[str, Any],
                   bounds: dict[str, float]) -> None:
    steps = [r for r in rows if r["measure"] not in TOKEN_MEASURES]
    base = {r["model"]: r["samples_per_s"] for r in steps
            if (r["measure"], r["dtype"], r["engine"]) == ("training step", "float32", "hf")}
    steps = [{**r, "vs_training": r["samples_per_s"] / base[r["model"]]} for r in steps]
    bound_line = ", ".join([f"peak matmul {bounds[f'gflops_{d}']:.0f} GFLOP/s in {d}" for d in plan.dtypes]
                           + [f"copy bandwidth {bounds['bandwidth_gbs']:.1f} GB/s"])
    text = [
        *run_header("Throughput benchmark", info),
        f"MovieLens-100K prompts (k-core 50, 5 history lines); G = N = {plan.group} completions per prompt, at most "
        f"{plan.max_new_tokens} new tokens (sampling, temperature 1.5, top-k 200); LoRA r 8 on all projections "
        "(float32); `dtype` is the frozen base weights' dtype.", "",
        f"Measured bound of this machine: {bound_line}.", "",
        "## Rollouts, prefill and the training forward against the bound", "",
        "Decode bound: each step reads every weight once (bandwidth) and does 2 FLOPs per weight per sequence; "
        "prefill bound: peak FLOP/s / (2 x params); forward + backward (LoRA gradients, frozen base): peak FLOP/s / "
        "(4 x params) per token run. `joined` runs G prompt + completion sequences per prompt, `prefix-shared` each "
        "prompt once with its G completions (the training path); `item encode` encodes a batch of "
        f"{ITEM_BATCH} catalogue item prompts (prompts B = items), `full` running every row, `prefix-shared` the "
        "rows' shared first tokens once (`Policy.encode`), against peak FLOP/s / (2 x the decoder's matmul parameters) "
        f"(no LM head); `item encode+bwd` the same for the {REC_ITEMS} items of a quickstart rec loss (2 targets + 16 "
        "sampled negatives) with backward to the LoRA weights in training mode, against / (4 x them); `reason+encode` "
        f"is an evaluation batch (B prompts): {EVAL_NEW_TOKENS} greedy reasoning tokens then the user embedding, "
        "`two passes` running each prompt for the reasoning and again for the embedding, `one prefill` once "
        "(`Policy.reason_and_encode`), with tokens = the user sequences' (prompt + completion) for both, against the "
        "item-encoding bound (the LM head runs only for the reasoning tokens); otherwise tokens = tokens run, padding included.", "",
        markdown_table([r for r in rows if r["measure"] in TOKEN_MEASURES], {
            "model": "model", "dtype": "dtype", "engine": "engine", "measure": "measure", "batch": "prompts B",
            "group": "G",
            "tokens": "tokens", "seconds": "seconds (median / best)", "tokens_per_s": "tokens/s",
            "bound_tokens_per_s": "bound tokens/s", "share_of_bound": "share of bound"}), "",
        "## A RecPO training step (with its time breakdown) and scoring, on the same samples", "",
        f"Mean over {plan.steps - 1} batch(es) after one warm-up batch, run by a Lightning Trainer. Breakdown: "
        "generate = sampling the rollouts; score = a scoring pass before the update (old log-probs, user embeddings, "
        "rewards; none where the update's own forward gives the rewards); update = loss forward (with the rewards), "
        "backward and optimizer; refresh = re-encoding the batch's catalogue rows.", "",
        markdown_table(steps, {"model": "model", "dtype": "dtype", "engine": "engine", "measure": "measure",
                               "batch": "samples per batch",
                               "seconds": "s per batch", "samples_per_s": "samples/s",
                               "vs_training": "vs float32 hf training step", "time_generate_s": "generate s",
                               "time_score_s": "score s", "time_update_s": "update s",
                               "time_refresh_s": "refresh s"}), "",
        "![rollout tokens/s](rollout_tokens_per_s.png)", "", "![scoring vs training](scoring_vs_training.png)", "",
    ]
    atomic_write_text(path, "\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny sizes (seconds), for tests")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput"), help="output folder")
    parser.add_argument("--cache_dir", default="data_cache", help="processed-dataset cache")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model runs (cuda: one GPU, SmolLM2 only, B x G up to 64)")
    parser.add_argument("--engines", nargs="+", choices=("hf", "vllm", "vllm-merged"), default=["hf"],
                        help="rollout engines to compare (vllm, vllm-merged: need vLLM, scripts/setup.sh vllm)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    plan = make_plan(args.quick, tuple(args.engines), args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bounds = hardware_bounds(plan)
    rows = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as work:
        for model, batch in plan.models:
            for dtype in plan.dtypes:
                rows += measure_rollouts(model, dtype, plan, args.cache_dir, bounds)
            rows += measure_steps(model, batch, plan, args.cache_dir, Path(work))
    rows = [{key: r.get(key, float("nan")) for key in COLUMNS} for r in rows]
    info = {"command": shlex.join(["python", "benchmarks/throughput.py", *argv]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": time.perf_counter() - start,
            "machine": machine(torch.get_num_threads(), args.device)}
    write_csv(args.out / "throughput.csv", rows, COLUMNS)
    write_markdown(args.out / "throughput.md", rows, plan, info, bounds)
    plot(rows, args.out, args.device)
    print((args.out / "throughput.md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from minirec.io import run_command  # a user error: one `error: ...` line, exit status 2 (--debug: traceback)

    sys.exit(run_command(main))
