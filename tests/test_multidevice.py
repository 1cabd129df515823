"""GRPOModule on 2 CPU processes with DDP and DeepSpeed ZeRO-2 (the shipped strategy presets): ranks stay in sync,
cross-device negatives arrive through all_gather, checkpoints hold only LoRA weights and resume, ZeRO-2 makes the
same update as DDP; importing `minirec` makes a process destroy its process group before interpreter shutdown.

Each mode runs tests/scripts/fit_multi.py twice as a subprocess (Lightning's launcher re-runs the script for rank 1):
a fit to step 2 that checkpoints, then a resume from `ckpt_path="last"` to step 4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import datamodules  # noqa: F401  (importing them allow-lists the configs in checkpoints for weights_only loading)
import lightning_modules  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fit_multi.py"
WORLD = 2


def run_script(mode: str, workdir: Path, *extra: str) -> float:
    """Run fit_multi.py; its output goes to a log in `workdir`. Returns the wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    log = workdir / f"{mode}{''.join(extra)}.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(workdir), *extra], cwd=ROOT, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=400)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"{mode} {extra} failed:\n" + log.read_text()[-4000:]
    return seconds


def run_mode(mode: str, workdir: Path) -> dict:
    """Fit then resume one mode: per run ("fit", "resume") the per-rank JSON records and LoRA weights."""
    seconds = {"fit": run_script(mode, workdir), "resume": run_script(mode, workdir, "--resume")}
    out = {"mode": mode, "workdir": workdir, "seconds": seconds}
    for run in ("fit", "resume"):
        out[run] = [json.loads((workdir / f"{run}-rank{r}.json").read_text()) for r in range(WORLD)]
        out[run + "_lora"] = [torch.load(workdir / f"{run}-rank{r}-lora.pt", weights_only=True) for r in range(WORLD)]
    print(f"\n{mode}: wall s {seconds}; val at step 2 {out['fit'][0]['val']}; at step 4 {out['resume'][0]['val']}")
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Callable[[str], dict]:
    """`results(mode)`: the runs of a mode, made once per module."""
    cache: dict[str, dict] = {}

    def get(mode: str) -> dict:
        if mode not in cache:
            cache[mode] = run_mode(mode, tmp_path_factory.mktemp(mode))
        return cache[mode]

    return get


@pytest.fixture(params=["ddp", "zero2"])
def runs(request, results) -> dict:
    return results(request.param)


def test_ranks_finish_in_sync(runs: dict) -> None:
    for run, step in (("fit", 2), ("resume", 4)):
        recs = runs[run]
        assert [r["rank"] for r in recs] == [0, 1] and all(r["world_size"] == WORLD for r in recs)
        assert [r["global_step"] for r in recs] == [step, step]
        end = runs[run + "_lora"]
        assert all(torch.equal(end[0]["end"][k], end[1]["end"][k]) for k in end[0]["end"]), "LoRA differs across ranks"
        assert any(not torch.equal(end[0]["start"][k], end[0]["end"][k]) for k in end[0]["end"]), "nothing trained"
        val = recs[0]["val"]
        assert set(val) == {f"val/{m}@{k}" for m in ("ndcg", "hr") for k in (5, 10, 20, 50)}
        assert val == recs[1]["val"] and all(0.0 <= v <= 1.0 for v in val.values())


def test_negatives_come_from_the_other_rank(runs: dict) -> None:
    for rank, rec in enumerate(runs["fit"]):
        other = runs["fit"][1 - rank]["seen"]
        seen = rec["seen"]
        assert seen["extra_shape"][0] > 0
        assert seen["extra_ids"] == other["own_ids"]  # exactly the other rank's unique in-batch targets, unpadded
        assert seen["extra_shape"] == [len(other["own_ids"]), 64] and seen["extra_requires_grad"] is False


