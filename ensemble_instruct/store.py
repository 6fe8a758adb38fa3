"""JSONL files that survive a crash: append-only, one flushed write per batch, torn tail dropped.

Every record has a stable `id`. A stage reads what is already on disk, skips those ids, and
appends the rest, so a killed run resumes without duplicates or gaps.

Two kinds of JSONL file are read, and they differ in one thing only: a last line without its
newline. In a run directory this tool wrote the file with whole lines, so such a line is a write
cut short by a crash. A user's own file (`ensemble INSTANCES OUTPUTS`, seeds) is often saved by
an editor without a final newline: there it is a record like any other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Literal

from .errors import UserError

Kind = Literal["run", "user"]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None


def read_jsonl(path: str | Path, kind: Kind) -> list[dict]:
    """All records of a JSONL file. kind "run": a last line without its newline is a torn write
    and is not a record (`cut_torn_tail` removes it); kind "user": it is a record. Any other bad
    line is an error. A missing file has no records."""
    return [rec for _, rec in read_jsonl_numbered(path, kind)]


def read_jsonl_numbered(path: str | Path, kind: Kind) -> list[tuple[int, dict]]:
    """`read_jsonl`, each record with its line number (for messages that point at the line)."""
    if kind not in ("run", "user"):
        raise ValueError(f"kind must be 'run' or 'user', not {kind!r}")
    path = Path(path)
    if not path.exists():
        return []
    data = _read_bytes(path)
    if kind == "run":
        data = data[: data.rfind(b"\n") + 1]
    records = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}:{n}: not UTF-8 text") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{n}: expected a JSON object")
        records.append((n, rec))
    return records


def cut_torn_tail(path: str | Path) -> int:
    """Cut a run file's torn last line (a write cut short by a crash); return how many bytes."""
    path = Path(path)
    if not path.exists():
        return 0
    data = _read_bytes(path)
    complete = data.rfind(b"\n") + 1
    if complete == len(data):
        return 0
    try:
        with open(path, "r+b") as f:
            f.truncate(complete)
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror}") from None
    return len(data) - complete


def dumps(record: dict) -> str:
    # Fixed key order and separators: the same records give the same bytes on every run.
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append records with one write and an fsync, so a batch lands whole or as a torn tail."""
    text = "".join(dumps(r) + "\n" for r in records)
    if not text:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror}") from None


def replace_text(path: str | Path, text: str) -> None:
    """Replace a file atomically: write a temp file next to it, fsync, rename over the old one.
    A reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write: {e.strerror}") from None


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    replace_text(path, "".join(dumps(r) + "\n" for r in records))


def write_json(path: str | Path, obj) -> None:
    replace_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
