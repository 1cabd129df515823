"""Bad input ends every command in one clean line: `error: <message>` on stderr, exit status 2, no traceback, and
whatever was already written (processed-dataset cache, run folders, score shards, checkpoints) stays byte for byte as
it was. The cases run in-process through `cli.main`; one runs the installed `minirec` script end to end.

Corpus: data files, settings, pipeline run folders, selection files, checkpoints, score folders (NaN scores) and
non-finite embeddings. Cases with a model use tiny-random-qwen2 on a small synthetic dataset.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
from minirec.io import DataError, atomic_write_json, load_checkpoint, run_command
from minirec.policy import Policy
from minirec.processing import ProcessingConfig, build_dataset
from pipeline import PipelineSpec, check_run_folder, score_pool, step_settings

SYNTH = ProcessingConfig(dataset="synthetic", synthetic_users=40, synthetic_items=16)
SYNTH_ARGS = ["--data.processing.dataset", "synthetic", "--data.processing.synthetic_users", "40",
              "--data.processing.synthetic_items", "16"]
REVIEW = {"user_id": "u1", "parent_asin": "B1", "rating": 5.0, "timestamp": 1600000000000}
META = {"parent_asin": "B1", "title": "A good record"}
WIDE = ["--data.processing.time_window", "[1990-01-01, 2030-01-01]"]  # (`null` is not accepted on the command line)


def tree(*folders: Path) -> dict[str, str]:
    """Every file under `folders` -> sha256 of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def fails(capsys: pytest.CaptureFixture, argv: list[str], match: str, *keep: Path) -> str:
    """`minirec <argv>` exits with status 2 after one `error: ` line (the last on stderr, no traceback) that matches
    `match`, and leaves every file under the `keep` folders as it was. Returns that line."""
    before = tree(*keep)
    assert before or not keep, "nothing to keep: the check would be vacuous"
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 2, err
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err, err
    assert re.search(match, errors[0]), errors[0]
    assert tree(*keep) == before
    return errors[0]


