"""Readers of raw recommendation data into two pandas tables (METHOD.md §2).

Interactions: `user_id` (str), `item_key` (str), `rating` (float), `timestamp` (int, seconds since the epoch, UTC).
Items: `item_key`, `title`, `description` (str, "" when absent), `price`, `average_rating`, `rating_number`
(float, NaN when absent or not a number). Strings are returned as found; `processing.clean_text` cleans them.

Sources: Amazon Reviews 2023 (official 5-core `rating_only` CSV or raw review JSONL, plus the meta JSONL; laid out like
the official Hugging Face dataset repository, or given as explicit paths, or downloaded), MovieLens-100K (the files
packaged in the `recbole==1.2.1` wheel, read by path). The column lists are in `minirec.schema`; the synthetic
generator is `minirec.synthetic`; `minirec.processing.load_source` picks the reader of a config.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from minirec.io import ConfigError, DataError, iter_jsonl, open_text
from minirec.schema import ITEM_COLUMNS

AMAZON_REPO = "McAuley-Lab/Amazon-Reviews-2023"
# Every category of the official repository (raw/review_categories/<Category>.jsonl).
AMAZON_CATEGORIES = (
    "All_Beauty", "Amazon_Fashion", "Appliances", "Arts_Crafts_and_Sewing", "Automotive", "Baby_Products",
    "Beauty_and_Personal_Care", "Books", "CDs_and_Vinyl", "Cell_Phones_and_Accessories", "Clothing_Shoes_and_Jewelry",
    "Digital_Music", "Electronics", "Gift_Cards", "Grocery_and_Gourmet_Food", "Handmade_Products",
    "Health_and_Household", "Health_and_Personal_Care", "Home_and_Kitchen", "Industrial_and_Scientific",
    "Kindle_Store", "Magazine_Subscriptions", "Movies_and_TV", "Musical_Instruments", "Office_Products",
    "Patio_Lawn_and_Garden", "Pet_Supplies", "Software", "Sports_and_Outdoors", "Subscription_Boxes",
    "Tools_and_Home_Improvement", "Toys_and_Games", "Unknown", "Video_Games",
)  # fmt: skip
# Categories for which the official repository has no benchmark/5core/rating_only file (raw reviews are used).
AMAZON_NO_5CORE = frozenset(
    {"Amazon_Fashion", "Appliances", "Digital_Music", "Handmade_Products", "Health_and_Personal_Care",
     "Subscription_Boxes"}
)
_REQUIRED = ("user_id", "parent_asin", "rating", "timestamp")


# -- small parsers -----------------------------------------------------------------------------------------------------
def to_float(value: Any) -> float:
    """A finite number (int, float or numeric string) as float; anything else (None, "from 9.99", bool) -> NaN."""
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return math.nan
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return math.nan


def _text(value: Any) -> str:
    """A string field: str as is, list of paragraphs joined with " " in order, anything else -> ""."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(v for v in value if isinstance(v, str))
    return ""


def _read_table(path: Path, sep: str) -> pd.DataFrame:
    """A delimited text file with a header as all-string columns (original line i+2 is row i; blank rows dropped)."""
    try:
        with open_text(path) as f:
            df = pd.read_csv(
                f, sep=sep, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False,
                quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE,
            )  # fmt: skip
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (expected a header line)") from None
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: malformed table ({str(e).strip()})") from None
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable file ({e})") from None
    if not isinstance(df.index, pd.RangeIndex):  # pandas takes extra leading fields of line 2 as an index
        raise DataError(f"{path}:2: more fields than the {len(df.columns)} of the header")
    blank = (df == "").all(axis=1)
    return df[~blank]


