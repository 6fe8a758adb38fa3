"""ROUGE-L F1, bit-for-bit equal to the `rouge-score` package, computed with rapidfuzz.

rouge-score tokenizes (lowercase, non-alphanumerics to spaces, Porter-stem tokens longer than
3 characters), fills a Python LCS table, and returns 2*p*r/(p+r) with p = lcs/len(prediction),
r = lcs/len(target). We tokenize once per text (stems cached), map each distinct token to one
Unicode code point so a text becomes a short string, and let rapidfuzz's bit-parallel LCSseq
count the LCS. The final float is computed with the same operations in the same order, so the
result is identical, not merely close.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID = re.compile(r"^[a-z0-9]+$")


@lru_cache(maxsize=None)
def _stemmer():
    from nltk.stem import porter  # the stemmer rouge-score uses

    return porter.PorterStemmer()


@lru_cache(maxsize=1 << 20)
def _stem(token: str) -> str:
    return _stemmer().stem(token)


def tokenize(text: str, stem: bool = False) -> list[str]:
    """rouge-score's DefaultTokenizer, with a cache in front of the stemmer."""
    tokens = _SPACES.split(_NON_ALNUM.sub(" ", text.lower()))
    if stem:
        tokens = [_stem(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if _VALID.match(t)]


class Vocab:
    """Token -> one code point, so token sequences become str for rapidfuzz."""

    def __init__(self):
        self.ids: dict[str, str] = {}

    def encode(self, tokens: list[str]) -> str:
        ids = self.ids
        out = []
        for t in tokens:
            c = ids.get(t)
            if c is None:
                n = len(ids)
                n += 0x800 if n >= 0xD800 else 0  # skip the surrogate block
                if n > 0x10FFFF:
                    raise ValueError("more distinct tokens than Unicode code points")
                c = ids[t] = chr(n)
            out.append(c)
        return "".join(out)


def encode_texts(texts: list[str], stem: bool = False, vocab: Vocab | None = None) -> list[str]:
    vocab = vocab or Vocab()
    return [vocab.encode(tokenize(t, stem)) for t in texts]


def f1_from_lcs(lcs, len_target, len_prediction):
    """rouge-score's _score_lcs + fmeasure, vectorised; same float operations, same order."""
    lcs = np.asarray(lcs, dtype=np.float64)
    lt = np.asarray(len_target, dtype=np.float64)
    lp = np.asarray(len_prediction, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = lcs / lp
        r = lcs / lt
        f = 2 * p * r / (p + r)
    return np.where((lcs > 0) & (lt > 0) & (lp > 0), f, 0.0)


def rouge_l(a: str, b: str, stem: bool = False) -> float:
    """ROUGE-L F1 of target `a` and prediction `b`, exactly as rouge-score returns it."""
    vocab = Vocab()
    ea, eb = vocab.encode(tokenize(a, stem)), vocab.encode(tokenize(b, stem))
    if not ea or not eb:
        return 0.0
    lcs = LCSseq.similarity(ea, eb)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(eb), lcs / len(ea)
    return 2 * p * r / (p + r)


def lcs_matrix(queries: list[str], choices: list[str], workers: int = -1) -> np.ndarray:
    """LCS lengths of every encoded query against every encoded choice (all cores)."""
    if not queries or not choices:
        return np.zeros((len(queries), len(choices)), dtype=np.int32)
    return process.cdist(queries, choices, scorer=LCSseq.similarity, dtype=np.int32, workers=workers)


def rouge_matrix_encoded(queries: list[str], choices: list[str], workers: int = -1) -> np.ndarray:
    lcs = lcs_matrix(queries, choices, workers)
    lq = np.fromiter(map(len, queries), dtype=np.int64, count=len(queries))[:, None]
    lc = np.fromiter(map(len, choices), dtype=np.int64, count=len(choices))[None, :]
    return f1_from_lcs(lcs, lq, lc)


def rouge_matrix(queries: list[str], choices: list[str], stem: bool = False, workers: int = -1) -> np.ndarray:
    """M[i, j] == rouge_l(queries[i], choices[j], stem) for every pair."""
    vocab = Vocab()
    return rouge_matrix_encoded(encode_texts(queries, stem, vocab), encode_texts(choices, stem, vocab), workers)


def rouge_pairs_encoded(a: list[str], b: list[str], workers: int = -1) -> np.ndarray:
    """Element-wise ROUGE-L F1 of a[i] (target) and b[i] (prediction)."""
    if not a:
        return np.zeros(0)
    lcs = process.cpdist(a, b, scorer=LCSseq.similarity, dtype=np.int32, workers=workers)
    la = np.fromiter(map(len, a), dtype=np.int64, count=len(a))
    lb = np.fromiter(map(len, b), dtype=np.int64, count=len(b))
    return f1_from_lcs(lcs, la, lb)
