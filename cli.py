"""MiniRec command line.

    minirec pipeline --config configs/quickstart.yaml            proxy → score → select → train → test, resumable
    minirec data --data configs/data/movielens-100k.yaml         build (or reuse) the processed dataset, print statistics
    minirec fit|validate|test|predict --config <yaml> [...]      LightningCLI (GRPOModule / ScoringModule, RecDataModule)

A user error (bad data, an impossible setting, a rejected command line, a non-finite loss) ends the command with one
`error: <message>` line on stderr and exit status 2; `--debug` anywhere on the command line (or MINIREC_DEBUG=1) shows
the traceback instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser
import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from datamodules import RecDataModule
from minirec.io import ConfigError, load_checkpoint, run_command
from minirec.processing import build_dataset, load_stats


def data_main(argv: list[str]) -> dict:
    """`minirec data`: build (or reuse) the configured processed dataset and print its statistics; returns them."""
    parser = ArgumentParser(prog="minirec data", description=data_main.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(RecDataModule, "data", required=True)
    dm: RecDataModule = parser.instantiate(parser.parse_args(argv)).data
    _, path = build_dataset(dm.processing, dm.cache_dir)
    stats = load_stats(path)
    window = stats["window"] or ["-", "-"]
    print(f"\n{stats['dataset']}  (processed dataset: {path})")
    print(f"  users {stats['users']:,}  items {stats['items']:,}  interactions {stats['interactions']:,}")
    print("  samples  " + "  ".join(f"{k} {v:,}" for k, v in stats["samples"].items()))
    print(f"  time window {window[0]} .. {window[1]}")
    print(json.dumps(stats, indent=2, sort_keys=True, default=str))
    return stats


def pipeline_parser() -> ArgumentParser:
    """Parser of `minirec pipeline`: the typed arguments of `pipeline.run_pipeline`, plus `--config`."""
    from pipeline import run_pipeline

    parser = ArgumentParser(prog="minirec pipeline", description=run_pipeline.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(run_pipeline)
    return parser


def trainer_parser() -> LightningArgumentParser:
    """A parser with the trainer / model / data groups of `minirec fit` that validates a config without instantiating
    anything (used to check shipped YAML files)."""
    parser = LightningArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--seed_everything", type=int | bool, default=True)
    parser.add_lightning_class_args(L.Trainer, "trainer")
    parser.add_lightning_class_args(L.LightningModule, "model", subclass_mode=True, required=False)
    parser.add_lightning_class_args(L.LightningDataModule, "data", subclass_mode=True, required=False)
    return parser


def pipeline_main(argv: list[str]) -> dict:
    """`minirec pipeline`: run or resume every stage under one run folder (see pipeline.run_pipeline)."""
    from pipeline import run_pipeline

    parser = pipeline_parser()
    cfg = parser.instantiate(parser.parse_args(argv))
    result = run_pipeline(**{k: v for k, v in vars(cfg).items() if k != "config"})
    print(f"\nreport: {cfg.run_dir}/report.md")
    for k, v in sorted(result["test"]["metrics"].items()):
        print(f"  {k} {v:.4f}")
    return result


class SaveConfig(SaveConfigCallback):
    """Lightning's SaveConfigCallback; the config.yaml of an earlier run in the log folder is a user error."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        try:
            super().setup(trainer, pl_module, stage)
        except RuntimeError as e:
            if "to NOT exist" not in str(e):
                raise
            raise ConfigError(f"{Path(trainer.log_dir or '.') / self.config_filename}: this folder holds an earlier "
                              "run; set a new trainer.default_root_dir (or a logger version), or delete it") from None


class MiniRecCLI(LightningCLI):
    """LightningCLI with the resolved config saved per run (`SaveConfig`) and checkpoints loaded with
    `weights_only=True`; a `ckpt_path` file is checked up front (`minirec.io.load_checkpoint`), so a foreign or broken
    one is a user error naming it."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if "weights_only" in config and config.weights_only is None:
            config.weights_only = True
        if config.get("ckpt_path") and Path(config.ckpt_path).is_file():
            load_checkpoint(config.ckpt_path)


COMMANDS = ("data", "pipeline", *LightningCLI.subcommands())


def _dispatch(argv: list[str]) -> None:
    if not argv or (not argv[0].startswith("-") and argv[0] not in COMMANDS):
        given = f"unknown command {argv[0]!r}" if argv else "no command given"
        raise ConfigError(f"{given}; choose one of {', '.join(COMMANDS)}")
    if argv[0] == "data":
        data_main(argv[1:])
    elif argv[0] == "pipeline":
        pipeline_main(argv[1:])
    else:
        MiniRecCLI(datamodule_class=RecDataModule, subclass_mode_data=True, subclass_mode_model=True, args=argv,
                   parser_kwargs={"exit_on_error": False}, save_config_callback=SaveConfig)


def main(argv: list[str] | None = None) -> None:
    """The `minirec` command (see the module docstring)."""
    run_command(_dispatch, argv)


if __name__ == "__main__":
    main()
