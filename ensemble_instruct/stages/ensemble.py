"""Stage 4: the ensemble decision for every usable instance, and the preference pairs (CPU only;
rewritten whole each time: it takes seconds and needs no resume)."""
from __future__ import annotations

from ..ensemble import decision_record, pair_record
from ..errors import UserError
from ..pairs import PairSettings, pick_pairs
from ..rules import select
from ..rundir import TYPES, Run
from ..store import write_jsonl
from . import instances, outputs

NAME = "ensemble"
DATASET = "dataset.jsonl"  # the kept instances of both types: what export and finetune read
PAIRS = "pairs.jsonl"  # chosen vs rejected per instance that yields a pair, both types: DPO data


def file_name(typ: str) -> str:
    return f"{NAME}_{typ}.jsonl"


def sources(run: Run) -> list[str]:
    """Who wrote each candidate: the generator, then each extra model in config order."""
    return [run.generator[0].name, *(c.name for c, _ in run.extras)]


def candidates(run: Run, typ: str) -> tuple[list[dict], list[list[tuple[str, str | None]]]]:
    """The usable instances of a type and, per instance, each candidate as written with the reason
    it can never be kept (None: it can): the generator's own output first."""
    usable = instances.usable(run, typ)
    tables = []
    for card, _ in run.extras:
        p = outputs.path(run, card, typ)
        table = {r["id"]: r for r in run.read(p)}
        missing = [it["id"] for it in usable if it["id"] not in table]
        if missing:
            raise UserError(f"{p}: no output for {missing[0]} ({len(missing)} missing): run the outputs stage first")
        tables.append(table)
    return usable, [[(it["output"], None), *((t[it["id"]]["output"], t[it["id"]].get("reason")) for t in tables)]
                    for it in usable]


def pairs(run: Run, usable: list[dict], cands: list[list[tuple[str, str | None]]]) -> list[dict]:
    """The pair records of one type's instances. The pair rule sees the outputs as written, flawed
    ones included: a loop or an echo is a fine rejected answer."""
    names = sources(run)
    rows = [(it["instruction"], it["input"], list(zip(names, [text for text, _ in c]))) for it, c in zip(usable, cands)]
    picked = pick_pairs(rows, PairSettings(**run.cfg.ensemble.pairs.model_dump())) if rows else []
    return [pair_record(it, p) for it, p in zip(usable, picked) if p is not None]


def all_pairs(run: Run) -> list[dict]:
    """Every type's pairs, computed from the stage files without writing (an export of a run made
    before pairs existed)."""
    return [r for typ in TYPES for r in pairs(run, *candidates(run, typ))]


def run_stage(run: Run) -> None:
    kept_all, pairs_all = [], []
    names = sources(run)
    for typ in TYPES:
        usable, cands = candidates(run, typ)
        # An output that can never be kept (looping, no room in the context) counts as empty.
        texts = [["" if reason else text for text, reason in c] for c in cands]
        e = run.cfg.ensemble
        decisions = select(texts, e.rule, e.threshold, e.quorum) if texts else []
        records = [{**decision_record(it, d, names), "kept": d.kept} for it, d in zip(usable, decisions)]
        write_jsonl(run.file(file_name(typ)), records)
        kept_all += [{k: v for k, v in r.items() if k != "kept"} for r in records if r["kept"]]
        pairs_all += pairs(run, usable, cands)
    write_jsonl(run.file(DATASET), kept_all)
    write_jsonl(run.file(PAIRS), pairs_all)
    run.manifest["dataset_size"] = len(kept_all)
    run.manifest["pairs"] = len(pairs_all)
    run.save_manifest()
