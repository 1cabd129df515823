"""Raw interaction and item tables -> the processed dataset of samples (METHOD.md §2), cached on disk.

Steps, in order: clean strings; keep items with a usable title (and a numeric price if `require_price`); keep their
interactions inside the time window [start, end), moving start back 3 months at a time while fewer than `min_items`
distinct items remain (never before Jan 1 of the earliest year in the data); drop repeated (user, item) pairs after
the first in time; optional iterative k-core; item ids 1..N sorted by item key (0 = padding); one sample per
interaction that has an earlier one of the same user; split by target time (or leave-one-out).

Result: a `datasets.DatasetDict` with `train`, `valid`, `test` (columns of `SAMPLE_FEATURES`) and `items`
(`ITEM_FEATURES`, row i holds item id i + 1), plus a stats dict. `build_dataset` caches it under
`cache_dir/<fingerprint>/` with `config.json` and `stats.json` (written last: the completion marker).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa

from minirec.io import ConfigError, DataError, atomic_dir, atomic_write_json, read_json
from minirec.sources import (
    amazon_category,
    amazon_paths,
    read_amazon_interactions,
    read_amazon_meta,
    read_movielens_100k,
)
from minirec.synthetic import make_synthetic

log = logging.getLogger("minirec.data")

SPLITS = ("train", "valid", "test")
PROCESSING_VERSION = 1  # part of the fingerprint: bump when the processing rules change, so old caches are not reused
SAMPLE_FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("int64"),
        "user_id": datasets.Value("string"),
        "history": datasets.List(datasets.Value("int64")),
        "history_ratings": datasets.List(datasets.Value("float32")),
        "history_timestamps": datasets.List(datasets.Value("int64")),
        "target": datasets.Value("int64"),
        "target_rating": datasets.Value("float32"),
        "target_timestamp": datasets.Value("int64"),
    }
)
ITEM_FEATURES = datasets.Features(
    {
        "item_id": datasets.Value("int64"),
        "item_key": datasets.Value("string"),
        "title": datasets.Value("string"),
        "description": datasets.Value("string"),
        "price": datasets.Value("float64"),
        "average_rating": datasets.Value("float64"),
        "rating_number": datasets.Value("float64"),
    }
)


@dataclass(frozen=True)
class ProcessingConfig:
    """How raw files become the processed dataset (METHOD.md §2). Its fingerprint keys the cache.

    Args:
        dataset: `movielens-100k`, `amazon2023:<Category>` (e.g. `amazon2023:CDs_and_Vinyl`) or `synthetic` (tests).
        data_dir: Amazon: folder laid out like the official dataset repository; MovieLens: folder with ml-100k.inter
            and ml-100k.item (default: the installed recbole wheel).
        interactions_path: Amazon: explicit 5-core rating_only CSV or review JSONL (wins over data_dir).
        meta_path: Amazon: explicit meta JSONL (wins over data_dir).
        download: Amazon: fetch missing official files from the Hugging Face hub (needs a network).
        time_window: [start, end) as ISO dates, UTC; null = no window.
        min_items: move the window start back 3 months at a time until this many distinct items remain.
        require_price: keep only items with a numeric price; null = true for sources with prices (paper parity).
        max_title_words: items whose cleaned title has more words are dropped.
        k_core: iterative k-core on users and items (0 = off).
        drop_duplicates: drop repeated (user, item) interactions after the first in time.
        window_size: history items per sample (the most recent ones).
        split: `chronological` (global, by target time, with split_ratios) or `leave_one_out` (per user).
        split_ratios: train / valid / test fractions for the chronological split.
        synthetic_users: users of the synthetic dataset.
        synthetic_items: items of the synthetic dataset.
        synthetic_seed: seed of the synthetic dataset.
    """

    dataset: str = "movielens-100k"
    data_dir: str | None = None
    interactions_path: str | None = None
    meta_path: str | None = None
    download: bool = False
    time_window: tuple[str, str] | None = ("2022-10-01", "2023-10-01")
    min_items: int = 10000
    require_price: bool | None = None
    max_title_words: int = 50
    k_core: int = 0
    drop_duplicates: bool = True
    window_size: int = 20
    split: str = "chronological"
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    synthetic_users: int = 200
    synthetic_items: int = 60
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        if self.time_window is not None:  # YAML may give a list, or dates
            object.__setattr__(self, "time_window", tuple(str(x) for x in self.time_window))
        object.__setattr__(self, "split_ratios", tuple(float(x) for x in self.split_ratios))
        if self.dataset.startswith("amazon2023:"):
            amazon_category(self.dataset)
        elif self.dataset not in ("movielens-100k", "synthetic"):
            raise DataError(
                f"processing.dataset: unknown dataset {self.dataset!r}; "
                "use 'movielens-100k', 'amazon2023:<Category>' or 'synthetic'"
            )
        if self.time_window is not None:
            if len(self.time_window) != 2:
                raise ConfigError(f"processing.time_window: expected [start, end], got {list(self.time_window)}")
            start, end = self.time_window
            if _parse_date(start) >= _parse_date(end):
                raise ConfigError(f"processing.time_window: start {start} is not before end {end}")
        if self.split not in ("chronological", "leave_one_out"):
            raise ConfigError(f"processing.split: must be 'chronological' or 'leave_one_out', got {self.split!r}")
        r = self.split_ratios
        if len(r) != 3 or any(not math.isfinite(x) or x < 0 for x in r) or abs(sum(r) - 1) > 1e-6 or r[0] == 0:
            raise DataError(
                f"processing.split_ratios: need three non-negative fractions summing to 1 with train > 0, got {list(r)}"
            )
        for name, low in (("window_size", 1), ("max_title_words", 1), ("k_core", 0), ("min_items", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"processing.{name}: must be ≥ {low}, got {getattr(self, name)}")

    def fingerprint(self) -> str:
        """Short sha256 of the fields that shape the data (all but `download`) and the processing version."""
        fields = {k: v for k, v in asdict(self).items() if k != "download"}
        fields["processing_version"] = PROCESSING_VERSION
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _parse_date(value: str) -> pd.Timestamp:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ConfigError(f"processing.time_window: {value!r} is not a date (YYYY-MM-DD)")
    try:
        return pd.Timestamp(value, tz="UTC")
    except ValueError:
        raise ConfigError(f"processing.time_window: {value!r} is not a date (YYYY-MM-DD)") from None


# -- strings -----------------------------------------------------------------------------------------------------------
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_DEBRIS = re.compile(r"[<>]|&#?\w+;")  # a tag fragment or an entity left after one round of unescaping
_PRODUCT_ID = re.compile(r"B0[0-9A-Z]{8}|[0-9]{9}[0-9X]")  # a bare ASIN / ISBN-10


def clean_text(s: Any) -> str:
    """HTML-unescape, strip tags, collapse whitespace; None / NaN -> ""."""
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return ""
    return " ".join(_TAG.sub(" ", html.unescape(str(s))).split())


def title_ok(title: str, max_words: int) -> bool:
    """A cleaned title is usable: 1..max_words words, no markup debris (`<`, `>`, a leftover entity such as `&amp;`),
    at least one letter or digit (not only punctuation), and not just a product id (ASIN / ISBN-10)."""
    n_words = len(title.split())
    return (
        0 < n_words <= max_words
        and not _DEBRIS.search(title)
        and any(c.isalnum() for c in title)
        and not _PRODUCT_ID.fullmatch(title)
    )


# -- interactions ------------------------------------------------------------------------------------------------------
def sequence_order(interactions: pd.DataFrame, item_col: str = "item_id") -> pd.DataFrame:
    """Rows sorted by (user_id, timestamp, item) — the one ordering of user sequences. Item ids follow item-key
    order, so sorting by `item_key` before ids exist gives the same order as sorting by `item_id` after."""
    return interactions.sort_values(["user_id", "timestamp", item_col], kind="mergesort").reset_index(drop=True)


def apply_window(
    interactions: pd.DataFrame, window: tuple[str, str] | None, min_items: int
) -> tuple[pd.DataFrame, tuple[str, str] | None]:
    """Interactions with timestamp in [start, end); start moves back 3 months while fewer than `min_items` distinct
    items are inside, but not before Jan 1 of the earliest year in the data. Returns (rows, final window)."""
    if window is None:
        return interactions, None
    start, end = (_parse_date(d) for d in window)
    ts = interactions["timestamp"].to_numpy()
    floor = pd.Timestamp(year=pd.Timestamp(int(ts.min()), unit="s").year, month=1, day=1, tz="UTC")
    keys = interactions["item_key"].to_numpy()
    while True:
        inside = (ts >= start.timestamp()) & (ts < end.timestamp())
        n_items = len(pd.unique(keys[inside]))
        if n_items >= min_items or start <= floor:
            break
        start = max(start - pd.DateOffset(months=3), floor)
        log.debug("window back-off: %d items < min_items=%d, start moved to %s", n_items, min_items, start.date())
    return interactions[inside], (start.date().isoformat(), end.date().isoformat())


def k_core(interactions: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively keep users and items with ≥ k interactions until nothing changes."""
    while True:
        users = interactions["user_id"].map(interactions["user_id"].value_counts())
        items = interactions["item_key"].map(interactions["item_key"].value_counts())
        keep = (users >= k) & (items >= k)
        if keep.all():
            return interactions
        interactions = interactions[keep]


