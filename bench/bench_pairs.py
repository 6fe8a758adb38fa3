"""Preference pairs: the pair rule (`ensemble_instruct.pairs`) against the naive max/min rule, on
every 3-model combination of the available answer sets for the 252 user-oriented tasks with gold.

Per rule: the share of instances that yield a pair, and of those pairs the share whose chosen
answer is closer to gold (ROUGE-L F1, stemmed, gold as target) than the rejected one (wins), as
close (ties), or further (losses). The rules never see gold.

Answer sets:
- `--answers DIR` (repeatable): answers_<model>.jsonl as `run.py evaluate` writes them. Outputs
  are taken as the models wrote them; `--blank-filtered` turns those with a `reason` (loop, echo,
  empty) into "" first, as the ensemble stage does today.
- `--predictions DIR`: Self-Instruct's human_eval/predictions/*_predictions.jsonl (GitHub
  yizhongw/self-instruct, Apache-2.0; eight GPT-3 models' answers to these tasks), used twice: as
  released, and cut at the first blank line as the outputs stage stops (`[outputs] stop`).
- constructed models (bench/bench_rules.py's noisy copies of gold), unless `--answers-only`.
  A smoke test: their errors are made up.

    python bench/bench_pairs.py --predictions ../self-instruct/human_eval/predictions \\
        --answers runs/pairs-answers/tiny [--ablation] [--detail]
"""
import argparse
import json
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_rules import construct  # noqa: E402

from ensemble_instruct import pairs, tasksets  # noqa: E402
from ensemble_instruct.evaluate import gold_rouge  # noqa: E402

DEFAULT = pairs.PairSettings()
# Where the gain comes from: each step adds one change to the one above; the last is the default.
STEPS = [
    ("naive (margin 0.1)", None),
    ("flaw-aware agreement, margin 0.1", pairs.PairSettings(margin=0.1, max_agreement_ratio=1, max_length_ratio=0, empty_rejected=True)),
    ("+ no empty rejected", pairs.PairSettings(margin=0.1, max_agreement_ratio=1, max_length_ratio=0)),
    ("+ length guard 2", pairs.PairSettings(margin=0.1, max_agreement_ratio=1)),
    ("+ margin 0.05 and ratio 0.8 (default)", DEFAULT),
]
VARIANTS = [  # one knob moved from the default
    ("naive, margin 0.05", "naive0.05"),
    ("default, margin 0.1", pairs.PairSettings(margin=0.1)),
    ("default, no ratio", pairs.PairSettings(max_agreement_ratio=1)),
    ("default, ratio 0.7", pairs.PairSettings(max_agreement_ratio=0.7)),
    ("default, ratio 0.6", pairs.PairSettings(max_agreement_ratio=0.6)),
    ("default, length guard 1.5", pairs.PairSettings(max_length_ratio=1.5)),
    ("default, length guard 3", pairs.PairSettings(max_length_ratio=3)),
    ("default, no length guard", pairs.PairSettings(max_length_ratio=0)),
    ("default, empty rejected allowed", pairs.PairSettings(empty_rejected=True)),
    ("default, no flawed rejected", pairs.PairSettings(flawed_rejected=False)),
    ("default, min support 0.2", pairs.PairSettings(min_support=0.2)),
]


# ---------------------------------------------------------------- answer sets

def read_answers(folder: Path, tasks: list[dict], blank_filtered: bool) -> dict[str, list[str]]:
    out = {}
    for p in sorted(folder.glob("answers_*.jsonl")):
        table = {}
        for line in p.read_text().splitlines():
            r = json.loads(line)
            table[r["id"]] = "" if blank_filtered and r.get("reason") else r["output"]
        if all(t["id"] in table for t in tasks):
            out[p.stem.removeprefix("answers_")] = [table[t["id"]] for t in tasks]
        else:
            print(f"(skipped {p}: answers for {sum(t['id'] in table for t in tasks)} of {len(tasks)} tasks)")
    return out


