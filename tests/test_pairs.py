"""The pair rule (ensemble_instruct/pairs.py): consensus chosen vs least-agreeing rejected, no models."""
import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, random_text

from ensemble_instruct import pairs, rules
from ensemble_instruct.pairs import PairSettings, Scored, decide, decide_naive, pick_pair, pick_pairs

INSTR = "Name three fruits that are usually red."
ANSWER = "Strawberries, cherries and raspberries are red fruits."
CLOSE = "Strawberries, cherries and red apples are red fruits."
OFF = "The capital of France is Paris, a city on the Seine."
LOOP = "fruit fruit fruit fruit fruit fruit fruit fruit fruit fruit fruit fruit fruit fruit fruit fruit"


def hand(S, flaws=None, lengths=None, texts=None) -> Scored:
    """A scored instance with a chosen similarity matrix (texts are distinct placeholders)."""
    S = np.array(S, dtype=float)
    n = len(S)
    texts = texts or [f"answer number {i}" for i in range(n)]
    return Scored([f"m{i}" for i in range(n)], texts, S, flaws or [None] * n, lengths or [10] * n,
                  [rules.normalize(t) for t in texts])


def test_consensus_is_chosen_and_the_outlier_rejected_with_models_attributed():
    p = pick_pair(INSTR, "", [("a", OFF), ("b", ANSWER), ("c", CLOSE)])
    assert (p.chosen, p.rejected) == (ANSWER, OFF)
    assert (p.chosen_model, p.rejected_model) == ("b", "a")
    assert (p.chosen_index, p.rejected_index) == (1, 0)
    assert p.rejected_flaw is None
    # the scores that decided it: mean agreements, their margin, every pairwise ROUGE-L
    s = p.scores
    assert s["margin"] == pytest.approx(s["chosen_agreement"] - s["rejected_agreement"], abs=1e-5)
    assert s["margin"] > PairSettings().margin
    assert s["1-2"] == pytest.approx(rules.similarity_matrices([[rules.normalize(ANSWER), rules.normalize(CLOSE)]],
                                                               "rouge")[0, 0, 1], abs=1e-6)
    assert set(p.record()) >= {"chosen", "rejected", "chosen_model", "rejected_model", "scores"}


def test_attribution_follows_the_texts_in_any_order():
    cands = [("a", OFF), ("b", ANSWER), ("c", CLOSE)]
    for perm in ([0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]):
        p = pick_pair(INSTR, "", [cands[i] for i in perm])
        assert dict(cands)[p.chosen_model] == p.chosen and dict(cands)[p.rejected_model] == p.rejected
        assert p.rejected_model == "a"


def test_deterministic_and_batch_equals_one_by_one():
    rng = random.Random(3)
    rows = [(random_text(rng, 3, 8), "", [(f"m{j}", random_text(rng, 0, 12)) for j in range(rng.choice([3, 4, 5]))])
            for _ in range(60)]
    batch = pick_pairs(rows)
    assert batch == pick_pairs(rows)
    assert batch == [pick_pair(*r) for r in rows]
    assert any(p is not None for p in batch)


def test_empty_output_is_never_chosen_and_not_rejected_by_default():
    cands = [("a", ""), ("b", ANSWER), ("c", CLOSE)]
    assert pick_pair(INSTR, "", cands) is None  # the only outlier is empty
    p = pick_pair(INSTR, "", cands, PairSettings(empty_rejected=True))
    assert (p.chosen, p.rejected, p.rejected_flaw) == (ANSWER, "", "empty")
    # punctuation only normalizes to empty too
    assert pick_pair(INSTR, "", [("a", " ... "), ("b", ANSWER), ("c", CLOSE)]) is None
    # two empty answers: no consensus, never a pair
    assert pick_pair(INSTR, "", [("a", ""), ("b", ""), ("c", ANSWER)], PairSettings(empty_rejected=True)) is None


def test_flawed_answers_cannot_be_the_consensus():
    inp = "Apples, bananas, cherries."
    # two models echo the input identically: agreement 1.0, but an echo is no answer
    cands = [("a", inp), ("b", inp), ("c", ANSWER)]
    assert pick_pair(INSTR, inp, cands) is None
    assert decide_naive(pairs.score_candidates([(INSTR, inp, cands)])[0]).chosen == inp  # the naive rule falls for it
    # two loops, one answer
    assert pick_pair(INSTR, "", [("a", LOOP), ("b", LOOP), ("c", ANSWER)]) is None


def test_flawed_answers_can_be_rejected():
    for bad, why in [(LOOP, "repetitive"), (INSTR, "echo"), ("Here are three red fruits:", "lead_in")]:
        p = pick_pair(INSTR, "", [("a", ANSWER), ("b", bad), ("c", CLOSE)])
        assert (p.chosen_model, p.rejected_model, p.rejected_flaw) == ("a", "b", why)
        assert pick_pair(INSTR, "", [("a", ANSWER), ("b", bad), ("c", CLOSE)], PairSettings(flawed_rejected=False)) is None


def test_flaw_checks():
    assert pairs.flaw("") == "empty" and pairs.flaw("?!") == "empty"
    assert pairs.flaw(LOOP) == "repetitive"
    assert pairs.flaw("Sentence: I am here.".split(": ")[1], "Fix it.", "Sentence: I am here.") == "echo"
    assert pairs.flaw("Sure! Here is a shorter version:  ") == "lead_in"
    assert pairs.flaw("Ratio: 2:1 is the answer") is None
    assert pairs.flaw("bad \ufffd bytes") == "invalid_text"
    assert pairs.flaw(ANSWER, INSTR) is None


