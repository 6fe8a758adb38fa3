"""The real pipeline, end to end, on the embedded tiny models (subprocesses, real files)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cli, read_jsonl, run_generate

pytestmark = pytest.mark.models
CI = ROOT / "configs" / "ci.toml"
STAGE_FILES = ["instructions_A.jsonl", "instructions_B.jsonl", "instances_A.jsonl", "instances_B.jsonl",
               "outputs_gemma3-270m_A.jsonl", "outputs_gemma3-270m_B.jsonl",
               "outputs_smollm2-135m-hf-nf4_A.jsonl", "outputs_smollm2-135m-hf-nf4_B.jsonl",
               "ensemble_A.jsonl", "ensemble_B.jsonl", "dataset.jsonl"]


def cmd(*args):
    return [sys.executable, str(ROOT / "run.py"), *map(str, args)]


generate = run_generate


def test_every_stage_file_and_manifest(reference_run):
    for name in STAGE_FILES:
        assert (reference_run / name).exists(), name
    m = json.loads((reference_run / "manifest.json").read_text())
    assert m["fingerprint"]["config"]["seed"] == 3 and m["seed"] == 3
    assert [c["name"] for c in m["fingerprint"]["cards"]] == ["smollm2-135m", "gemma3-270m", "smollm2-135m-hf-nf4"]
    assert {"rapidfuzz", "llama_cpp_python", "torch", "transformers"} <= set(m["versions"])
    for key in ("instructions_A", "instances_B", "outputs_gemma3-270m_A", "outputs_smollm2-135m-hf-nf4_B"):
        t = m["timings"][key]
        assert t["seconds"] > 0 and t["completion_tokens"] > 0 and t["tokens_per_s"] > 0 and t["peak_rss_mb"] > 0
    # never two models at once: load/free strictly alternate, generator first, each model once
    ev = [(e["event"], e["model"]) for e in m["events"]]
    assert ev == [("load", "smollm2-135m"), ("free", "smollm2-135m"), ("load", "gemma3-270m"),
                  ("free", "gemma3-270m"), ("load", "smollm2-135m-hf-nf4"), ("free", "smollm2-135m-hf-nf4")]
    # counts line up through the funnel
    for typ, target in (("A", 3), ("B", 2)):
        reqs = read_jsonl(reference_run / f"instructions_{typ}.jsonl")
        accepted = [it for r in reqs for it in r["items"] if it["status"] == "accepted"]
        assert len(accepted) == target and [r["request"] for r in reqs] == list(range(len(reqs)))
        assert all(len(it["most_similar"]) == 10 and 0 <= it["mean_rouge"] <= it["max_rouge"] <= 0.7 for it in accepted)
        inst = read_jsonl(reference_run / f"instances_{typ}.jsonl")
        assert [r["id"] for r in inst] == [it["id"] for it in accepted]
        usable = [r["id"] for r in inst if r["reason"] is None]
        for model in ("gemma3-270m", "smollm2-135m-hf-nf4"):
            assert [r["id"] for r in read_jsonl(reference_run / f"outputs_{model}_{typ}.jsonl")] == usable
        ens = read_jsonl(reference_run / f"ensemble_{typ}.jsonl")
        assert [r["id"] for r in ens] == usable
    kept = [r for t in "AB" for r in read_jsonl(reference_run / f"ensemble_{t}.jsonl") if r["kept"]]
    dataset = read_jsonl(reference_run / "dataset.jsonl")
    assert [r["id"] for r in dataset] == [r["id"] for r in kept]
    assert all(r["output"] and r["rule"] in ("exact", "rouge") for r in dataset)


def test_same_seed_gives_identical_bytes(reference_run, tmp_path):
    r = generate(tmp_path / "again")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in STAGE_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (reference_run / name).read_bytes(), name


def test_another_seed_gives_other_files(reference_run, tmp_path):
    r = generate(tmp_path / "seed8", "--seed", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("instructions_A.jsonl", "instructions_B.jsonl", "instances_A.jsonl"):
        assert (tmp_path / "seed8" / name).read_bytes() != (reference_run / name).read_bytes(), name
    ours = [it["text"] for r in read_jsonl(tmp_path / "seed8" / "instructions_A.jsonl") for it in r["items"]]
    ref = [it["text"] for r in read_jsonl(reference_run / "instructions_A.jsonl") for it in r["items"]]
    assert ours != ref  # not only the recorded seeds: the sampled text differs


def test_finished_run_resumes_as_noop_and_refuses_changed_config(reference_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    before = {n: (run / n).read_bytes() for n in STAGE_FILES}
    r = generate(run)
    assert r.returncode == 0
    assert {n: (run / n).read_bytes() for n in STAGE_FILES} == before
    events = json.loads((run / "manifest.json").read_text())["events"]
    assert len(events) == 6  # nothing was loaded again
    r = generate(run, "--seed", "8")
    assert r.returncode == 2 and "different setup" in r.stderr and "seed (3 -> 8)" in r.stderr
    assert "Traceback" not in r.stderr
    # without --config, the run's own config is used
    r = cli("generate", "--out", run, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def _count(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("point", [
    ("poll", "instructions_A.jsonl", 1),               # SIGKILL from outside during instruction generation
    ("poll", "instances_A.jsonl", 1),                  # ... during instance generation
    ("poll", "outputs_gemma3-270m_A.jsonl", 1),        # ... during extra outputs (llama.cpp)
    ("env", "torn:outputs_smollm2-135m-hf-nf4_A.jsonl"),  # killed halfway through writing a batch (transformers)
    ("env", "torn:instructions_B.jsonl"),              # a torn request record
    ("env", "after:ensemble_A.jsonl"),                 # during the ensemble, before dataset.jsonl
])
def test_sigkill_then_resume_is_byte_identical(reference_run, tmp_path, point):
    out = tmp_path / "run"
    if point[0] == "env":
        r = generate(out, env={"INJECT_KILL_AT": point[1]})  # tests/inject.py patches the writes
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    else:
        _, name, n = point
        p = subprocess.Popen(cmd("generate", "-c", CI, "--out", out), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while _count(out / name) < n and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
        assert not (out / "dataset.jsonl").exists()
    r = generate(out)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in STAGE_FILES:
        assert (out / name).read_bytes() == (reference_run / name).read_bytes(), name


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen(cmd("generate", "-c", CI, "--out", out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 300
    while _count(out / "instructions_A.jsonl") < 1 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert "Resume with: python run.py generate --out" in err and "Traceback" not in err
    assert not (out / "dataset.jsonl").exists()
    assert read_jsonl(out / "instructions_A.jsonl")  # what was done is on disk


@pytest.fixture(scope="module")
def refill_run(tmp_path_factory):
    """The CI preset with a generator that decodes 2 sequences in windows of 3 requests: slots are
    refilled inside a window (the CI stages are too small to refill 16 slots). One reference run."""
    d = tmp_path_factory.mktemp("refill")
    card = (ROOT / "quantized" / "smollm2-135m.toml").read_text()
    (d / "smollm2-p2.toml").write_text(card.replace('name = "smollm2-135m"', 'name = "smollm2-135m-p2"')
                                       .replace("parallel = 16", "parallel = 2\nwindow = 3"))
    cfg = CI.read_text().replace('generator = "quantized/smollm2-135m.toml"', 'generator = "smollm2-p2.toml"')
    assert "smollm2-p2.toml" in cfg
    (d / "ci-p2.toml").write_text(cfg)
    r = run_generate(d / "ref", config=d / "ci-p2.toml")
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "ci-p2.toml", d / "ref"


@pytest.mark.parametrize("key", ["instructions_A", "instances_A"])
def test_sigkill_inside_a_window_then_resume(refill_run, tmp_path, key):
    """Killed while a window is being decoded (a request done, others still in their slots): the
    window was not written, the resume decodes it again whole, and every file equals the
    uninterrupted run's."""
    config, ref = refill_run
    out = tmp_path / "run"
    r = run_generate(out, env={"INJECT_KILL_AT": f"mid:{key}:1"}, config=config)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _count(out / f"{key}.jsonl") == 0  # the first window of the stage: nothing of it on disk
    assert not (out / "dataset.jsonl").exists()
    r = generate(out, config=config)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in STAGE_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    reqs = read_jsonl(ref / "instances_A.jsonl")
    assert len(reqs) == 3  # one window of 3 requests on 2 slots: one slot was refilled
