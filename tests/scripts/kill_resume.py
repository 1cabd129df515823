"""Kill a tiny pipeline and a tiny `minirec fit` with SIGKILL, re-run them to completion, and check that every result
equals the uninterrupted run's.

    python tests/scripts/kill_resume.py --workdir /tmp/kills [--pipeline-kills 8] [--fit-kills 4] [--seed 0]
        [--engine hf|vllm]

The pipeline (configs/pipeline-tiny.yaml) runs twice uninterrupted, first on cold caches (dataset, models), then warm
(the reference); the two must be identical. Then per kill a fresh run folder is killed at a seeded random point of a
stage taken in turn, and re-launched to completion: in the proxy fit or the final fit once its `last.ckpt` reaches a
random step (mid-epoch, after a validation or at an epoch end), in scoring once a random number of score shards is
written, in the test at a random moment. The fit (configs/fit-tiny.yaml, `--ckpt_path last`) is killed once its
`last.ckpt` reaches a random step. Compared exactly: the pipeline's selection files, scores.csv, test_metrics.json and
per-stage results (run-folder paths and wall times left out); the fit's final LoRA weights, optimizer step and
validation history. `--engine vllm` samples the fit's rollouts with the vLLM engine (which then restarts with every
launch and receives the resumed LoRA weights). Prints one line per kill (where it landed) and a summary; exits 1 on any
difference. tests/test_kill_resume.py and tests/test_vllm_engine.py run it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import datamodules, lightning_modules  # noqa: E402,F401  (register the config classes checkpoints hold)
from minirec.io import load_checkpoint  # noqa: E402

STAGES = ("proxy", "score", "train", "test")


class Launch:
    """One `python cli.py ...` process in its own session; notes when each `[pipeline] <stage>: running` appears."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.start, self.stage_start = time.monotonic(), {}
        self.log = log.open("a")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            if line.startswith("[pipeline] ") and ": running" in line:
                self.stage_start[line.split()[1].rstrip(":")] = time.monotonic() - self.start

    def kill_when(self, reached: Callable[["Launch"], bool]) -> bool:
        """SIGKILL the whole process group once `reached(self)` is true (polled every 50 ms); False if the process
        ended before."""
        while self.proc.poll() is None:
            if reached(self):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                self.reader.join()
                return True
            time.sleep(0.05)
        self.finish()
        return False

    def finish(self) -> float:
        code = self.proc.wait()
        self.reader.join()
        if code != 0:
            sys.exit(f"kill_resume: {self.proc.args[2:]} exited with {code}; see {self.log.name}")
        return time.monotonic() - self.start


def checkpoint_step(last: Path) -> int:
    """The global step in `last.ckpt`, -1 while there is none (or it is being replaced)."""
    try:
        return load_checkpoint(last)["global_step"] if last.is_file() else -1
    except Exception:
        return -1


def _normalised(obj, run: Path):
    """`obj` with the run folder's path replaced by `<run>` and wall times dropped."""
    if isinstance(obj, dict):
        return {k: _normalised(v, run) for k, v in obj.items() if k not in ("seconds", "previously_scored")}
    if isinstance(obj, list):
        return [_normalised(v, run) for v in obj]
    return obj.replace(str(run), "<run>") if isinstance(obj, str) else obj


def pipeline_result(run: Path) -> dict:
    """Everything a pipeline run decides: selections, scores, test metrics, per-stage results."""
    out = {name: _normalised(json.loads((run / name).read_text()), run) for name in (
        "scores/selection.json", "scores/selection_k32.json", "scores/selection_k64.json", "scores/summary.json",
        "test/test_metrics.json", "proxy/done.json", "train/done.json", "test/done.json")}
    out["scores/scores.csv"] = (run / "scores/scores.csv").read_text()
    return out


