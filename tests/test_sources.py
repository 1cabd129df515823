"""Readers of the real Amazon Reviews 2023 fixture files and MovieLens-100K, and every bad input they must reject."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from minirec.io import DataError
from minirec.processing import ProcessingConfig, load_source
from minirec.schema import INTERACTION_COLUMNS, ITEM_COLUMNS
from minirec.sources import (
    AMAZON_CATEGORIES,
    amazon_paths,
    read_amazon_interactions,
    read_amazon_meta,
    read_movielens_100k,
)


def test_official_category_list_matches_checksums(amazon_dir: Path) -> None:
    listed = {
        line.split("\t")[0].split("/")[-1][: -len(".jsonl")]
        for line in (amazon_dir / "official_file_checksums.tsv").read_text().splitlines()
        if line.startswith("raw/review_categories/")
    }
    assert set(AMAZON_CATEGORIES) == listed and len(AMAZON_CATEGORIES) == 34


def test_5core_csv(amazon_dir: Path) -> None:
    df = read_amazon_interactions(amazon_dir / "All_Beauty.5core_rating_only.csv.gz")
    raw = pd.read_csv(amazon_dir / "All_Beauty.5core_rating_only.csv.gz")
    assert list(df.columns) == INTERACTION_COLUMNS and len(df) == 2535
    assert df["user_id"].nunique() == 253 and df["item_key"].nunique() == 356
    assert df["timestamp"].dtype == "int64" and df["rating"].dtype == "float64"
    assert (df["timestamp"].to_numpy() == raw["timestamp"].to_numpy() // 1000).all()  # ms -> s
    assert (df["item_key"].to_numpy() == raw["parent_asin"].to_numpy()).all()


def test_raw_review_jsonl(amazon_dir: Path) -> None:
    path = amazon_dir / "All_Beauty.raw_reviews.675users.jsonl"
    df = read_amazon_interactions(path)
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(df) == len(lines) == 4060
    assert df["user_id"].nunique() == 675 and df["item_key"].nunique() == 3208
    assert df["timestamp"].tolist() == [r["timestamp"] // 1000 for r in lines]
    assert df.duplicated(["user_id", "item_key"]).sum() == 540  # kept here; processing drops them


def test_meta_tolerates_missing_fields(amazon_dir: Path) -> None:
    items = read_amazon_meta(amazon_dir / "meta_All_Beauty.5core_items.jsonl")
    assert list(items.columns) == ITEM_COLUMNS and len(items) == 356
    assert items["price"].notna().sum() == 57
    assert items["average_rating"].isna().all() and items["rating_number"].isna().all()
    assert (items["title"].str.len() > 0).all()
    mi = read_amazon_meta(amazon_dir / "meta_Musical_Instruments.sample_items.jsonl")
    assert len(mi) == 149 and (mi["description"] == "").all()


def test_meta_field_parsing(tmp_path: Path) -> None:
    path = tmp_path / "meta.jsonl"
    records = [
        {"parent_asin": "A1", "title": "One", "description": ["First para.", "Second para."], "price": "from 9.99",
         "average_rating": 4.5, "rating_number": 12},
        {"parent_asin": "A2", "price": None, "description": "plain"},
        {"parent_asin": "A3", "title": "Three", "price": "12.50", "average_rating": "n/a"},
        {"parent_asin": "A1", "title": "duplicate line loses"},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    items = read_amazon_meta(path).set_index("item_key")
    assert items.loc["A1", "description"] == "First para. Second para."
    assert math.isnan(items.loc["A1", "price"]) and items.loc["A1", "average_rating"] == 4.5
    assert items.loc["A1", "rating_number"] == 12.0 and items.loc["A1", "title"] == "One"
    assert items.loc["A2", "title"] == "" and items.loc["A2", "description"] == "plain"
    assert items.loc["A3", "price"] == 12.5 and math.isnan(items.loc["A3", "average_rating"])
    assert len(items) == 3


def test_movielens_from_wheel() -> None:
    inter, items = read_movielens_100k()
    assert len(inter) == 100000 and inter["user_id"].nunique() == 943 and inter["item_key"].nunique() == 1682
    assert len(items) == 1682 and items["price"].isna().all() and items["average_rating"].isna().all()
    toy = items.set_index("item_key").loc["1"]
    assert toy["title"] == "Toy Story"
    assert toy["description"] == "Released 1995. Genres: Animation, Children's, Comedy."
    assert items.set_index("item_key").loc["267", "description"] == ""  # year and genre unknown: nothing to say
    _, _, has_price = load_source(ProcessingConfig())
    assert has_price is False


def _layout(root: Path, amazon_dir: Path) -> None:
    """Symlink the fixtures into the official repository layout (nothing is copied)."""
    (root / "benchmark/5core/rating_only").mkdir(parents=True)
    (root / "raw/meta_categories").mkdir(parents=True)
    (root / "benchmark/5core/rating_only/All_Beauty.csv.gz").symlink_to(
        amazon_dir / "All_Beauty.5core_rating_only.csv.gz"
    )
    (root / "raw/meta_categories/meta_All_Beauty.jsonl").symlink_to(amazon_dir / "meta_All_Beauty.5core_items.jsonl")


def test_amazon_paths_official_layout(tmp_path: Path, amazon_dir: Path) -> None:
    _layout(tmp_path, amazon_dir)
    inter, meta = amazon_paths("All_Beauty", data_dir=tmp_path)
    assert inter == tmp_path / "benchmark/5core/rating_only/All_Beauty.csv.gz"
    assert meta == tmp_path / "raw/meta_categories/meta_All_Beauty.jsonl"
    # raw reviews are the fallback when there is no 5-core file; explicit paths win
    (tmp_path / "raw/review_categories").mkdir()
    raw_reviews = amazon_dir / "All_Beauty.raw_reviews.675users.jsonl"
    (tmp_path / "raw/review_categories/All_Beauty.jsonl").symlink_to(raw_reviews)
    (tmp_path / "benchmark/5core/rating_only/All_Beauty.csv.gz").unlink()
    assert amazon_paths("All_Beauty", data_dir=tmp_path)[0] == tmp_path / "raw/review_categories/All_Beauty.jsonl"
    explicit = amazon_dir / "All_Beauty.5core_rating_only.csv.gz"
    assert amazon_paths("All_Beauty", data_dir=tmp_path, interactions_path=explicit)[0] == explicit
    cfg = ProcessingConfig(dataset="amazon2023:All_Beauty", data_dir=str(tmp_path))
    inter_df, items_df, has_price = load_source(cfg)
    assert len(inter_df) == 4060 and len(items_df) == 356 and has_price is True


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_malformed_json_line(tmp_path: Path) -> None:
    path = tmp_path / "reviews.jsonl"
    path.write_text('{"user_id": "u", "parent_asin": "a", "rating": 5, "timestamp": 1000}\n{"user_id": "u",\n')
    with pytest.raises(DataError, match=r"reviews\.jsonl:2: malformed JSON"):
        read_amazon_interactions(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"parent_asin": "a", "rating": 5, "timestamp": 1000}, "field 'user_id' missing"),
        ({"user_id": "u", "parent_asin": "a", "rating": 5}, "field 'timestamp' missing"),
        ({"user_id": "u", "parent_asin": "a", "rating": "five", "timestamp": 1000}, "field 'rating' is not a number"),
        ({"user_id": "", "parent_asin": "a", "rating": 5, "timestamp": 1000}, "field 'user_id' must be a non-empty"),
    ],
)
def test_review_missing_or_bad_field(tmp_path: Path, record: dict, message: str) -> None:
    path = tmp_path / "reviews.jsonl"
    good = {"user_id": "u", "parent_asin": "b", "rating": 4, "timestamp": 999}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"reviews\.jsonl:2: {message}"):
        read_amazon_interactions(path)


def test_csv_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("user_id,parent_asin,rating,timestamp\nu1,a,5.0,1000\n\nu2,b,x,2000\n")
    with pytest.raises(DataError, match=r"r\.csv:4: field 'rating' is not a number \('x'\)"):
        read_amazon_interactions(path)
    path.write_text("user_id,item,rating,timestamp\nu1,a,5.0,1000\n")
    with pytest.raises(DataError, match=r"r\.csv:1: field 'parent_asin' missing from the header"):
        read_amazon_interactions(path)
    path.write_text("user_id,parent_asin,rating,timestamp\nu1,a,5.0,1000,extra,more\n")
    with pytest.raises(DataError, match=r"r\.csv:2: more fields than the 4 of the header"):
        read_amazon_interactions(path)
    path.write_text("user_id,parent_asin,rating,timestamp\nu1,a,5.0,1000\nu2,b,4.0,2000,extra\n")
    with pytest.raises(DataError, match=r"r\.csv: malformed table \(.*line 3"):
        read_amazon_interactions(path)
    path.write_text("user_id,parent_asin,rating,timestamp\nu1,a,5.0,1000\nu2,b,4.0\n")
    with pytest.raises(DataError, match=r"r\.csv:3: field 'timestamp' is not a number"):
        read_amazon_interactions(path)


def test_meta_missing_parent_asin(tmp_path: Path) -> None:
    path = tmp_path / "meta.jsonl"
    path.write_text('{"parent_asin": "A", "title": "t"}\n{"title": "no key"}\n')
    with pytest.raises(DataError, match=r"meta\.jsonl:2: field 'parent_asin'"):
        read_amazon_meta(path)


@pytest.mark.parametrize("name", ["reviews.csv.gz", "reviews.jsonl.gz", "meta.jsonl.gz"])
def test_unreadable_gzip(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not gzip data at all\n")
    reader = read_amazon_meta if name.startswith("meta") else read_amazon_interactions
    with pytest.raises(DataError, match="unreadable file"):
        reader(path)


def test_truncated_gzip(tmp_path: Path, amazon_dir: Path) -> None:
    data = gzip.compress(b"user_id,parent_asin,rating,timestamp\n" + b"u,a,5.0,1000\n" * 2000)
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable file"):
        read_amazon_interactions(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "reviews.parquet"
    path.write_text("x")
    with pytest.raises(DataError, match="unsupported interactions file"):
        read_amazon_interactions(path)


def test_unknown_category_and_dataset() -> None:
    with pytest.raises(DataError, match=r"unknown Amazon Reviews 2023 category 'Beauty'.*All_Beauty.*Video_Games"):
        ProcessingConfig(dataset="amazon2023:Beauty")
    with pytest.raises(DataError, match="category 'Beauty'"):
        amazon_paths("Beauty")
    with pytest.raises(DataError, match=r"unknown dataset 'ml-1m'.*movielens-100k"):
        ProcessingConfig(dataset="ml-1m")


def test_missing_files_offline(tmp_path: Path) -> None:
    for download in (False, True):  # tests run with HF_HUB_OFFLINE=1: the download attempt fails the same way
        with pytest.raises(DataError) as err:
            amazon_paths("CDs_and_Vinyl", data_dir=tmp_path, download=download)
        msg = str(err.value)
        assert "benchmark/5core/rating_only/CDs_and_Vinyl.csv" in msg
        assert "raw/meta_categories/meta_CDs_and_Vinyl.jsonl" in msg
        assert str(tmp_path) in msg and "download: true" in msg and "McAuley-Lab/Amazon-Reviews-2023" in msg
        assert ("failed" in msg) == download
    with pytest.raises(DataError, match=r"raw/review_categories/Digital_Music\.jsonl"):  # no official 5-core file
        amazon_paths("Digital_Music", data_dir=tmp_path)
    with pytest.raises(DataError, match="processing.meta_path: file not found"):
        amazon_paths("All_Beauty", data_dir=tmp_path, meta_path=tmp_path / "nope.jsonl")


def test_movielens_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"ml-100k\.inter: file not found"):
        read_movielens_100k(tmp_path)
