"""Card settings resolved once. A llama.cpp card may say gpu_layers / parallel = "auto"; the numbers
decide what a window of requests produces (window = 8 x parallel, and a sequence's text depends on
the batch it is decoded in), so they are picked once, when a directory is first opened, from the
plan and the memory free then, recorded in its manifest under "auto", and reused on every resume,
whatever memory is free by then. Runs and `evaluate --models` call `resolve`; backends refuse a
card that still says "auto".
"""
from __future__ import annotations

from pathlib import Path

from .config import Config, ModelCard
from .plan import has_auto, resolve_auto

AUTO_KEYS = ("gpu_layers", "parallel")


def resolve(pairs: list[tuple[ModelCard, Path]], keys: list[str], roles: list[str], cfg: Config | None,
            recorded: dict) -> tuple[list[tuple[ModelCard, Path]], dict]:
    """(the cards with numbers for "auto", what to record under the manifest's "auto"). keys[i] names
    card i in the record (a run: its role; an evaluation: the card's name); roles[i] is the stage
    role it plans for ("generator" or "extra"; with cfg None: the card's worst case, parallel x
    context). A key already in `recorded` keeps its numbers."""
    out, record = list(pairs), {}
    for i, (card, path) in enumerate(pairs):
        if not has_auto(card):
            continue
        old = recorded.get(keys[i])
        new, budget = card, ""
        if old is not None:
            upd = {k: old[k] for k in AUTO_KEYS if getattr(card, k) == "auto" and isinstance(old.get(k), int)}
            new, budget = card.model_copy(update=upd), old.get("budget", "")
        if old is None or "auto" in (new.gpu_layers, new.parallel):
            new, budget = resolve_auto(card, path, roles[i], cfg)
        out[i] = (new, path)
        record[keys[i]] = {"gpu_layers": new.gpu_layers, "parallel": new.parallel, "budget": budget,
                           "card": {k: getattr(card, k) for k in AUTO_KEYS}}
    return out, record
