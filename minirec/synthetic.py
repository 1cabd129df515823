"""A small synthetic dataset with planted preferences, for tests and demos only (never a default).

Items belong to a few genres and their titles and descriptions name the genre ("Jazz album 7"). Each user prefers one
genre and buys from it with probability `loyalty` (otherwise from another genre), never the same item twice, at
increasing times inside the default processing window (2023). So the titles of a user's history reveal the genre of
the target: a tiny LLM can learn it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from minirec.io import ConfigError
from minirec.schema import INTERACTION_COLUMNS, ITEM_COLUMNS

GENRES = ("Jazz", "Rock", "Classical", "Country")
START = 1672531200  # 2023-01-01 00:00:00 UTC, inside the default time window


def genre_of(item_index: int) -> str:
    """Genre of item `item_index` (0-based; items are dealt round-robin over the genres)."""
    return GENRES[item_index % len(GENRES)]


def make_synthetic(
    num_users: int, num_items: int, seed: int, loyalty: float = 0.9, min_len: int = 5, max_len: int = 10
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, items) with the columns of `minirec.sources`; deterministic for a seed.

    Each user has `min_len..max_len` interactions (capped by the catalogue), a favourite genre (users are spread evenly
    over genres), ratings 4-5 for favourite-genre items and 1-3 otherwise, timestamps strictly increasing.
    """
    if num_users < 1:
        raise ConfigError(f"processing.synthetic_users must be ≥ 1, got {num_users}")
    if num_items < 2 * len(GENRES):
        raise ConfigError(f"processing.synthetic_items must be ≥ {2 * len(GENRES)} (two per genre), got {num_items}")
    rng = np.random.default_rng(seed)
    keys = [f"SYN{i:05d}" for i in range(num_items)]
    by_genre = {g: [i for i in range(num_items) if genre_of(i) == g] for g in GENRES}
    items = pd.DataFrame(
        [
            (
                keys[i],
                f"{genre_of(i)} album {i // len(GENRES) + 1}",
                f"A {genre_of(i).lower()} music album: number {i // len(GENRES) + 1} in our {genre_of(i).lower()} "
                f"collection, for listeners who love {genre_of(i).lower()}.",
                math.nan,
                math.nan,
                math.nan,
            )
            for i in range(num_items)
        ],
        columns=ITEM_COLUMNS,
    )
    rows = []
    for u in range(num_users):
        favourite = GENRES[u % len(GENRES)]
        others = [i for g in GENRES if g != favourite for i in by_genre[g]]
        fav_pool = list(rng.permutation(by_genre[favourite]))
        other_pool = list(rng.permutation(others))
        length = int(rng.integers(min_len, max_len + 1))
        t = START + int(rng.integers(0, 30 * 86400))
        for _ in range(length):
            if not fav_pool and not other_pool:
                break
            use_fav = bool(fav_pool) and (not other_pool or rng.random() < loyalty)
            i = int(fav_pool.pop() if use_fav else other_pool.pop())
            rating = float(rng.integers(4, 6) if use_fav else rng.integers(1, 4))
            rows.append((f"U{u:05d}", keys[i], rating, t))
            t += int(rng.integers(3600, 7 * 86400))
    return pd.DataFrame(rows, columns=INTERACTION_COLUMNS), items