def fit_result(run: Path) -> dict:
    """What a fit decides: the final LoRA weights and optimizer step (last.ckpt), and every validation's NDCG@10."""
    ckpt = load_checkpoint(run / "checkpoints/last.ckpt")
    vals = []
    for log in sorted((run / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        lines = log.read_text().splitlines()
        header = lines[0].split(",") if lines else []
        if "val/ndcg@10" in header:  # a launch resumed after the last validation logs none
            col, step = header.index("val/ndcg@10"), header.index("step")
            vals += [(int(r.split(",")[step]), r.split(",")[col]) for r in lines[1:] if r.split(",")[col]]
    return {"global_step": ckpt["global_step"], "weights": ckpt["state_dict"], "val": sorted(set(vals))}


def same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def pipeline_args(run: Path, cache: Path) -> list[str]:
    return ["pipeline", "--config", "configs/pipeline-tiny.yaml", "--run_dir", str(run), "--loader.cache_dir",
            str(cache), "--proxy.save_every_n_steps", "3", "--train.save_every_n_steps", "2"]


def fit_args(run: Path, cache: Path, engine: str) -> list[str]:
    """`minirec fit --ckpt_path last` on configs/fit-tiny.yaml with its folders moved to `run` and rollouts sampled by
    `engine` (the first launch starts fresh; later ones resume from its last.ckpt)."""
    config = run.with_suffix(".yaml")
    if not config.is_file():
        text = (ROOT / "configs/fit-tiny.yaml").read_text().replace("runs/fit-tiny", str(run))
        config.write_text(text.replace("model: model/", f"model: {ROOT}/configs/model/"))
    args = ["fit", "--config", str(config), "--data.init_args.cache_dir", str(cache), "--ckpt_path", "last",
            "--model.init_args.sampling.engine", engine]
    if engine == "vllm":  # a small engine beside the fit
        args += ["--model.init_args.sampling.vllm_kv_cache_gb", "0.25", "--model.init_args.sampling.vllm_max_model_len",
                 "1024"]
    return args


def pipeline_kill_point(stage: str, rng: random.Random, run: Path, ref: dict) -> tuple[str, Callable[[Launch], bool]]:
    """(description, condition) of a random kill point inside `stage`, from the reference run's counts and times."""
    if stage in ("proxy", "train"):
        step = rng.randint(1, ref[f"{stage}_steps"] - 2)  # the last step ends the fit
        return f"{stage} last.ckpt at step ≥ {step}", lambda _: checkpoint_step(run / stage / "checkpoints/last.ckpt") >= step
    if stage == "score":
        shards = rng.randint(1, ref["shards"] - 1)
        return f"{shards} score shards", lambda _: len(list((run / "scores/shards").glob("*.pt"))) >= shards
    wait = rng.uniform(0.0, 0.6 * ref["test_seconds"])  # the end of it writes the report
    return f"test + {wait:.1f}s", lambda launch: launch.stage_start.get("test", 1e9) + wait < time.monotonic() - launch.start


def resumed_run(args: list[str], reached: Callable[[Launch], bool], log: Path, state: Callable[[], str]) -> str:
    """Launch, kill once `reached`, launch again to the end; -> the state the kill left (or that it missed)."""
    killed = Launch(args, log).kill_when(reached)
    landed = state() if killed else "the run ended first"
    Launch(args, log).finish()
    return landed


def describe(run: Path) -> str:
    """The state a kill left: complete stages, the last checkpoints' steps, score shards."""
    done = [s for s, d in zip(STAGES, ("proxy", "scores", "train", "test")) if (run / d / "done.json").is_file()]
    parts = [f"done={'+'.join(done) or 'none'}"]
    for fit in ("proxy", "train", "."):
        step = checkpoint_step(run / fit / "checkpoints" / "last.ckpt")
        if step >= 0:
            parts.append(f"{fit.strip('.') or 'fit'} last.ckpt step {step}")
    shards = list((run / "scores" / "shards").glob("*.pt")) if (run / "scores" / "shards").is_dir() else []
    if shards:
        parts.append(f"{len(shards)} score shards")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--pipeline-kills", type=int, default=8)
    parser.add_argument("--fit-kills", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="rollout engine of the fit")
    args = parser.parse_args()
    work, rng = args.workdir, random.Random(args.seed)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache, log = work / "cache", work / "runs.log"
    # cold caches for the first run: converted / tiny models and Hugging Face files in the work folder, offline
    os.environ.update(MINIREC_CACHE=str(work / "models"), HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1",
                      HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results: list[bool] = []

    def report(what: str, ok: bool) -> None:
        results.append(ok)
        print(f"{what} -> {'identical' if ok else 'DIFFERENT'}", flush=True)

    if args.pipeline_kills:
        Launch(pipeline_args(work / "p-cold", cache), log).finish()
        ref_launch = Launch(pipeline_args(work / "p-ref", cache), log)
        total = ref_launch.finish()
        expected = pipeline_result(work / "p-ref")
        report("pipeline: first run on cold caches vs a second run", same(pipeline_result(work / "p-cold"), expected))
        ref = {"proxy_steps": expected["proxy/done.json"]["global_step"],
               "train_steps": expected["train/done.json"]["global_step"],
               "shards": len(list((work / "p-ref/scores/shards").glob("*.pt"))),
               "test_seconds": total - ref_launch.stage_start["test"]}
        print(f"pipeline reference: {total:.1f}s, {ref}", flush=True)
        for i in range(args.pipeline_kills):
            stage = STAGES[i % len(STAGES)]
            run = work / f"p-kill{i}"
            where, reached = pipeline_kill_point(stage, rng, run, ref)
            landed = resumed_run(pipeline_args(run, cache), reached, log, lambda: describe(run))
            report(f"pipeline kill {i} in {stage} ({where}): left {landed}", same(pipeline_result(run), expected))

    if args.fit_kills:
        ref_run = work / "f-ref"
        total = Launch(fit_args(ref_run, cache, args.engine), log).finish()
        expected = fit_result(ref_run)
        print(f"fit reference: {total:.1f}s, {expected['global_step']} steps, validations {expected['val']}", flush=True)
        for i in range(args.fit_kills):
            run, step = work / f"f-kill{i}", rng.randint(1, expected["global_step"] - 1)
            last = run / "checkpoints/last.ckpt"
            landed = resumed_run(fit_args(run, cache, args.engine), lambda _: checkpoint_step(last) >= step, log,
                                 lambda: describe(run))
            report(f"fit kill {i} (last.ckpt at step ≥ {step}): left {landed}", same(fit_result(run), expected))

    differ = results.count(False)
    print(f"kill_resume: {differ} of {len(results)} comparisons differ from the unbroken run")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
