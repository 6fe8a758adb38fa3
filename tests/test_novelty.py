import random

import numpy as np
from rouge_score import rouge_scorer

from bench.bench_novelty import make_candidates  # the benchmark's own candidate mix
from conftest import SEEDS
from ensemble_instruct.novelty import filter_novel, novelty_scores
from ensemble_instruct.seeds import load_seeds


def reference(candidates, existing, threshold=0.7):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool, res = list(existing), []
    for c in candidates:
        scores = [scorer.score(c, p)["rougeL"].fmeasure for p in pool]
        if scores and max(scores) > threshold:
            res.append((False, None, None))
            continue
        # self-instruct's {pool[i]: score for i in np.argsort(scores)[-10:][::-1]}, with a stable
        # sort so that equal scores have one order
        top = {pool[i]: scores[i] for i in np.argsort(scores, kind="stable")[-10:][::-1]}
        res.append((True, list(top.items()), float(np.mean(scores)) if scores else 0.0))
        pool.append(c)
    return res


def test_same_decisions_and_scores_as_rouge_score_loop():
    rng = random.Random(7)
    seeds = [t.instruction for t in load_seeds(SEEDS)]
    cands = make_candidates(seeds, 700, rng)
    ref = reference(cands, seeds)
    ours = novelty_scores(cands, seeds, block=64)  # small blocks: exercise block boundaries
    assert [n.keep for n in ours] == [r[0] for r in ref]
    assert 50 < sum(n.keep for n in ours) < 690  # the set really mixes kept and rejected
    for n, (keep, top, mean) in zip(ours, ref):
        if keep:
            assert list(n.most_similar.items()) == top  # whole: the same texts, scores and order
            assert n.mean_score == mean
    assert filter_novel(cands, seeds) == [r[0] for r in ref]


def test_threshold_is_strict_and_pool_includes_kept_candidates():
    # 7/10 overlap scores exactly 0.7: kept (reject only when > 0.7).
    base = "a b c d e f g h i j"
    assert filter_novel(["a b c d e f g x y z"], [base]) == [True]
    assert filter_novel(["a b c d e f g h x y"], [base]) == [False]
    # the second candidate copies the first kept one
    assert filter_novel(["one two three four", "one two three four"], []) == [True, False]


def test_no_existing_and_no_candidates():
    assert filter_novel([], ["x"]) == []
    n = novelty_scores(["hello world there"], [])[0]
    assert n.keep and n.most_similar == {} and n.mean_score == 0.0


def test_growing_pool_gives_the_one_shot_decisions():
    """The pipeline checks each request's items against a Pool it grows; same result as one call."""
    from ensemble_instruct.novelty import Pool

    rng = random.Random(11)
    seeds = [t.instruction for t in load_seeds(SEEDS)]
    cands = make_candidates(seeds, 300, rng)
    one_shot = novelty_scores(cands, seeds)
    pool, got = Pool(seeds), []
    for start in range(0, len(cands), 3):  # three items per "request"
        chunk = cands[start:start + 3]
        res = novelty_scores(chunk, pool)
        for text, n in zip(chunk, res):
            if n.keep:
                pool.add(text)
        got += res
    assert [(n.keep, n.max_score, n.mean_score, n.most_similar) for n in got] == \
        [(n.keep, n.max_score, n.mean_score, n.most_similar) for n in one_shot]
