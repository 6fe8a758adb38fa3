"""The lock an environment was installed from (requirements.lock, written by `make lock`).

A run's manifest records the lock's sha256 and any installed package whose version is not the
locked one, so "same seed, same config, same versions" names versions a user can install again.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import re
from pathlib import Path

from .config import ROOT

LOCK = ROOT / "requirements.lock"  # a checkout's; an installed package carries none
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.M)


def pins(path: Path = LOCK) -> dict[str, str]:
    """name -> version for every `name==version` line of a lock file."""
    return dict(_PIN.findall(path.read_text()))


def record(path: Path = LOCK) -> dict | None:
    """{"file", "sha256", "differs": ["name installed (lock version)", ...]}, or None without a lock."""
    if not path.is_file():
        return None
    differs = []
    for name, version in pins(path).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            differs.append(f"{name} {installed} (lock {version})")
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "differs": differs}


def describe(entry: dict | None) -> str:
    """One line for a report: which lock, and whether the environment matched it."""
    if not entry:
        return "not installed from requirements.lock"
    state = "installed as locked" if not entry["differs"] else \
        f"{len(entry['differs'])} packages differ from it: " + ", ".join(entry["differs"][:5]) + \
        (", ..." if len(entry["differs"]) > 5 else "")
    return f"{entry['file']} sha256 {entry['sha256'][:12]}, {state}"
