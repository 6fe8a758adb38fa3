"""JSONL files that survive a crash: append-only, one flushed write per batch, torn tail dropped.

Every record has a stable `id`. A stage reads what is already on disk, skips those ids, and
appends the rest, so a killed run resumes without duplicates or gaps.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Iterable

from .errors import UserError


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """All records of a JSONL file. A last line without its newline is a write cut short by a
    crash: it is ignored (and cut off the file when `repair`). Any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    complete = data.rfind(b"\n") + 1
    if complete < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(complete)
    records = []
    for n, line in enumerate(data[:complete].split(b"\n")[:-1], 1):
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
        records.append(rec)
    return records


def dumps(record: dict) -> str:
    # Fixed key order and separators: the same records give the same bytes on every run.
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def _crash_here(event: str, path: Path) -> bool:
    """Test hook for the crash tests: ENSEMBLE_INSTRUCT_KILL_AT=EVENT:FILENAME."""
    return os.environ.get("ENSEMBLE_INSTRUCT_KILL_AT") == f"{event}:{Path(path).name}"


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append records with one write and an fsync, so a batch lands whole or as a torn tail."""
    text = "".join(dumps(r) + "\n" for r in records)
    if not text:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            if _crash_here("torn", path):  # a power cut in the middle of a write
                f.write(text[: len(text) // 2])
                f.flush()
                os.fsync(f.fileno())
                _sigkill()
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror}") from None


def _replace(path: Path, text: str) -> None:
    """Replace a file atomically: write a temp file, fsync, rename over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror}") from None


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    path = Path(path)
    _replace(path, "".join(dumps(r) + "\n" for r in records))
    if _crash_here("after", path):
        _sigkill()


def write_json(path: str | Path, obj) -> None:
    _replace(Path(path), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