def assign_item_ids(interactions: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Add `item_id` 1..N (items sorted by key; 0 is padding). Returns (interactions, keys) with keys[id - 1] = key."""
    keys = sorted(interactions["item_key"].unique())
    ids = pd.Series(np.arange(1, len(keys) + 1, dtype=np.int64), index=keys)
    return interactions.assign(item_id=interactions["item_key"].map(ids).to_numpy()), keys


def build_samples(interactions: pd.DataFrame, window_size: int | None) -> pd.DataFrame:
    """One sample per position i ≥ 1 of each user's sequence (`sequence_order`): history = items[max(0, i - w):i]
    with ratings and timestamps, target = items[i]; w = None keeps the full history. `sample_id` 0.. in the order
    of users sorted by user_id, then position. Needs columns user_id, item_id, rating, timestamp."""
    df = sequence_order(interactions, "item_id")
    users = df["user_id"].to_numpy()
    items = df["item_id"].to_numpy(dtype=np.int64)
    ratings = df["rating"].to_numpy(dtype=np.float32)
    times = df["timestamp"].to_numpy(dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(df) else np.array([], dtype=int)
    ends = np.r_[starts[1:], len(df)].astype(int)
    cols: dict[str, list] = {name: [] for name in SAMPLE_FEATURES if name != "sample_id"}
    for s, e in zip(starts.tolist(), ends.tolist()):
        for i in range(s + 1, e):
            lo = s if window_size is None else max(s, i - window_size)
            cols["user_id"].append(users[i])
            cols["history"].append(items[lo:i].tolist())
            cols["history_ratings"].append(ratings[lo:i].tolist())
            cols["history_timestamps"].append(times[lo:i].tolist())
            cols["target"].append(int(items[i]))
            cols["target_rating"].append(float(ratings[i]))
            cols["target_timestamp"].append(int(times[i]))
    return pd.DataFrame({"sample_id": np.arange(len(cols["target"]), dtype=np.int64), **cols})


def split_samples(samples: pd.DataFrame, split: str, ratios: tuple[float, float, float]) -> dict[str, pd.DataFrame]:
    """train / valid / test, each ordered by (target_timestamp, sample_id). `chronological`: first ratios[0] of all
    samples in that order -> train, next ratios[1] -> valid, rest -> test. `leave_one_out`: each user's last sample ->
    test, second last -> valid, the rest -> train. A split with no sample raises DataError."""
    ordered = samples.sort_values(["target_timestamp", "sample_id"], kind="mergesort").reset_index(drop=True)
    if split == "chronological":
        n = len(ordered)
        cut1 = math.floor(n * ratios[0] + 1e-9)
        cut2 = math.floor(n * (ratios[0] + ratios[1]) + 1e-9)
        part = np.select([np.arange(n) < cut1, np.arange(n) < cut2], [0, 1], 2)
    else:  # within a user, (target_timestamp, sample_id) order is sequence order
        from_end = ordered.groupby("user_id", sort=False).cumcount(ascending=False).to_numpy()
        part = np.select([from_end == 0, from_end == 1], [2, 1], 0)
    parts = {name: ordered[part == k].reset_index(drop=True) for k, name in enumerate(SPLITS)}
    for name, df in parts.items():
        if df.empty:
            hint = "change processing.split_ratios" if split == "chronological" else "use split: chronological"
            raise DataError(
                f"split '{name}' has 0 of {len(samples)} samples with processing.split={split} "
                f"(split_ratios={list(ratios)}); {hint} or use more data (time_window, min_items)"
            )
    return parts


# -- the whole pipeline ------------------------------------------------------------------------------------------------
def process(
    cfg: ProcessingConfig, interactions: pd.DataFrame, items: pd.DataFrame, has_price: bool
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Raw tables (columns of `minirec.sources`) -> (DatasetDict train/valid/test/items, stats). Pure."""
    require_price = has_price if cfg.require_price is None else cfg.require_price
    # 1. items that have interactions: usable title, then (optionally) a numeric price; no metadata = no title
    keys = pd.unique(interactions["item_key"].to_numpy())
    meta = items.drop_duplicates("item_key").set_index("item_key").reindex(keys)
    titles = meta["title"].map(clean_text)
    ok_title = titles.map(lambda t: title_ok(t, cfg.max_title_words)).to_numpy(dtype=bool)
    if not ok_title.any():
        raise DataError(
            f"the title filter kept 0 of {len(keys)} items (no metadata title, longer than "
            f"max_title_words={cfg.max_title_words}, or markup debris); check the item metadata file or raise "
            "processing.max_title_words"
        )
    ok = ok_title & meta["price"].notna().to_numpy() if require_price else ok_title
    if not ok.any():
        raise DataError(f"require_price=true kept 0 of {int(ok_title.sum())} items; set require_price: false")
    kept = interactions[interactions["item_key"].isin(set(keys[ok]))]
    # 2. window with back-off, dedup, k-core
    inter, window = apply_window(kept, cfg.time_window, cfg.min_items)
    if inter.empty:
        span = pd.to_datetime(kept["timestamp"].agg(["min", "max"]), unit="s").dt.date.tolist()
        raise DataError(
            f"time_window={list(cfg.time_window)} kept 0 of {len(kept)} interactions (data from {span[0]} to "
            f"{span[1]}); change processing.time_window (or null for no window) or lower min_items"
        )
    inter = sequence_order(inter, "item_key")
    n_before = len(inter)
    if cfg.drop_duplicates:
        inter = inter.drop_duplicates(["user_id", "item_key"], keep="first")
    duplicates = n_before - len(inter)
    if cfg.k_core:
        inter = k_core(inter, cfg.k_core)
        if inter.empty:
            raise DataError(f"k_core={cfg.k_core} removed every interaction; lower processing.k_core (0 = off)")
    # 3-5. ids, samples, split
    inter, item_keys = assign_item_ids(inter)
    samples = build_samples(inter, cfg.window_size)
    if samples.empty:
        raise DataError(
            f"no user has two interactions after filtering ({len(inter)} interactions); widen processing.time_window "
            "or relax the item filters"
        )
    parts = split_samples(samples, cfg.split, cfg.split_ratios)
    final = meta.loc[item_keys]
    item_table = {
        "item_id": list(range(1, len(item_keys) + 1)),
        "item_key": [str(k) for k in item_keys],
        "title": titles.loc[item_keys].tolist(),
        "description": final["description"].map(clean_text).tolist(),
        **{c: final[c].astype("float64").tolist() for c in ("price", "average_rating", "rating_number")},
    }
    data = datasets.DatasetDict(
        {
            **{name: _to_dataset(df.to_dict("list"), SAMPLE_FEATURES) for name, df in parts.items()},
            "items": _to_dataset(item_table, ITEM_FEATURES),
        }
    )
    stats = {
        "dataset": cfg.dataset,
        "fingerprint": cfg.fingerprint(),
        "users": int(inter["user_id"].nunique()),
        "items": len(item_keys),
        "interactions": len(inter),
        "samples": {name: len(df) for name, df in parts.items()},
        "window": list(window) if window else None,
        "require_price": bool(require_price),
        "items_dropped_by_title": int((~ok_title).sum()),
        "items_dropped_by_price": int((ok_title & ~ok).sum()),
        "duplicates_dropped": int(duplicates),
    }
    return data, stats


def _to_dataset(columns: dict[str, list], features: datasets.Features) -> datasets.Dataset:
    """Columns of Python values -> Dataset with exactly `features` (NaN floats stay NaN, not null)."""
    return datasets.Dataset(pa.Table.from_pydict(columns, schema=features.arrow_schema))


# -- sources -----------------------------------------------------------------------------------------------------------
def load_source(cfg: ProcessingConfig) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """(interactions, items, whether the source has prices at all) for `cfg.dataset`."""
    if cfg.dataset == "movielens-100k":
        interactions, items = read_movielens_100k(cfg.data_dir)
        return interactions, items, False
    if cfg.dataset == "synthetic":
        interactions, items = make_synthetic(cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_seed)
        return interactions, items, False
    if cfg.dataset.startswith("amazon2023:"):
        category = amazon_category(cfg.dataset)
        inter_path, meta_path = amazon_paths(category, cfg.data_dir, cfg.interactions_path, cfg.meta_path, cfg.download)
        interactions = read_amazon_interactions(inter_path)
        if interactions.empty:
            raise DataError(f"no interactions in {inter_path}")
        return interactions, read_amazon_meta(meta_path), True
    raise DataError(
        f"processing.dataset: unknown dataset {cfg.dataset!r}; "
        "use 'movielens-100k', 'amazon2023:<Category>' or 'synthetic'"
    )


def build_dataset(cfg: ProcessingConfig, cache_dir: str | Path) -> tuple[datasets.DatasetDict, Path]:
    """The processed dataset of `cfg`, from `cache_dir/<fingerprint>/` when complete (stats.json present), else built
    (load_source + process), written to a temp folder beside it and moved into place atomically."""
    final = Path(cache_dir) / cfg.fingerprint()
    if (final / "stats.json").is_file():
        log.info("reusing processed dataset %s", final)
        return datasets.load_from_disk(str(final)), final
    interactions, items, has_price = load_source(cfg)
    data, stats = process(cfg, interactions, items, has_price)
    with atomic_dir(final) as tmp:
        data.save_to_disk(str(tmp))
        atomic_write_json(tmp / "config.json", asdict(cfg))
        atomic_write_json(tmp / "stats.json", stats)  # written last: marks the folder complete
    n = stats["samples"]
    log.info(
        "built %s (%s): window %s, %d users, %d items, %d interactions, samples train/valid/test %d/%d/%d -> %s",
        cfg.dataset, stats["fingerprint"], stats["window"], stats["users"], stats["items"], stats["interactions"],
        n["train"], n["valid"], n["test"], final,
    )  # fmt: skip
    return datasets.load_from_disk(str(final)), final


def load_stats(path: str | Path) -> dict[str, Any]:
    """The stats.json of a processed dataset folder."""
    return read_json(Path(path) / "stats.json")
