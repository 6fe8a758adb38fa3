"""Selection rules: which candidate to keep for an instance, and whether to keep it at all.

No rule sees a gold answer. Each rule scores every instance once: a pick (the candidate it would
keep) and a confidence; the instance is kept when the confidence is above the threshold and the
pick is not empty. Scoring once and thresholding afterwards makes a threshold sweep cheap and
monotone (a higher threshold keeps a subset of the rows).

- paper: the spec's rule, and its only implementation (`ensemble.ensemble` calls it). An
  exact-match group wins; otherwise the confidence is the smallest pairwise ROUGE-L and the pick
  the candidate with the largest summed agreement.
- weighted: the same keep decision as paper (so the same kept rows), but the pick is a weighted
  vote: each model votes for every candidate (its own included) in proportion to their
  similarity, and its vote counts as much as that model agrees with the others across the whole
  dataset. A model that is usually right agrees with the others more often, so this moves picks
  towards the better models without any gold.
- quorum: keep when some k candidates agree pairwise (k = a majority by default), pick among those
  k by the weighted vote of all models. With 5+ models one weak model no longer vetoes every row.
- *-f1, *-chrf: the same rules with token-level F1 or chrF as the similarity instead of ROUGE-L.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations

import numpy as np

from .errors import UserError
from .similarity import Vocab, encode_texts, rouge_pairs_encoded, tokenize

# name -> (kind, similarity)
RULES = {
    "paper": ("paper", "rouge"),
    "weighted": ("weighted", "rouge"),
    "weighted-f1": ("weighted", "f1"),
    "weighted-chrf": ("weighted", "chrf"),
    "quorum": ("quorum", "rouge"),
}
DEFAULT = "paper"
HELP = {
    "paper": "the spec: exact match, else keep if every pairwise ROUGE-L > threshold; pick the medoid",
    "weighted": "keep as paper; pick by a vote weighted by each model's dataset-wide agreement",
    "weighted-f1": "as weighted, with token-level F1 as the similarity",
    "weighted-chrf": "as weighted, with chrF (character n-grams) as the similarity",
    "quorum": "keep if some k candidates agree pairwise (k: a majority by default); pick among them by the vote",
}


# ---------------------------------------------------------------- what a rule decides

_PUNCT = str.maketrans("", "", string.punctuation)
_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace."""
    return _WS.sub(" ", text.lower().translate(_PUNCT)).strip()


@dataclass
class Decision:
    kept: bool
    rule: str  # "exact", "rouge", "below_threshold"
    winner: int | None  # index of the kept candidate
    output: str | None
    scores: dict[str, float] = field(default_factory=dict)  # "i-j" -> ROUGE-L F1 (rouge rule)
    group: list[int] = field(default_factory=list)  # members of the exact-match group


