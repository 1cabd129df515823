"""The pipeline end to end on a tiny model and synthetic data: every stage's outputs, skip on re-run, resume of an
interrupted stage, refusal to mix configs in one run folder; and every shipped YAML parses."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import pytest

from lightning_modules.grpo import OptimConfig
from minirec.io import DataError
from minirec.policy import PolicyConfig
from minirec.processing import ProcessingConfig
from minirec.recpo import SamplingConfig
from minirec.subsets import SelectionConfig
from pipeline import DeviceConfig, FitStep, LoaderConfig, ScoreStep, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(tmp_path: Path, **over) -> dict:
    optim = OptimConfig(lr=3e-3, micro_batch_size=8)
    args = dict(
        run_dir=str(tmp_path / "run"),
        processing=ProcessingConfig(dataset="synthetic", synthetic_users=80, synthetic_items=24),
        loader=LoaderConfig(cache_dir=str(tmp_path / "cache"), max_val_samples=16, max_test_samples=16,
                            train_batch_size=8, eval_batch_size=16),
        policy=PolicyConfig(pretrained="tiny-random-qwen2", lora_r=8, lora_alpha=16, lora_dropout=0.0),
        sampling=SamplingConfig(group_size=2, max_new_tokens=3),
        proxy=FitStep(subset="random:16", max_epochs=1, optim=optim),
        score=ScoreStep(pool_size=32, num_rollouts=2, selection=SelectionConfig(ks=(16, 24), num_stages=2)),
        train=FitStep(max_epochs=3, save_every_n_steps=1, optim=optim),
        eval_max_new_tokens=3,
        device=DeviceConfig(accelerator="cpu"),
    )
    return run_pipeline(**{**args, **over})


def test_pipeline_end_to_end_skip_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline

    class KilledInEpoch2(pipeline.CurriculumCallback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                raise RuntimeError("simulated kill")
            super().on_train_epoch_start(trainer, pl_module)

    monkeypatch.setattr(pipeline, "CurriculumCallback", KilledInEpoch2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        tiny_run(tmp_path)
    run = tmp_path / "run"
    assert (run / "scores/done.json").is_file() and not (run / "train/done.json").exists()
    assert (run / "train/checkpoints/last.ckpt").is_file()
    monkeypatch.undo()

    first = tiny_run(tmp_path)  # proxy and scores are skipped; train resumes from last.ckpt (epoch 2 of 3)
    for f in ("report.md", "pipeline_config.json", "proxy/done.json", "proxy/adapter_best/adapter_config.json",
              "scores/selection.json", "scores/scores.csv", "scores/reward_hist.png", "train/done.json",
              "test/done.json", "test/test_metrics.json", "train/training_curves.png", "proxy/training_curves.png"):
        assert (run / f).is_file(), f
    assert first["train"]["global_step"] == 1 + 2 + 2  # 8 / 16 / 16 samples per epoch at 8 prompts per step
    resumed_log = sorted((run / "train/logs").glob("version_*/metrics.csv"))[-1].read_text().splitlines()
    header = resumed_log[0].split(",")
    step_col = header.index("step")
    logged = [int(r.split(",")[step_col]) for r in resumed_log[1:] if r.split(",")[step_col]]
    assert min(logged) >= 1  # the resumed fit started after the checkpointed first epoch, not from step 0
    sel = json.loads((run / "scores/selection.json").read_text())
    assert len(sel["ids"]) == 16 and sorted(set(sel["stages"])) == [0, 1]
    report = (run / "report.md").read_text()
    assert "| train |" in report and "![scores/reward_hist.png]" in report and "![train/training_curves.png]" in report
    for method in ("policy", "zero_shot", "popularity", "random"):  # every report reads the policy against baselines
        assert f"| {method} | " in report
    assert set(first["test"]["baselines"]["methods"]) == {
        "policy", "zero_shot", "popularity", "random", "policy-zero_shot", "policy-popularity", "policy-random"}

    again = tiny_run(tmp_path)  # every stage is complete: nothing runs again
    assert again["test"]["metrics"] == first["test"]["metrics"] and again["seconds"] == first["seconds"]
    with pytest.raises(DataError, match=r"run/proxy: made with other settings \(changed: \['seed'\]\)"):
        tiny_run(tmp_path, seed=1)


def test_a_new_selection_reuses_the_proxy_and_the_scores(tmp_path: Path) -> None:
    """A changed `score.selection` keeps the proxy and the scores: the train step that used the old selection is
    refused by name (nothing rewritten), and once train/ and test/ are deleted the run selects anew from the saved
    scores, exactly as a fresh scoring with those settings selects, and trains on that."""
    import io
    import shutil

    import torch

    from minirec.subsets import ScoreTable, select_subsets

    first = tiny_run(tmp_path)
    run = tmp_path / "run"
    selection = SelectionConfig(ks=(16, 24), num_stages=2, mu=0.1, alpha=3.0)
    new_score = ScoreStep(pool_size=32, num_rollouts=2, selection=selection)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"run/train: made with other settings \(changed: \['score.selection.alpha', "
                                        r"'score.selection.mu'\]\)"):
        tiny_run(tmp_path, score=new_score)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # refused before anything ran
    shutil.rmtree(run / "train"), shutil.rmtree(run / "test")
    second = tiny_run(tmp_path, score=new_score)
    assert second["seconds"]["proxy"] == first["seconds"]["proxy"]  # reused: the steps' recorded times
    assert second["seconds"]["score"] == first["seconds"]["score"]
    kept = [run / n for n in ("proxy/done.json", "scores/done.json", "scores/attempt.json", "scores/fingerprint.json")]
    for path in kept + sorted((run / "scores/shards").glob("*.pt")):  # not fitted or scored again
        assert path.read_bytes() == before[path]
    table = ScoreTable.load(run / "scores/score_table.pt")
    old_table = torch.load(io.BytesIO(before[run / "scores/score_table.pt"]), weights_only=True)
    assert all(torch.equal(getattr(table, k), v) for k, v in old_table.items())
    fresh = select_subsets(table, replace(selection, seed=0), "-").selections[16]
    made = json.loads((run / "scores/selection.json").read_text())
    assert made["ids"] == fresh.ids and made["stages"] == fresh.stages and made["config"]["mu"] == 0.1
    assert made["ids"] != json.loads(before[run / "scores/selection.json"])["ids"]  # the new settings select others
    summary = json.loads((run / "scores/summary.json").read_text())  # describes the new selection
    rows = [table.sample_id.tolist().index(i) for i in made["ids"]]
    assert summary["per_k"]["16"]["mean_reward"] == pytest.approx(float(table.mean_reward[rows].float().mean()))
    assert summary["seconds"] == json.loads(before[run / "scores/summary.json"])["seconds"]  # the scoring's own
    assert second["train"]["global_step"] > 0 and (run / "test/done.json").is_file()


def test_a_step_killed_and_rerun_counts_the_time_of_both_attempts(tmp_path: Path) -> None:
    """An attempt that dies before `done.json` lasted until the last file it wrote; the completing attempt adds its
    own time, so a resumed step reports the wall time of all its attempts, not only the last one."""
    import os
    import time

    from pipeline import run_step

    folder, times = tmp_path / "step", {}

    def killed(d: Path) -> dict:
        (d / "logs.csv").write_text("step 1\n")
        started = json.loads((d / "attempt.json").read_text())["started"]
        os.utime(d / "logs.csv", (started + 30.0, started + 30.0))  # it logged for 30 s, then died
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_step(folder, times, "fit", killed, {"lr": 0.1})
    assert not (folder / "done.json").exists()
    done = run_step(folder, times, "fit", lambda d: time.sleep(0.2) or {}, {"lr": 0.1})
    assert 30.2 <= done["seconds"] < 31.5 and times["fit"] == done["seconds"]
    assert json.loads((folder / "done.json").read_text())["seconds"] == done["seconds"]
    (folder / "done.json").unlink()
    (folder / "attempt.json").write_text("[]")
    with pytest.raises(DataError, match=r"attempt.json: fields 'seconds_before' / 'started' missing"):
        run_step(folder, times, "fit", lambda d: {}, {"lr": 0.1})
    with pytest.raises(DataError, match=r"step: made with other settings \(changed: \['lr'\]\)"):
        run_step(folder, times, "fit", lambda d: {}, {"lr": 0.2})  # a step is resumed only with its own settings


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_yaml_parses(path: str) -> None:
    """Each YAML is checked against the signature it configures (pipeline, LightningCLI run, model, data, strategy)."""
    from cli import pipeline_parser, trainer_parser

    if path.startswith("configs/paper/") or path in ("configs/quickstart.yaml", "configs/pipeline-tiny.yaml"):
        cfg = pipeline_parser().parse_args(["--config", str(ROOT / path)])
        assert cfg.policy.pretrained
        return
    block = Path(path).stem
    if len(Path(path).parts) == 4 or path.startswith("configs/recpo/"):  # a block: configs/{data,model}/<preset>/x.yaml
        cfg = pipeline_parser().parse_args([f"--{block}", str(ROOT / path)])
        assert vars(cfg[block]) != vars(pipeline_parser().get_defaults()[block])
        return
    flag = {"model": "--model", "data": "--data"}.get(Path(path).parent.name, "--config")
    cfg = trainer_parser().parse_args([flag, str(ROOT / path)])
    if flag == "--config" and "strategy" not in path:
        assert cfg.model.class_path == "lightning_modules.GRPOModule" and cfg.data.class_path.endswith("RecDataModule")


@pytest.mark.parametrize("model", ["qwen2.5-3b", "gemma2-2b"])
@pytest.mark.parametrize("data", ["cds", "instruments"])
def test_paper_pipelines_use_the_fit_presets(model: str, data: str) -> None:
    """The paper pipeline configs and the `minirec fit` presets read the same data / model / RecPO blocks."""
    from cli import pipeline_parser, trainer_parser

    pipe = pipeline_parser().parse_args(["--config", str(ROOT / f"configs/paper/{model}-{data}.yaml")])
    fit = trainer_parser().parse_args(["--model", str(ROOT / f"configs/model/{model}.yaml"),
                                       "--data", str(ROOT / f"configs/data/amazon-{data}.yaml")])
    strip = lambda ns: {k: v for k, v in vars(ns).items() if k != "__path__"}  # noqa: E731
    for block in ("policy", "sampling", "reward", "loss"):
        assert strip(pipe[block]) == strip(fit.model.init_args[block]), block
    for block in ("processing", "prompts"):
        assert strip(pipe[block]) == strip(fit.data.init_args[block]), block


def test_cli_pipeline_passes_typed_config(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`minirec pipeline --config <yaml> --x.y v` instantiates the typed configs and calls run_pipeline with them."""
    import cli
    import pipeline

    seen = {}

    @functools.wraps(pipeline.run_pipeline)  # keeps the signature the parser is built from
    def fake_run(**kw):
        seen.update(kw)
        return {"test": {"metrics": {"test/ndcg@10": 0.25}}}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    cli.main(["pipeline", "--config", str(ROOT / "configs/quickstart.yaml"), "--score.selection.ks", "[8, 16]"])
    assert isinstance(seen["policy"], PolicyConfig) and seen["policy"].pretrained == "smollm2-135m-instruct"
    assert isinstance(seen["processing"], ProcessingConfig) and seen["processing"].k_core == 50
    assert isinstance(seen["train"].optim, OptimConfig) and tuple(seen["score"].selection.ks) == (8, 16)
    assert "test/ndcg@10 0.2500" in capsys.readouterr().out
