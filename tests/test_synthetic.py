"""The synthetic dataset: deterministic, planted genre preferences visible in titles, processable with defaults."""

from __future__ import annotations

from collections import Counter

import pytest

from minirec.io import DataError
from minirec.processing import ProcessingConfig, build_samples, assign_item_ids, process
from minirec.processing import load_source
from minirec.schema import INTERACTION_COLUMNS, ITEM_COLUMNS
from minirec.synthetic import GENRES, make_synthetic


def genre(title: str) -> str:
    return title.split(" album ")[0]


def test_deterministic_per_seed() -> None:
    a_inter, a_items = make_synthetic(50, 40, seed=3)
    b_inter, b_items = make_synthetic(50, 40, seed=3)
    c_inter, _ = make_synthetic(50, 40, seed=4)
    assert a_inter.equals(b_inter) and a_items.equals(b_items)
    assert not a_inter.equals(c_inter)
    assert list(a_inter.columns) == INTERACTION_COLUMNS and list(a_items.columns) == ITEM_COLUMNS


def test_planted_preferences() -> None:
    inter, items = make_synthetic(200, 60, seed=0)
    title = dict(zip(items["item_key"], items["title"]))
    assert {genre(t) for t in items["title"]} == set(GENRES)
    for t, d in zip(items["title"], items["description"]):
        assert genre(t).lower() in d
    assert not inter.duplicated(["user_id", "item_key"]).any()
    share = []
    for _, rows in inter.groupby("user_id"):
        assert rows["timestamp"].is_monotonic_increasing and rows["timestamp"].is_unique
        counts = Counter(genre(title[k]) for k in rows["item_key"])
        share.append(counts.most_common(1)[0][1] / len(rows))
    assert sum(share) / len(share) > 0.8 and inter["user_id"].nunique() == 200


def test_history_titles_reveal_the_target_genre() -> None:
    """A title-only rule (most common genre in the history) predicts the target's genre: the signal is learnable."""
    inter, items = make_synthetic(200, 60, seed=1)
    inter, keys = assign_item_ids(inter)
    title = dict(zip(items["item_key"], items["title"]))
    samples = build_samples(inter, window_size=20)
    hits = [
        Counter(genre(title[keys[h - 1]]) for h in hist).most_common(1)[0][0] == genre(title[keys[t - 1]])
        for hist, t in zip(samples["history"], samples["target"])
    ]
    assert sum(hits) / len(hits) > 0.8


def test_processes_with_default_settings() -> None:
    cfg = ProcessingConfig(dataset="synthetic")
    inter, items, has_price = load_source(cfg)
    assert has_price is False
    data, stats = process(cfg, inter, items, has_price)
    assert stats["interactions"] == len(inter) and stats["items"] == 60 and stats["users"] == 200
    assert stats["window"] == ["2022-10-01", "2023-10-01"]  # no back-off: the start already precedes all data
    assert sum(stats["samples"].values()) == len(inter) - 200
    assert data["items"][0]["title"].endswith("album 1")


def test_bad_sizes() -> None:
    with pytest.raises(DataError, match="synthetic_items"):
        make_synthetic(10, 3, seed=0)
    with pytest.raises(DataError, match="synthetic_users"):
        make_synthetic(0, 60, seed=0)
