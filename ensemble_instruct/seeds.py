"""Seed tasks: load, validate, and split into type A (needs an input) and B (output only)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .store import read_jsonl_numbered


@dataclass(frozen=True)
class SeedTask:
    id: str
    instruction: str
    input: str  # of the first instance; non-empty means type A
    output: str

    @property
    def type(self) -> str:
        return "A" if self.input.strip() else "B"


def _parse(obj: dict, where: str, n: int) -> SeedTask:
    instruction = obj.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise UserError(f"{where}: missing or empty 'instruction'")
    instances = obj.get("instances")
    if not isinstance(instances, list) or not instances:
        raise UserError(f"{where}: missing or empty 'instances'")
    first = instances[0]
    if not isinstance(first, dict) or not isinstance(first.get("output"), str):
        raise UserError(f"{where}: instances[0] needs a string 'output'")
    inp = first.get("input", "")
    if not isinstance(inp, str):
        raise UserError(f"{where}: instances[0].input must be a string")
    return SeedTask(str(obj.get("id", f"seed_{n}")), instruction.strip(), inp, first["output"])


def load_seeds(path: str | Path) -> list[SeedTask]:
    path = Path(path)
    if not path.exists():  # read_jsonl reads a missing file as empty; a missing seed file is a mistake
        raise UserError(f"{path}: seed file not found")
    # A user's file: a last line without its newline is a record. Bad lines are errors with path:line.
    tasks = [_parse(obj, f"{path}:{n}", n) for n, obj in read_jsonl_numbered(path, "user")]
    if not tasks:
        raise UserError(f"{path}: no seed tasks (empty file)")
    return tasks


def split_types(tasks: list[SeedTask]) -> dict[str, list[SeedTask]]:
    return {"A": [t for t in tasks if t.type == "A"], "B": [t for t in tasks if t.type == "B"]}
