"""rules.py: the selection rules, each against a reference written out by hand on rouge-score (the
paper rule: conftest.paper_rule_by_hand; the others below), sharing no code with the package:
normalize, exact-match groups, the paper rule through `ensemble.ensemble` and `rules.select`,
the weighted and quorum rules with each similarity, determinism."""
import random
import string
import typing
from collections import Counter
from functools import lru_cache
from itertools import combinations

import numpy as np
import pytest
from rouge_score import rouge_scorer
from rouge_score.tokenizers import DefaultTokenizer

from conftest import paper_rule_by_hand, random_candidates, random_text
from ensemble_instruct import rules
from ensemble_instruct.config import EnsembleCfg
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


# ------------------------------------------------------------ every rule through rules.select

def test_rules_are_deterministic():
    _, cands = random_candidates(2)
    for rule in rules.RULES:
        a, b = rules.score(cands, rule), rules.score(cands, rule, workers=1)
        assert (a.pick == b.pick).all() and (a.confidence == b.confidence).all()
        da, db = rules.select(cands, rule), rules.select([list(c) for c in cands], rule)
        assert [(d.kept, d.winner, d.output) for d in da] == [(d.kept, d.winner, d.output) for d in db]


def test_paper_rule_is_the_spec():
    # Against the spec written out on rouge-score (conftest), not against the package's own code:
    # what `evaluate` measures (score + kept_mask) and what the pipeline keeps (select) alike.
    _, cands = random_candidates(2)
    scored = rules.score(cands, "paper")
    for t in (0.0, 0.01, 0.3, 0.6):
        want = [paper_rule_by_hand(c, t) for c in cands]
        keep = rules.kept_mask(scored, cands, t)
        assert [int(p) if k else None for p, k in zip(scored.pick, keep)] == want, t
        assert [d.winner for d in rules.select(cands, "paper", t)] == want, t
        if t == 0.01:  # the rows exercise every branch: exact match, medoid, dropped
            assert {d.rule for d in rules.select(cands, "paper", t)} == {"exact", "rouge", "below_threshold"}


def test_weighted_vote_follows_the_reliable_model():
    # On the common rows m0 agrees with both others, m1 and m2 not with each other: m0 is the most
    # reliable. On the last row the medoid is m1's answer (summed agreement 1.07 against 1.02 for
    # m0: the paper's pick), but m0's vote weighs most, so weighted picks m0's answer.
    common = [["a b c d", "a b c x", "y z d"]] * 5
    row = ["t q w s", "t r q", "v u t v q"]
    s_paper, s_w = rules.score(common + [row], "paper"), rules.score(common + [row], "weighted")
    assert s_w.weights[0] == max(s_w.weights)
    assert s_paper.pick[-1] == 1 and s_w.pick[-1] == 0
    # same keep decision as the paper rule
    assert (rules.kept_mask(s_paper, common + [row], 0.01) == rules.kept_mask(s_w, common + [row], 0.01)).all()


def test_quorum_survives_one_dissenting_model():
    rows = [["the cat sat", "the cat sat down", "a cat sat", "the cat", "zzz"]] * 3
    assert not any(d.kept for d in rules.select(rows, "paper"))  # one model vetoes the row
    ds = rules.select(rows, "quorum")  # a majority (3 of 5) agrees
    assert all(d.kept and d.winner != 4 for d in ds)
    assert all(d.kept for d in rules.select(rows, "quorum", quorum=4))
    assert not any(d.kept for d in rules.select(rows, "quorum", quorum=5))


def test_similarities_and_config_names():
    assert set(typing.get_args(EnsembleCfg.model_fields["rule"].annotation)) == set(rules.RULES)
    norms = [["the cat sat", "the cat sat", "dog"], ["", "a", "a b"]]
    for sim in ("rouge", "f1", "chrf"):
        S = rules.similarity_matrices(norms, sim)
        assert np.allclose(S, S.transpose(0, 2, 1)) and (np.diagonal(S, axis1=1, axis2=2) == 1).all()
        assert S[0, 0, 1] == 1.0 and S[0, 0, 2] == 0.0 and S[1, 0, 1] == 0.0
        assert ((S >= 0) & (S <= 1)).all()
    assert rules.similarity_matrices([["a b c d", "a b x y", "q"]], "f1")[0, 0, 1] == 0.5


