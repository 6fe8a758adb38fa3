"""Exports of a run's dataset.jsonl for fine-tuning tools.

An export only reads the run directory: it never writes into it (a typo such as
`-o RUN/dataset.jsonl` would destroy the run), and it replaces its output file atomically, so an
interrupted export leaves the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import UserError
from .stages.ensemble import DATASET
from .store import dumps, read_jsonl, replace_text

FORMATS = ("alpaca", "jsonl", "sharegpt", "hf")


def prompt_text(r: dict) -> str:
    """The user turn: the instruction, then the input (if any) after a blank line."""
    return f"{r['instruction']}\n\n{r['input']}" if r.get("input") else r["instruction"]


def _check_out(run_dir: Path, out: Path) -> None:
    run, target = run_dir.resolve(), out.resolve()
    if target == run or run in target.parents:
        raise UserError(f"{out}: inside the run directory {run_dir}; export to a path outside it")


def export(run_dir: Path, fmt: str, out: Path) -> int:
    """Write the kept examples as `fmt` to `out`; return how many."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "manifest.json").is_file():
        raise UserError(f"{run_dir}: not a run directory (no manifest.json)")
    path = run_dir / DATASET
    if not path.exists():
        raise UserError(f"{run_dir}: no {DATASET} (finish the run first: python run.py generate --out {run_dir})")
    _check_out(run_dir, out)
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
            for r in read_jsonl(path, "run")]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out.parent}: cannot create the folder ({e.strerror})") from None
    if fmt == "alpaca":  # one JSON array of {instruction, input, output}
        replace_text(out, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    elif fmt == "jsonl":  # chat messages, one conversation per line
        chats = [{"messages": [{"role": "user", "content": prompt_text(r)},
                               {"role": "assistant", "content": r["output"]}]} for r in rows]
        replace_text(out, "".join(dumps(c) + "\n" for c in chats))
    elif fmt == "sharegpt":
        conv = [{"conversations": [{"from": "human", "value": prompt_text(r)}, {"from": "gpt", "value": r["output"]}]}
                for r in rows]
        replace_text(out, json.dumps(conv, ensure_ascii=False, indent=1) + "\n")
    elif fmt == "hf":
        _save_hf(rows, out)
    return len(rows)


def _save_hf(rows: list[dict], out: Path) -> None:
    """A datasets folder, saved next to `out` and then swapped in."""
    try:
        import datasets
    except ImportError:
        raise UserError("--format hf needs the datasets package (pip install '.[datasets]')") from None
    datasets.disable_progress_bars()
    cols = {k: [r[k] for r in rows] for k in ("instruction", "input", "output")}
    tmp, old = out.with_name(f".{out.name}.{os.getpid()}.tmp"), out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_dict(cols).save_to_disk(str(tmp))
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
