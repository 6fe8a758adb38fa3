"""Stage 4: the ensemble decision for every usable instance (CPU only; rewritten whole each time:
it takes seconds and needs no resume)."""
from __future__ import annotations

from ..ensemble import decision_record
from ..errors import UserError
from ..rules import select
from ..rundir import TYPES, Run
from ..store import write_jsonl
from . import instances, outputs

NAME = "ensemble"
DATASET = "dataset.jsonl"  # the kept instances of both types: what export and finetune read


def file_name(typ: str) -> str:
    return f"{NAME}_{typ}.jsonl"


def run_stage(run: Run) -> None:
    kept_all = []
    sources = [run.generator[0].name, *(c.name for c, _ in run.extras)]
    for typ in TYPES:
        usable = instances.usable(run, typ)
        columns = []
        for card, _ in run.extras:
            p = outputs.path(run, card, typ)
            # An output that can never be kept (looping, no room in the context) counts as empty.
            table = {r["id"]: "" if r.get("reason") else r["output"] for r in run.read(p)}
            missing = [it["id"] for it in usable if it["id"] not in table]
            if missing:
                raise UserError(f"{p}: no output for {missing[0]} ({len(missing)} missing): run the outputs stage first")
            columns.append([table[it["id"]] for it in usable])
        cands = [[it["output"], *(col[k] for col in columns)] for k, it in enumerate(usable)]
        e = run.cfg.ensemble
        decisions = select(cands, e.rule, e.threshold, e.quorum) if cands else []
        records = [{**decision_record(it, d, sources), "kept": d.kept} for it, d in zip(usable, decisions)]
        write_jsonl(run.file(file_name(typ)), records)
        kept_all += [{k: v for k, v in r.items() if k != "kept"} for r in records if r["kept"]]
    write_jsonl(run.file(DATASET), kept_all)
    run.manifest["dataset_size"] = len(kept_all)
    run.save_manifest()
