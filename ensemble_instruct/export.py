"""Exports of a run's dataset.jsonl for fine-tuning tools."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .store import read_jsonl

FORMATS = ("alpaca", "jsonl", "sharegpt", "hf")


def prompt_text(r: dict) -> str:
    """The user turn: the instruction, then the input (if any) after a blank line."""
    return f"{r['instruction']}\n\n{r['input']}" if r.get("input") else r["instruction"]


def export(run_dir: Path, fmt: str, out: Path) -> int:
    """Write the kept examples as `fmt` to `out`; return how many."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    path = Path(run_dir) / "dataset.jsonl"
    if not path.exists():
        raise UserError(f"{run_dir}: no dataset.jsonl (finish the run first: python run.py generate --out {run_dir})")
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
            for r in read_jsonl(path)]
    out = Path(out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True)
    if fmt == "alpaca":  # one JSON array of {instruction, input, output}
        out.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    elif fmt == "jsonl":  # chat messages, one conversation per line
        with open(out, "w", encoding="utf-8") as f:
            for r in rows:
                msgs = [{"role": "user", "content": prompt_text(r)}, {"role": "assistant", "content": r["output"]}]
                f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    elif fmt == "sharegpt":
        conv = [{"conversations": [{"from": "human", "value": prompt_text(r)}, {"from": "gpt", "value": r["output"]}]}
                for r in rows]
        out.write_text(json.dumps(conv, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    elif fmt == "hf":
        try:
            import datasets
        except ImportError:
            raise UserError("--format hf needs the datasets package (pip install -e '.[datasets]')") from None
        datasets.disable_progress_bars()
        cols = {k: [r[k] for r in rows] for k in ("instruction", "input", "output")}
        datasets.Dataset.from_dict(cols).save_to_disk(str(out))
    return len(rows)