def read_predictions(folder: Path, tasks: list[dict]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Self-Instruct's released predictions, matched to the tasks by instruction and input:
    (as released, cut at the first blank line)."""
    index = {(t["instruction"].strip(), t["input"].strip()): k for k, t in enumerate(tasks)}
    raw, cut = {}, {}
    for p in sorted(folder.glob("*_predictions.jsonl")):
        texts: list[str | None] = [None] * len(tasks)
        for line in p.read_text().splitlines():
            r = json.loads(line)
            k = index.get((r["instruction"].strip(), r["input"].strip()))
            if k is not None:
                texts[k] = r["response"]
        if any(t is None for t in texts):
            print(f"(skipped {p}: not every task answered)")
            continue
        name = p.name.removesuffix("_predictions.jsonl")
        raw[name] = [t.strip() for t in texts]
        cut[name] = [t.lstrip().split("\n\n")[0].strip() for t in texts]
    return raw, cut


# ---------------------------------------------------------------- measuring

def measure(tasks: list[dict], models: dict[str, list[str]], rulesets: list[tuple[str, object]], size: int = 3):
    """Per rule: totals over every combination of `size` models, and per-combination numbers."""
    names = list(models)
    gold = [t["output"] for t in tasks]
    rows = [(t["instruction"], t["input"], [(m, models[m][k]) for m in names]) for k, t in enumerate(tasks)]
    scored = pairs.score_candidates(rows)
    R = gold_rouge(gold, [[models[m][k] for m in names] for k in range(len(tasks))])
    result = {label: {"pairs": 0, "win": 0, "tie": 0, "instances": 0, "combos": [], "by_flaw": {}, "flawed_chosen": [0, 0]}
              for label, _ in rulesets}
    for combo in combinations(range(len(names)), size):
        subs = [sc.subset(combo) for sc in scored]
        for label, rule in rulesets:
            agg = result[label]
            p = w = t = 0
            for k, sc in enumerate(subs):
                if rule is None or isinstance(rule, str):
                    pair = pairs.decide_naive(sc, 0.05 if rule == "naive0.05" else 0.1)
                else:
                    pair = pairs.decide(sc, rule)
                if pair is None:
                    continue
                d = R[k, combo[pair.chosen_index]] - R[k, combo[pair.rejected_index]]
                p += 1
                w += d > 1e-12
                t += abs(d) <= 1e-12
                f = agg["by_flaw"].setdefault(pair.rejected_flaw or "none", [0, 0])
                f[0] += 1
                f[1] += d > 1e-12
                if sc.flaws[pair.chosen_index]:
                    agg["flawed_chosen"][0] += 1
                    agg["flawed_chosen"][1] += d > 1e-12
            agg["pairs"] += p
            agg["win"] += w
            agg["tie"] += t
            agg["instances"] += len(subs)
            agg["combos"].append(([names[i] for i in combo], p / len(subs), w / p if p else None))
    return result


def fmt_row(label: str, a: dict, base: dict | None) -> str:
    p = a["pairs"]
    rate, win, tie = p / a["instances"], a["win"] / max(p, 1), a["tie"] / max(p, 1)
    wins = [c[2] for c in a["combos"] if c[2] is not None]
    vs = ""
    if base is not None:
        better = sum(c[2] is not None and b[2] is not None and c[2] >= b[2] for c, b in zip(a["combos"], base["combos"]))
        vs = f" | {better} of {len(a['combos'])}"
    return (f"| {label} | {rate:.3f} | {win:.3f} | {tie:.3f} | {1 - win - tie:.3f} | "
            f"{min(wins):.3f} .. {max(wins):.3f} | {p}{vs} |" if wins else f"| {label} | 0 | - | - | - | - | 0{vs} |")


def table(result: dict, rulesets, title: str, base_label: str) -> list[str]:
    lines = [f"### {title}", "",
             "| rule | pair share | chosen wins | ties | chosen loses | wins, min .. max over combinations | pairs"
             f" | combinations with wins >= naive's |", "|---|---|---|---|---|---|---|---|"]
    for label, _ in rulesets:
        lines.append(fmt_row(label, result[label], None if label == base_label else result[base_label]))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", type=Path, action="append", default=[], help="answers_<model>.jsonl folder (repeatable)")
    ap.add_argument("--blank-filtered", action="store_true", help="outputs with a reason become '' (today's ensemble stage)")
    ap.add_argument("--predictions", type=Path, help="self-instruct's human_eval/predictions folder")
    ap.add_argument("--answers-only", action="store_true", help="skip the constructed models")
    ap.add_argument("--seed", type=int, default=1, help="seed of the constructed models")
    ap.add_argument("--exclude", action="append", default=[], help="leave out the answer set of this model (repeatable)")
    ap.add_argument("--ablation", action="store_true", help="also: each change on its own, and one knob at a time")
    ap.add_argument("--detail", action="store_true", help="every combination, naive vs the rule")
    a = ap.parse_args()
    t0 = time.perf_counter()
    tasks, _ = tasksets.load("user-oriented")
    sets = []
    if a.predictions:
        raw, cut = read_predictions(a.predictions, tasks)
        sets += [(f"Self-Instruct predictions as released ({a.predictions})", raw),
                 ("Self-Instruct predictions cut at the first blank line", cut)]
    for d in a.answers:
        sets.append((f"answers in {d}" + (" (filtered outputs blanked)" if a.blank_filtered else ""),
                     read_answers(d, tasks, a.blank_filtered)))
    if not a.answers_only:
        sets.append((f"constructed models (seed {a.seed}; smoke test)", construct(tasks, a.seed)))
    rulesets = [("naive (margin 0.1)", None), ("pair rule (default)", DEFAULT)]
    if a.ablation:
        rulesets = STEPS + VARIANTS
    print(f"pair rule defaults: {DEFAULT}\n")
    for title, models in sets:
        if a.exclude:
            models = {m: v for m, v in models.items() if m not in a.exclude}
            title += f", without {', '.join(a.exclude)}"
        if len(models) < 3:
            print(f"## {title}: fewer than 3 answer sets\n")
            continue
        R = gold_rouge([t["output"] for t in tasks], [list(x) for x in zip(*models.values())])
        print(f"## {title}\n")
        print("models, ROUGE-L vs gold: " + ", ".join(f"{m} {R[:, i].mean():.3f}" for i, m in enumerate(models)) + "\n")
        result = measure(tasks, models, rulesets)
        n = len(result[rulesets[0][0]]["combos"])
        print("\n".join(table(result, rulesets, f"{n} combinations of 3 models x {len(tasks)} tasks", rulesets[0][0])))
        print()
        for label in (rulesets[0][0], "pair rule (default)" if not a.ablation else STEPS[-1][0]):
            r = result[label]
            fc = r["flawed_chosen"]
            print(f"{label}: pairs by the rejected answer's flaw (pairs, chosen wins): " +
                  ", ".join(f"{f} {v[0]} ({v[1] / v[0]:.3f})" for f, v in sorted(r["by_flaw"].items())) +
                  f"; flawed chosen: {fc[0]}" + (f" ({fc[1] / fc[0]:.3f})" if fc[0] else ""))
        print()
        if a.detail:
            base, mine = result[rulesets[0][0]], result[STEPS[-1][0] if a.ablation else "pair rule (default)"]
            print("| models | naive: pair share, wins | rule: pair share, wins |\n|---|---|---|")
            for b, m in zip(base["combos"], mine["combos"]):
                f = (lambda c: f"{c[1]:.2f}, {c[2]:.2f}" if c[2] is not None else f"{c[1]:.2f}, -")
                print(f"| {', '.join(b[0])} | {f(b)} | {f(m)} |")
            print()
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
