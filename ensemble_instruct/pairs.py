"""Preference pairs from the ensemble: the consensus answer (chosen) against the answer the other
models agree with least (rejected), with no judge model and no gold.

The naive rule takes the candidate with the highest mean ROUGE-L to the others as chosen, the one
with the lowest as rejected, and pairs them when the two means differ by more than 0.1. This
rule changes four things, each measured in docs/pairs.md (bench/bench_pairs.py):

1. A flawed answer is never chosen and never counts as agreement. Flawed: empty, a repetition
   loop, an echo of the instruction or input (the checks the outputs stage drops such answers
   with, `parsing`), or a lead-in that stops before the answer ("Here are some ideas:", what a
   chat model leaves when generation stops at a blank line). Agreement is the mean ROUGE-L to the
   *unflawed* other candidates, so two models agreeing with a loop is not a consensus.
2. A flawed answer may be the rejected one (it is a real failure of a real model); an empty one
   may not (by default): it teaches nothing but "say something".
3. No pair when the rejected answer is much longer than the chosen one (`max_length_ratio`).
   ROUGE-L F1 between two texts of very different length is low whatever they say, so a low
   agreement for a long answer is weak evidence that it is wrong; it is often the one complete
   answer beside terse ones. (A much *shorter* outlier is kept: it is usually incomplete.)
4. A relative test beside a smaller margin beside a smaller absolute one: rejected's agreement at most 0.8 x chosen's,
   and below it by more than 0.05 (the naive rule: 0.1). How much models agree depends on the
   task (one right answer, or many) and on the models (stronger ones agree more); a ratio reads
   0.15 vs 0.05 as the strong signal it is and 0.85 vs 0.75 as the weak one, where a fixed
   difference treats them alike.

Scoring is the ensemble's (`rules.normalize`, `rules.similarity_matrices`: ROUGE-L F1 with
stemming, equal texts score 1); ties go to the earliest candidate, as in the paper rule. For
3 candidates without flaws, chosen is the paper rule's pick.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Sequence

import numpy as np

from .parsing import echo, repetitive
from .rules import normalize, similarity_matrices
from .similarity import tokenize

EPS = 1e-9  # float noise: a margin of exactly `margin` (0.55 - 0.25 vs 0.3) is not above it
FLAWS = ("empty", "invalid_text", "repetitive", "echo", "lead_in")


@dataclass(frozen=True)
class PairSettings:
    """How a pair is picked (all measured in docs/pairs.md)."""
    margin: float = 0.05  # chosen's mean agreement minus rejected's must be above this
    max_agreement_ratio: float = 0.8  # and rejected's at most this fraction of chosen's (1: off)
    max_length_ratio: float = 2.0  # no pair when an unflawed rejected has more than this x chosen's tokens (0: off)
    flawed_rejected: bool = True  # a loop, echo or lead-in may be the rejected answer
    empty_rejected: bool = False  # an empty answer may be the rejected answer
    min_support: float = 0.0  # chosen's best agreement with one unflawed other must reach this (0: off)

    def __post_init__(self):
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin {self.margin}: must be in [0, 1)")
        if self.max_length_ratio < 0 or 0 < self.max_length_ratio < 1:
            raise ValueError(f"max_length_ratio {self.max_length_ratio}: must be 0 (off) or >= 1")
        if not 0 < self.max_agreement_ratio <= 1:
            raise ValueError(f"max_agreement_ratio {self.max_agreement_ratio}: must be in (0, 1]")
        if not 0 <= self.min_support <= 1:
            raise ValueError(f"min_support {self.min_support}: must be in [0, 1]")


@dataclass
class Pair:
    chosen: str
    rejected: str
    chosen_model: str
    rejected_model: str
    chosen_index: int  # position among the instance's candidates
    rejected_index: int
    rejected_flaw: str | None  # why the rejected answer is flawed (FLAWS), None if it is not
    scores: dict[str, float] = field(default_factory=dict)  # what decided it, see `_scores`

    def record(self) -> dict:
        return asdict(self)


@dataclass
class Scored:
    """One instance's candidates, scored once: `subset` then serves any group of them."""
    names: list[str]
    texts: list[str]
    S: np.ndarray  # (N, N) ROUGE-L F1 on normalized texts, 1 on the diagonal and for equal texts
    flaws: list[str | None]
    lengths: list[int]  # tokens (rouge-score's tokenizer)
    norms: list[str]  # rules.normalize of each text

    def subset(self, idx: Sequence[int]) -> "Scored":
        idx = list(idx)
        return Scored([self.names[i] for i in idx], [self.texts[i] for i in idx], self.S[np.ix_(idx, idx)],
                      [self.flaws[i] for i in idx], [self.lengths[i] for i in idx], [self.norms[i] for i in idx])


def flaw(text: str, instruction: str = "", input: str = "") -> str | None:
    """Why an answer cannot be a consensus answer (one of FLAWS), or None."""
    if not normalize(text):
        return "empty"
    if "\ufffd" in text:
        return "invalid_text"
    if repetitive(text):
        return "repetitive"
    if echo(text, instruction, input):
        return "echo"
    if text.rstrip().endswith(":"):
        return "lead_in"
    return None