# ------------------------------------------------------------ the other rules against references by hand

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
TOKENS = DefaultTokenizer(use_stemmer=True)
KINDS = {"weighted": ("weighted", "rouge"), "weighted-f1": ("weighted", "f1"),
         "weighted-chrf": ("weighted", "chrf"), "quorum": ("quorum", "rouge")}


@lru_cache(maxsize=None)
def similarity_by_hand(a: str, b: str, sim: str) -> float:
    """Of two normalized texts: ROUGE-L F1 (rouge-score, stemmed), token F1 (rouge-score's stemmed
    tokens) or chrF (character 1..6-grams without spaces, mean precision and recall, beta 1). Equal
    non-empty texts score 1, as an exact match."""
    if a and a == b:
        return 1.0
    if sim == "rouge":
        return SCORER.score(a, b)["rougeL"].fmeasure
    if sim == "f1":
        ta, tb = TOKENS.tokenize(a), TOKENS.tokenize(b)
        common = sum(min(ta.count(t), tb.count(t)) for t in set(ta))
        return 2 * common / (len(ta) + len(tb)) if common else 0.0
    sa, sb = a.replace(" ", ""), b.replace(" ", "")
    ps, rs = [], []
    for n in range(1, 7):
        ga = Counter(sa[i:i + n] for i in range(len(sa) - n + 1))
        gb = Counter(sb[i:i + n] for i in range(len(sb) - n + 1))
        if ga and gb:
            common = sum(min(c, gb[g]) for g, c in ga.items())
            ps.append(common / sum(gb.values()))
            rs.append(common / sum(ga.values()))
    if not ps:
        return 0.0
    p, r = sum(ps) / len(ps), sum(rs) / len(rs)
    return 2 * p * r / (p + r) if p + r else 0.0


def rule_by_hand(rows: list[list[str]], rule: str, threshold: float = 0.01, quorum: int = 0):
    """The weighted and quorum rules (rules.py's docstring), the slow way. Per row: (the kept
    candidate's index or None, the indices that tie with it for the most votes)."""
    return [(pick if conf > threshold and nonempty else None, ties)
            for pick, conf, nonempty, ties in scores_by_hand(rows, rule, quorum)]


def scores_by_hand(rows: list[list[str]], rule: str, quorum: int = 0):
    """Per row: the pick (the earliest of the most voted), the confidence, whether the pick is
    non-empty, and the candidates that tie for the most votes."""
    kind, sim = KINDS[rule]
    n = len(rows[0])
    norm = [[" ".join(c.lower().translate(str.maketrans("", "", string.punctuation)).split()) for c in r]
            for r in rows]
    S = [[[1.0 if i == j else similarity_by_hand(r[i], r[j], sim) for j in range(n)] for i in range(n)]
         for r in norm]
    # each model's weight: its mean similarity to the other models, over every row
    w = [sum(sum(S[k][j][i] for i in range(n) if i != j) / (n - 1) for k in range(len(rows))) / len(rows)
         for j in range(n)]
    out = []
    for k, r in enumerate(norm):
        pairs = lambda members: [S[k][i][j] for i, j in combinations(members, 2)]  # noqa: E731
        if kind == "weighted":
            members, conf = list(range(n)), min(pairs(range(n)))
        else:  # the k-subset whose weakest pair agrees most (the first such)
            size = quorum or n // 2 + 1
            cliques = list(combinations(range(n), size))
            conf = max(min(pairs(c)) for c in cliques)
            members = list(next(c for c in cliques if min(pairs(c)) == conf))
        votes = {i: sum(w[j] * S[k][i][j] for j in range(n)) for i in members}  # a model votes for itself too
        best = max(votes.values())
        ties = [i for i in members if votes[i] > best - 1e-9]
        if any(r[i] and r.count(r[i]) >= 2 for i in range(n)):
            conf = 1.0  # an exact match: kept at every threshold (the pick stays the vote's)
        out.append((ties[0], conf, bool(r[ties[0]]), ties))
    return out


