import random

import pytest
from rouge_score import rouge_scorer

from conftest import paper_rule_by_hand, random_text
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


@pytest.mark.parametrize("n", [3, 4, 5])
def test_matches_brute_force_spec_on_random_candidates(n):
    rng = random.Random(3 + n)
    batch = []
    for _ in range(1500):
        o = [random_text(rng, 0, 8) for _ in range(n)]
        r = rng.random()
        if r < 0.2:  # exact-match groups, changed only in case and punctuation
            o[rng.randrange(n)] = o[rng.randrange(n)].upper() + rng.choice(["", "!", " ."])
        elif r < 0.3:  # small shared vocabularies: ties in the summed agreement
            o = [" ".join(rng.choice("ab") for _ in range(rng.randint(1, 3))) for _ in range(n)]
        batch.append(o)
    decisions = ensemble(batch)
    assert {d.rule for d in decisions} == {"exact", "rouge", "below_threshold"}
    for o, d in zip(batch, decisions):
        w = paper_rule_by_hand(o)
        assert (d.winner, d.output) == (w, None if w is None else o[w]), o
