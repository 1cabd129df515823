"""MiniRec command line.

    minirec pipeline --config configs/quickstart.yaml            proxy → score → select → train → test, resumable
    minirec data --data configs/data/movielens-100k.yaml         build (or reuse) the processed dataset, print statistics
    minirec fit|validate|test|predict --config <yaml> [...]      LightningCLI (GRPOModule / ScoringModule, RecDataModule)
"""

from __future__ import annotations

import json
import sys

from jsonargparse import ActionConfigFile, ArgumentParser
import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules import RecDataModule
from minirec.processing import build_dataset, load_stats


def data_main(argv: list[str]) -> dict:
    """`minirec data`: build (or reuse) the configured processed dataset and print its statistics; returns them."""
    parser = ArgumentParser(prog="minirec data", description=data_main.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(RecDataModule, "data", required=True)
    dm: RecDataModule = parser.instantiate_classes(parser.parse_args(argv)).data
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

    parser = ArgumentParser(prog="minirec pipeline", description=run_pipeline.__doc__)
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
    cfg = parser.instantiate_classes(parser.parse_args(argv))
    result = run_pipeline(**{k: v for k, v in vars(cfg).items() if k != "config"})
    print(f"\nreport: {cfg.run_dir}/report.md")
    for k, v in sorted(result["test"]["metrics"].items()):
        print(f"  {k} {v:.4f}")
    return result


class MiniRecCLI(LightningCLI):
    """LightningCLI with the resolved config saved per run (Lightning's SaveConfigCallback)."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "data":
        data_main(argv[1:])
        return
    if argv and argv[0] == "pipeline":
        pipeline_main(argv[1:])
        return
    MiniRecCLI(datamodule_class=RecDataModule, subclass_mode_data=True, subclass_mode_model=True, args=argv)


if __name__ == "__main__":
    main()