def exact_group(norms: list[str]) -> list[int]:
    """Members of the largest group of equal non-empty normalized texts (>= 2), else []."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(norms):
        if n:
            groups.setdefault(n, []).append(i)
    best: list[int] = []
    for members in groups.values():  # dict order = order of each group's first member
        if len(members) >= 2 and len(members) > len(best):
            best = members
    return best



# ---------------------------------------------------------------- similarities (on normalized text)

def _token_f1(a: list[str], b: list[str]) -> float:
    if not a or not b:
        return 0.0
    common = sum((Counter(a) & Counter(b)).values())
    return 0.0 if common == 0 else 2 * common / (len(a) + len(b))


@lru_cache(maxsize=1 << 16)
def _ngrams(text: str, n: int) -> Counter:
    s = text.replace(" ", "")  # chrF ignores whitespace
    return Counter(s[i:i + n] for i in range(len(s) - n + 1))


def _chrf(a: list[Counter], b: list[Counter]) -> float:
    """Symmetric chrF (beta = 1): mean character n-gram precision and recall over n = 1..6."""
    ps, rs = [], []
    for ga, gb in zip(a, b):
        if not ga or not gb:
            continue
        common = sum((ga & gb).values())
        ps.append(common / sum(gb.values()))
        rs.append(common / sum(ga.values()))
    if not ps:
        return 0.0
    p, r = sum(ps) / len(ps), sum(rs) / len(rs)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def similarity_matrices(norms: list[list[str]], sim: str, workers: int = -1) -> np.ndarray:
    """S[k, i, j]: similarity of candidates i and j of instance k (normalized texts, all rows the
    same N). Equal non-empty texts score 1, as the exact-match step treats them."""
    rows, n = len(norms), len(norms[0]) if norms else 0
    S = np.zeros((rows, n, n))
    pairs = list(combinations(range(n), 2))
    if sim == "rouge":  # batched like the ensemble step: encode once, one cpdist per pair
        vocab = Vocab()
        enc = [encode_texts([r[i] for r in norms], True, vocab) for i in range(n)]
        for i, j in pairs:
            S[:, i, j] = rouge_pairs_encoded(enc[i], enc[j], workers)
    elif sim == "f1":
        toks = [[tokenize(t, True) for t in r] for r in norms]
        for k, (i, j) in ((k, p) for k in range(rows) for p in pairs):
            S[k, i, j] = _token_f1(toks[k][i], toks[k][j])
    elif sim == "chrf":
        grams = [[[_ngrams(t, m) for m in range(1, 7)] for t in r] for r in norms]
        for k, (i, j) in ((k, p) for k in range(rows) for p in pairs):
            S[k, i, j] = _chrf(grams[k][i], grams[k][j])
    else:
        raise ValueError(f"unknown similarity {sim!r}")
    for k, r in enumerate(norms):
        for i, j in pairs:
            if r[i] and r[i] == r[j]:
                S[k, i, j] = 1.0
    S = S + S.transpose(0, 2, 1)
    S[:, range(n), range(n)] = 1.0
    return S


# ---------------------------------------------------------------- scoring

@dataclass
class Scored:
    """A rule's view of every instance, before any threshold."""
    pick: np.ndarray  # (rows,) index of the candidate the rule keeps
    confidence: np.ndarray  # (rows,) kept when > threshold
    groups: list[list[int]]  # exact-match group per row ([] if none)
    S: np.ndarray  # (rows, N, N) the similarity the rule used
    weights: np.ndarray  # (N,) per-model vote weight (ones for paper)


def reliability(S: np.ndarray) -> np.ndarray:
    """Each model's mean similarity to the other models over all rows: no gold needed."""
    rows, n = S.shape[:2]
    if rows == 0:
        return np.ones(n)
    return (S.sum(axis=2) - 1.0).mean(axis=0) / (n - 1)


def _vote(S: np.ndarray, w: np.ndarray, members=None, self_vote: bool = True) -> np.ndarray:
    """Per row, the candidate with the most votes (ties: earliest): model j gives candidate i
    w_j * S[i, j]. A model also votes for its own answer (S[i, i] = 1); without that, a strong
    model's weight goes only to the others' answers and pulls picks away from its own (measured:
    worse than the paper's pick on constructed data, bench/bench_rules.py)."""
    n = S.shape[1]
    mask = np.ones(n, bool) if members is None else np.isin(np.arange(n), members)
    votes = ((S if self_vote else S * (1 - np.eye(n))) * w[None, None, :]).sum(axis=2)  # every model votes
    votes[:, ~mask] = -np.inf
    return np.argmax(votes, axis=1)