def test_margin_is_strict():
    # agreements: m0 = (0.8 + 0.3) / 2 = 0.55, m1 = (0.8 + 0.2) / 2 = 0.5, m2 = 0.25
    S = [[1, .8, .3], [.8, 1, .2], [.3, .2, 1]]
    p = decide(hand(S), PairSettings(margin=0.29))
    assert (p.chosen_index, p.rejected_index) == (0, 2)
    assert p.scores["margin"] == pytest.approx(0.3)
    assert decide(hand(S), PairSettings(margin=0.3)) is None
    assert decide(hand(S), PairSettings(margin=0.31)) is None
    assert decide_naive(hand(S), 0.29) is not None and decide_naive(hand(S), 0.3) is None


def test_agreement_ratio():
    # a clear outlier passes; agreements too close as a ratio do not, whatever the margin
    S = [[1, .9, .2, .2], [.9, 1, .1, .1], [.2, .1, 1, .2], [.2, .1, .2, 1]]
    sc = hand(S)
    assert decide(sc, PairSettings(margin=0.0)).rejected_index == 2  # 0.17 / 0.43 = 0.38
    S2 = [[1, .5, .6], [.5, 1, .4], [.6, .4, 1]]  # 0.55, 0.45, 0.5: 0.45/0.55 = 0.82
    assert decide(hand(S2), PairSettings(margin=0.0)) is None
    assert decide(hand(S2), PairSettings(margin=0.0, max_agreement_ratio=0.85)).rejected_index == 1
    assert decide(hand(S2), PairSettings(margin=0.0, max_agreement_ratio=1)) is not None


def test_ties_go_to_the_earliest_chosen_and_a_flawed_rejected():
    # 0 and 1 identical (agreement tie): the earliest is chosen
    p = pick_pair(INSTR, "", [("a", OFF), ("b", ANSWER), ("c", ANSWER)])
    assert (p.chosen_model, p.rejected_model) == ("b", "a")
    # 2 and 3 tie for the lowest agreement: the flawed one is rejected; without flaws, the earliest
    S = [[1, .9, .1, .1], [.9, 1, .1, .1], [.1, .1, 1, 0], [.1, .1, 0, 1]]
    assert decide(hand(S)).rejected_index == 2
    assert decide(hand(S, flaws=[None, None, None, "repetitive"])).rejected_index == 3


def test_identical_chosen_and_rejected_never_pair():
    # equal normalized texts (case, punctuation) are the same answer
    assert pick_pair(INSTR, "", [("a", ANSWER), ("b", ANSWER.upper() + "!"), ("c", ANSWER.lower())]) is None


def test_length_guard_skips_a_much_longer_unflawed_rejected_only():
    S = [[1, .8, .1], [.8, 1, .1], [.1, .1, 1]]
    assert decide(hand(S, lengths=[10, 10, 30])) is None  # 31 > 2 x 11
    assert decide(hand(S, lengths=[10, 10, 21])) is not None  # 22 = 2 x 11: not more than twice
    assert decide(hand(S, lengths=[10, 10, 30]), PairSettings(max_length_ratio=0)) is not None
    assert decide(hand(S, lengths=[10, 10, 30], flaws=[None, None, "repetitive"])) is not None
    assert decide(hand(S, lengths=[10, 10, 1])) is not None  # a much shorter outlier is a fine rejected


def test_agreement_ignores_flawed_peers():
    # 1's agreement comes from a loop (2); among the unflawed, 0 is the consensus and 1 the outlier
    S = [[1, .3, 0, .6], [.3, 1, .9, .2], [0, .9, 1, 0], [.6, .2, 0, 1]]
    assert decide_naive(hand(S)).chosen_index == 1  # the loop's vote wins it for the naive rule
    p = decide(hand(S, flaws=[None, None, "repetitive", None]), PairSettings(margin=0.0))
    assert (p.chosen_index, p.rejected_index) == (0, 1)
    assert p.scores["chosen_agreement"] == pytest.approx(0.45) and p.scores["rejected_agreement"] == pytest.approx(0.25)


def test_min_support():
    S = [[1, .25, .05], [.25, 1, .0], [.05, .0, 1]]
    assert decide(hand(S), PairSettings(margin=0.05)) is not None
    assert decide(hand(S), PairSettings(margin=0.05, min_support=0.3)) is None


def test_chosen_is_the_paper_rules_pick_for_three_unflawed_answers():
    rng = random.Random(7)
    n = 0
    for _ in range(200):
        cands = [random_text(rng, 4, 12) for _ in range(3)]
        sc = pairs.score_candidates([("Say something.", "", list(zip("abc", cands)))])[0]
        if any(sc.flaws):
            continue
        p = decide(sc, PairSettings(margin=0.0, max_length_ratio=0))
        d = rules.select([cands], "paper", threshold=-1)[0]
        if p is not None:
            n += 1
            assert p.chosen_index == d.winner
    assert n > 50


def test_settings_are_checked():
    for bad in (dict(margin=-0.1), dict(margin=1.0), dict(max_length_ratio=0.5), dict(min_support=1.5),
                dict(max_agreement_ratio=0), dict(max_agreement_ratio=1.2)):
        with pytest.raises(ValueError):
            PairSettings(**bad)
    with pytest.raises(ValueError):
        pick_pair(INSTR, "", [("a", ANSWER)])


def test_light_import():
    code = "import sys, ensemble_instruct.pairs; print(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'trl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
