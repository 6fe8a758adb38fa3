"""The run directory: opening or creating one, its manifest, and the fingerprint that guards a resume.

    manifest.json                    config, hashes, versions, counts, timings (the only non-deterministic file)
    instructions_{A,B}.jsonl         one record per request: completion and every item with its fate
    instances_{A,B}.jsonl            one record per accepted instruction: parsed input/output or drop reason
    outputs_{MODEL}_{A,B}.jsonl      one record per usable instance, per extra model
    ensemble_{A,B}.jsonl             the decision for every instance
    dataset.jsonl                    the kept instances (A, then B)
    .lock                            the PID of the process writing the run, while it runs

Commands that generate open a run with `open_run` (every model checked before any stage);
commands that only read a finished stage (`ensemble --run`, `report`, `export`) use `open_existing`,
which needs no backend package, no weights and no server.
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

from . import lockfile, settings, templates, weights
from .backends import check_installed, preflight
from .config import ROOT, Config, ModelCard, file_hash, load_card, load_config
from .errors import UserError
from .seeds import SeedTask, load_seeds, split_types
from .store import cut_torn_tail, read_jsonl, write_json

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
    resume_command: str = ""  # what resumes this directory after a stop; default: generate --out DIR
    trace: list | None = None  # a forecast pilot's per-batch timings (runner.Meter), else None

    def resume_hint(self) -> str:
        return self.resume_command or f"python run.py generate --out {self.dir}"

    def file(self, name: str) -> Path:
        return self.dir / name

    def save_manifest(self) -> None:
        write_json(self.file("manifest.json"), self.manifest)

    def read(self, path: Path) -> list[dict]:
        """A stage file's records, after cutting a torn last line (a crash mid-write) off the file;
        the manifest records every such repair."""
        cut = cut_torn_tail(path)
        if cut:
            self.note_repair(path, f"cut a torn last line ({cut} bytes)")
        return read_jsonl(path, "run")

    def hub_resolved(self, card: ModelCard, card_path: Path) -> None:
        """A backend resolved a hub card's weights: record the commit and bytes where the run was
        opened before they were in the cache; refuse bytes other than those recorded (the branch
        moved on the hub since the run was opened), before this model generates anything."""
        records = self.manifest.get("fingerprint", {}).get("weights")
        if not records:  # a directory that records no weights (evaluate --models)
            return
        for i, (c, p) in enumerate([self.generator, *self.extras]):
            if c != card or Path(p) != Path(card_path) or not records[i].get("hub_repo"):
                continue
            now = weights.record(c, p)
            if records[i].get("commit") is None:
                records[i] = now
                self.save_manifest()
            elif now != records[i]:
                changes = diff(records[i], now, f"weights.{_role(i)}.")
                raise UserError(f"{card.source.hub_repo} changed on the hub since the run was opened: "
                                f"{'; '.join(changes[:2])}; run the command again (a resume names the change, "
                                "--force accepts it)")

    def note_repair(self, path: Path, what: str) -> None:
        self.manifest.setdefault("repairs", []).append(
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "file": Path(path).name, "what": what})
        self.save_manifest()


# The packages that compute a backend's outputs: a new version may give other text for the same
# request, so a resume compares them (only those of the backends the run uses).
ENGINES = {"llama_cpp": ("llama_cpp_python",), "transformers": ("torch", "transformers", "accelerate"), "openai": ()}


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def engines(cards: list[ModelCard]) -> dict:
    pkgs = {p for c in cards for p in ENGINES[c.backend]}
    pkgs |= {"bitsandbytes" for c in cards if c.backend == "transformers" and c.quantization != "none"}
    return {p: _version(p) for p in sorted(pkgs)}


def fingerprint(cfg: Config, cards: list[tuple[ModelCard, Path]]) -> dict:
    tdir = cfg.path(cfg.templates_dir)
    return {
        "config": cfg.model_dump(mode="json"),
        # Lists in role order (generator, then the extras in config order), not keyed by name: the
        # generator may also be one of the extras (greedy this time), so a name can fill two roles.
        "cards": [c.model_dump(mode="json") for c, _ in cards],
        "weights": [weights.record(c, p) for c, p in cards],
        "engines": engines([c for c, _ in cards]),
        "templates": {p.name: file_hash(p) for p in sorted(tdir.glob("*.txt"))},
        "seeds_file": file_hash(cfg.path(cfg.seeds_file)),
    }


def _role(i: int) -> str:
    return "generator" if i == 0 else f"extra{i}"


def _by_role(fp: dict, names: list[str]) -> dict:
    """A fingerprint as a resume compares it: cards and weights keyed by role, so that a change
    reads `cards.extra2.context (2048 -> 4096)`. An older manifest keyed them by card name (one
    entry for a generator that was also an extra): it is looked up with the new cards' names."""
    out = dict(fp)
    for key in ("cards", "weights"):
        if key in fp:
            value = [fp[key].get(n) for n in names] if isinstance(fp[key], dict) else fp[key]
            out[key] = {_role(i): v for i, v in enumerate(value)}
    return out