def score(candidates: list[list[str]], rule: str = DEFAULT, quorum: int = 0, workers: int = -1) -> Scored:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}")
    kind, sim = RULES[rule]
    n = len(candidates[0]) if candidates else 3
    if any(len(c) != n for c in candidates) or n < 3:
        raise ValueError("every instance needs the same number (>= 3) of candidate outputs")
    norms = [[normalize(t) for t in c] for c in candidates]
    groups = [exact_group(r) for r in norms]
    S = similarity_matrices(norms, sim, workers)
    rows = len(candidates)
    offdiag = S[:, ~np.eye(n, dtype=bool)].reshape(rows, -1)
    if kind == "paper":
        w = np.ones(n)
        pick = _vote(S, w, self_vote=False)  # the summed agreement with the others, as the spec
        conf = offdiag.min(axis=1) if rows else np.zeros(0)
    else:
        w = reliability(S)
        if kind == "weighted":
            pick = _vote(S, w)
            conf = offdiag.min(axis=1) if rows else np.zeros(0)
        else:  # quorum: the k-clique whose weakest pair agrees most
            k = quorum or n // 2 + 1
            if not 2 <= k <= n:
                raise UserError(f"quorum {k}: must be between 2 and {n} (the candidates per instance)")
            cliques = list(combinations(range(n), k))
            conf_c = np.stack([np.min([S[:, i, j] for i, j in combinations(c, 2)], axis=0) for c in cliques], 1) \
                if rows else np.zeros((0, len(cliques)))
            best = np.argmax(conf_c, axis=1)
            conf = conf_c[np.arange(rows), best]
            pick = np.zeros(rows, dtype=int)
            for c_idx in np.unique(best):
                sel = best == c_idx
                pick[sel] = _vote(S[sel], w, list(cliques[c_idx]))
    pick = np.asarray(pick, dtype=int)
    conf = np.asarray(conf, dtype=float).copy()
    for k, g in enumerate(groups):
        if g:
            conf[k] = 1.0  # an exact match is full agreement: kept at every threshold
            if kind == "paper":
                pick[k] = g[0]
    return Scored(pick, conf, groups, S, w)


def kept_mask(scored: Scored, candidates: list[list[str]], threshold: float) -> np.ndarray:
    nonempty = np.array([bool(normalize(c[p])) for c, p in zip(candidates, scored.pick)], dtype=bool)
    return (scored.confidence > threshold) & nonempty


def decisions(scored: Scored, candidates: list[list[str]], threshold: float, rule: str) -> list[Decision]:
    keep = kept_mask(scored, candidates, threshold)
    n = scored.S.shape[1] if len(candidates) else 0
    pairs = list(combinations(range(n), 2))
    out = []
    for k, c in enumerate(candidates):
        g, p = scored.groups[k], int(scored.pick[k])
        s = {} if g else {f"{i}-{j}": float(scored.S[k, i, j]) for i, j in pairs}
        if keep[k]:
            out.append(Decision(True, "exact" if p in g else rule, p, c[p], scores=s, group=g))
        else:
            out.append(Decision(False, "below_threshold", None, None, scores=s, group=g))
    return out


def select(candidates: list[list[str]], rule: str = DEFAULT, threshold: float = 0.01, quorum: int = 0,
           workers: int = -1) -> list[Decision]:
    """The ensemble step with the chosen rule, one Decision per instance. `paper` also takes
    instances with different numbers of candidates (scored in groups of the same N) and records
    its ROUGE rule as "rouge"."""
    if rule != "paper":
        return decisions(score(candidates, rule, quorum, workers), candidates, threshold, rule) if candidates else []
    if any(len(c) < 3 for c in candidates):
        raise ValueError("the ensemble needs at least 3 candidate outputs per instance")
    out: list[Decision | None] = [None] * len(candidates)
    by_n: dict[int, list[int]] = {}
    for k, c in enumerate(candidates):
        by_n.setdefault(len(c), []).append(k)
    for ks in by_n.values():  # the rules score instances with the same N together
        rows = [candidates[k] for k in ks]
        for k, d in zip(ks, decisions(score(rows, "paper", workers=workers), rows, threshold, "rouge")):
            out[k] = d
    return out  # type: ignore[return-value]