def jsonl(*records: dict | str) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A processed-dataset cache holding the synthetic dataset (which no failing command may touch)."""
    folder = tmp_path_factory.mktemp("cache")
    build_dataset(SYNTH, folder)
    return folder


def data_args(cache: Path, *extra: str) -> list[str]:
    return ["data", "--data", "datamodules.RecDataModule", "--data.cache_dir", str(cache), *extra]


# -- data files --------------------------------------------------------------------------------------------------------
# id, files to write (name -> text; bytes as is; None = a folder), the interactions file, the expected message
DATA_FILES = [
    ("malformed_json", {"r.jsonl": jsonl(REVIEW, '{"user_id": "u2",')}, "r.jsonl", r"r\.jsonl:2: malformed JSON"),
    ("missing_field", {"r.jsonl": jsonl({k: v for k, v in REVIEW.items() if k != "rating"})}, "r.jsonl",
     r"r\.jsonl:1: field 'rating' missing"),
    ("text_timestamp", {"r.jsonl": jsonl(REVIEW, {**REVIEW, "timestamp": "last Tuesday"})}, "r.jsonl",
     r"r\.jsonl:2: field 'timestamp' is not a number \('last Tuesday'\)"),
    ("not_an_object", {"r.jsonl": jsonl("[1, 2]")}, "r.jsonl", r"r\.jsonl:1: expected a JSON object, got list"),
    ("empty_user_id", {"r.jsonl": jsonl({**REVIEW, "user_id": " "})}, "r.jsonl",
     r"r\.jsonl:1: field 'user_id' must be a non-empty string"),
    ("missing_file", {}, "r.jsonl", r"processing\.interactions_path: file not found: .*r\.jsonl$"),
    ("folder_as_file", {"r.jsonl": None}, "r.jsonl", r"processing\.interactions_path: file not found"),
    ("unreadable_gzip", {"r.jsonl.gz": b"this is not gzip"}, "r.jsonl.gz", r"r\.jsonl\.gz: unreadable file"),
    ("empty_review_file", {"r.jsonl": ""}, "r.jsonl", r"^error: no interactions in .*r\.jsonl$"),
    ("csv_missing_column", {"r.csv": "user_id,parent_asin,rating\nu1,B1,5\n"}, "r.csv",
     r"r\.csv:1: field 'timestamp' missing from the header"),
    ("csv_bad_number", {"r.csv": "user_id,parent_asin,rating,timestamp\nu1,B1,5,1\nu1,B2,five,2\n"}, "r.csv",
     r"r\.csv:3: field 'rating' is not a number \('five'\)"),
    ("csv_header_only", {"r.csv": "user_id,parent_asin,rating,timestamp\n"}, "r.csv", r"no interactions in .*r\.csv"),
    ("unsupported_format", {"r.txt": "u1 B1 5 1\n"}, "r.txt", r"r\.txt: unsupported interactions file"),
    ("meta_missing_asin", {"r.jsonl": jsonl(REVIEW), "m.jsonl": jsonl({"title": "x"})}, "r.jsonl",
     r"m\.jsonl:1: field 'parent_asin' missing"),
    ("meta_malformed", {"r.jsonl": jsonl(REVIEW), "m.jsonl": jsonl(META, "{oops")}, "r.jsonl",
     r"m\.jsonl:2: malformed JSON"),
    ("no_usable_title", {"r.jsonl": jsonl(REVIEW), "m.jsonl": jsonl({**META, "title": "<b>"})}, "r.jsonl",
     r"the title filter kept 0 of 1 items"),
]


@pytest.mark.parametrize("files, reviews, match", [c[1:] for c in DATA_FILES], ids=[c[0] for c in DATA_FILES])
def test_bad_data_file(capsys, tmp_path: Path, cache: Path, files: dict, reviews: str, match: str) -> None:
    files = {"m.jsonl": jsonl(META), **files}
    for name, content in files.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    fails(capsys, data_args(cache, "--data.processing.dataset", "amazon2023:CDs_and_Vinyl",
                            "--data.processing.interactions_path", str(tmp_path / reviews),
                            "--data.processing.meta_path", str(tmp_path / "m.jsonl"),
                            *WIDE, "--data.processing.require_price", "false"),
          match, cache, tmp_path)


@pytest.mark.parametrize("extra, match", [
    (["--data.processing.time_window", "[1990-01-01, 1990-02-01]"],
     r"time_window=\['1990-01-01', '1990-02-01'\] kept 0 of"),
    (["--data.processing.k_core", "1000"], r"k_core=1000 removed every interaction; lower processing\.k_core"),
], ids=["impossible_window", "impossible_k_core"])
def test_impossible_processing_of_real_files(capsys, amazon_dir: Path, cache: Path, extra: list, match: str) -> None:
    reviews, meta = "CDs_and_Vinyl.sample_reviews.jsonl", "meta_CDs_and_Vinyl.sample_items.jsonl"
    fails(capsys, data_args(cache, "--data.processing.dataset", "amazon2023:CDs_and_Vinyl",
                            "--data.processing.interactions_path", str(amazon_dir / reviews),
                            "--data.processing.meta_path", str(amazon_dir / meta),
                            *WIDE, "--data.processing.require_price", "false", *extra),
          match, cache)


# -- settings ----------------------------------------------------------------------------------------------------------
SETTINGS = [  # id, flags after `minirec data --data ... --data.cache_dir <cache>`, expected message
    ("negative_window_size", [*SYNTH_ARGS, "--data.processing.window_size", "-1"],
     r"^error: processing\.window_size: must be ≥ 1, got -1$"),
    ("split_ratios_sum_to_2", [*SYNTH_ARGS, "--data.processing.split_ratios", "[1.0, 0.5, 0.5]"],
     r"^error: processing\.split_ratios: need three non-negative fractions summing to 1"),
    ("unknown_split", [*SYNTH_ARGS, "--data.processing.split", "random"],
     r"^error: processing\.split: must be 'chronological' or 'leave_one_out', got 'random'$"),
    ("reversed_window", [*SYNTH_ARGS, "--data.processing.time_window", "[2023-01-01, 2022-01-01]"],
     r"processing\.time_window: start 2023-01-01 is not before end 2022-01-01"),
    ("window_not_dates", [*SYNTH_ARGS, "--data.processing.time_window", "[last year, today]"],
     r"processing\.time_window: 'last year' is not a date"),
    ("negative_k_core", [*SYNTH_ARGS, "--data.processing.k_core", "-2"], r"processing\.k_core: must be ≥ 0, got -2"),
    ("unknown_dataset", ["--data.processing.dataset", "netflix"], r"processing\.dataset: unknown dataset 'netflix'"),
    ("unknown_category", ["--data.processing.dataset", "amazon2023:Shoes"],
     r"unknown Amazon Reviews 2023 category 'Shoes'"),
    ("not_an_integer", [*SYNTH_ARGS, "--data.processing.window_size", "twenty"],
     r"^error: data\.processing\.window_size: Expected a <class 'int'>\. Got value: twenty$"),
    ("unknown_setting", [*SYNTH_ARGS, "--data.processing.windowsize", "3"], r"unrecognized arguments.*windowsize"),
    ("unknown_pacing", [*SYNTH_ARGS, "--data.pacing", "fast"], r"data\.pacing: must be one of"),
]


@pytest.mark.parametrize("extra, match", [c[1:] for c in SETTINGS], ids=[c[0] for c in SETTINGS])
def test_bad_setting(capsys, cache: Path, extra: list, match: str) -> None:
    fails(capsys, data_args(cache, *extra), match, cache)


def test_bad_config_files(capsys, tmp_path: Path, cache: Path) -> None:
    fails(capsys, ["data", "--config", str(tmp_path / "none.yaml")], r"none\.yaml", cache)
    (tmp_path / "broken.yaml").write_text("data:\n  class_path: datamodules.RecDataModule\n  init_args: [unclosed\n")
    fails(capsys, ["data", "--config", str(tmp_path / "broken.yaml")], r"^error: \S", cache)
    (tmp_path / "typo.yaml").write_text(f"data:\n  class_path: datamodules.RecDataModule\n  init_args:\n"
                                        f"    cache_dir: {cache}\n    processing:\n      dataset: synthetic\n"
                                        "      split_ratios: [0.5, 0.5, 0.5]\n")
    fails(capsys, ["data", "--config", str(tmp_path / "typo.yaml")], r"processing\.split_ratios: need three", cache)


def test_bad_commands(capsys, cache: Path) -> None:
    fails(capsys, ["train", "--config", "x.yaml"], r"^error: unknown command 'train'; choose one of data, pipeline,")
    fails(capsys, [], r"^error: no command given; choose one of")
    fails(capsys, ["data"], r"required.*data")
    fails(capsys, ["fit", "--trainer.max_steps", "many"], r"trainer\.max_steps: Expected a <class 'int'>")
    fails(capsys, ["pipeline", "--sampling.temperature", "0"], r"^error: sampling\.temperature must be > 0, got 0")
    fails(capsys, ["pipeline", "--loss.loss_agg", "sum"], r"loss\.loss_agg must be one of")


# -- pipeline run folders ----------------------------------------------------------------------------------------------
def pipeline_args(run: Path, cache: Path, *extra: str) -> list[str]:
    return ["pipeline", "--run_dir", str(run), "--processing.dataset", "synthetic", "--processing.synthetic_users",
            "40", "--processing.synthetic_items", "16", "--loader.cache_dir", str(cache), *extra]


def start_run(run: Path, argv: list[str]) -> PipelineSpec:
    """Make `run` a pipeline run folder of the settings `argv` gives, its proxy step started (`proxy/settings.json`);
    returns them."""
    parser = cli.pipeline_parser()
    cfg = parser.instantiate(parser.parse_args(argv[1:]))
    spec = PipelineSpec(**{k: v for k, v in vars(cfg).items() if k not in ("config", "run_dir")})
    check_run_folder(run, spec)
    (run / "proxy").mkdir()
    atomic_write_json(run / "proxy" / "settings.json", step_settings(spec, "proxy"))
    return spec


def test_foreign_and_half_written_run_folders(capsys, tmp_path: Path, cache: Path) -> None:
    run = tmp_path / "run"
    start_run(run, pipeline_args(run, cache, "--seed", "1"))
    fails(capsys, pipeline_args(run, cache), r"run/proxy: made with other settings \(changed: \['seed'\]\)", run, cache)

    start_run(half := tmp_path / "half", pipeline_args(tmp_path / "half", cache))
    (half / "proxy" / "done.json").write_text('{"adapter": "x", "seco')
    fails(capsys, pipeline_args(half, cache), r"proxy/done\.json:1: malformed JSON", half, cache)
    (half / "proxy" / "done.json").write_text('{"adapter": "x"}')
    fails(capsys, pipeline_args(half, cache), r"proxy/done\.json: field 'seconds' missing", half, cache)
    (half / "proxy" / "done.json").unlink()
    (half / "proxy" / "checkpoints").mkdir()
    (half / "proxy" / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 half a checkpoint")
    fails(capsys, pipeline_args(half, cache), r"proxy/checkpoints/last\.ckpt: unreadable checkpoint", half, cache)
    settings = half / "proxy" / "settings.json"
    settings.write_text(settings.read_text()[:100])
    fails(capsys, pipeline_args(half, cache), r"proxy/settings\.json:\d+: malformed JSON", half, cache)

    (tmp_path / "file").write_text("not a folder")
    fails(capsys, pipeline_args(tmp_path / "file", cache), r"File exists: '.*/file'$", cache, tmp_path)


# -- debug, benchmarks, the installed script ---------------------------------------------------------------------------
def test_debug_shows_the_traceback(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = data_args(cache, *SYNTH_ARGS, "--data.processing.window_size", "-1")
    with pytest.raises(ValueError) as raised:
        cli.main([*bad, "--debug"])
    assert isinstance(raised.value.__cause__ or raised.value.__context__, DataError)
    monkeypatch.setenv("MINIREC_DEBUG", "1")
    with pytest.raises(ValueError):
        cli.main(bad)


def test_a_bug_keeps_its_traceback() -> None:
    def buggy(argv: list[str]) -> None:
        raise KeyError("seconds")

    with pytest.raises(KeyError):
        run_command(buggy, [])


def test_benchmark_entry_point(capsys, tmp_path: Path, import_benchmark) -> None:
    bench = import_benchmark("data_efficiency")
    with pytest.raises(SystemExit) as stop:
        run_command(bench.main, ["--base", str(tmp_path / "missing.yaml")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: data_efficiency.base: no pipeline config at {tmp_path}/missing.yaml\n"


def test_installed_script_exit_status_and_stderr(cache: Path) -> None:
    script = Path(sys.executable).with_name("minirec")
    assert script.is_file(), "the minirec console script is not installed (pip install -e .)"
    proc = subprocess.run([str(script), *data_args(cache, *SYNTH_ARGS, "--data.processing.split_ratios", "[1, 1, 0]")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: processing.split_ratios: need three")
    assert "Traceback" not in proc.stderr and proc.stderr.count("error: ") == 1


# -- checkpoints, selection files, score folders (tiny model) ----------------------------------------------------------
MODEL = ["--model.policy.pretrained", "tiny-random-qwen2", "--model.policy.lora_r", "4",
         "--model.policy.lora_alpha", "8", "--model.policy.lora_dropout", "0.0", "--model.sampling.max_new_tokens", "2",
         "--model.eval_max_new_tokens", "2"]


def lightning_args(subcommand: str, root: Path, cache: Path, *extra: str, model: str = "GRPOModule") -> list[str]:
    grpo = ["--model.sampling.group_size", "2", "--model.test_baselines", "false"] if model == "GRPOModule" else []
    return [subcommand, "--model", f"lightning_modules.{model}", *MODEL, *grpo,
            "--data", "datamodules.RecDataModule", *SYNTH_ARGS, "--data.cache_dir", str(cache),
            "--data.max_train_samples", "8", "--data.max_val_samples", "4", "--data.max_test_samples", "4",
            "--data.max_predict_samples", "8", "--data.train_batch_size", "4", "--data.eval_batch_size", "4",
            "--data.item_batch_size", "16", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(root), *extra]


def test_bad_rollout_engine(capsys, tmp_path: Path, cache: Path) -> None:
    """An unknown `sampling.engine` or weight sync, and `vllm` where vLLM is not installed, end the fit with one line
    naming it."""
    fails(capsys, lightning_args("fit", tmp_path / "a", cache, "--model.sampling.engine", "sglang"),
          r"^error: sampling\.engine must be 'hf' or 'vllm', got 'sglang'$", cache)
    fails(capsys, lightning_args("fit", tmp_path / "c", cache, "--model.sampling.vllm_weight_sync", "nccl"),
          r"^error: sampling\.vllm_weight_sync must be 'lora' or 'merged', got 'nccl'$", cache)
    if importlib.util.find_spec("vllm") is None:
        fails(capsys, lightning_args("fit", tmp_path / "b", cache, "--model.sampling.engine", "vllm",
                                     "--trainer.max_steps", "1"),
              r"^error: sampling\.engine=vllm needs vLLM .*: pip install 'minirec\[vllm\]'", cache)


class Foreign:
    """A class no checkpoint may unpickle."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """A one-step GRPOModule fit through `minirec fit`; returns its checkpoint."""
    root = tmp_path_factory.mktemp("fit")
    cli.main(lightning_args("fit", root, cache, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"))
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    return ckpt


def test_resume_loads_the_checkpoint_weights_only(tmp_path: Path, cache: Path, trained: Path) -> None:
    cli.main(lightning_args("fit", tmp_path, cache, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                            "--ckpt_path", str(trained)))
    (resumed,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert load_checkpoint(resumed)["global_step"] == 2  # only tensors and allow-listed configs inside
    assert (tmp_path / "config.yaml").read_text().count("weights_only: true") == 1


def test_bad_checkpoints(capsys, tmp_path: Path, cache: Path, trained: Path) -> None:
    good = torch.load(trained, weights_only=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({**good, "extra": Foreign()}, bad / "foreign.ckpt")
    (bad / "truncated.ckpt").write_bytes(trained.read_bytes()[:5000])
    torch.save({"weight": torch.zeros(2)}, bad / "weights.pt")
    torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}, "hyper_parameters": {"hidden": 32}},
               bad / "other_module.ckpt")
    torch.save({**good, "state_dict": {k: torch.zeros(8, *v.shape[1:]) if "lora_A" in k else v
                                       for k, v in good["state_dict"].items()}}, bad / "other_rank.ckpt")
    keep = (trained.parent.parent, cache, bad)  # the fit's run folder, the dataset cache, the bad files
    for name, match in (("foreign.ckpt", r"foreign\.ckpt: refused to unpickle .*Foreign: .* weights_only=True"),
                        ("truncated.ckpt", r"truncated\.ckpt: unreadable checkpoint"),
                        ("weights.pt", r"weights\.pt: not a Lightning checkpoint"),
                        ("missing.ckpt", r"Checkpoint file not found: .*missing\.ckpt"),
                        ("other_module.ckpt", r"Option 'hidden' is not accepted")):
        fails(capsys, lightning_args("test", tmp_path / name, cache, "--ckpt_path", str(bad / name)), match, *keep)
    for name, match in (("foreign.ckpt", r"refused to unpickle"),
                        ("other_rank.ckpt", r"lora_A\.default\.weight: shape \(8, 64\) != \(4, 64\)"),
                        ("other_module.ckpt", r"LoRA state dict does not match the model"),
                        ("", r"not an exported PEFT adapter")):
        fails(capsys, lightning_args("predict", tmp_path / f"p{name}", cache, "--model.proxy", str(bad / name),
                                     model="ScoringModule"), match, *keep)
    fails(capsys, lightning_args("fit", trained.parent.parent, cache, "--trainer.max_steps", "1"),
          r"config\.yaml: this folder holds an earlier run", *keep)


def test_bad_selection_files(capsys, tmp_path: Path, cache: Path) -> None:
    fingerprint = SYNTH.fingerprint()
    cases = {
        "unknown_ids": ({"ids": [0, 10**6, 10**6 + 1], "stages": [0, 0, 0], "fingerprint": fingerprint},
                        r"field 'ids' names 2 unknown training sample id\(s\), e\.g\. \[1000000, 1000001\]"),
        "other_dataset": ({"ids": [0], "stages": [0], "fingerprint": "0123456789abcdef"},
                          r"made for dataset fingerprint 0123456789abcdef"),
        "no_stages": ({"ids": [0], "fingerprint": fingerprint}, r"missing field 'stages'"),
        "half_written": ('{"ids": [0, 1], "stag', r"half_written\.json:1: malformed JSON"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / "sel" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        fails(capsys, lightning_args("fit", tmp_path / name, cache, "--data.subset", str(path)), match,
              cache, path.parent)


def score_args(run: Path, cache: Path) -> list[str]:
    """`minirec pipeline` on a pool of 8 samples with the tiny model (its score stage writes 2 shards)."""
    return pipeline_args(run, cache, "--policy.lora_r", "4", "--policy.lora_alpha", "8", "--policy.lora_dropout", "0.0",
                         "--sampling.max_new_tokens", "2", "--score.num_rollouts", "2", "--score.pool_size", "8",
                         "--score.selection.ks", "[4]", "--score.selection.num_stages", "1", "--loader.eval_batch_size", "4",
                         "--loader.item_batch_size", "16", "--eval_max_new_tokens", "2", "--device.accelerator", "cpu")


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """A pipeline run folder whose proxy is done and whose score stage wrote every shard and artefact but was stopped
    before its done.json: a re-run merges the shards again."""
    root = tmp_path_factory.mktemp("scored")
    run, adapter = root / "run", root / "adapter"
    spec = start_run(run, score_args(run, cache))
    Policy(spec.policy).save_adapter(adapter)
    atomic_write_json(run / "proxy" / "done.json", {"adapter": str(adapter), "seconds": 0.0})
    score_pool(spec, run / "scores", str(adapter))
    assert len(list((run / "scores" / "shards").glob("*.pt"))) == 2 and (run / "scores" / "selection.json").is_file()
    return run


def test_bad_score_folders(capsys, tmp_path: Path, cache: Path, scored: Path) -> None:
    def copy(name: str) -> Path:
        return Path(shutil.copytree(scored, tmp_path / name))

    nan = copy("nan")
    shard = sorted((nan / "scores" / "shards").glob("*.pt"))[0]
    part = torch.load(shard, weights_only=True)
    part["rep_vec"][1, 0] = float("nan")
    torch.save(part, shard)
    fails(capsys, score_args(nan, cache), r"^error: representativeness vectors contains NaN", nan, cache)

    cut = copy("cut")
    shard = sorted((cut / "scores" / "shards").glob("*.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    fails(capsys, score_args(cut, cache), rf"{shard.name}: unreadable score shard .*; delete it", cut, cache)

    foreign = copy("foreign")
    fingerprint = json.loads((foreign / "scores" / "fingerprint.json").read_text())
    fingerprint["scoring"]["num_rollouts"] = 3
    (foreign / "scores" / "fingerprint.json").write_text(json.dumps(fingerprint))
    fails(capsys, score_args(foreign, cache),
          r"fingerprint\.json: scores in .* were made with other settings \(scoring: ", foreign, cache)


def test_non_finite_embeddings(capsys, tmp_path: Path, cache: Path, trained: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Policy, "encode", lambda self, ids, mask: torch.full((ids.shape[0], 64), float("nan")))
    fails(capsys, lightning_args("test", tmp_path, cache, "--ckpt_path", str(trained)),
          r"^error: non-finite item embeddings at global step \d+; item ids \[1, 2, 3, 4, 5\]$", trained.parent, cache)
