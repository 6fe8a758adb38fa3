"""Novelty filter: a plain rouge-score loop (as Self-Instruct does it) vs ours.

175 seed instructions + N candidates made from the seed texts (exact repeats, near-repeats with
dropped words, and recombinations of two seeds), so that some are rejected. Prints both times, the
ratio, and checks that the keep decisions are identical.

    python bench/bench_novelty.py [--n 10000]
"""
import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rouge_score import rouge_scorer  # noqa: E402

from ensemble_instruct.novelty import filter_novel  # noqa: E402
from ensemble_instruct.seeds import load_seeds  # noqa: E402


def make_candidates(seeds: list[str], n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        a, b = rng.choice(seeds).split(), rng.choice(seeds).split()
        r = rng.random()
        if r < 0.15:
            words = a
        elif r < 0.35:
            words = [w for w in a if rng.random() > 0.15]
        else:
            words = a[: rng.randint(1, len(a))] + b[rng.randint(0, len(b) - 1):]
        out.append(" ".join(words))
    return out


def reference(candidates: list[str], existing: list[str], threshold: float = 0.7) -> list[bool]:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool, keep = list(existing), []
    for c in candidates:
        ok = all(scorer.score(c, p)["rougeL"].fmeasure <= threshold for p in pool)
        keep.append(ok)
        if ok:
            pool.append(c)
    return keep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    seeds = [t.instruction for t in load_seeds(ROOT / "seeds" / "seed_tasks.jsonl")]
    cands = make_candidates(seeds, args.n, random.Random(args.seed))

    t0 = time.perf_counter()
    ours = filter_novel(cands, seeds)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference(cands, seeds)
    t_ref = time.perf_counter() - t0

    assert ours == ref, "keep decisions differ"
    print(f"novelty filter: {len(seeds)} seeds + {len(cands)} candidates, kept {sum(ours)}, "
          f"rejected {len(ours) - sum(ours)}; decisions identical")
    print(f"rouge-score loop: {t_ref:.2f} s")
    print(f"ensemble-instruct: {t_ours:.3f} s")
    print(f"speed-up: {t_ref / t_ours:.0f}x")


if __name__ == "__main__":
    main()
