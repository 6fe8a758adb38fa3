"""The run directory: opening or creating one, its manifest, and the fingerprint that guards a resume.

    manifest.json                    config, hashes, versions, counts, timings (the only non-deterministic file)
    instructions_{A,B}.jsonl         one record per request: completion and every item with its fate
    instances_{A,B}.jsonl            one record per accepted instruction: parsed input/output or drop reason
    outputs_{MODEL}_{A,B}.jsonl      one record per usable instance, per extra model
    ensemble_{A,B}.jsonl             the decision for every instance
    dataset.jsonl                    the kept instances (A, then B)
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

from .backends import check_installed, preflight
from .config import ROOT, Config, ModelCard, check_weights, file_hash, load_card, load_config
from .errors import UserError
from .seeds import SeedTask, load_seeds, split_types
from .store import write_json

TYPES = ("A", "B")
PACKAGES = ("ensemble-instruct", "rapidfuzz", "numpy", "nltk", "llama_cpp_python", "torch", "transformers",
            "bitsandbytes", "accelerate")


def rng_for(seed: int, stage: str, typ: str, index: int) -> random.Random:
    """Every random choice derives from (run seed, stage, type, index): resumes repeat it exactly."""
    return random.Random(f"{seed}/{stage}/{typ}/{index}")  # str seeds hash with sha512: stable


def seed_for(seed: int, stage: str, typ: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/{typ}/{index}/sampling".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class Run:
    dir: Path
    cfg: Config
    generator: tuple[ModelCard, Path]
    extras: list[tuple[ModelCard, Path]]
    seeds: dict[str, list[SeedTask]]
    manifest: dict
    stop_requested: bool = False

    def file(self, name: str) -> Path:
        return self.dir / name

    def save_manifest(self) -> None:
        write_json(self.file("manifest.json"), self.manifest)


def fingerprint(cfg: Config, cards: list[tuple[ModelCard, Path]]) -> dict:
    tdir = cfg.path(cfg.templates_dir)
    return {
        "config": cfg.model_dump(mode="json"),
        "cards": {c.name: c.model_dump(mode="json") for c, _ in cards},  # a diff names the setting
        "templates": {p.name: file_hash(p) for p in sorted(tdir.glob("*.txt"))},
        "seeds_file": file_hash(cfg.path(cfg.seeds_file)),
    }


def diff(old, new, prefix="") -> list[str]:
    """What changed between two fingerprints, as `key (old -> new)` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} ({old!r} -> {new!r})"]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _read_manifest(out: Path) -> dict | None:
    if not (out / "manifest.json").exists():
        return None
    try:
        existing = json.loads((out / "manifest.json").read_text())
    except ValueError:
        existing = None
    if not isinstance(existing, dict) or not isinstance(existing.get("fingerprint"), dict):
        raise UserError(f"{out / 'manifest.json'}: not valid JSON or not a run manifest") from None
    return existing


def _with_overrides(cfg: Config, num_instructions: int | None, seed: int | None) -> Config:
    if seed is None and num_instructions is None:
        return cfg
    data = cfg.model_dump()
    if seed is not None:
        data["seed"] = seed
    if num_instructions is not None:
        if num_instructions < 2:
            raise UserError("--num-instructions must be at least 2 (one per type)")
        a = max(1, min(num_instructions - 1, round(num_instructions * 125 / 175)))
        data["instructions"]["target"] = {"A": a, "B": num_instructions - a}
    return Config(**data)


def open_run(config: Path | None, out: Path | None, num_instructions: int | None = None,
             seed: int | None = None, force: bool = False) -> Run:
    """Load (or create) a run directory. An existing run keeps its config unless one is given;
    a config or card that differs from the one the run started with is refused unless force."""
    existing = _read_manifest(out) if out is not None else None
    if config is None and existing is not None:
        cfg = Config(**existing["fingerprint"]["config"])
    else:
        config = config or ROOT / "configs" / "default.toml"
        cfg = load_config(config)
    cfg = _with_overrides(cfg, num_instructions, seed)
    generator = load_card(cfg.path(cfg.generator))
    extras = [load_card(cfg.path(p)) for p in cfg.extra]
    names = [c.name for c, _ in [generator, *extras]]
    if len(set(names[1:])) != len(names) - 1:
        raise UserError("each extra model must be a different card (names repeat)")
    for card, path in [generator, *extras]:  # fail before any stage, not hours into the run
        check_installed(card, path)
        check_weights(card, path)
        preflight(card, path)
    seeds = split_types(load_seeds(cfg.path(cfg.seeds_file)))
    out = out or ROOT / "runs" / (Path(config).stem if config else "run")
    fp = fingerprint(cfg, [generator, *extras])
    if existing is not None:
        changes = diff(existing.get("fingerprint"), fp)
        if changes and not force:
            raise UserError(f"{out} was started with a different setup: {'; '.join(changes[:3])}"
                            f"{' ...' if len(changes) > 3 else ''} (use a new --out, or --force)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{out}: run directory is not writable ({e.strerror})") from None
    manifest = existing or {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings": {}, "events": []}
    manifest.update(fingerprint=fp, seed=cfg.seed, versions=versions())
    run = Run(out, cfg, generator, extras, seeds, manifest)
    run.save_manifest()
    return run
