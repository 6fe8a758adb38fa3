import random

import pytest
from rouge_score import rouge_scorer

from conftest import random_text
from ensemble_instruct.ensemble import ensemble, normalize, exact_group


def test_normalize():
    assert normalize("  Hello,   World!\n") == "hello world"
    assert normalize("...") == ""


def test_exact_match_keeps_original_text_of_earliest_member():
    d = ensemble([["Paris.", "The capital is Rome", "paris"]])[0]
    assert (d.kept, d.rule, d.winner, d.output, d.group) == (True, "exact", 0, "Paris.", [0, 2])
    d = ensemble([["something else", "Yes!", "yes"]])[0]
    assert (d.rule, d.winner, d.output) == ("exact", 1, "Yes!")


def test_exact_match_largest_group_then_earliest_group():
    # N = 5: group "b" has 3 members, group "a" has 2 -> "b" wins although "a" comes first
    d = ensemble([["a", "b", "a", "b", "B."]])[0]
    assert (d.winner, d.group) == (1, [1, 3, 4])
    # tie between two groups of 2: the group whose earliest member comes first
    d = ensemble([["x", "y", "Y", "X"]])[0]
    assert (d.winner, d.group) == (0, [0, 3])


def test_empty_outputs_never_form_a_group_or_win():
    d = ensemble([["", "  ", "something"]])[0]
    assert not d.kept and d.rule == "below_threshold"
    d = ensemble([["!!", "...", "an answer"]])[0]  # normalize to empty
    assert not d.kept
    assert exact_group(["", "", "a"]) == []


def test_rouge_rule_picks_largest_summed_agreement():
    c = ["the cat sat on the mat", "a cat sat on a mat today", "the dog sat on the mat"]
    d = ensemble([c])[0]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    s = lambda i, j: scorer.score(normalize(c[i]), normalize(c[j]))["rougeL"].fmeasure
    sums = [s(0, 1) + s(0, 2), s(0, 1) + s(1, 2), s(0, 2) + s(1, 2)]
    assert d.rule == "rouge" and d.winner == sums.index(max(sums))
    assert d.scores == {"0-1": s(0, 1), "0-2": s(0, 2), "1-2": s(1, 2)}


def test_rouge_rule_tie_goes_to_earliest():
    d = ensemble([["x y", "y z", "z x"]])[0]  # every pair shares 1 of 2 tokens: all sums equal
    assert d.rule == "rouge" and d.winner == 0


def test_below_threshold_drops():
    d = ensemble([["the cat sat", "the cat sat down", "completely unrelated words"]])[0]
    assert not d.kept and d.rule == "below_threshold" and d.output is None
    assert d.scores["0-2"] == 0.0


def test_threshold_is_strict():
    # the smallest pair scores exactly 0.25; threshold 0.25 drops, 0.24 keeps
    c = ["a b c d", "a x y z", "a b c q"]
    assert not ensemble([c], threshold=0.25)[0].kept
    assert ensemble([c], threshold=0.24)[0].kept


def test_n4_mixed_batch():
    batch = [["one two three", "one two four", "one two five", "one two six"],
             ["q", "r", "s", "r!"],
             ["alpha beta", "gamma", "delta", "alpha"]]
    d = ensemble(batch)
    assert d[0].rule == "rouge" and d[0].winner == 0
    assert d[1].rule == "exact" and d[1].winner == 1
    assert d[2].rule == "below_threshold"


def test_needs_three_candidates():
    with pytest.raises(ValueError):
        ensemble([["a", "b"]])


def reference_n3(o):
    """The reference implementation's rule for N = 3 (after its 2024 fix)."""
    n = [normalize(x) for x in o]
    if n[0] and (n[0] == n[1] or n[0] == n[2]):
        return o[0]
    if n[1] and n[1] == n[2]:
        return o[1]
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    r = lambda i, j: sc.score(n[i], n[j])["rougeL"].fmeasure
    r01, r02, r12 = r(0, 1), r(0, 2), r(1, 2)
    if min(r01, r02, r12) > 0.01:
        sums = [r01 + r02, r01 + r12, r02 + r12]
        return o[sums.index(max(sums))]
    return None


def test_matches_reference_rule_on_random_triples():
    rng = random.Random(3)
    batch = []
    for _ in range(2000):
        o = [random_text(rng, 0, 8) for _ in range(3)]
        if rng.random() < 0.2:
            o[rng.randrange(3)] = o[rng.randrange(3)].upper()
        batch.append(o)
    for o, d in zip(batch, ensemble(batch)):
        assert d.output == reference_n3(o)