def test_checkpoint_holds_only_lora_and_resumes(runs: dict) -> None:
    fit, resume, n = runs["fit"], runs["resume"], runs["fit"][0]["n_trainable"]
    last = Path(resume[0]["last_ckpt"])  # written at step 4 by the resumed run
    assert last.name == "last.ckpt" and last.exists()
    if runs["mode"] == "ddp":
        ckpt = torch.load(last, weights_only=True)
        assert ckpt["global_step"] == 4 and len(ckpt["optimizer_states"][0]["state"]) == n
        weights = ckpt["state_dict"]
    else:  # a DeepSpeed checkpoint folder: frozen weights excluded, optimizer state sharded per rank
        files = last / "checkpoint"
        model_states = torch.load(files / "mp_rank_00_model_states.pt", weights_only=True)
        assert model_states["global_step"] == 4 and model_states["global_steps"] == 4
        assert model_states["ds_config"]["managed_gradient_accumulation"] is False
        assert all((files / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file() for r in range(WORLD))
        weights = model_states["module"]
    trained = runs["resume_lora"][0]["end"]
    assert len(weights) == n and all("lora_" in k for k in weights)
    assert all(torch.equal(weights[k], trained[k]) for k in trained)
    for rank in range(WORLD):
        start, saved = runs["resume_lora"][rank]["start"], runs["fit_lora"][rank]["end"]
        assert all(torch.equal(start[k], saved[k]) for k in saved), "resume did not start from the saved weights"
        assert fit[rank]["adamw_steps"] == 2 and resume[rank]["adamw_steps"] == 4  # optimizer state carried over


def test_zero2_uses_the_preset(results) -> None:
    """The shipped ZeRO-2 preset accumulates every micro-batch backward into one optimizer step."""
    zero2 = results("zero2")
    for run, steps in (("fit", 2), ("resume", 4)):
        ds = zero2[run][0]["deepspeed"]
        assert ds["managed_gradient_accumulation"] is False and ds["gradient_clipping"] == 1.0
        assert ds["optimizer"] == "DeepSpeedZeroOptimizer" and ds["base_optimizer"] == "AdamW"
        # 16 rollout rows per rank, micro_batch_size 8: two backward passes per optimizer step and one through the
        # items they share, all accumulated
        assert ds["global_steps"] == steps and ds["global_samples"] == steps * 3 * ds["train_batch_size"]


def test_zero2_update_matches_ddp(tmp_path_factory) -> None:
    """ZeRO-2 (partitioned gradients, DeepSpeed's reduction over ranks and micro-batches) makes the same update as DDP.
    Compared with SGD and no clipping, whose update is lr times the gradient: under AdamW the first step is
    lr·sign(g), so float summation-order noise in near-zero gradient entries flips signs and gives full-size weight
    differences that say nothing, and clipping to a norm would hide a gradient scaled by the wrong factor."""
    updates = {}
    for mode in ("ddp", "zero2"):
        workdir = tmp_path_factory.mktemp(f"{mode}-sgd")
        run_script(mode, workdir, "--sgd")
        lora = torch.load(workdir / "fit-rank0-lora.pt", weights_only=True)
        updates[mode] = torch.cat([(lora["end"][k] - lora["start"][k]).flatten() for k in sorted(lora["end"])])
        assert json.loads((workdir / "fit-rank0.json").read_text())["global_step"] == 2
    ddp, zero2 = updates["ddp"], updates["zero2"]
    assert ddp.norm() > 0
    rel = ((ddp - zero2).norm() / ddp.norm()).item()
    print(f"\nSGD update after 2 steps: |ddp| {ddp.norm():.3e}, relative difference ZeRO-2 vs DDP {rel:.2e}")
    # a gradient scaled by the world size or the number of micro-batches would be off by O(1)
    assert rel < 1e-3, rel


def test_importing_minirec_destroys_the_process_group_at_exit(tmp_path: Path) -> None:
    """A gloo group left to interpreter shutdown can abort a finished run; the hook registered on import of `minirec`
    destroys it first. An exit hook registered before that import runs after it, and reports what it saw."""
    script = (
        "import atexit, torch.distributed as dist\n"
        "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
        "import minirec\n"
        f"dist.init_process_group('gloo', init_method={(tmp_path / 'store').as_uri()!r}, rank=0, world_size=1)\n"
        "assert dist.is_initialized()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "initialized at exit: False"
