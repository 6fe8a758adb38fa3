"""Selection rules vs the best single model, on every three-model combination.

Gold: the 175 seed tasks' outputs. Candidates: (1) constructed models, noisy copies of gold with
different error rates, wrong answers on hard rows, and two "herd" models that often give the same
wrong answer; (2) optionally, real answers from an evaluation directory (`run.py evaluate --out DIR`
writes answers_<model>.jsonl). For each combination and rule: the kept fraction, the pick's ROUGE-L
vs gold on the kept rows, and the best of the three models on the same rows. A rule "wins" a
combination when its pick matches or beats that best single model on the rows it keeps.

    python bench/bench_rules.py [--seed 1] [--detail]
    python bench/bench_rules.py --answers runs/evaluate-tiny --limit 60 --answers-only
"""
import argparse
import json
import random
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ensemble_instruct import rules  # noqa: E402
from ensemble_instruct.evaluate import gold_rouge, load_tasks  # noqa: E402

CHATTER = ["Sure! Here is the answer:", "Of course.", "I hope this helps!", "Let me know if you need more."]
GENERIC = ["I'm sorry, I cannot answer that.", "Yes.", "No.", "The answer is not known.",
           "This depends on many factors."]
# name: (chance of a wrong answer, word error rate, style, chance a wrong answer is the herd's)
MODELS = {
    "strong": (0.10, 0.05, None, 0.0),
    "good": (0.20, 0.10, None, 0.0),
    "fair": (0.30, 0.20, None, 0.0),
    "weak": (0.45, 0.30, None, 0.0),
    "chatty": (0.20, 0.10, "chatty", 0.0),
    "terse": (0.20, 0.10, "terse", 0.0),
    "herd1": (0.50, 0.20, None, 0.8),
    "herd2": (0.50, 0.20, None, 0.8),
}


def construct(tasks: list[dict], seed: int) -> dict[str, list[str]]:
    """Each constructed model's answer to each task. Hard rows (shared difficulty) go wrong for
    several models at once, as real models fail together."""
    gold = [t["output"] for t in tasks]
    vocab = sorted({w for g in gold for w in g.split()})
    base = random.Random(f"{seed}/rows")
    difficulty = [base.betavariate(2, 2) for _ in tasks]
    herd = [base.choice(GENERIC + [gold[base.randrange(len(gold))]]) for _ in tasks]
    out = {}
    for name, (p_wrong, err, style, p_herd) in MODELS.items():
        rng = random.Random(f"{seed}/{name}")
        answers = []
        for k, g in enumerate(gold):
            if rng.random() < min(1.0, 2 * p_wrong * difficulty[k]):
                if rng.random() < p_herd:
                    answers.append(herd[k])
                else:
                    answers.append(rng.choice([rng.choice(GENERIC), gold[rng.randrange(len(gold))],
                                               tasks[k]["instruction"]]))
                continue
            words = []
            for w in g.split():
                r = rng.random()
                if r < err / 3:
                    continue  # dropped
                words.append(rng.choice(vocab) if r < 2 * err / 3 else w)
                if r > 1 - err / 3:
                    words.append(rng.choice(vocab))  # inserted
            text = " ".join(words)
            if style == "chatty":
                text = f"{rng.choice(CHATTER)} {text} {rng.choice(CHATTER)}"
            elif style == "terse":
                text = " ".join(text.split()[:12])
            answers.append(text)
        out[name] = answers
    return out


def read_answers(folder: Path, tasks: list[dict]) -> dict[str, list[str]]:
    out = {}
    for p in sorted(folder.glob("answers_*.jsonl")):
        table = {}
        for line in p.read_text().splitlines():
            r = json.loads(line)
            table[r["id"]] = "" if r.get("reason") else r["output"]
        if all(t["id"] in table for t in tasks):
            out[p.stem.removeprefix("answers_")] = [table[t["id"]] for t in tasks]
    return out


