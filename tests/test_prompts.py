"""Prompt templates: history lines, truncation to the token budget, item prompts, template validation."""

from __future__ import annotations

import math

import pytest

from minirec.io import DataError
from minirec.models import load_tokenizer
from minirec.prompts import PromptBuilder, PromptConfig, history_lines, humanize_seconds, item_fields, item_text


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-random-qwen2")


def test_humanize_seconds() -> None:
    assert humanize_seconds(1) == "1 second"
    assert humanize_seconds(59) == "59 seconds"
    assert humanize_seconds(2 * 3600 + 5) == "2 hours"
    assert humanize_seconds(86400) == "1 day"
    assert humanize_seconds(40 * 86400) == "1 month"
    assert humanize_seconds(800 * 86400) == "2 years"


def test_history_lines_are_relative_to_the_target_time() -> None:
    lines = history_lines(["Old", "New"], [4.0, 3.5], [1000, 1000 + 86400 * 3], 1000 + 86400 * 5)
    assert lines == ["5 days ago: [Old] rated 4/5", "2 days ago: [New] rated 3.5/5"]


def test_user_prompt_shows_last_window_and_truncates_oldest_first(tokenizer) -> None:
    titles = [f"Title number {i}" for i in range(8)]
    ratings, times = [5.0] * 8, list(range(8))
    builder = PromptBuilder(PromptConfig(prompt_window=5), tokenizer)
    text = tokenizer.decode(builder.user_prompt_ids(titles, ratings, times, 100))
    assert "[Title number 7]" in text and "[Title number 3]" in text and "[Title number 2]" not in text
    assert text.rstrip().endswith("assistant")  # generation prompt added by the chat template

    full = len(builder.user_prompt_ids(titles, ratings, times, 100))
    tight = PromptBuilder(PromptConfig(prompt_window=5, max_prompt_tokens=full - 5), tokenizer)
    ids = tight.user_prompt_ids(titles, ratings, times, 100)
    text = tokenizer.decode(ids)
    assert len(ids) <= full - 5
    assert "[Title number 7]" in text and "[Title number 3]" not in text  # oldest line dropped, newest kept


def test_item_prompt_uses_what_exists_and_ends_with_marker(tokenizer) -> None:
    cfg = PromptConfig(description_words=3)
    fields = item_fields(cfg, "Abbey Road", 4.75, 1200.0, "one two three four five")
    assert fields == "Title: Abbey Road\nUser Rating: 4.8\nNumber of Buyers: 1200\nDescription: one two three"
    assert item_fields(cfg, "Toy Story", math.nan, None, "") == "Title: Toy Story"
    assert item_text(cfg, "Title: X") == "Summarise the key features of this movie for a recommender system.\nTitle: X"
    builder = PromptBuilder(cfg, tokenizer)
    ids = builder.item_prompt_ids("Abbey Road", 4.75, 1200.0, "one two three")
    assert ids[-len(builder.marker_ids):] == builder.marker_ids


# The SmolLM2 chat template's end of the user turn and generation prompt, then the marker.
TAIL = "<|im_end|>\n<|im_start|>assistant\n<answer>"


def test_long_item_prompt_loses_field_words_never_the_template(tokenizer) -> None:
    """Too long an item prompt is cut in its field text (the description's end first), so it still ends with the end
    of turn, generation prompt and marker, like a short one, within `max_item_tokens`."""
    tail = tokenizer(TAIL, add_special_tokens=False)["input_ids"]
    builder = PromptBuilder(PromptConfig(max_item_tokens=80), tokenizer)
    short = builder.item_prompt_ids("Abbey Road", 4.75, 1200.0, "A record.")
    assert len(short) < 80 and short[-len(tail):] == tail
    long = builder.item_prompt_ids("Abbey Road", 4.75, 1200.0, "word " * 100 + "END")
    text = tokenizer.decode(long)
    assert len(long) <= 80 and long[-len(tail):] == tail
    assert "Number of Buyers: 1200\nDescription: word word" in text and "END" not in text
    assert len(builder.item_prompt_ids("Abbey Road", 4.75, 1200.0, "word " * 100)) >= 78  # as many words as fit
    # A budget just above the bare template: the description and the rating lines go, the template stays.
    least = len(builder._item_ids(""))
    tight = PromptBuilder(PromptConfig(max_item_tokens=least + 4), tokenizer)
    ids = tight.item_prompt_ids("Abbey Road", 4.75, 1200.0, "word " * 100)
    assert len(ids) <= least + 4 and ids[-len(tail):] == tail
    assert "Title: Abbey Road" + TAIL in tokenizer.decode(ids)


def test_item_budget_below_the_bare_template_is_an_error(tokenizer) -> None:
    with pytest.raises(DataError, match=r"^prompts\.max_item_tokens=20: .* takes 49 tokens; set it to at least 49$"):
        PromptBuilder(PromptConfig(max_item_tokens=20), tokenizer)
    PromptBuilder(PromptConfig(max_item_tokens=49), tokenizer)


def test_category_names_are_filled_in(tokenizer) -> None:
    cfg = PromptConfig(category="CDs and vinyl", item="CD or vinyl", item_plural="CDs and vinyl records")
    text = tokenizer.decode(PromptBuilder(cfg, tokenizer).user_prompt_ids(["X"], [5.0], [0], 10))
    assert "recommender of CDs and vinyl" in text and "next CD or vinyl" in text and "<answer>" in text


def test_bad_templates_name_the_field(tokenizer) -> None:
    with pytest.raises(DataError, match="prompts.user_template: must contain"):
        PromptBuilder(PromptConfig(user_template="no history here"), tokenizer)
    with pytest.raises(DataError, match=r"prompts.item_template: unknown placeholder\(s\) \['price'\]"):
        PromptBuilder(PromptConfig(item_template="{fields} {price}"), tokenizer)
