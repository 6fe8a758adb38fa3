"""Command line: `python run.py COMMAND` (or `ensemble-instruct COMMAND`).

Only light modules are imported here; each command imports what it needs, so `--help` and
`ensemble` start without torch or llama.cpp.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Generate instruction-tuning data with Ensemble-Instruct on local quantized models.")


@app.callback()
def _root() -> None:
    """Generate instruction-tuning data with Ensemble-Instruct on local quantized models."""


@app.command()
def ensemble(
    instances: Path = typer.Argument(..., help="JSONL with instruction, input, output (the generator's), optional id."),
    outputs: List[Path] = typer.Argument(..., help="Two or more JSONL files with output (optional id, instruction)."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the kept instances (JSONL)."),
    threshold: float = typer.Option(0.01, help="Keep only if every pairwise ROUGE-L F1 is above this."),
):
    """Keep only the instances whose candidate outputs agree (CPU only, no model)."""
    from . import ensemble as ens
    from .store import read_jsonl, write_jsonl

    if len(outputs) < 2:
        raise UserError("ensemble needs at least 2 OUTPUTS files (3 candidates per instance)")
    if not 0 <= threshold < 1:
        raise UserError(f"--threshold must be in [0, 1), got {threshold}")
    for p in [instances, *outputs]:
        if not p.is_file():
            raise UserError(f"{p}: file not found")
    names = [str(p) for p in [instances, *outputs]]
    inst = read_jsonl(instances)
    cands = ens.align(inst, [read_jsonl(p) for p in outputs], names)
    decisions = ens.ensemble(cands, threshold)
    sources = ["generator"] + [p.stem for p in outputs]
    write_jsonl(out, (ens.decision_record(i, d, sources) for i, d in zip(inst, decisions) if d.kept))
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d.rule] = counts.get(d.rule, 0) + 1
    kept = sum(d.kept for d in decisions)
    typer.echo(f"kept {kept} of {len(decisions)}, dropped {len(decisions) - kept} "
               f"(exact match: {counts.get('exact', 0)}, rouge-l: {counts.get('rouge', 0)}, "
               f"below threshold: {counts.get('below_threshold', 0)}) -> {out}")


def main() -> None:
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
