"""The MiniRec pipeline: proxy fit → score → select → fit on the selection with the curriculum → test, in one run folder.

Each step writes `done.json` when complete; a re-run skips complete steps and resumes an interrupted one (a fit from
its `last.ckpt`, scoring from the score writer's shards). `report.md` gathers metrics, wall times, the selection
summary and the plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DeepSpeedStrategy

from callbacks import AdapterExport, CurriculumCallback, ResumeCheckpoint, ScoreWriter
from callbacks.score_writer import reselect
from datamodules import RecDataModule
from lightning_modules import GRPOModule, ScoringModule
from lightning_modules.grpo import OptimConfig
from minirec.io import (ConfigError, DataError, as_json, atomic_write_json, atomic_write_text, load_checkpoint,
                        read_json)
from minirec.losses import LossConfig
from minirec.plots import training_curves
from minirec.policy import PolicyConfig
from minirec.processing import ProcessingConfig
from minirec.prompts import PromptConfig
from minirec.recpo import RewardConfig, SamplingConfig
from minirec.subsets import SelectionConfig


@dataclass(frozen=True)
class LoaderConfig:
    """Data loading shared by every step.

    Args:
        cache_dir: processed-dataset cache folder.
        max_train_samples: seeded cap on the training pool (None = all).
        max_val_samples: seeded cap on validation samples.
        max_test_samples: seeded cap on test samples.
        train_batch_size: prompts per RecPO step.
        eval_batch_size: prompts per validation / test / scoring batch.
        item_batch_size: item prompts per catalogue-encoding batch.
        seed: seed of caps, subsets and shuffling.
    """

    cache_dir: str = "data_cache"
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    max_test_samples: int | None = None
    train_batch_size: int = 4
    eval_batch_size: int = 8
    item_batch_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class FitStep:
    """One RecPO fit (the proxy or the final training).

    Args:
        subset: training subset for the proxy (`random:<k>`); the train step always uses the selection.
        max_epochs: epochs (the train stage also unlocks one curriculum stage per `epochs_per_stage` epochs).
        max_steps: optimizer-step cap (-1 = none).
        val_every_n_steps: validate every n steps (None = by epochs, see val_every_n_epochs).
        val_every_n_epochs: validate at the end of every n-th epoch (when val_every_n_steps is None).
        save_every_n_steps: write `last.ckpt` every n optimizer steps, mid-epoch too (a kill loses at most n steps;
            the re-run resumes from it and ends exactly where an unbroken run ends).
        epochs_per_stage: the train fit: epochs spent on each curriculum stage before the next unlocks (the proxy
            fit has no curriculum).
        optim: optimisation settings.
    """

    subset: str = "random:256"
    max_epochs: int = 3
    max_steps: int = -1
    val_every_n_steps: int | None = None
    val_every_n_epochs: int = 1
    save_every_n_steps: int = 10
    epochs_per_stage: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class ScoreStep:
    """Scoring and selection.

    Args:
        pool_size: seeded cap on the scored training pool (None = the whole training split).
        num_rollouts: N sampled rollouts per sample.
        space: representativeness space, `hidden` or `lora`.
        rep_loss: `full` or `in_batch` (hidden space).
        projection_dim: lora space projected width.
        lora_hvp: lora space: H·g instead of g (double backward; needs `policy.attn_implementation: eager` on CPU).
        selection: how the scored pool becomes selections (`minirec.subsets.SelectionConfig`); the first of its ks is
            trained; its `seed` is the pipeline's `seed`.
    """

    pool_size: int | None = None
    num_rollouts: int = 4
    space: str = "hidden"
    rep_loss: str = "full"
    projection_dim: int = 8192
    lora_hvp: bool = False
    selection: SelectionConfig = field(default_factory=SelectionConfig)


@dataclass(frozen=True)
class DeviceConfig:
    """Where the stages run.

    Args:
        accelerator: Lightning accelerator (`auto`, `cpu`, `gpu`).
        devices: devices per step.
        strategy: Lightning strategy name (`auto`, `ddp`, `deepspeed_stage_2`, ...).
        precision: Lightning precision (`32-true`, `bf16-mixed`, `bf16-true`).
    """

    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"


@dataclass(frozen=True)
class PipelineSpec:
    """Every setting of a pipeline run except its folder (the arguments of `run_pipeline`, documented there)."""

    processing: ProcessingConfig = ProcessingConfig()
    prompts: PromptConfig = PromptConfig()
    loader: LoaderConfig = LoaderConfig()
    policy: PolicyConfig = PolicyConfig()
    sampling: SamplingConfig = SamplingConfig()
    reward: RewardConfig = RewardConfig()
    loss: LossConfig = LossConfig()
    proxy: FitStep = FitStep()
    score: ScoreStep = ScoreStep()
    train: FitStep = FitStep(subset="selection")
    eval_max_new_tokens: int = 256
    device: DeviceConfig = DeviceConfig()
    seed: int = 0

    def datamodule(self, **kw: Any) -> RecDataModule:
        """The RecDataModule of these settings; `kw` sets the subset / predict cap."""
        return RecDataModule(processing=self.processing, prompts=self.prompts, tokenizer=self.policy.pretrained,
                             **asdict(self.loader), **kw)

    def module(self, fit: FitStep, **kw: Any) -> GRPOModule:
        """A fresh GRPOModule for one fit step; `kw` sets its other arguments (e.g. `test_baselines`)."""
        return GRPOModule(policy=self.policy, sampling=self.sampling, reward=self.reward, loss=self.loss,
                          optim=fit.optim, eval_max_new_tokens=self.eval_max_new_tokens, **kw)


def run_pipeline(
    run_dir: str = "runs/pipeline",
    processing: ProcessingConfig = ProcessingConfig(),
    prompts: PromptConfig = PromptConfig(),
    loader: LoaderConfig = LoaderConfig(),
    policy: PolicyConfig = PolicyConfig(),
    sampling: SamplingConfig = SamplingConfig(),
    reward: RewardConfig = RewardConfig(),
    loss: LossConfig = LossConfig(),
    proxy: FitStep = FitStep(),
    score: ScoreStep = ScoreStep(),
    train: FitStep = FitStep(subset="selection"),
    eval_max_new_tokens: int = 256,
    device: DeviceConfig = DeviceConfig(),
    seed: int = 0,
) -> dict[str, Any]:
    """Run (or resume) proxy → score → train → test under `run_dir`; returns the report's numbers.

    Args:
        run_dir: folder of this run; steps already complete there are skipped.
        processing: dataset processing (METHOD.md §2).
        prompts: prompt templates and lengths.
        loader: data loading shared by the stages.
        policy: model and LoRA settings (the proxy and the final policy start from the same base).
        sampling: rollout sampling for training and scoring.
        reward: reward settings.
        loss: the RecPO objective, shared by both fits and the LoRA-space scoring.
        proxy: the proxy fit on a small random subset.
        score: scoring and selection.
        train: the fit on the selection, with the curriculum.
        eval_max_new_tokens: longest greedy reasoning in validation, test and the scoring's greedy pass.
        device: accelerator, devices, strategy, precision.
        seed: global seed.
    """
    spec = PipelineSpec(processing, prompts, loader, policy, sampling, reward, loss, proxy, score, train,
                        eval_max_new_tokens, device, seed)
    run = Path(run_dir)
    check_run_folder(run, spec)
    times: dict[str, float] = {}
    proxy_done = run_step(run / "proxy", times, "proxy", lambda d: fit_proxy(spec, d), step_settings(spec, "proxy"))
    score_dir = run / "scores"
    score_done = run_step(score_dir, times, "score", lambda d: score_pool(spec, d, proxy_done["adapter"]),
                          step_settings(spec, "scores"))
    if reselect(score_dir, selection_config(spec)):
        print(f"[pipeline] selection: made again from the scores in {score_dir} (score.selection changed)")
    score_done = {**score_done, "summary": read_json(score_dir / "summary.json")}
    train_done = run_step(run / "train", times, "train", lambda d: fit_subset(spec, d, score_done["selection"]),
                          step_settings(spec, "train"))
    test_done = run_step(run / "test", times, "test", lambda d: test_best(spec, d, train_done["best_checkpoint"]),
                         step_settings(spec, "test"))
    result = {"proxy": proxy_done, "score": score_done, "train": train_done, "test": test_done, "seconds": times,
              "loss_impl": loss.loss_impl}
    for name in ("proxy", "train"):
        logs = sorted((run / name / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
        if logs:  # one file per launch of the fit (resumed launches continue the log)
            training_curves(logs, run / name / "training_curves.png")
    atomic_write_text(run / "report.md", _report(result, run))
    return result


def fit_proxy(spec: PipelineSpec, folder: Path) -> dict[str, Any]:
    """The proxy fit on `spec.proxy.subset`; -> fit summary (see `_fit`)."""
    L.seed_everything(spec.seed)
    return _fit(folder, spec.module(spec.proxy), spec.datamodule(subset=spec.proxy.subset), spec.proxy, spec.device,
                [])


def score_pool(spec: PipelineSpec, folder: Path, proxy_adapter: str) -> dict[str, Any]:
    """Score the pool with the proxy and select for every k (`spec.score.selection`); -> selection path and summary."""
    L.seed_everything(spec.seed)
    score = spec.score
    module = ScoringModule(proxy=proxy_adapter, policy=spec.policy, sampling=spec.sampling, reward=spec.reward,
                           loss=spec.loss,
                           num_rollouts=score.num_rollouts, space=score.space, rep_loss=score.rep_loss,
                           projection_dim=score.projection_dim, lora_hvp=score.lora_hvp,
                           eval_max_new_tokens=spec.eval_max_new_tokens)
    writer = ScoreWriter(str(folder), selection_config(spec))
    trainer = _trainer(folder, spec.device, [writer], logger=False)
    trainer.predict(module, datamodule=spec.datamodule(max_predict_samples=score.pool_size), return_predictions=False)
    return {"selection": str(folder / "selection.json"), "summary": read_json(folder / "summary.json")}


def fit_subset(spec: PipelineSpec, folder: Path, selection: str) -> dict[str, Any]:
    """The final fit on a selection file, one curriculum stage unlocked per `train.epochs_per_stage` epochs."""
    L.seed_everything(spec.seed)
    return _fit(folder, spec.module(spec.train), spec.datamodule(subset=selection), spec.train, spec.device,
                [CurriculumCallback(spec.train.epochs_per_stage)], reload_dataloaders_every_n_epochs=1)


def test_best(spec: PipelineSpec, folder: Path, checkpoint: str, baselines: bool = True) -> dict[str, Any]:
    """Test metrics of the checkpoint (the best-valid one of a fit) and, with `baselines`, the zero-shot and popularity
    baselines on the same samples; every method's means and intervals are in `folder/test_metrics.json`."""
    trainer = _trainer(folder, spec.device, [], logger=CSVLogger(folder, name="logs"))
    module = spec.module(spec.train, test_baselines=baselines)
    metrics = trainer.test(module, datamodule=spec.datamodule(), ckpt_path=checkpoint)[0]
    return {"metrics": {k: float(v) for k, v in metrics.items() if k.count("/") == 1},
            "baselines": read_json(folder / "test_metrics.json")}


