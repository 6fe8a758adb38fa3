"""Ensemble step: a rouge-score implementation of the spec vs ours.

N instances x 3 candidate outputs of 20-200 words, drawn from a word list with overlap between
candidates, plus some exact (after normalization) agreements. Prints both times, the ratio, and
checks that both keep the same output for every instance.

    python bench/bench_ensemble.py [--n 20000]
"""
import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rouge_score import rouge_scorer  # noqa: E402

from ensemble_instruct.ensemble import ensemble, normalize  # noqa: E402

WORDS = ("the of and to in is was for that with as on by be at this from are an which or have "
         "not had has were but their they its one all more been can would will also other some "
         "run running runs ran answer answers answered write writes writing summarize summary "
         "list lists listed generate generation generated happy happily happiness connect "
         "connection connected relate relation relational result results resulting").split()


def make_instances(n: int, rng: random.Random) -> list[list[str]]:
    out = []
    for _ in range(n):
        base = [rng.choice(WORDS) for _ in range(rng.randint(20, 200))]
        cands = []
        for _ in range(3):
            words = [w if rng.random() > 0.3 else rng.choice(WORDS) for w in base]
            cut = rng.randint(0, len(words) // 4)
            words = words[cut:] if rng.random() < 0.5 else words[: len(words) - cut]
            text = " ".join(words)
            cands.append(text.capitalize() + "." if rng.random() < 0.5 else text)
        r = rng.random()
        if r < 0.1:  # exact agreement after normalization
            cands[2] = cands[0].upper() + "!"
        elif r < 0.2:  # an unrelated candidate: dropped
            cands[1] = "zebra quartz xylophone"
        out.append(cands)
    return out


def reference(instances: list[list[str]], threshold: float = 0.01) -> list[str | None]:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    kept = []
    for cands in instances:
        norms = [normalize(c) for c in cands]
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(norms):
            if t:
                groups.setdefault(t, []).append(i)
        best = max((g for g in groups.values() if len(g) >= 2), key=len, default=None)
        if best:
            kept.append(cands[best[0]])
            continue
        n = len(cands)
        s = {(i, j): scorer.score(norms[i], norms[j])["rougeL"].fmeasure for i in range(n) for j in range(i + 1, n)}
        if min(s.values()) > threshold:
            sums = [sum(v for (i, j), v in s.items() if k in (i, j)) for k in range(n)]
            kept.append(cands[sums.index(max(sums))])
        else:
            kept.append(None)
    return kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    instances = make_instances(args.n, random.Random(args.seed))

    t0 = time.perf_counter()
    ours = [d.output for d in ensemble(instances)]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference(instances)
    t_ref = time.perf_counter() - t0

    assert ours == ref, "selections differ"
    kept = sum(o is not None for o in ours)
    print(f"ensemble: {len(instances)} instances x 3 outputs, kept {kept}, dropped {len(ours) - kept}; "
          "selections identical")
    print(f"rouge-score implementation: {t_ref:.2f} s")
    print(f"ensemble-instruct: {t_ours:.3f} s")
    print(f"speed-up: {t_ref / t_ours:.0f}x")


if __name__ == "__main__":
    main()