def _require_columns(df: pd.DataFrame, path: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if name not in df.columns:
            found = ", ".join(map(str, df.columns))
            raise DataError(f"{path}:1: field '{name}' missing from the header (found {found})")


def _checked_strings(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    bad = df[col].str.strip() == ""
    if bad.any():
        raise DataError(f"{path}:{int(bad.idxmax()) + 2}: field '{col}' is empty")
    return df[col]


def _checked_numbers(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = ~np.isfinite(values.to_numpy(dtype="float64"))
    if bad.any():
        i = df.index[bad.argmax()]
        raise DataError(f"{path}:{int(i) + 2}: field '{col}' is not a number ({df[col][i]!r})")
    return values


def _interactions(user_id, item_key, rating, timestamp) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.Series(user_id, dtype=object).astype(str).to_numpy(),
            "item_key": pd.Series(item_key, dtype=object).astype(str).to_numpy(),
            "rating": pd.Series(rating, dtype="float64").to_numpy(),
            "timestamp": pd.Series(timestamp, dtype="int64").to_numpy(),
        }
    )


# -- Amazon Reviews 2023 -----------------------------------------------------------------------------------------------
def read_amazon_interactions(path: str | os.PathLike) -> pd.DataFrame:
    """Official 5-core rating_only CSV (`.csv`/`.csv.gz`) or raw review JSONL (`.jsonl`/`.jsonl.gz`) -> interactions.

    Timestamps are converted from milliseconds to seconds (floor).
    """
    path = Path(path)
    name = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    if name.endswith(".csv"):
        df = _read_table(path, ",")
        _require_columns(df, path, _REQUIRED)
        users, items = _checked_strings(df, "user_id", path), _checked_strings(df, "parent_asin", path)
        rating, ts = _checked_numbers(df, "rating", path), _checked_numbers(df, "timestamp", path)
        return _interactions(users, items, rating, ts.astype("int64") // 1000)
    if name.endswith(".jsonl"):
        cols: dict[str, list] = {k: [] for k in _REQUIRED}
        for lineno, rec in iter_jsonl(path):
            for key in _REQUIRED:
                if key not in rec or rec[key] is None:
                    raise DataError(f"{path}:{lineno}: field '{key}' missing")
            for key in ("user_id", "parent_asin"):
                if not isinstance(rec[key], str) or not rec[key].strip():
                    raise DataError(f"{path}:{lineno}: field '{key}' must be a non-empty string, got {rec[key]!r}")
            for key in ("rating", "timestamp"):
                if math.isnan(to_float(rec[key])):
                    raise DataError(f"{path}:{lineno}: field '{key}' is not a number ({rec[key]!r})")
                cols[key].append(to_float(rec[key]))
            cols["user_id"].append(rec["user_id"])
            cols["parent_asin"].append(rec["parent_asin"])
        ts = [int(t) // 1000 for t in cols["timestamp"]]
        return _interactions(cols["user_id"], cols["parent_asin"], cols["rating"], ts)
    raise DataError(f"{path}: unsupported interactions file; expected .csv, .csv.gz, .jsonl or .jsonl.gz")


def read_amazon_meta(path: str | os.PathLike) -> pd.DataFrame:
    """Meta JSONL -> items. Only `parent_asin` is required; the first record of a repeated `parent_asin` wins."""
    path = Path(path)
    rows: dict[str, tuple] = {}
    for lineno, rec in iter_jsonl(path):
        key = rec.get("parent_asin")
        if not isinstance(key, str) or not key.strip():
            raise DataError(f"{path}:{lineno}: field 'parent_asin' missing or not a non-empty string")
        if key not in rows:
            rows[key] = (
                key,
                _text(rec.get("title")),
                _text(rec.get("description")),
                to_float(rec.get("price")),
                to_float(rec.get("average_rating")),
                to_float(rec.get("rating_number")),
            )
    return pd.DataFrame(list(rows.values()), columns=ITEM_COLUMNS).astype(
        {"price": "float64", "average_rating": "float64", "rating_number": "float64"}
    )


def amazon_category(dataset: str) -> str:
    """`amazon2023:<Category>` -> the category; an unknown one raises DataError listing the valid names."""
    category = dataset.split(":", 1)[1]
    if category not in AMAZON_CATEGORIES:
        raise DataError(
            f"processing.dataset: unknown Amazon Reviews 2023 category {category!r}; "
            f"valid: {', '.join(AMAZON_CATEGORIES)}"
        )
    return category


def _official_files(category: str) -> tuple[str, str]:
    """Official repository paths (interactions, meta) of a category."""
    if category in AMAZON_NO_5CORE:
        reviews = f"raw/review_categories/{category}.jsonl"
    else:
        reviews = f"benchmark/5core/rating_only/{category}.csv"
    return reviews, f"raw/meta_categories/meta_{category}.jsonl"


def _find(data_dir: Path | None, candidates: list[str]) -> Path | None:
    if data_dir is None:
        return None
    for rel in candidates:
        for suffix in ("", ".gz"):
            if (data_dir / (rel + suffix)).is_file():
                return data_dir / (rel + suffix)
    return None


def amazon_paths(
    category: str,
    data_dir: str | os.PathLike | None = None,
    interactions_path: str | os.PathLike | None = None,
    meta_path: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[Path, Path]:
    """(interactions file, meta file) of a category.

    Explicit paths win. Otherwise `data_dir` is searched in the official layout: the 5-core rating_only CSV first, then
    the raw review JSONL, each plain or gzipped; meta `raw/meta_categories/meta_<Category>.jsonl(.gz)`. Missing files
    are fetched from the official dataset repository with `download=True`; otherwise one DataError names what to put
    where.
    """
    amazon_category(f"amazon2023:{category}")
    root = Path(data_dir) if data_dir is not None else None
    official_reviews, official_meta = _official_files(category)
    found: dict[str, Path | None] = {}
    for field, given, candidates in (
        ("interactions_path", interactions_path,
         [f"benchmark/5core/rating_only/{category}.csv", f"raw/review_categories/{category}.jsonl"]),
        ("meta_path", meta_path, [official_meta]),
    ):  # fmt: skip
        if given is not None:
            if not Path(given).is_file():
                raise ConfigError(f"processing.{field}: file not found: {given}")
            found[field] = Path(given)
        else:
            found[field] = _find(root, candidates)
    wanted = {
        field: rel for field, rel in (("interactions_path", official_reviews), ("meta_path", official_meta))
        if found[field] is None
    }  # fmt: skip
    if not wanted:
        return found["interactions_path"], found["meta_path"]
    failure = ""
    if download:
        try:
            from huggingface_hub import hf_hub_download

            for field, rel in wanted.items():
                found[field] = Path(
                    hf_hub_download(AMAZON_REPO, rel, repo_type="dataset", local_dir=str(root) if root else None)
                )
            return found["interactions_path"], found["meta_path"]
        except Exception as e:  # network, offline mode, missing file upstream: all end in the same instructions
            failure = f" Download failed ({type(e).__name__}: {str(e).strip().rstrip('.')})."
    where = f"processing.data_dir ({root.resolve()})" if root else "a folder set as processing.data_dir"
    names = []
    if "interactions_path" in wanted:
        alt = "" if category in AMAZON_NO_5CORE else f" (or raw/review_categories/{category}.jsonl)"
        names.append(f"interactions {wanted['interactions_path']}{alt}")
    if "meta_path" in wanted:
        names.append(f"meta {wanted['meta_path']}")
    raise DataError(
        f"Amazon Reviews 2023 {category}: not found: {'; '.join(names)}. Place these official files of the Hugging "
        f"Face dataset {AMAZON_REPO} under {where} with the same relative paths (.gz copies are read too), or set "
        f"processing.interactions_path / processing.meta_path, or set processing.download: true to fetch them when "
        f"online.{failure}"
    )


# -- MovieLens-100K ----------------------------------------------------------------------------------------------------
def movielens_folder() -> Path:
    """The ml-100k folder inside the installed recbole wheel (its files are read by path; recbole is never imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "MovieLens-100K: the recbole==1.2.1 wheel is not installed (pip install --no-deps recbole==1.2.1, as "
            "scripts/setup.sh does), or set processing.data_dir to a folder with ml-100k.inter and ml-100k.item"
        )
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"


def _read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab separated, header fields `name:type` -> columns named `name`."""
    df = _read_table(path, "\t")
    df.columns = [str(c).split(":", 1)[0] for c in df.columns]
    return df


def read_movielens_100k(folder: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MovieLens-100K (RecBole atomic files ml-100k.inter / ml-100k.item) -> (interactions, items).

    Item description from what exists: "Released 1995. Genres: Animation, Children's, Comedy."; no prices; no
    average rating / count (computing them from the interactions would leak the test targets).
    """
    folder = Path(folder) if folder is not None else movielens_folder()
    inter = _read_atomic(folder / "ml-100k.inter")
    _require_columns(inter, folder / "ml-100k.inter", ("user_id", "item_id", "rating", "timestamp"))
    path = folder / "ml-100k.inter"
    interactions = _interactions(
        _checked_strings(inter, "user_id", path),
        _checked_strings(inter, "item_id", path),
        _checked_numbers(inter, "rating", path),
        _checked_numbers(inter, "timestamp", path).astype("int64"),
    )
    if interactions.empty:
        raise DataError(f"no interactions in {path}")
    item = _read_atomic(folder / "ml-100k.item")
    _require_columns(item, folder / "ml-100k.item", ("item_id", "movie_title"))
    _checked_strings(item, "item_id", folder / "ml-100k.item")
    descriptions = []
    for year, genres in zip(item.get("release_year", [""] * len(item)), item.get("class", [""] * len(item))):
        parts = [f"Released {year}."] if year.isdigit() else []
        names = [g for g in genres.split() if g.lower() != "unknown"]
        if names:
            parts.append(f"Genres: {', '.join(names)}.")
        descriptions.append(" ".join(parts))
    items = pd.DataFrame(
        {
            "item_key": item["item_id"].to_numpy(),
            "title": item["movie_title"].to_numpy(),
            "description": descriptions,
            "price": math.nan,
            "average_rating": math.nan,
            "rating_number": math.nan,
        },
        columns=ITEM_COLUMNS,
    ).drop_duplicates("item_key")
    return interactions, items.reset_index(drop=True)
