"""MiniRec command line.

    minirec data --data configs/data/movielens-100k.yaml         build (or reuse) the processed dataset, print statistics
    minirec fit|validate|test|predict --config <yaml> [...]      LightningCLI over any LightningModule / RecDataModule
"""

from __future__ import annotations

import json
import sys

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.cli import LightningCLI

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


class MiniRecCLI(LightningCLI):
    """LightningCLI with the resolved config saved per run (Lightning's SaveConfigCallback)."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "data":
        data_main(argv[1:])
        return
    MiniRecCLI(datamodule_class=RecDataModule, subclass_mode_data=True, subclass_mode_model=True, args=argv)


if __name__ == "__main__":
    main()
