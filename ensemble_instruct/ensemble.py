"""The ensemble step: keep an instance only when its candidate outputs agree.

Candidates per instance: the generator's own output first, then each extra model's, in config
order. Rule 1 (exact): a normalized non-empty text shared by >= 2 candidates wins (largest group;
ties go to the group whose first member comes first), and we keep the original text of that
group's first member. Rule 2 (rouge): otherwise, if every pairwise ROUGE-L F1 (Porter stemming,
on the normalized texts) is > threshold, keep the candidate with the largest summed agreement
(ties: earliest). Otherwise drop. An empty output is never kept.
"""
from __future__ import annotations

from .errors import UserError
from .rules import Decision, exact_group, normalize, select  # noqa: F401  (the spec's names, re-exported)


def ensemble(candidates: list[list[str]], threshold: float = 0.01, workers: int = -1) -> list[Decision]:
    """One Decision per instance by the paper rule; candidates[k] holds instance k's N >= 3 outputs
    (N may differ between instances). The rule lives in `rules` beside the others."""
    return select(candidates, "paper", threshold, workers=workers)


def align(instances: list[dict], outputs: list[list[dict]], names: list[str]) -> list[list[str]]:
    """Candidate lists per instance: the instance's own output, then each outputs file's.
    Matched by `id` when every record has one, else line by line."""
    if not instances:
        raise UserError(f"{names[0]}: no instances (empty file)")
    by_id = all("id" in r for r in instances) and all("id" in r for o in outputs for r in o)
    columns = []
    for name, recs in zip(names[1:], outputs):
        if not recs:
            raise UserError(f"{name}: no outputs (empty file)")
        if by_id:
            table = {r["id"]: r for r in recs}
            missing = [r["id"] for r in instances if r["id"] not in table]
            if missing or len(table) != len(instances):
                extra = [i for i in table if i not in {r["id"] for r in instances}]
                what = f"no output for id {missing[0]!r}" if missing else f"unknown id {extra[0]!r}"
                raise UserError(f"{name}: ids do not match {names[0]}: {what}")
            recs = [table[r["id"]] for r in instances]
        elif len(recs) != len(instances):
            raise UserError(f"{name}: {len(recs)} outputs for {len(instances)} instances in {names[0]}")
        for n, (inst, rec) in enumerate(zip(instances, recs), 1):
            if "instruction" in rec and rec["instruction"] != inst.get("instruction"):
                raise UserError(f"{name}: record {n}: instruction differs from {names[0]}")
            if not isinstance(rec.get("output"), str):
                raise UserError(f"{name}: record {n}: missing string 'output'")
        columns.append([r["output"] for r in recs])
    for n, inst in enumerate(instances, 1):
        for key in ("instruction", "output"):
            if not isinstance(inst.get(key), str):
                raise UserError(f"{names[0]}: record {n}: missing string '{key}'")
    return [[inst["output"], *(col[k] for col in columns)] for k, inst in enumerate(instances)]


def decision_record(instance: dict, d: Decision, sources: list[str]) -> dict:
    """What we write for an instance: its fields, the kept output, and why."""
    rec = {k: instance[k] for k in ("id", "type") if k in instance}
    rec.update(instruction=instance["instruction"], input=instance.get("input", ""),
               output=d.output, rule=d.rule,
               source=sources[d.winner] if d.winner is not None else None)
    if d.group:
        rec["agreeing"] = [sources[i] for i in d.group]
    if d.scores:
        rec["scores"] = d.scores
    return rec


def pair_record(instance: dict, p) -> dict:
    """What we write for an instance that yields a preference pair (a `pairs.Pair`)."""
    rec = {k: instance[k] for k in ("id", "type") if k in instance}
    rec.update(instruction=instance["instruction"], input=instance.get("input", ""), chosen=p.chosen,
               rejected=p.rejected, chosen_model=p.chosen_model, rejected_model=p.rejected_model,
               rejected_flaw=p.rejected_flaw, scores=p.scores)
    return rec
