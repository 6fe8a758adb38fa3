"""Instruction post-processing: split a completion into items and reject the unusable ones."""
from __future__ import annotations

import re
import string

from .templates import EOS

# The reference's `\n\d+\s?\. ` ("amount:\n2.5 liters" is not a new item), and a bare "27." at the end.
_ITEM_SPLIT = re.compile(r"\n\d+\s?\.(?: |$)")
_WS = re.compile(r"\s+")
_BLOCKED = re.compile(r"\b(images?|graphs?|pictures?|files?|maps?|draw|plot|go to)\b", re.IGNORECASE)


def split_items(completion: str) -> list[str]:
    """The text after the prompt's `k+1.` is the first item; a new line starting with a number,
    an optional space, a dot and a space starts the next one. Whitespace is collapsed and `|EoS|` removed."""
    items = (_WS.sub(" ", piece.replace(EOS, " ")).strip() for piece in _ITEM_SPLIT.split(completion))
    return [item for item in items if item]


def reject_reason(item: str) -> str | None:
    """Why an instruction is unusable, or None if it passes every filter of the spec."""
    if not item:
        return "empty"
    words = len(item.split())
    if words <= 3:
        return "too_short"
    if words > 150:
        return "too_long"
    if _BLOCKED.search(item):
        return "blocked_word"
    if item.startswith("Write a program"):
        return "write_a_program"
    if item[0] in string.punctuation:
        return "starts_with_punctuation"
    if not item[0].isascii():
        return "starts_non_ascii"
    if "\ufffd" in item:  # bytes the model emitted that are not UTF-8
        return "invalid_text"
    return None


def process_completion(completion: str) -> list[tuple[str, str | None]]:
    """(item, reason) for each item of a completion; reason None means it passed."""
    return [(item, reject_reason(item)) for item in split_items(completion)]
