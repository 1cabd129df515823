"""SASRec baseline: the classic sequential recommender on the same processed data, split, test samples and metric as
the LLM runs, next to popularity and random ranking, with 95 % bootstrap intervals.

Trains on the whole training split, early-stops on the whole validation split, tests on the data config's test samples
(`max_test_samples` with its seed: the samples `minirec test` and the quickstart use with the same data settings).

    python benchmarks/sasrec.py --data configs/data/amazon-beauty.yaml --out benchmarks/results/sasrec/amazon-beauty

Writes sasrec.md (table, training summary, command, date, machine), metrics.json and training.csv into `out`.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import torch

from bench_common import data_parser, print_summary, write_comparison, write_csv
from datamodules import RecDataModule
from minirec.evaluation import (
    bootstrap_intervals,
    candidate_counts,
    metric_names,
    paired_differences,
    per_sample_metrics,
    popularity_ranks,
    random_expectation,
)
from minirec.sasrec import SASRecConfig, history_tensor, sasrec_ranks, train_sasrec

KS = (5, 10, 20, 50)


def split_tensors(dm: RecDataModule, split: str, order: list[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(history `[S, max_len]`, target `[S]`) of the given rows of a split."""
    rows = dm.rows[split].select(order)
    return history_tensor(rows["history"], max_len), torch.tensor(rows["target"], dtype=torch.long)


def run(dm: RecDataModule, sasrec: SASRecConfig, out: Path, command: str) -> dict:
    """Train, test and write the report; returns {method: {metric: mean}}."""
    start = time.perf_counter()
    dm.setup()
    max_len = dm.processing.window_size
    train = split_tensors(dm, "train", list(range(len(dm.rows["train"]))), max_len)
    valid = split_tensors(dm, "valid", list(range(len(dm.rows["valid"]))), max_len)
    history, target = split_tensors(dm, "test", dm.split_order["test"], max_len)
    model, log = train_sasrec(dm.num_items, train, valid, sasrec)
    train_s = time.perf_counter() - start
    values = {
        "sasrec": per_sample_metrics(sasrec_ranks(model, history, target), KS),
        "popularity": per_sample_metrics(popularity_ranks(dm.item_popularity(), history, target), KS),
        "random": random_expectation(candidate_counts(history, target, dm.num_items), KS),
    }
    intervals = bootstrap_intervals({**values, **paired_differences(values, of="sasrec")}, seed=0)
    names = metric_names(KS)
    best = max(log, key=lambda r: r["val_ndcg@10"])
    intro = (f"Data: {dm.processing.dataset}, {dm.num_items} items; trained on all {len(train[1])} training samples, "
             f"early-stopped on all {len(valid[1])} validation samples: best epoch {best['epoch']} of {len(log)} "
             f"(validation NDCG@10 {best['val_ndcg@10']:.4f}), {train_s:.0f} s. Settings: {sasrec}.")
    summary = write_comparison(out, "sasrec", "SASRec against popularity and random ranking", command, start, intro,
                               intervals, names, len(target), best_epoch=best["epoch"], epochs=len(log),
                               train_s=train_s)
    write_csv(out / "training.csv", log, ("epoch", "loss", "val_ndcg@10"))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = data_parser("sasrec", __doc__)
    parser.add_class_arguments(SASRecConfig, "sasrec")
    parser.add_argument("--out", default="benchmarks/results/sasrec", help="results folder")
    argv = sys.argv[1:] if argv is None else argv
    cfg = parser.instantiate(parser.parse_args(argv))
    summary = run(cfg.data, cfg.sasrec, Path(cfg.out), shlex.join(["python", "benchmarks/sasrec.py", *argv]))
    print_summary(summary)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from minirec.io import run_command  # a user error: one `error: ...` line, exit status 2 (--debug: traceback)

    sys.exit(run_command(main))