def selection_config(spec: PipelineSpec) -> SelectionConfig:
    """`score.selection` with the run's seed (the one the score folder's selections record)."""
    return replace(spec.score.selection, seed=spec.seed)


RUN_STEPS = ("proxy", "scores", "train", "test")


def step_settings(spec: PipelineSpec, step: str) -> dict[str, Any]:
    """The settings a step's result depends on, as JSON reads them back: `proxy` all but `score` and `train`;
    `scores` also `score` without its `selection` (a selection is made again from the scores, cheaply, when only it
    changes: `callbacks.score_writer.reselect`); `train` and `test` all; `fit` (a fit on a given selection file, with
    its test) all but `proxy` and `score`; `untrained` (the untrained policy's test) all but `proxy`, `score`, `train`
    and `seed`."""
    config = as_json(spec)
    drop = {"proxy": ("score", "train"), "scores": ("train",), "train": (), "test": (), "fit": ("proxy", "score"),
            "untrained": ("proxy", "score", "train", "seed")}[step]
    config = {k: v for k, v in config.items() if k not in drop}
    if step == "scores":
        config["score"] = {k: v for k, v in config["score"].items() if k != "selection"}
    return config


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new)) for c in _changed(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [prefix.rstrip(".") or "(all)"] if old != new else []


def check_step_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse a step folder made with other settings than `settings` (its `settings.json`, written when the step
    first ran): a DataError naming the folder and the changed settings."""
    path = folder / "settings.json"
    if path.is_file():
        old = read_json(path)
        if old != settings:
            raise DataError(f"{folder}: made with other settings (changed: {_changed(old, settings)}); delete this "
                            "folder and the later steps' folders to run them again with these settings (the steps "
                            "before it are reused), or use a new folder")


def check_run_folder(run: Path, spec: PipelineSpec) -> None:
    """Check every step folder of a pipeline run against the settings it depends on (`step_settings`) before any
    step runs, then record the settings in `pipeline_config.json`: a re-run reuses the steps whose settings did not
    change (a new `score.selection` keeps the proxy and the scores) and names the first step that must be redone."""
    for step in RUN_STEPS:
        check_step_settings(run / step, step_settings(spec, step))
    atomic_write_json(run / "pipeline_config.json", as_json(spec))


def _time_before(folder: Path) -> tuple[float, dict[str, float] | None]:
    """Seconds the earlier, interrupted attempts of a step spent in `folder`, which `folder/attempt.json` accumulates:
    an attempt lasted from its start until the last file it wrote (logs are written every step). Marks this attempt's
    start; -> (seconds, the note as it was before, None if there was none)."""
    note = folder / "attempt.json"
    before, last = 0.0, None
    if note.is_file():
        last = read_json(note)
        if not isinstance(last, dict) or not all(isinstance(last.get(k), (int, float)) for k in ("seconds_before", "started")):
            raise DataError(f"{note}: fields 'seconds_before' / 'started' missing or not numbers; delete it (the step's "
                            "time then counts from now)")
        latest = max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file() and p != note), default=0.0)
        before = last["seconds_before"] + max(0.0, latest - last["started"])
    atomic_write_json(note, {"seconds_before": before, "started": time.time()})
    return before, last


def run_step(folder: Path, times: dict[str, float], name: str, body, settings: dict[str, Any]) -> dict[str, Any]:
    """Run `body(folder)` unless `folder/done.json` exists; record its wall time in the marker (with the time of
    earlier attempts killed before the step completed, `_time_before`). `settings` (what the result depends on) are
    checked against the folder's (`check_step_settings`) and written when the step first runs."""
    check_step_settings(folder, settings)
    marker = folder / "done.json"
    if marker.is_file():
        done = read_json(marker)
        if not isinstance(done, dict) or not isinstance(done.get("seconds"), (int, float)):
            raise DataError(f"{marker}: field 'seconds' missing or not a number: not a step marker of this pipeline; "
                            "delete it to run the step again")
        print(f"[pipeline] {name}: already complete, skipped ({marker})")
    else:
        print(f"[pipeline] {name}: running in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        first = not (folder / "settings.json").is_file()
        if first:
            atomic_write_json(folder / "settings.json", settings)
        (before, last), start = _time_before(folder), time.perf_counter()
        try:
            done = body(folder)
        except DataError:  # a user error leaves the folder as it was: the settings and attempt notes too
            if first:
                (folder / "settings.json").unlink()
            if last is None:
                (folder / "attempt.json").unlink(missing_ok=True)
            else:
                atomic_write_json(folder / "attempt.json", last)
            raise
        done["seconds"] = before + time.perf_counter() - start
        atomic_write_json(marker, done)
    times[name] = done["seconds"]
    return done


STRATEGY_PRESETS = Path(__file__).resolve().parent / "configs" / "strategy"


def deepspeed_settings(zero: int, grad_clip: float) -> dict[str, Any]:
    """The DeepSpeedStrategy arguments of `configs/strategy/deepspeed-zero{zero}.yaml` (ZeRO level `zero`) (the one source of RecPO's
    DeepSpeed settings, also used as `minirec fit --config` presets), with this fit's gradient clipping."""
    import yaml

    path = STRATEGY_PRESETS / f"deepspeed-zero{zero}.yaml"
    if not path.is_file():
        raise ConfigError(f"device.strategy=deepspeed_stage_{zero}: no preset {path} (ZeRO levels 2 and 3 ship)")
    args = yaml.safe_load(path.read_text())["trainer"]["strategy"]["init_args"]
    return {**args, "config": {**args["config"], "gradient_clipping": grad_clip}}


def _strategy(device: DeviceConfig, grad_clip: float) -> Any:
    """Lightning strategy: `deepspeed_stage_2` / `deepspeed_stage_3` from the shipped DeepSpeed presets, others as is."""
    if device.strategy.startswith("deepspeed_stage_"):
        return DeepSpeedStrategy(**deepspeed_settings(int(device.strategy.rsplit("_", 1)[1]), grad_clip))
    return device.strategy


def _trainer(folder: Path, device: DeviceConfig, callbacks: list, grad_clip: float = 1.0, **kw: Any) -> L.Trainer:
    return L.Trainer(accelerator=device.accelerator, devices=device.devices, strategy=_strategy(device, grad_clip),
                     precision=device.precision, default_root_dir=str(folder), callbacks=callbacks,
                     enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, **kw)


def _fit(folder: Path, module: GRPOModule, dm: RecDataModule, fit: FitStep, device: DeviceConfig,
         callbacks: list, **kw: Any) -> dict[str, Any]:
    """Fit with the best checkpoint (at validation), `last.ckpt` (`ResumeCheckpoint`) and the best adapter exported;
    resumes from `last.ckpt` when present. The best checkpoint is overwritten in place (no `-v1` copy after a resume)."""
    last = folder / "checkpoints" / "last.ckpt"
    if last.exists():
        load_checkpoint(last)  # a foreign or broken file is a user error naming it, not a traceback from Lightning
    ckpt = ModelCheckpoint(dirpath=folder / "checkpoints", monitor="val/ndcg@10", mode="max", filename="best",
                           enable_version_counter=False)
    last_ckpt = ResumeCheckpoint(str(folder / "checkpoints"), fit.save_every_n_steps)
    export = AdapterExport(dirpath=str(folder / "adapter_best"))
    val = {"val_check_interval": fit.val_every_n_steps, "check_val_every_n_epoch": None} \
        if fit.val_every_n_steps else {"check_val_every_n_epoch": fit.val_every_n_epochs}
    trainer = _trainer(folder, device, [ckpt, last_ckpt, export, *callbacks], fit.optim.grad_clip,
                       logger=CSVLogger(folder, name="logs"),
                       max_epochs=fit.max_epochs, max_steps=fit.max_steps, **val, **kw)
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last.exists() else None)
    if not ckpt.best_model_path:
        raise DataError(f"{folder}: no validation ran, so there is no best checkpoint; validate at least once per fit")
    return {"best_checkpoint": ckpt.best_model_path, "best_val_ndcg@10": float(ckpt.best_model_score),
            "adapter": str(folder / "adapter_best"), "global_step": trainer.global_step}


def _report(result: dict[str, Any], run: Path) -> str:
    """report.md: test metrics against the baselines, per-step wall time, the selection summary and the plots."""
    summary = result["score"]["summary"]
    lines = ["# MiniRec pipeline report", "", f"Loss implementation: `{result['loss_impl']}`.", "",
             "## Test metrics (best-valid checkpoint) against baselines", "",
             "`policy` is the trained policy; `zero_shot` the same model untrained (adapter off), same prompts; "
             "`popularity` ranks by training-split counts; `random` is the expected value of a random ranking.", "",
             (run / "test" / "test_report.md").read_text().split("\n", 2)[2].strip(), ""]
    lines += ["", "## Validation NDCG@10 (best)", "", "| fit | val/ndcg@10 | steps |", "|---|---|---|",
              f"| proxy | {result['proxy']['best_val_ndcg@10']:.4f} | {result['proxy']['global_step']} |",
              f"| train on selection | {result['train']['best_val_ndcg@10']:.4f} | {result['train']['global_step']} |",
              "", "## Wall time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["seconds"].items()]
    lines += [f"| total | {sum(result['seconds'].values()):.1f} |", "", "## Selection", "", "```",
              json.dumps(summary, indent=2, sort_keys=True, default=str), "```", "", "## Plots", ""]
    for png in ("proxy/training_curves.png", "train/training_curves.png", "scores/reward_hist.png",
                "scores/l_vs_r.png", "scores/selected_vs_pool.png", "scores/curriculum.png"):
        if (run / png).is_file():
            lines.append(f"![{png}]({png})")
    return "\n".join(lines) + "\n"
