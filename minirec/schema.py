"""The raw-table schema every source produces (Amazon 2023, MovieLens-100K, synthetic) and processing consumes."""

INTERACTION_COLUMNS = ["user_id", "item_key", "rating", "timestamp"]
"""Interactions: one row per (user, item, rating, unix-seconds timestamp)."""

ITEM_COLUMNS = ["item_key", "title", "description", "price", "average_rating", "rating_number"]
"""Items: one row per item key with its text and metadata (NaN where a source has none)."""
