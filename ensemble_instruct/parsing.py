"""Instance parsing: turn an instance completion into (input, output) for A, output for B.

The prompt ends with `instruction: ...` then `input:` (A) or `output:` (B), so the completion
starts inside that field. Outputs may span many lines (code, lists) and are kept whole; the text
stops at `|EoS|` or where the model starts another `instruction:` block.
"""
from __future__ import annotations

import re
import zlib
from collections import Counter
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


_DIGITS = re.compile(r"\d+")


def _loops_3grams(words: list[str]) -> bool:
    grams = list(zip(words, words[1:], words[2:]))
    return len(set(grams)) * 2 < len(grams)


def _compresses_10x(text: str) -> bool:
    data = text.encode("utf-8")
    return len(data) >= 200 and len(zlib.compress(data)) < 0.1 * len(data)


# One short unit repeated over 40 characters or more ("000,000,000,...", "<u><u><u>...", "1.1.1.1."):
# a loop inside a word, which the word and line rules do not see. Unlike those ratios, a run stays
# in a text as it grows, so the engine's early loop check cannot cut what this rule would keep.
_RUN = re.compile(r"(\S)\1{39,}|(\S\S)\2{19,}|(\S{3})\3{13,}|(\S{4})\4{9,}")


def repetitive(text: str) -> bool:
    """A model stuck in a loop: a run of one short unit (above), mostly one repeated line (line
    numbers aside: "1. Yes 2. Yes"), mostly repeated word 3-grams, or long text that compresses to
    under a tenth of its size (prose and code: 30-60%). Long runs where only the numbers change
    ("160, 165, 170, ...") count too; a short list of numbers does not."""
    if _RUN.search(text):
        return True
    counted = _DIGITS.sub("0", text)
    lines = [line.strip(" \t.-–•*") for line in counted.splitlines()]
    lines = [line for line in lines if line]
    if len(lines) >= 3:
        top = Counter(lines).most_common(1)[0][1]
        if top >= 3 and top * 2 >= len(lines):
            return True
    words, counted_words = text.lower().split(), counted.lower().split()
    if len(words) >= 12 and _loops_3grams(words) or len(words) >= 60 and _loops_3grams(counted_words):
        return True
    return _compresses_10x(text) or _compresses_10x(re.sub(r"\d", "0", text))


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


_LABEL = re.compile(r"^\s*[A-Za-z][\w ]{0,30}:\s*")  # "Sentence: ", "Original text: "


def echo(output: str, instruction: str, input: str = "") -> bool:
    """An output that only repeats the instruction or the input (case and punctuation aside, and
    the input's leading label: "Sentence: I am here." -> "I am here.")."""
    out = _norm(output)
    return bool(out) and out in (_norm(instruction), _norm(input), _norm(_LABEL.sub("", input, count=1)))


def parse_instance(completion: str, with_input: bool, instruction: str = "", finish: str = "stop") -> Parsed:
    """`finish` is why generation ended: a completion cut at the token limit is incomplete."""
    if finish == "prompt_too_long":
        return Parsed("", "", "prompt_too_long")
    p = _parse(completion, with_input)
    if p.reason is None and finish == "loop":  # the backend cut a loop short
        p.reason = "repetitive"
    if p.reason is None and finish == "length":
        p.reason = "token_limit"
    if p.reason is None and echo(p.output, instruction, p.input):
        p.reason = "echo"
    return p


def looping(completion: str, with_input: bool) -> bool:
    """The engine's early loop test for the instance stage, on a completion so far: its input or
    its output is a repetition loop, each field on its own as `parse_instance` checks them (an
    output that copies its input repeats the text as a whole, not either field); before the output
    field starts, the input so far."""
    text = _cut(completion.replace("\r\n", "\n"))
    if with_input and not _OUTPUT.search(text):
        return repetitive(text.strip())
    return _parse(completion, with_input).reason == "repetitive"


def _parse(completion: str, with_input: bool) -> Parsed:
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