def combos(tasks: list[dict], models: dict[str, list[str]], threshold: float, size: int = 3):
    gold = [t["output"] for t in tasks]
    names = list(models)
    R_all = gold_rouge(gold, [list(x) for x in zip(*models.values())])
    rows = []
    for combo in combinations(range(len(names)), size):
        cands = [[models[names[i]][k] for i in combo] for k in range(len(gold))]
        R = R_all[:, combo]
        row = {"models": [names[i] for i in combo]}
        for rule in rules.RULES:
            s = rules.score(cands, rule)
            keep = rules.kept_mask(s, cands, threshold)
            if not keep.any():
                row[rule] = (0.0, None, None)
                continue
            pick = R[np.arange(len(gold)), s.pick][keep].mean()
            best = R[keep].mean(axis=0).max()
            row[rule] = (keep.mean(), pick, best)
        rows.append(row)
    return rows


def summary(rows: list[dict], title: str) -> list[str]:
    lines = [f"### {title}: {len(rows)} combinations", "",
             "| rule | wins (pick >= best single, same rows) | kept fraction (mean) | kept >= paper's | "
             "pick ROUGE-L (mean) | pick - best single (mean, min, max) |", "|---|---|---|---|---|---|"]
    for rule in rules.RULES:
        v = [r[rule] for r in rows if r[rule][1] is not None]
        d = np.array([p - b for _, p, b in v])
        wins = int((d >= -1e-12).sum())
        kept_ok = sum(r[rule][0] >= r["paper"][0] - 1e-12 for r in rows)
        lines.append(f"| {rule} | {wins} of {len(rows)} | {np.mean([k for k, _, _ in v]):.3f} | {kept_ok} of "
                     f"{len(rows)} | {np.mean([p for _, p, _ in v]):.3f} | {d.mean():+.3f} ({d.min():+.3f}, "
                     f"{d.max():+.3f}) |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1, help="seed of the constructed models (rules were tuned on 0)")
    ap.add_argument("--threshold", type=float, default=0.01)
    ap.add_argument("--answers", type=Path, help="an evaluation directory with answers_<model>.jsonl")
    ap.add_argument("--answers-only", action="store_true", help="skip the constructed models")
    ap.add_argument("--limit", type=int, help="first N tasks only")
    ap.add_argument("--detail", action="store_true", help="print every combination")
    a = ap.parse_args()
    tasks, _ = load_tasks(None)
    tasks = tasks[: a.limit] if a.limit else tasks
    gold = [t["output"] for t in tasks]
    sets = [] if a.answers_only else [(f"constructed models (seed {a.seed})", construct(tasks, a.seed))]
    if a.answers:
        sets.append((f"real answers in {a.answers}", read_answers(a.answers, tasks)))
    for title, models in sets:
        R = gold_rouge(gold, [list(x) for x in zip(*models.values())])
        print(f"## {title}\n")
        print("models, ROUGE-L vs gold: " + ", ".join(f"{m} {R[:, i].mean():.3f}" for i, m in enumerate(models)))
        print()
        if len(models) < 3:
            print("(fewer than 3 models)\n")
            continue
        for size in [3] + ([5] if len(models) >= 5 else [4] if len(models) == 4 else []):
            rows = combos(tasks, models, a.threshold, size)
            print("\n".join(summary(rows, f"{size} models, threshold {a.threshold:g}")))
            print()
            if a.detail or len(rows) <= 10:
                print("| models | " + " | ".join(rules.RULES) + " |")
                print("|---|" + "---|" * len(rules.RULES))
                for r in rows:
                    print(f"| {', '.join(r['models'])} | " + " | ".join(
                        "kept 0" if r[k][1] is None else f"kept {r[k][0]:.2f}: {r[k][1]:.3f} vs {r[k][2]:.3f}"
                        for k in rules.RULES) + " |")
                print("\n(per rule: kept fraction: pick's ROUGE-L vs the best single model's, on the kept rows)\n")


if __name__ == "__main__":
    main()
