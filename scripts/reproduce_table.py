"""The paper's table for `make reproduce`: model, training data, ROUGE-L per held-out task set.

    python scripts/reproduce_table.py OUT    # reads OUT/tuned/manifest.json and OUT/eval-*/metrics.json

writes OUT/reproduce.md and prints it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def table(out: Path) -> str:
    tuned = json.loads((out / "tuned" / "manifest.json").read_text())
    evals = sorted(p for p in out.glob("eval-*") if (p / "metrics.json").is_file())
    metrics = {p.name[len("eval-"):]: json.loads((p / "metrics.json").read_text()) for p in evals}
    models = list(next(iter(metrics.values()))["models"]) if metrics else []
    data = (f"{tuned['run']}: {tuned['examples']} kept examples ({tuned['decontamination']['dropped']} dropped as "
            f"close to an evaluation task), {tuned['steps']} steps")
    head = ["model", "training data", *(f"{name} ROUGE-L ({m['rows']} tasks)" for name, m in metrics.items())]
    rows = [[m, data if k else "- (base)", *(f"{v['models'][m]['rouge_l']:.3f}" for v in metrics.values())]
            for k, m in enumerate(models)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return "# Base vs tuned on held-out tasks\n\n" + "\n".join(lines) + \
        f"\n\nFine-tuning: {tuned.get('train_s', '?')} s of training on {tuned.get('device', '?')} ({tuned.get('method', '?')}).\n"


if __name__ == "__main__":
    out = Path(sys.argv[1])
    text = table(out)
    (out / "reproduce.md").write_text(text, encoding="utf-8")
    print(text)
