"""Processing rules (METHOD.md §2) on the real Amazon Reviews 2023 fixtures and MovieLens-100K.

Expected counts are computed independently with plain pandas on the raw files, not copied from the code's output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pandas as pd
import pytest

import minirec.processing as processing
from minirec.io import DataError
from minirec.processing import (
    ProcessingConfig,
    apply_window,
    assign_item_ids,
    build_dataset,
    build_samples,
    clean_text,
    load_stats,
    process,
    title_ok,
)
from minirec.processing import load_source
from minirec.sources import read_amazon_interactions

BEAUTY_CSV = "All_Beauty.5core_rating_only.csv.gz"
BEAUTY_META = "meta_All_Beauty.5core_items.jsonl"


def beauty(amazon_dir: Path, interactions: str = BEAUTY_CSV, meta: str | Path = BEAUTY_META, **kw) -> ProcessingConfig:
    return ProcessingConfig(
        dataset="amazon2023:All_Beauty",
        interactions_path=str(amazon_dir / interactions),
        meta_path=str(amazon_dir / meta),
        **kw,
    )


def run(cfg: ProcessingConfig) -> tuple[datasets.DatasetDict, dict]:
    return process(cfg, *load_source(cfg))


def chrono_counts(n: int) -> dict[str, int]:
    """80/10/10 cut of n samples, in exact integer arithmetic."""
    return {"train": n * 8 // 10, "valid": n * 9 // 10 - n * 8 // 10, "test": n - n * 9 // 10}


def read_lines(path: Path) -> pd.DataFrame:
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


# -- strings -----------------------------------------------------------------------------------------------------------
def test_clean_text() -> None:
    assert clean_text("&lt;b&gt;Great&lt;/b&gt; &amp; cheap<br />\n  buy   it") == "Great & cheap buy it"
    assert clean_text("a <span class='x'>b</span>&nbsp;c") == "a b c"
    assert clean_text(None) == "" and clean_text(float("nan")) == ""
    assert clean_text("I <3 this") == "I <3 this"  # not a tag


def test_title_rule() -> None:
    assert title_ok("Jazz album 7", 50) and title_ok("187", 50) and title_ok("Tom & Jerry", 50)
    assert not title_ok("", 50)
    assert not title_ok(" ".join(["word"] * 51), 50) and title_ok(" ".join(["word"] * 50), 50)
    assert not title_ok(clean_text('<span class="a-size-large"'), 50)  # unclosed tag fragment
    assert not title_ok(clean_text("Tom &amp;amp; Jerry"), 50)  # double-escaped entity
    assert not title_ok("!!! ---", 50) and not title_ok("B07XYZ1234", 50)


# -- ordering and samples ----------------------------------------------------------------------------------------------
def test_official_history_oracle(amazon_dir: Path) -> None:
    """Official last_out_w_his train+valid (the README: valid continues each user's train sequence): rebuilding each
    user's sequence with our ordering reproduces the `history` column of every row."""
    files = [amazon_dir / f"All_Beauty.last_out_w_his.{s}.csv" for s in ("train", "valid")]
    official = pd.concat([pd.read_csv(f, dtype=str, keep_default_na=False) for f in files], ignore_index=True)
    inter = pd.concat([read_amazon_interactions(f) for f in files], ignore_index=True)
    assert len(inter) == len(official) == 19120 + 42823
    # the official order has no equal timestamps within a user, even at 1 s resolution, so ties cannot disagree
    assert not inter.duplicated(["user_id", "timestamp"]).any()
    inter, keys = assign_item_ids(inter)
    samples = build_samples(inter, window_size=None)
    rebuilt = pd.DataFrame(
        {
            "user_id": samples["user_id"],
            "parent_asin": [keys[t - 1] for t in samples["target"]],
            "ts": samples["target_timestamp"],
            "rebuilt": [" ".join(keys[h - 1] for h in hist) for hist in samples["history"]],
        }
    )
    official["ts"] = official["timestamp"].astype("int64") // 1000
    with_history = official[official["history"] != ""]  # the first item of a user has no history, so no sample
    merged = with_history.merge(rebuilt, on=["user_id", "parent_asin", "ts"], how="outer", validate="one_to_one")
    assert len(merged) == len(with_history) == len(rebuilt) == 19120
    assert (merged["history"] == merged["rebuilt"]).all()


def test_ties_ordered_by_item_id_and_window() -> None:
    inter = pd.DataFrame(
        {
            "user_id": ["u", "u", "u", "u", "v"],
            "item_key": ["c", "b", "a", "d", "a"],
            "rating": [1.0, 2.0, 3.0, 4.0, 5.0],
            "timestamp": [10, 20, 20, 30, 5],
        }
    )
    inter, keys = assign_item_ids(inter)
    assert keys == ["a", "b", "c", "d"]
    s = build_samples(inter, window_size=2)
    assert s["user_id"].tolist() == ["u", "u", "u"]  # v has one interaction: no sample
    # u's sequence: c(10), then a and b tie at 20 -> item id order a(1), b(2); then d(30)
    assert s["target"].tolist() == [1, 2, 4]
    assert s["history"].tolist() == [[3], [3, 1], [1, 2]]  # window_size=2 keeps the most recent two
    assert s["history_ratings"].tolist() == [[1.0], [1.0, 3.0], [3.0, 2.0]]
    assert s["history_timestamps"].tolist() == [[10], [10, 20], [20, 20]]
    assert s["sample_id"].tolist() == [0, 1, 2]


# -- Amazon 5-core CSV end to end --------------------------------------------------------------------------------------
def test_5core_csv_default_and_without_price(amazon_dir: Path) -> None:
    raw = pd.read_csv(amazon_dir / BEAUTY_CSV)
    meta = read_lines(amazon_dir / BEAUTY_META)
    assert "average_rating" not in meta and "rating_number" not in meta  # the fixture lacks them: tolerated
    assert meta["title"].str.split().str.len().between(1, 50).all() and not meta["title"].str.contains("[<>]").any()
    priced = set(meta["parent_asin"][meta["price"].notna()])
    for require_price, usable in ((None, priced), (False, set(meta["parent_asin"]))):
        data, stats = run(beauty(amazon_dir, require_price=require_price))
        kept = raw[raw["parent_asin"].isin(usable)]
        n = len(kept) - kept["user_id"].nunique()  # no duplicates in the 5-core file: one sample per non-first row
        assert stats["window"] == ["2018-01-01", "2023-10-01"]  # backed off to Jan 1 of the first year (data 2018-12..)
        assert stats["users"] == kept["user_id"].nunique() and stats["interactions"] == len(kept)
        assert stats["items"] == kept["parent_asin"].nunique() == len(usable)
        assert stats["samples"] == chrono_counts(n)
        assert stats["items_dropped_by_price"] == 356 - len(usable) and stats["items_dropped_by_title"] == 0
        assert stats["require_price"] == (require_price is None) and stats["duplicates_dropped"] == 0
        items = data["items"]
        assert list(items["item_id"]) == list(range(1, len(usable) + 1)) and list(items["item_key"]) == sorted(usable)
        assert all(math.isnan(x) for x in list(items["average_rating"]) + list(items["rating_number"]))
        prices = dict(zip(meta["parent_asin"], meta["price"]))
        for key, price in zip(items["item_key"], items["price"]):
            assert price == prices[key] or (math.isnan(price) and pd.isna(prices[key]))
    assert stats["samples"] == {"train": 1825, "valid": 228, "test": 229}  # the without-price run, for the record


def test_beauty_preset_on_the_official_5core_file(amazon_dir: Path) -> None:
    """configs/data/amazon-beauty/processing.yaml on the official All_Beauty 5-core file: every rating kept, each
    user's last item in test and second last in valid (253 each), the rest in train, as its comments say."""
    import yaml

    preset = yaml.safe_load((Path(__file__).parents[1] / "configs/data/amazon-beauty/processing.yaml").read_text())
    data, stats = run(beauty(amazon_dir, **{k: v for k, v in preset.items() if k not in ("dataset", "data_dir")}))
    assert (stats["users"], stats["items"], stats["interactions"]) == (253, 356, 2535)
    assert stats["samples"] == {"train": 1776, "valid": 253, "test": 253}
    test = data["test"].to_pandas()
    assert test["user_id"].is_unique and len(test) == 253


def test_window_backoff_stops_at_min_items(amazon_dir: Path) -> None:
    raw = pd.read_csv(amazon_dir / BEAUTY_CSV)
    ts = raw["timestamp"] // 1000
    end = pd.Timestamp("2023-10-01", tz="UTC")

    def items_from(start: pd.Timestamp) -> int:
        return raw["parent_asin"][(ts >= start.timestamp()) & (ts < end.timestamp())].nunique()

    start = pd.Timestamp("2022-10-01", tz="UTC")
    while items_from(start) < 40:
        start -= pd.DateOffset(months=3)
    assert start < pd.Timestamp("2022-10-01", tz="UTC")  # the back-off does run
    data, stats = run(beauty(amazon_dir, require_price=False, min_items=40))
    assert stats["window"] == [start.date().isoformat(), "2023-10-01"] and stats["items"] == items_from(start)
    for split in ("train", "valid", "test"):
        for row in data[split]:
            assert start.timestamp() <= min(row["history_timestamps"]) and row["target_timestamp"] < end.timestamp()
    inside, window = apply_window(read_amazon_interactions(amazon_dir / BEAUTY_CSV), ("2022-10-01", "2023-10-01"), 0)
    assert window == ("2022-10-01", "2023-10-01")  # min_items reached at once: no back-off
    assert inside["item_key"].nunique() == items_from(pd.Timestamp("2022-10-01", tz="UTC"))


# -- raw review JSONL --------------------------------------------------------------------------------------------------
def test_raw_reviews_with_real_meta_leave_too_few_samples(amazon_dir: Path) -> None:
    raw = read_lines(amazon_dir / "All_Beauty.raw_reviews.675users.jsonl")
    meta = read_lines(amazon_dir / BEAUTY_META)
    kept = raw[raw["parent_asin"].isin(meta["parent_asin"])].drop_duplicates(["user_id", "parent_asin"])
    n = len(kept) - kept["user_id"].nunique()
    with pytest.raises(DataError, match=rf"split 'train' has 0 of {n} samples.*split_ratios"):
        run(beauty(amazon_dir, "All_Beauty.raw_reviews.675users.jsonl", require_price=False, time_window=None))


def test_raw_reviews_duplicates_and_untitled_items(amazon_dir: Path, tmp_path: Path) -> None:
    """Real review lines with a meta file titling half of the items; the rest have no title, a null title, a tag
    fragment or only an entity, and are dropped with their interactions."""
    raw = read_lines(amazon_dir / "All_Beauty.raw_reviews.675users.jsonl")
    keys = sorted(raw["parent_asin"].unique())
    titled = set(keys[::2])
    untitled = [None, '<span class="a-size-large"', "&nbsp;", "missing"]
    lines = []
    for i, k in enumerate(keys):
        if k in titled:
            lines.append({"parent_asin": k, "title": f"Beauty product {k}", "description": ["Made", "well."]})
        elif untitled[i // 2 % 4] != "missing":
            lines.append({"parent_asin": k, "title": untitled[i // 2 % 4]})
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    data, stats = run(
        beauty(amazon_dir, "All_Beauty.raw_reviews.675users.jsonl", meta, require_price=False, time_window=None,
               window_size=1000)
    )  # fmt: skip
    kept = raw[raw["parent_asin"].isin(titled)].assign(ts=lambda d: d["timestamp"] // 1000)
    first = kept.sort_values(["ts", "parent_asin"], kind="stable").drop_duplicates(["user_id", "parent_asin"])
    assert stats["duplicates_dropped"] == len(kept) - len(first) > 0
    assert stats["items_dropped_by_title"] == len(keys) - len(titled)
    assert stats["interactions"] == len(first) and stats["users"] == first["user_id"].nunique()
    assert stats["samples"] == chrono_counts(len(first) - first["user_id"].nunique())
    # each user's full sequence (last sample's history + target) is the deduplicated one: earliest copy kept
    key_of = dict(zip(list(data["items"]["item_id"]), list(data["items"]["item_key"])))
    assert data["items"]["description"][0] == "Made well."
    last = {}
    for split in ("train", "valid", "test"):
        for row in data[split]:
            if row["user_id"] not in last or row["sample_id"] > last[row["user_id"]]["sample_id"]:
                last[row["user_id"]] = row
    for user, row in last.items():
        seq = first[first["user_id"] == user].sort_values(["ts", "parent_asin"], kind="stable")
        assert [key_of[i] for i in row["history"] + [row["target"]]] == seq["parent_asin"].tolist()
        assert row["history_timestamps"] + [row["target_timestamp"]] == seq["ts"].tolist()
        assert row["history_ratings"] + [row["target_rating"]] == seq["rating"].astype(float).tolist()


# -- Musical Instruments and CDs samples -------------------------------------------------------------------------------
@pytest.mark.parametrize("category", ["Musical_Instruments", "CDs_and_Vinyl"])
def test_category_samples(amazon_dir: Path, category: str) -> None:
    reviews = amazon_dir / f"{category}.sample_reviews.jsonl"
    meta_file = amazon_dir / f"meta_{category}.sample_items.jsonl"
    raw, meta = read_lines(reviews), read_lines(meta_file)
    assert meta["title"].str.split().str.len().between(1, 50).all()
    priced = set(meta["parent_asin"][meta["price"].notna()])
    kept = raw[raw["parent_asin"].isin(priced)]
    cfg = ProcessingConfig(dataset=f"amazon2023:{category}", interactions_path=str(reviews), meta_path=str(meta_file))
    data, stats = run(cfg)
    first_year = pd.Timestamp(int(kept["timestamp"].min()), unit="ms").year
    assert stats["window"] == [f"{first_year}-01-01", "2023-10-01"]
    assert kept["timestamp"].max() < pd.Timestamp("2023-10-01").timestamp() * 1000  # so all kept rows are inside
    assert stats["interactions"] == len(kept) and stats["items"] == kept["parent_asin"].nunique()
    assert stats["samples"] == chrono_counts(len(kept) - kept["user_id"].nunique())
    assert stats["items_dropped_by_price"] == raw["parent_asin"].nunique() - kept["parent_asin"].nunique()
    if category == "Musical_Instruments":  # 26 reviews inside the paper window: min_items=0 keeps just those
        _, narrow = run(ProcessingConfig(**{**cfg.__dict__, "min_items": 0}))
        ts = kept["timestamp"] // 1000
        inside = kept[(ts >= pd.Timestamp("2022-10-01").timestamp()) & (ts < pd.Timestamp("2023-10-01").timestamp())]
        assert narrow["window"] == ["2022-10-01", "2023-10-01"] and narrow["interactions"] == len(inside)
        assert sum(narrow["samples"].values()) == len(inside) - inside["user_id"].nunique()


# -- MovieLens-100K ----------------------------------------------------------------------------------------------------
def test_movielens_processed() -> None:
    data, stats = run(ProcessingConfig(dataset="movielens-100k", time_window=None))
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    assert stats["samples"] == chrono_counts(100000 - 943) and stats["window"] is None
    assert stats["require_price"] is False and stats["items_dropped_by_title"] == 0  # "187", "8 1/2" are titles
    assert max(len(h) for h in data["test"]["history"]) == 20
    assert data["items"][list(data["items"]["item_key"]).index("1")]["title"] == "Toy Story"


# -- splits ------------------------------------------------------------------------------------------------------------
def test_chronological_split_is_ordered_by_time(amazon_dir: Path) -> None:
    data, stats = run(beauty(amazon_dir, require_price=False))
    keys = {s: list(zip(data[s]["target_timestamp"], data[s]["sample_id"])) for s in ("train", "valid", "test")}
    for s in keys:
        assert keys[s] == sorted(keys[s])
    assert keys["train"][-1] <= keys["valid"][0] and keys["valid"][-1] <= keys["test"][0]
    ids = [i for s in keys for _, i in keys[s]]
    assert sorted(ids) == list(range(len(ids)))  # unique over all splits
    assert data["train"].features == processing.SAMPLE_FEATURES


def test_leave_one_out(amazon_dir: Path) -> None:
    data, stats = run(beauty(amazon_dir, require_price=False, split="leave_one_out"))
    rows = pd.concat([data[s].to_pandas().assign(split=s) for s in ("train", "valid", "test")])
    users = rows["user_id"].nunique()
    assert stats["samples"]["test"] == users and stats["samples"]["valid"] == users  # every 5-core user has ≥ 3 items
    order = rows.sort_values("sample_id").groupby("user_id")["split"].apply(list)
    assert all(s[-1] == "test" and s[-2] == "valid" and set(s[:-2]) <= {"train"} for s in order)
    # sample ids follow users sorted by id, then position
    first_ids = rows.groupby("user_id")["sample_id"].min().sort_index()
    assert first_ids.is_monotonic_increasing


# -- bad settings and empty results ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"split_ratios": (0.5, 0.3, 0.3)}, "split_ratios: need three non-negative fractions"),
        ({"split_ratios": (0.0, 0.5, 0.5)}, "split_ratios"),
        ({"split": "random"}, "processing.split: must be"),
        ({"time_window": ("2022-13-01", "2023-10-01")}, r"'2022-13-01' is not a date"),
        ({"time_window": ("last year", "2023-10-01")}, r"'last year' is not a date"),
        ({"time_window": ("2023-10-01", "2022-10-01")}, "is not before end"),
        ({"window_size": 0}, "window_size: must be"),
        ({"dataset": "amazon2023:"}, "unknown Amazon Reviews 2023 category"),
    ],
)
def test_bad_settings(kw: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        ProcessingConfig(**kw)


def test_empty_results_name_the_filter(amazon_dir: Path) -> None:
    with pytest.raises(DataError, match=r"require_price=true kept 0 of 60 items; set require_price: false"):
        run(ProcessingConfig(dataset="synthetic", require_price=True))
    with pytest.raises(DataError, match=r"title filter kept 0 of 356 items"):  # meta of another category
        run(beauty(amazon_dir, meta="meta_CDs_and_Vinyl.sample_items.jsonl", require_price=False))
    with pytest.raises(DataError, match=r"time_window=\['2030-01-01', '2031-01-01'\] kept 0 of 2535 .*2018-12-13"):
        run(beauty(amazon_dir, require_price=False, time_window=("2030-01-01", "2031-01-01"), min_items=0))
    with pytest.raises(DataError, match=r"k_core=1000 removed every interaction; lower processing.k_core"):
        run(beauty(amazon_dir, require_price=False, k_core=1000))
    with pytest.raises(DataError, match=r"split 'valid' has 0 of \d+ samples"):
        run(ProcessingConfig(dataset="synthetic", split_ratios=(0.95, 0.0, 0.05)))


def test_k_core(amazon_dir: Path) -> None:
    _, stats = run(beauty(amazon_dir, require_price=False, k_core=5))
    assert stats["interactions"] == 2535  # the official 5-core file is already 5-core
    raw = pd.read_csv(amazon_dir / BEAUTY_CSV)
    meta = read_lines(amazon_dir / BEAUTY_META)
    core = raw[raw["parent_asin"].isin(meta["parent_asin"][meta["price"].notna()])]
    while True:  # iterative 3-core of the priced items' interactions
        small = core["user_id"].map(core["user_id"].value_counts()).lt(3) | core["parent_asin"].map(
            core["parent_asin"].value_counts()
        ).lt(3)
        if not small.any():
            break
        core = core[~small]
    _, stats = run(beauty(amazon_dir, k_core=3))
    assert 0 < stats["interactions"] == len(core) < 413
    assert (stats["users"], stats["items"]) == (core["user_id"].nunique(), core["parent_asin"].nunique())


# -- cache -------------------------------------------------------------------------------------------------------------
def test_fingerprint() -> None:
    a = ProcessingConfig(dataset="synthetic")
    assert a.fingerprint() == ProcessingConfig(dataset="synthetic").fingerprint() and len(a.fingerprint()) == 16
    assert a.fingerprint() != ProcessingConfig(dataset="synthetic", window_size=10).fingerprint()
    assert a.fingerprint() == ProcessingConfig(dataset="synthetic", download=True).fingerprint()
    listed = ProcessingConfig(dataset="synthetic", time_window=["2022-10-01", "2023-10-01"])  # as YAML gives it
    assert listed.time_window == ("2022-10-01", "2023-10-01") and listed.fingerprint() == a.fingerprint()


def test_cache_reuse_and_half_written_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ProcessingConfig(dataset="synthetic", synthetic_users=40)
    fp = cfg.fingerprint()
    junk_tmp = tmp_path / f".{fp}.tmp-crashed"  # a crashed build's temp folder, even with a stats.json
    junk_tmp.mkdir(parents=True)
    (junk_tmp / "stats.json").write_text('{"users": -1}')
    (tmp_path / fp).mkdir()  # an incomplete final folder (no stats.json)
    (tmp_path / fp / "dataset_dict.json").write_text("garbage")
    data, path = build_dataset(cfg, tmp_path)
    expected, stats = run(cfg)
    assert path == tmp_path / fp and load_stats(path) == stats
    assert json.loads((path / "config.json").read_text())["synthetic_users"] == 40
    assert list(data["train"]["sample_id"]) == list(expected["train"]["sample_id"])
    assert list(data["items"]["title"]) == list(expected["items"]["title"])

    def no_source(cfg: ProcessingConfig) -> None:
        raise AssertionError("load_source called although the cache is complete")

    monkeypatch.setattr(processing, "load_source", no_source)
    again, path2 = build_dataset(cfg, tmp_path)
    assert path2 == path and list(again["test"]["target"]) == list(data["test"]["target"])


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ProcessingConfig(dataset="synthetic", synthetic_users=20)

    def broken(self, *args, **kwargs) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", broken)
    with pytest.raises(OSError, match="disk full"):
        build_dataset(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []
