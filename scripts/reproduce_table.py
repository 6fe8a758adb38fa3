"""The paper's table for `make reproduce`: model, training data, ROUGE-L per held-out task set.

    python scripts/reproduce_table.py OUT    # reads OUT/tuned/manifest.json, OUT/dpo/manifest.json (if
                                             # any) and OUT/eval-*/metrics.json

writes OUT/reproduce.md and prints it. Both of the paper's task sets always get a column: a set that
was not evaluated here (SuperNI, until scripts/superni_sample.py has built its sample) says so in its
cells and in a note under the table, never a number. Under the table, per task set: tuned minus base,
task by task (mean, a 95% paired bootstrap interval, how many tasks got better / worse / stayed equal).
With OUT/dpo (DPO on the run's preference pairs on top of the SFT, the third model evaluated), an
"SFT + DPO" row, and the same interval for SFT + DPO minus base and SFT + DPO minus SFT.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SETS = ("user-oriented", "superni")  # the paper's two held-out sets (ensemble_instruct.tasksets.NAMES)
NOT_EVALUATED = {
    "superni": "SuperNI was **not evaluated**: its test tasks cannot be downloaded by this tool, so the sample "
               "is not built here. Clone allenai/natural-instructions, run `python scripts/superni_sample.py "
               "--repo PATH`, then `make reproduce` again (finished steps are not redone).",
    "user-oriented": "user-oriented was **not evaluated** (no OUT/eval-user-oriented/metrics.json).",
}
RESAMPLES = 10_000


def fail(message: str):
    """Bad input: one line on stderr, exit 2 (as the CLI)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{path} not found (run the finetune and evaluate steps of `make reproduce` first)")
    except ValueError as e:
        fail(f"{path}: not valid JSON ({e})")


def paired(rows: list[dict], base: str, tuned: str, seed: int = 0) -> dict:
    """Tuned minus base ROUGE-L task by task: mean, 95% bootstrap interval (fixed seed), better/worse/equal."""
    d = np.array([r["rouge_l"][tuned] - r["rouge_l"][base] for r in rows])
    idx = np.random.default_rng(seed).integers(0, len(d), size=(RESAMPLES, len(d)))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return {"mean": float(d.mean()), "low": float(lo), "high": float(hi), "better": int((d > 0).sum()),
            "worse": int((d < 0).sum()), "equal": int((d == 0).sum()), "tasks": len(d)}


def table(out: Path) -> str:
    tuned = _read(out / "tuned" / "manifest.json")
    metrics = {p.parent.name[len("eval-"):]: _read(p) for p in sorted(out.glob("eval-*/metrics.json"))}
    if not metrics:
        fail(f"{out}: no eval-*/metrics.json (run the evaluate step of `make reproduce` first)")
    sets = [*SETS, *(s for s in metrics if s not in SETS)]
    models = list(next(iter(metrics.values()))["models"])  # base first, then the tuned model (--models order)
    run = Path(tuned["run"])
    try:
        run = run.relative_to(Path.cwd())
    except ValueError:
        pass
    data = (f"{run}: {tuned['examples']} kept examples ({tuned['decontamination']['dropped']} dropped as "
            f"close to an evaluation task), {tuned['steps']} steps")
    head = ["model", "training data",
            *(f"{s} ROUGE-L ({metrics[s]['rows']} tasks)" if s in metrics else f"{s} ROUGE-L" for s in sets)]
    dpo = _read(out / "dpo" / "manifest.json") if (out / "dpo" / "manifest.json").is_file() else None
    kinds = ["- (base)", data] + [data] * (len(models) - 2)
    if dpo is not None and len(models) >= 3:
        kinds[2] = (f"SFT + DPO: {dpo['pairs']} preference pairs ({dpo['decontamination']['dropped']} dropped), "
                    f"{dpo['steps']} steps, beta {dpo.get('beta', '?')}")
    rows = [[m, kinds[k],
             *(f"{metrics[s]['models'][m]['rouge_l']:.3f}" if s in metrics else "not evaluated" for s in sets)]
            for k, m in enumerate(models)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    notes = []
    for s in sets:
        if s not in metrics:
            notes.append(NOT_EVALUATED.get(s, f"{s} was not evaluated."))
            continue
        if len(models) < 2 or not (out / f"eval-{s}" / "rows.jsonl").is_file():
            continue
        rows_s = [json.loads(x) for x in (out / f"eval-{s}" / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
        pairs = [(models[1], models[0])] + ([(models[2], models[0]), (models[2], models[1])]
                                            if dpo is not None and len(models) >= 3 else [])
        for tuned_m, base_m in pairs:
            p = paired(rows_s, base_m, tuned_m)
            notes.append(f"{s}, {tuned_m} minus {base_m} task by task: mean {p['mean']:+.3f}, 95% bootstrap "
                         f"interval [{p['low']:+.3f}, {p['high']:+.3f}] ({RESAMPLES} resamples of the {p['tasks']} "
                         f"tasks); better on {p['better']}, worse on {p['worse']}, equal on {p['equal']}.")
    exact = "; ".join(f"{s}: " + ", ".join(f"{m} {100 * metrics[s]['models'][m]['exact']:.1f}%" for m in models)
                      for s in sets if s in metrics)
    return ("# Base vs tuned on held-out tasks\n\n" + "\n".join(lines) + "\n\n" + "".join(f"- {n}\n" for n in notes)
            + f"- Exact match: {exact}.\n"
            + f"\nFine-tuning: {tuned.get('train_s', '?')} s of training on {tuned.get('device', '?')} "
              f"({tuned.get('method', '?')})"
            + (f"; DPO: {dpo.get('train_s', '?')} s ({dpo.get('method', '?')})" if dpo is not None else "") + ".\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: python scripts/reproduce_table.py OUT   (the folder `make reproduce` wrote)")
    out = Path(sys.argv[1])
    text = table(out)
    (out / "reproduce.md").write_text(text, encoding="utf-8")
    print(text)
