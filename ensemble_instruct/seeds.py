"""Seed tasks: load, validate, and split into type A (needs an input) and B (output only)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class SeedTask:
    id: str
    instruction: str
    input: str  # of the first instance; non-empty means type A
    output: str

    @property
    def type(self) -> str:
        return "A" if self.input.strip() else "B"


def _parse(obj, where: str, n: int) -> SeedTask:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object")
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
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: seed file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    tasks = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        tasks.append(_parse(obj, f"{path}:{n}", n))
    if not tasks:
        raise UserError(f"{path}: no seed tasks (empty file)")
    return tasks


def split_types(tasks: list[SeedTask]) -> dict[str, list[SeedTask]]:
    return {"A": [t for t in tasks if t.type == "A"], "B": [t for t in tasks if t.type == "B"]}
