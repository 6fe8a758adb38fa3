"""Novelty filter: keep a candidate only if no instruction in the pool is too similar.

The pool is the existing instructions plus every candidate kept before this one, so decisions
are sequential. We still compute scores in bulk: candidates go in blocks; each block is scored
against the existing pool and everything kept before the block with `process.cdist` (all cores),
and against itself, and only the within-block decisions run in a Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .similarity import Vocab, encode_texts, rouge_matrix_encoded, tokenize


@dataclass
class Novelty:
    keep: bool
    max_score: float  # highest ROUGE-L against the pool at decision time
    mean_score: float = 0.0  # mean ROUGE-L against the pool (kept candidates only)
    most_similar: dict[str, float] = field(default_factory=dict)  # top 10, best first


def _top(row: np.ndarray, pool_text, k: int) -> dict[str, float]:
    # Same order as self-instruct's np.argsort(scores)[-k:][::-1]: highest first, and among
    # equal scores the later pool entry first.
    idx = np.argsort(row, kind="stable")[-k:][::-1]
    out: dict[str, float] = {}
    for i in idx:
        out.setdefault(pool_text(int(i)), float(row[i]))
    return out


class Pool:
    """Instructions already accepted (seeds first), tokenized once: a generation run checks each
    request's items against a growing pool, and re-tokenizing it every request would cost O(pool)."""

    def __init__(self, texts: list[str] = ()):
        self.vocab = Vocab()
        self.texts = list(texts)
        self.encoded = encode_texts(self.texts, False, self.vocab)

    def add(self, text: str) -> None:
        self.texts.append(text)
        self.encoded.append(self.vocab.encode(tokenize(text)))


def novelty_scores(candidates: list[str], existing: list[str] | Pool, threshold: float = 0.7,
                   top_k: int = 10, block: int = 256, workers: int = -1) -> list[Novelty]:
    """Per candidate: kept or not, with the scores users inspect (ROUGE-L, no stemming).
    `existing` is not changed; add the kept candidates to a Pool yourself."""
    pool = existing if isinstance(existing, Pool) else Pool(existing)
    vocab, existing, enc_existing = pool.vocab, pool.texts, pool.encoded
    enc_cand = encode_texts(candidates, False, vocab)
    vs_existing = rouge_matrix_encoded(enc_cand, enc_existing, workers) if existing else None
    kept_idx: list[int] = []  # candidates kept so far, in order: the pool after `existing`
    results: list[Novelty] = []
    for start in range(0, len(candidates), block):
        stop = min(start + block, len(candidates))
        chunk = enc_cand[start:stop]
        prev = [enc_cand[i] for i in kept_idx]
        vs_prev = rouge_matrix_encoded(chunk, prev, workers) if prev else np.zeros((len(chunk), 0))
        within = rouge_matrix_encoded(chunk, chunk, workers)
        kept_here: list[int] = []

        def pool_text(i: int) -> str:  # pool position -> text, without building the pool
            if i < len(existing):
                return existing[i]
            i -= len(existing)
            if i < len(kept_idx):
                return candidates[kept_idx[i]]
            return candidates[start + kept_here[i - len(kept_idx)]]

        for r in range(len(chunk)):
            parts = [vs_existing[start + r] if vs_existing is not None else np.zeros(0),
                     vs_prev[r], within[r, kept_here]]
            row = np.concatenate(parts)
            max_score = float(row.max()) if row.size else 0.0
            if max_score > threshold:
                results.append(Novelty(False, max_score))
                continue
            mean = float(np.mean(row)) if row.size else 0.0
            results.append(Novelty(True, max_score, mean, _top(row, pool_text, top_k)))
            kept_here.append(r)
        kept_idx.extend(start + j for j in kept_here)
    return results


def filter_novel(candidates: list[str], existing: list[str], threshold: float = 0.7) -> list[bool]:
    """Keep decisions, exactly as a sequential rouge-score loop would make them."""
    return [n.keep for n in novelty_scores(candidates, existing, threshold)]