def tie_heavy_candidates(seed: int, rows: int, n: int) -> list[list[str]]:
    """Random rows with exact-match groups and tiny shared vocabularies (ties in every vote)."""
    rng = random.Random(seed)
    batch = []
    for _ in range(rows):
        o = [random_text(rng, 0, 8) for _ in range(n)]
        r = rng.random()
        if r < 0.2:  # an exact-match group, changed only in case and punctuation
            o[rng.randrange(n)] = o[rng.randrange(n)].upper() + rng.choice(["", "!", " ."])
        elif r < 0.35:
            o = [" ".join(rng.choice("ab") for _ in range(rng.randint(1, 3))) for _ in range(n)]
        batch.append(o)
    return batch


def test_the_rules_by_hand_cover_every_rule():
    assert set(KINDS) | {"paper"} == set(rules.RULES)


@pytest.mark.parametrize("rule", sorted(KINDS))
@pytest.mark.parametrize("n", [3, 5])
def test_rule_matches_the_reference_by_hand(rule, n):
    """select against rule_by_hand on random rows and on rows full of ties and exact matches. The
    pick must be the earliest of the tied candidates (votes within 1e-9: the sums are floats)."""
    batch = random_candidates(10 + n, rows=100, n=n)[1] + tie_heavy_candidates(20 + n, 100, n)
    scored = scores_by_hand(batch, rule)
    for t in (0.0, 0.01, 0.3):
        want = [(pick if conf > t and nonempty else None, ties) for pick, conf, nonempty, ties in scored]
        got = rules.select(batch, rule, t)
        assert [d.winner for d in got] == [p for p, _ in want], t
        for c, d, (_, ties) in zip(batch, got, want):
            groups = [i for i in range(n) if normalize(c[i]) and [normalize(x) for x in c].count(normalize(c[i])) >= 2]
            assert d.kept == (d.winner is not None) and d.output == (None if d.winner is None else c[d.winner])
            if d.kept:
                assert d.rule == ("exact" if d.winner in groups else rule), (c, d)
        if t == 0.01:  # every branch occurs: an exact match, a vote, a dropped row, a tie
            assert {d.rule for d in got} == {"exact", rule, "below_threshold"}
            assert any(len(ties) > 1 for _, ties in want)


@pytest.mark.parametrize("quorum", [2, 3, 4])
def test_quorum_size_matches_the_reference_by_hand(quorum):
    batch = random_candidates(15, rows=100, n=5)[1] + tie_heavy_candidates(25, 100, 5)  # texts as above
    want = rule_by_hand(batch, "quorum", 0.01, quorum)
    assert [d.winner for d in rules.select(batch, "quorum", 0.01, quorum=quorum)] == [p for p, _ in want]


def test_quorum_outside_2_to_n_is_refused():
    rows = [["a", "b", "c"]]
    for q in (1, 4):
        with pytest.raises(rules.UserError, match=f"quorum {q}: must be between 2 and 3"):
            rules.select(rows, "quorum", quorum=q)


@pytest.mark.parametrize("sim", ["rouge", "f1", "chrf"])
def test_similarity_matrices_match_the_reference_by_hand(sim):
    batch = random_candidates(41, rows=80, n=4)[1] + tie_heavy_candidates(42, 40, 4)
    norms = [[normalize(c) for c in r] for r in batch]
    S = rules.similarity_matrices(norms, sim)
    want = [[[1.0 if i == j else similarity_by_hand(r[i], r[j], sim) for j in range(4)] for i in range(4)]
            for r in norms]
    assert np.allclose(S, np.array(want), rtol=0, atol=1e-12)


def test_unknown_rule_and_too_few_candidates():
    with pytest.raises(ValueError, match="unknown rule 'best'"):
        rules.select([["a", "b", "c"]], "best")
    for rule in rules.RULES:
        with pytest.raises(ValueError):
            rules.select([["a", "b"]], rule)
        assert rules.select([], rule) == []
