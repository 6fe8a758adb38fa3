"""Exports of a run's dataset.jsonl (and its preference pairs) for fine-tuning tools.

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
from .stages.ensemble import DATASET, PAIRS
from .store import dumps, read_jsonl, replace_text

FORMATS = ("alpaca", "jsonl", "sharegpt", "hf", "dpo", "dpo-chat")


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
    if fmt in ("dpo", "dpo-chat"):  # TRL's preference format, one pair per line
        pairs = dpo_rows(run_dir, load_pairs(run_dir), chat=fmt == "dpo-chat")
        if not pairs:
            raise UserError(f"{run_dir}: no preference pairs (no instance's outputs disagreed enough: "
                            "see [ensemble.pairs] in the README)")
        replace_text(out, "".join(dumps(p) + "\n" for p in pairs))
        return len(pairs)
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
        _save_hf(rows, dpo_rows(run_dir, load_pairs(run_dir), chat=False), out)
    return len(rows)


def load_pairs(run_dir: Path) -> list[dict]:
    """The run's pairs: its pairs.jsonl, or for a run made before pairs existed, computed from its
    stage files as `ensemble --run` would (nothing is written into the run)."""
    path = run_dir / PAIRS
    if path.exists():
        return read_jsonl(path, "run")
    from .rundir import open_existing
    from .stages.ensemble import all_pairs

    return all_pairs(open_existing(run_dir, lock_it=False))


def dpo_rows(run_dir: Path, pairs: list[dict], chat: bool) -> list[dict]:
    """TRL's preference format: {prompt, chosen, rejected}. The prompt is what the fine-tune step
    and `evaluate` send a model (the run's templates/output.txt: instruction, new line, input);
    `chat`: the conversational variant, the user turn as the chat exports write it."""
    if chat:
        return [{"prompt": [{"role": "user", "content": prompt_text(p)}],
                 "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    from . import templates
    from .rundir import open_existing

    cfg = open_existing(run_dir, lock_it=False).cfg
    tpl = templates.load("output.txt", cfg.path(cfg.templates_dir), templates.FIELDS["output"])
    return [{"prompt": templates.output_prompt(tpl, p["instruction"], p["input"]), "chosen": p["chosen"],
             "rejected": p["rejected"]} for p in pairs]


def _save_hf(rows: list[dict], pairs: list[dict], out: Path) -> None:
    """A datasets folder with two splits, the kept examples ("train") and the preference pairs
    ("pairs"), saved next to `out` and then swapped in."""
    try:
        import datasets
    except ImportError:
        raise UserError("--format hf needs the datasets package (pip install '.[datasets]')") from None
    datasets.disable_progress_bars()
    cols = {k: [r[k] for r in rows] for k in ("instruction", "input", "output")}
    tmp, old = out.with_name(f".{out.name}.{os.getpid()}.tmp"), out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    pair_cols = {k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols),
                          "pairs": datasets.Dataset.from_dict(pair_cols)}).save_to_disk(str(tmp))
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
