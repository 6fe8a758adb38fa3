import random

import numpy as np
from rouge_score import rouge_scorer

from conftest import random_text
from ensemble_instruct.similarity import rouge_l, rouge_matrix, rouge_pairs_encoded, encode_texts, Vocab, tokenize
from rouge_score import tokenize as rs_tokenize
from nltk.stem import porter


def ref(a, b, stem):
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem).score(a, b)["rougeL"].fmeasure


def test_rouge_l_equals_rouge_score_exactly_on_random_pairs():
    rng = random.Random(0)
    for stem in (False, True):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
        for _ in range(3000):
            a, b = random_text(rng), random_text(rng)
            if rng.random() < 0.2:  # near copies give high scores and many ties
                b = " ".join(a.split()[: rng.randint(0, 12)]) + " " + random_text(rng, 0, 3)
            expected = scorer.score(a, b)["rougeL"].fmeasure
            assert rouge_l(a, b, stem) == expected, (a, b, stem)


def test_ties_and_edge_cases():
    cases = [
        ("", ""), ("", "a cat"), ("a cat", ""), ("!!!", "cat"), ("日本 語", "日本 語"),
        ("a b c d e f g h i j", "a b c d e f g x y z"),          # 7/10 vs 7/10
        ("a b c d e f g h i j", "a b c d e f g"),                # 7/10 vs 7/7
        ("one two three", "three two one"),
        ("Running runs ran", "run running runner"),
        ("The cat's hat.", "the cat s hat"),
    ]
    for a, b in cases:
        for stem in (False, True):
            assert rouge_l(a, b, stem) == ref(a, b, stem), (a, b, stem)
    assert rouge_l("a b c d e f g h i j", "a b c d e f g x y z") == 0.7


def test_tokenizer_matches_rouge_score():
    rng = random.Random(5)
    stemmer = porter.PorterStemmer()
    for _ in range(500):
        t = random_text(rng)
        assert tokenize(t, False) == rs_tokenize.tokenize(t, None)
        assert tokenize(t, True) == rs_tokenize.tokenize(t, stemmer)


def test_matrix_and_pairs_equal_scalar():
    rng = random.Random(1)
    q = [random_text(rng) for _ in range(60)]
    c = [random_text(rng) for _ in range(45)]
    for stem in (False, True):
        m = rouge_matrix(q, c, stem)
        assert m.shape == (60, 45)
        for i in range(60):
            for j in range(45):
                assert m[i, j] == ref(q[i], c[j], stem)
        vocab = Vocab()
        ea, eb = encode_texts(q[:45], stem, vocab), encode_texts(c, stem, vocab)
        pairs = rouge_pairs_encoded(ea, eb)
        assert [float(x) for x in pairs] == [ref(q[i], c[i], stem) for i in range(45)]


def test_matrix_of_empty_lists():
    assert rouge_matrix([], ["a"]).shape == (0, 1)
    assert rouge_matrix(["a"], []).shape == (1, 0)
