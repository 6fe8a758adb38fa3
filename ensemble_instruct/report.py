"""What a run made: the funnel through every stage, read from the run directory's files."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .store import read_jsonl

TYPES = ("A", "B")


def funnel(run_dir: Path) -> dict:
    """Counts per type: requests, items, rejections per reason, instances, ensemble rules, winners."""
    run_dir = Path(run_dir)
    out = {}
    for typ in TYPES:
        reqs = read_jsonl(run_dir / f"instructions_{typ}.jsonl")
        items = [it for r in reqs for it in r["items"]]
        inst = read_jsonl(run_dir / f"instances_{typ}.jsonl")
        ens = read_jsonl(run_dir / f"ensemble_{typ}.jsonl")
        out[typ] = {
            "requests": len(reqs),
            "raw_instructions": len(items),
            "instruction_rejected": dict(Counter(it["reason"] for it in items if it["status"] != "accepted")),
            "accepted_instructions": sum(it["status"] == "accepted" for it in items),
            "instances": len(inst),
            "instance_dropped": dict(Counter(r["reason"] for r in inst if r["reason"])),
            "usable_instances": sum(r["reason"] is None for r in inst),
            "ensemble_rules": dict(Counter(r["rule"] for r in ens)),
            "kept": sum(r["kept"] for r in ens),
            "winners": dict(Counter(r["source"] for r in ens if r["kept"])),
        }
    return out


def print_summary(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    f = funnel(run_dir)
    fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"  # noqa: E731
    table = Table("", "type A", "type B", title=f"run {run_dir}")
    rows = [("requests", "requests"), ("raw instructions", "raw_instructions"),
            ("rejected instructions", "instruction_rejected"), ("accepted instructions", "accepted_instructions"),
            ("instances dropped", "instance_dropped"), ("usable instances", "usable_instances"),
            ("ensemble rule", "ensemble_rules"), ("kept", "kept"), ("kept output from", "winners")]
    for label, key in rows:
        table.add_row(label, *(fmt(f[t][key]) if isinstance(f[t][key], dict) else str(f[t][key]) for t in TYPES))
    console = Console(stderr=True)
    console.print(table)
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    console.print(f"dataset: {Path(run_dir) / 'dataset.jsonl'} ({manifest.get('dataset_size', 0)} examples)")