def score_candidates(rows: Sequence[tuple[str, str, Sequence[tuple[str, str]]]], workers: int = 1) -> list[Scored]:
    """rows: (instruction, input, [(model, text), ...]) per instance; every instance needs >= 2
    candidates. Similarities are computed in one batch per candidate count."""
    out: list[Scored | None] = [None] * len(rows)
    by_n: dict[int, list[int]] = {}
    for k, (_, _, cands) in enumerate(rows):
        if len(cands) < 2:
            raise ValueError("a pair needs at least 2 candidate outputs per instance")
        by_n.setdefault(len(cands), []).append(k)
    for ks in by_n.values():
        norms = [[normalize(t) for _, t in rows[k][2]] for k in ks]
        S = similarity_matrices(norms, "rouge", workers)
        for k, s, nm in zip(ks, S, norms):
            instruction, input, cands = rows[k]
            texts = [t for _, t in cands]
            out[k] = Scored([m for m, _ in cands], texts, s, [flaw(t, instruction, input) for t in texts],
                            [len(tokenize(t)) for t in texts], nm)
    return out  # type: ignore[return-value]


def _scores(sc: Scored, agreement: np.ndarray, c: int, r: int) -> dict[str, float]:
    n = len(sc.texts)
    s = {"chosen_agreement": float(agreement[c]), "rejected_agreement": float(agreement[r]),
         "margin": float(agreement[c] - agreement[r]),
         "agreement_ratio": float(agreement[r] / agreement[c]) if agreement[c] > 0 else 0.0,
         "length_ratio": (sc.lengths[r] + 1) / (sc.lengths[c] + 1)}
    s.update({f"{i}-{j}": float(sc.S[i, j]) for i, j in combinations(range(n), 2)})
    return {k: round(v, 6) for k, v in s.items()}


def _pair(sc: Scored, agreement: np.ndarray, c: int, r: int) -> Pair:
    return Pair(sc.texts[c], sc.texts[r], sc.names[c], sc.names[r], c, r, sc.flaws[r], _scores(sc, agreement, c, r))


def decide(sc: Scored, settings: PairSettings | None = None) -> Pair | None:
    """The pair rule on one scored instance (see the module docstring), or None."""
    st = settings or PairSettings()
    n = len(sc.texts)
    ok = np.array([f is None for f in sc.flaws])
    if ok.sum() < 2:  # no consensus without two unflawed answers
        return None
    off = ~np.eye(n, dtype=bool)
    peers = ok[None, :] & off  # agreement counts only with unflawed others
    agreement = (sc.S * peers).sum(axis=1) / np.maximum(peers.sum(axis=1), 1)
    c = int(np.argmax(np.where(ok, agreement, -np.inf)))  # ties: the earliest
    norms = sc.norms
    eligible = [i for i in range(n) if i != c and norms[i] != norms[c]
                and (sc.flaws[i] is None or sc.flaws[i] == "empty" and st.empty_rejected
                     or sc.flaws[i] not in (None, "empty") and st.flawed_rejected)]
    if not eligible:
        return None
    # lowest agreement; ties: a flawed answer (known bad), then the earliest
    r = min(eligible, key=lambda i: (agreement[i], sc.flaws[i] is None, i))
    if agreement[c] - agreement[r] <= st.margin + EPS or \
            agreement[r] > st.max_agreement_ratio * agreement[c] + EPS:
        return None
    if st.max_length_ratio and sc.flaws[r] is None and \
            sc.lengths[r] + 1 > st.max_length_ratio * (sc.lengths[c] + 1):
        return None
    if st.min_support and max(sc.S[c, j] for j in range(n) if j != c and ok[j]) < st.min_support:
        return None
    return _pair(sc, agreement, c, r)


def decide_naive(sc: Scored, margin: float = 0.1) -> Pair | None:
    """The baseline: highest mean ROUGE-L to the others chosen, lowest rejected, if they differ by
    more than `margin`; every candidate counts, flawed or not (ties: the earliest)."""
    n = len(sc.texts)
    agreement = (sc.S.sum(axis=1) - 1.0) / (n - 1)
    c, r = int(np.argmax(agreement)), int(np.argmin(agreement))
    if agreement[c] - agreement[r] <= margin + EPS:
        return None
    return _pair(sc, agreement, c, r)


def pick_pairs(rows: Sequence[tuple[str, str, Sequence[tuple[str, str]]]], settings: PairSettings | None = None,
               workers: int = 1) -> list[Pair | None]:
    """One Pair (or None) per instance; rows: (instruction, input, [(model, text), ...])."""
    return [decide(sc, settings) for sc in score_candidates(rows, workers)]


def pick_pair(instruction: str, input: str, candidates: Sequence[tuple[str, str]],
              settings: PairSettings | None = None) -> Pair | None:
    """The pair for one instance: candidates are (model name, output text) in ensemble order
    (the generator's own output first). Pass outputs as the models wrote them, flawed ones
    included: the rule recognises loops, echoes and lead-ins itself."""
    return pick_pairs([(instruction, input, candidates)], settings)[0]
