"""Prompt templates (config text) and their rendering with the tokenizer's chat template (METHOD.md §3).

User prompt: an instruction, then one line per history item for the last `prompt_window` items (time since that
interaction relative to the target time, title in brackets, rating out of 5). Item prompt: an instruction, then Title /
User Rating / Number of Buyers / Description lines (lines whose value is missing are left out), ending in the marker;
a long one loses words from the end of these lines, never any of the chat template.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Sequence

from minirec.io import ConfigError

DEFAULT_USER_TEMPLATE = (
    "You are a recommender of {category}. Here are the {item_plural} a user bought, oldest first, each with how long "
    "before now it was bought, its title in brackets and the user's rating out of 5:\n"
    "{history}\n"
    "Analyse the user's tastes briefly, then write {marker} to recommend the next {item} this user will buy."
)
DEFAULT_ITEM_TEMPLATE = "Summarise the key features of this {item} for a recommender system.\n{fields}"


@dataclass(frozen=True)
class PromptConfig:
    """Prompt settings.

    Args:
        category: what the catalogue holds, in the plural, filled into `{category}` (e.g. "CDs and vinyl").
        item: one item, filled into `{item}` (e.g. "CD or vinyl").
        item_plural: several items, filled into `{item_plural}`.
        user_template: user prompt text with `{category}`, `{item}`, `{item_plural}`, `{history}`, `{marker}`.
        item_template: item prompt text with `{item}` and `{fields}` (the Title / User Rating / ... lines).
        answer_marker: the text that ends reasoning; its hidden state is the user or item embedding.
        prompt_window: how many of the most recent history items the user prompt shows.
        max_prompt_tokens: longest user prompt in tokens; the oldest history lines are dropped to fit.
        max_item_tokens: longest item prompt in tokens, chat template and marker included (the paper's 768); longer
            ones keep fewer words of the Title / ... / Description lines, cut from the end (the description first).
        description_words: item descriptions are cut to this many words.
    """

    category: str = "movies"
    item: str = "movie"
    item_plural: str = "movies"
    user_template: str = DEFAULT_USER_TEMPLATE
    item_template: str = DEFAULT_ITEM_TEMPLATE
    answer_marker: str = "<answer>"
    prompt_window: int = 5
    max_prompt_tokens: int = 384
    max_item_tokens: int = 768
    description_words: int = 100


def humanize_seconds(seconds: float) -> str:
    """How long ago, in words: 45 -> "45 seconds", 7200 -> "2 hours", 86400*40 -> "1 month"."""
    seconds = max(0.0, float(seconds))
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    n = int(seconds)
    return f"{n} second{'s' if n != 1 else ''}"


def history_lines(titles: Sequence[str], ratings: Sequence[float], timestamps: Sequence[int], target_timestamp: int) -> list[str]:
    """One line per history item, oldest first: `<time> ago: [<title>] rated <r>/5`."""
    return [
        f"{humanize_seconds(target_timestamp - ts)} ago: [{title}] rated {_fmt_rating(r)}/5"
        for title, r, ts in zip(titles, ratings, timestamps)
    ]


def _fmt_rating(r: float) -> str:
    return str(int(r)) if float(r).is_integer() else f"{r:.1f}"


def _present(x: object) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and x != ""


def item_fields(cfg: PromptConfig, title: str, average_rating: float | None, rating_number: float | None,
                description: str) -> str:
    """The Title / User Rating / Number of Buyers / Description lines whose values exist."""
    fields = [f"Title: {title}"]
    if _present(average_rating):
        fields.append(f"User Rating: {float(average_rating):.1f}")
    if _present(rating_number):
        fields.append(f"Number of Buyers: {int(rating_number)}")
    if _present(description):
        words = str(description).split()
        fields.append("Description: " + " ".join(words[: cfg.description_words]))
    return "\n".join(fields)


def item_text(cfg: PromptConfig, fields: str) -> str:
    """The item prompt's user text: the instruction and the field lines."""
    return cfg.item_template.format(item=cfg.item, fields=fields)


def user_text(cfg: PromptConfig, lines: Sequence[str]) -> str:
    """The user prompt's text for the given history lines."""
    return cfg.user_template.format(
        category=cfg.category, item=cfg.item, item_plural=cfg.item_plural, history="\n".join(lines), marker=cfg.answer_marker
    )


def render_chat(tokenizer, text: str) -> list[int]:
    """Token ids of a single user turn rendered with the chat template, generation prompt added."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return list(ids)


def check_templates(cfg: PromptConfig) -> None:
    """Fail early, naming the field, when a template lacks a required placeholder or uses an unknown one."""
    for name, template, required, allowed in (
        ("user_template", cfg.user_template, {"history"}, {"category", "item", "item_plural", "history", "marker"}),
        ("item_template", cfg.item_template, {"fields"}, {"item", "fields"}),
    ):
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        if not required <= used:
            raise ConfigError(f"prompts.{name}: must contain {sorted(required)}; it has {sorted(used)}")
        if not used <= allowed:
            raise ConfigError(f"prompts.{name}: unknown placeholder(s) {sorted(used - allowed)}; allowed {sorted(allowed)}")


class PromptBuilder:
    """Turns dataset rows into token ids: user prompts (truncated to fit) and item prompts ending with the marker."""

    def __init__(self, cfg: PromptConfig, tokenizer) -> None:
        check_templates(cfg)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.marker_ids: list[int] = tokenizer(cfg.answer_marker, add_special_tokens=False)["input_ids"]
        least = len(self._item_ids(""))
        if least > cfg.max_item_tokens:
            raise ConfigError(f"prompts.max_item_tokens={cfg.max_item_tokens}: the item prompt without any fields (chat "
                            f"template, instruction, marker) already takes {least} tokens; set it to at least {least}")

    def user_prompt_ids(self, titles: Sequence[str], ratings, timestamps, target_timestamp: int) -> list[int]:
        """Chat-rendered user prompt for the last `prompt_window` history items; oldest lines dropped to fit the budget."""
        w = self.cfg.prompt_window
        lines = history_lines(titles[-w:], ratings[-w:], timestamps[-w:], target_timestamp)
        while True:
            ids = render_chat(self.tokenizer, user_text(self.cfg, lines))
            if len(ids) <= self.cfg.max_prompt_tokens or len(lines) <= 1:
                return ids
            lines = lines[1:]

    def _item_ids(self, fields: str) -> list[int]:
        """Chat-rendered item prompt with these field lines, followed by the marker."""
        return render_chat(self.tokenizer, item_text(self.cfg, fields)) + self.marker_ids

    def item_prompt_ids(self, title: str, average_rating, rating_number, description: str) -> list[int]:
        """Chat-rendered item prompt followed by the marker, at most `max_item_tokens` long.

        A longer one keeps the most words of its field lines that fit (binary search over words kept, counted from the
        start: the description loses its end first, then the lines above it), so the chat template (end of turn,
        generation prompt) and the marker always stay whole; with no words kept it fits, as checked in `__init__`.
        """
        fields = item_fields(self.cfg, title, average_rating, rating_number, description)
        ids = self._item_ids(fields)
        if len(ids) <= self.cfg.max_item_tokens:
            return ids
        ends = [0] + [m.end() for m in re.finditer(r"\S+", fields)]  # fields[: ends[k]] = the first k words
        lo, hi = 0, len(ends) - 2  # lo words fit; all len(ends) - 1 do not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self._item_ids(fields[: ends[mid]])) <= self.cfg.max_item_tokens:
                lo = mid
            else:
                hi = mid - 1
        return self._item_ids(fields[: ends[lo]])
