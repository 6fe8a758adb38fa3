"""Instance parsing: turn an instance completion into (input, output) for A, output for B.

The prompt ends with `instruction: ...` then `input:` (A) or `output:` (B), so the completion
starts inside that field. Outputs may span many lines (code, lists) and are kept whole; the text
stops at `|EoS|` or where the model starts another `instruction:` block.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from .templates import EOS

_OUTPUT = re.compile(r"^\s*output\s*:", re.IGNORECASE | re.MULTILINE)
_NEXT_BLOCK = re.compile(r"^\s*instruction\s*:", re.IGNORECASE | re.MULTILINE)


@dataclass
class Parsed:
    input: str
    output: str
    reason: str | None  # None when usable, else why it was dropped


def _cut(text: str) -> str:
    text = text.split(EOS, 1)[0]
    m = _NEXT_BLOCK.search(text)
    return text[: m.start()] if m else text


def repetitive(text: str) -> bool:
    """A model stuck in a loop: long text that compresses to under a tenth of its size
    (ordinary prose and code compress to 30-60%)."""
    data = text.encode("utf-8")
    return len(data) >= 200 and len(zlib.compress(data)) < 0.1 * len(data)


def parse_instance(completion: str, with_input: bool) -> Parsed:
    text = _cut(completion.replace("\r\n", "\n"))
    if "\ufffd" in text:  # undecodable bytes from the model
        return Parsed("", "", "invalid_text")
    if not with_input:
        out = text.strip()
        if not out:
            return Parsed("", out, "empty_output")
        return Parsed("", out, "repetitive" if repetitive(out) else None)
    m = _OUTPUT.search(text)
    if not m:
        return Parsed(text.strip(), "", "no_output_field")
    inp, out = text[: m.start()].strip(), text[m.end():].strip()
    if not inp:
        return Parsed(inp, out, "empty_input")
    if not out:
        return Parsed(inp, out, "empty_output")
    if repetitive(out) or repetitive(inp):
        return Parsed(inp, out, "repetitive")
    return Parsed(inp, out, None)