# Hub weights that were not in the local cache when the run was opened: only what the card says
# was recorded then; these keys are completed once a backend resolves (downloads) the file.
_RESOLVED = ("commit", "file", "files", "size", "sha256_ends")


def setup_changes(old: dict, new: dict, names: list[str]) -> list[str]:
    """What differs between the fingerprint a run was started with and the current one."""
    old, new = _by_role(old, names), _by_role(new, names)
    # A run started before weights (or engines) were recorded cannot tell whether they changed.
    new = {k: v for k, v in new.items() if k in old or k not in ("weights", "engines")}
    if isinstance(new.get("weights"), dict) and isinstance(old.get("weights"), dict):
        new["weights"] = dict(new["weights"])
        for role, rec in old["weights"].items():
            if isinstance(rec, dict) and rec.get("hub_repo") and rec.get("commit") is None \
                    and isinstance(new["weights"].get(role), dict):
                new["weights"][role] = {k: v for k, v in new["weights"][role].items() if k not in _RESOLVED or k in rec}
    if isinstance(old.get("config"), dict) and isinstance(new.get("config"), dict):
        new["config"] = _known(old["config"], new["config"])
    return diff(old, new)


def _known(old: dict, new: dict) -> dict:
    """`new` without the settings the run's version did not have yet (a newer version's setting,
    such as [ensemble.pairs], has a default that does what the older version did)."""
    return {k: _known(old[k], v) if isinstance(v, dict) and isinstance(old[k], dict) else v
            for k, v in new.items() if k in old}


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
    out["lock"] = lockfile.record()
    return out


def _check_templates(cfg: Config, extras: list[tuple[ModelCard, Path]]) -> None:
    """Load every template the run will use, so a bad one stops the run before any model loads."""
    tdir = cfg.path(cfg.templates_dir)
    inst = "instances" if cfg.instances.demos == "fixed" else "instances_random"
    for typ in TYPES:
        templates.load(f"instructions_{typ}.txt", tdir)
        templates.load(f"{inst}_{typ}.txt", tdir)
    for card, _ in extras:
        templates.load(card.output_template or "output.txt", tdir, templates.FIELDS["output"])


def _check_writable(out: Path) -> None:
    """Before the models are checked: a run directory that cannot be made is a one-line error."""
    p = out.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{out}: run directory is not writable ({p} is not a writable folder)")


def lock(out: Path) -> None:
    """Hold the run directory's lock until this process ends, or exit with the owner's PID.

    Two runs appending to the same files would interleave their records and leave a run that can
    never resume. The lock is an flock on `.lock`, which also holds the owner's PID: the kernel
    drops it when the owner dies, however it dies, so a lock left by a killed run (a dead PID in
    the file) is taken over; a normal exit also removes the file."""
    path = out.absolute() / ".lock"
    if _held.get(path) is not None:
        return  # this process holds it already (a command that opens the run twice)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{out}: run directory is not writable ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _owner(path)
            raise UserError(f"{out} is in use by another run (process {pid or 'unknown'}); wait for it to "
                            "finish or stop it, or use another --out") from None
        try:  # the file we locked may have been removed by its previous owner in the meantime
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[path] = fd
    atexit.register(unlock, out)


_held: dict[Path, int] = {}


def _owner(path: Path) -> int | None:
    for _ in range(20):  # the new owner writes its PID just after taking the lock
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None


def unlock(out: Path) -> None:
    path = out.absolute() / ".lock"
    fd = _held.pop(path, None)
    if fd is not None:
        path.unlink(missing_ok=True)  # while still holding it: no one can take a file we remove
        os.close(fd)


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


def _with_overrides(cfg: Config, num_instructions: int | None, seed: int | None,
                    targets: dict[str, int] | None = None) -> Config:
    if seed is None and num_instructions is None and targets is None:
        return cfg
    data = cfg.model_dump()
    if seed is not None:
        data["seed"] = seed
    if num_instructions is not None:
        if num_instructions < 2:
            raise UserError("--num-instructions must be at least 2 (one per type)")
        a = max(1, min(num_instructions - 1, round(num_instructions * 125 / 175)))
        data["instructions"]["target"] = {"A": a, "B": num_instructions - a}
    if targets is not None:  # a forecast's pilot: fewer instructions per type
        data["instructions"]["target"] = dict(targets)
    return Config(**data).located(cfg._dir)


def setup(config: Path | None, existing: dict | None = None, num_instructions: int | None = None,
          seed: int | None = None, targets: dict[str, int] | None = None):
    """The config (with the command line's overrides) and the cards with "auto" resolved:
    (cfg, generator, extras, auto), each model as (card, path). Opens nothing."""
    if config is None and existing is not None:
        cfg = Config(**existing["fingerprint"]["config"]).located(_config_dir(existing))
    else:
        cfg = load_config(config or ROOT / "configs" / "default.toml")
    cfg = _with_overrides(cfg, num_instructions, seed, targets)
    generator = load_card(cfg.path(cfg.generator))
    extras = [load_card(cfg.path(p)) for p in cfg.extra]
    generator, extras, auto = _resolve_auto(cfg, generator, extras, existing)
    return cfg, generator, extras, auto


def open_run(config: Path | None, out: Path | None, num_instructions: int | None = None,
             seed: int | None = None, force: bool = False, targets: dict[str, int] | None = None) -> Run:
    """Load (or create) a run directory to generate into. An existing run keeps its config unless
    one is given; a config, card, weight file, template or seed file that differs from the one the
    run started with is refused unless force (then the manifest keeps what changed, and when)."""
    existing = _read_manifest(out) if out is not None else None
    if config is None and existing is None:
        config = ROOT / "configs" / "default.toml"
    cfg, generator, extras, auto = setup(config, existing, num_instructions, seed, targets)
    names = [c.name for c, _ in [generator, *extras]]
    if len(set(names[1:])) != len(names) - 1:
        raise UserError("each extra model must be a different card (names repeat)")
    # Everything that only reads files first, then what needs the backends: fail before any
    # stage, not hours into the run.
    seeds = split_types(load_seeds(cfg.path(cfg.seeds_file)))
    _check_templates(cfg, extras)
    out = out or Path("runs") / (Path(config).stem if config else "run")
    _check_writable(out)
    for card, path in [generator, *extras]:
        check_installed(card, path)
        weights.check(card, path)
        preflight(card, path)
    fp = fingerprint(cfg, [generator, *extras])
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{out}: run directory is not writable ({e.strerror})") from None
    lock(out)
    existing = _read_manifest(out)  # again, under the lock: another run may have started it meanwhile
    changes = []
    if existing is not None:
        changes = setup_changes(existing["fingerprint"], fp, [c.name for c, _ in [generator, *extras]])
    if changes and not force:
        raise UserError(f"{out} was started with a different setup: {'; '.join(changes[:3])}"
                        f"{' ...' if len(changes) > 3 else ''} (use a new --out, or --force)")
    manifest = existing or {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings": {}, "events": []}
    if changes:
        manifest.setdefault("forced", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes})
    manifest.update(fingerprint=fp, seed=cfg.seed, versions=versions())
    if auto:
        manifest.setdefault("auto", {}).update(auto)
    if cfg._dir is not None:
        manifest["config_dir"] = str(cfg._dir)
    run = Run(out, cfg, generator, extras, seeds, manifest)
    run.save_manifest()
    return run


def _resolve_auto(cfg: Config, generator, extras, existing: dict | None):
    """Numbers for "auto" card settings: those the run recorded when it was opened, else the plan's
    for this config and the memory free now (settings.resolve)."""
    pairs = [generator, *extras]
    keys = [_role(i) for i in range(len(pairs))]
    roles = ["generator" if i == 0 else "extra" for i in range(len(pairs))]
    pairs, auto = settings.resolve(pairs, keys, roles, cfg, (existing or {}).get("auto", {}))
    return pairs[0], pairs[1:], auto


def _config_dir(manifest: dict) -> Path | None:
    d = manifest.get("config_dir")
    return Path(d) if d and Path(d).is_dir() else None


def open_existing(out: Path, lock_it: bool) -> Run:
    """A run directory as its manifest describes it, for commands that read its stage files: no
    model is checked, loaded or reached. `lock_it` for a command that writes into it."""
    existing = _read_manifest(out) if out.is_dir() else None
    if existing is None:
        raise UserError(f"{out}: not a run directory (no manifest.json)")
    fp = existing["fingerprint"]
    try:
        cfg = Config(**fp["config"]).located(_config_dir(existing))
        raw = fp["cards"]  # generator first, then the extras in config order
        cards = [ModelCard(**c) for c in (raw.values() if isinstance(raw, dict) else raw)]
    except (ValueError, KeyError, AttributeError, TypeError):
        raise UserError(f"{out / 'manifest.json'}: not a run manifest this version can read") from None
    paths = [cfg.path(cfg.generator), *(cfg.path(p) for p in cfg.extra)]
    if len(cards) != len(paths) and isinstance(raw, dict):
        # A run from before cards were a list, whose generator was also an extra: one entry for
        # two roles. The card files say which name fills which role.
        try:
            cards = [ModelCard(**raw[load_card(p)[0].name]) for p in paths]
        except (UserError, KeyError, ValueError):
            pass
    if len(cards) != len(paths):
        raise UserError(f"{out / 'manifest.json'}: the manifest's cards do not match its config")
    if lock_it:
        lock(out)
    pairs = list(zip(cards, paths))
    return Run(out, cfg, pairs[0], pairs[1:], {}, existing)
