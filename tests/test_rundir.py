"""rundir.py: opening a run directory, one writer at a time (the lock), torn tails cut, the
fingerprint that guards a resume, --force and its history. Fake models (tests/fakes.py) drive the
real stages and the real CLI, so these tests run on an install without the model extras."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import fakes
import conftest
from conftest import ROOT, one_line_error, read_jsonl
from ensemble_instruct import rundir
from ensemble_instruct.errors import UserError
from ensemble_instruct.stages import instances

INJECT = ROOT / "tests" / "inject.py"
FILES = ["instructions_A.jsonl", "instructions_B.jsonl", "instances_A.jsonl", "instances_B.jsonl",
         "outputs_extra1_A.jsonl", "outputs_extra2_B.jsonl", "ensemble_A.jsonl", "dataset.jsonl"]


def cli(*args, env=None, fake=True, timeout=120, **kw):
    """The real CLI in a subprocess; with fake models unless fake=False (then run.py itself)."""
    env = {"INJECT_FAKE": "1", **(env or {})} if fake else env
    return conftest.cli(*args, env=env, script=INJECT if fake else "run.py", timeout=timeout, **kw)


@pytest.fixture
def fake_run(tmp_path):
    """A finished run made by fake models through the real CLI."""
    cfg = fakes.fake_setup(tmp_path)
    r = cli("generate", "-c", cfg, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp_path / "run"


def manifest(run):
    return json.loads((run / "manifest.json").read_text())


# ------------------------------------------------------------ files: run files and the user's own

def test_user_files_keep_a_last_line_without_newline(tmp_path):
    rows = [{"id": "a", "instruction": "Capital of France?", "input": "", "output": "Paris."},
            {"id": "b", "instruction": "Say hi", "input": "", "output": "hello there"}]
    inst = tmp_path / "inst.jsonl"
    inst.write_text("\n".join(json.dumps(r) for r in rows))  # as an editor saves it: no final newline
    o1, o2 = tmp_path / "m1.jsonl", tmp_path / "m2.jsonl"
    o1.write_text('{"id": "a", "output": "paris"}\n{"id": "b", "output": "hello there"}')
    o2.write_text('{"id": "a", "output": "Lyon"}\n{"id": "b", "output": "Hello there!"}')
    r = cli("ensemble", inst, o1, o2, "-o", tmp_path / "out.jsonl", fake=False)
    assert r.returncode == 0, r.stderr
    kept = [x["id"] for x in read_jsonl(tmp_path / "out.jsonl")]
    assert kept == ["a", "b"] and "kept 2 of 2" in r.stdout


def test_seed_file_keeps_a_last_line_without_newline(tmp_path):
    from ensemble_instruct.seeds import load_seeds

    task = '{"instruction": "Say %s.", "instances": [{"input": "", "output": "%s"}]}'
    (tmp_path / "s.jsonl").write_text(task % ("hi", "hi") + "\n" + task % ("bye", "bye"))
    assert [t.instruction for t in load_seeds(tmp_path / "s.jsonl")] == ["Say hi.", "Say bye."]


def test_torn_tail_of_a_run_file_is_cut_and_recorded(fake_run, monkeypatch):
    fakes.install(monkeypatch)
    path = fake_run / "instances_A.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"id": "A00003", "type": "A", "instr')  # a crash in the middle of a write
    run = rundir.open_run(None, fake_run)
    assert len(instances.usable(run, "A")) == 2
    assert path.read_bytes() == whole
    repairs = manifest(fake_run)["repairs"]
    assert [(r["file"], r["what"]) for r in repairs] == [("instances_A.jsonl", "cut a torn last line (36 bytes)")]


# ------------------------------------------------------------ one writer at a time

def hold_lock(run):
    """Another process that holds the run's lock until killed."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from ensemble_instruct.rundir import lock; lock(Path(sys.argv[2])); print('locked', flush=True); "
            "time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(run)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_run_on_the_same_directory_exits_2_naming_the_owner(fake_run):
    before = {p.name: p.read_bytes() for p in fake_run.iterdir()}
    holder = hold_lock(fake_run)
    try:
        for args in (("generate", "--out", fake_run), ("ensemble", "--run", fake_run)):
            r = cli(*args)
            err = one_line_error(r, 2, f"is in use by another run (process {holder.pid})")
            assert len(r.stderr.strip().splitlines()) == 1, err
    finally:
        holder.kill()
        assert holder.wait() == -signal.SIGKILL  # it still held the lock when killed (it sleeps 120 s)
    after = {p.name: p.read_bytes() for p in fake_run.iterdir() if p.name != ".lock"}
    assert after == before  # nothing touched
    # the owner died without releasing it: a stale lock (dead PID), taken over
    assert (fake_run / ".lock").read_text().strip() == str(holder.pid)
    r = cli("generate", "--out", fake_run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (fake_run / ".lock").exists()  # released on exit


# ------------------------------------------------------------ reading a run needs a run, and no model

def test_readers_refuse_a_directory_without_manifest(tmp_path):
    typo = tmp_path / "rnu"
    one_line_error(cli("ensemble", "--run", typo, fake=False), 2, "rnu: not a run directory (no manifest.json)")
    assert not typo.exists()  # was created (and 'ensembled', exit 0) before
    typo.mkdir()
    one_line_error(cli("ensemble", "--run", typo, fake=False), 2, "not a run directory")
    one_line_error(cli("export", typo, "-o", tmp_path / "x.json", fake=False), 2, "not a run directory")
    one_line_error(cli("report", typo, fake=False), 2, "not a run directory")


def test_readers_need_no_backend_no_weights_no_server(fake_run, tmp_path):
    (fake_run.parent / "cards" / "model.gguf").unlink()  # the weights are gone
    hide = {"PYTHONPATH": str(ROOT / "tests" / "hide_backends")}  # and no backend package is importable
    expected = (fake_run / "dataset.jsonl").read_bytes()
    (fake_run / "dataset.jsonl").unlink()
    r = cli("ensemble", "--run", fake_run, fake=False, env=hide)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (fake_run / "dataset.jsonl").read_bytes() == expected
    r = cli("export", fake_run, "-f", "jsonl", "-o", tmp_path / "chat.jsonl", fake=False, env=hide)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((tmp_path / "chat.jsonl").read_text().splitlines()) == len(expected.splitlines())


@pytest.mark.models  # no model, but matplotlib (the report extra), which the core install lacks
def test_report_needs_no_backend_no_weights_no_server(fake_run):
    (fake_run.parent / "cards" / "model.gguf").unlink()
    r = cli("report", fake_run, fake=False, env={"PYTHONPATH": str(ROOT / "tests" / "hide_backends")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (fake_run / "report" / "report.md").exists()


# ------------------------------------------------------------ --force, --num-instructions, weights

def test_force_keeps_a_history_of_what_changed(fake_run, monkeypatch):
    fakes.install(monkeypatch)
    with pytest.raises(UserError, match=r"different setup: config\.seed \(7 -> 8\)"):
        rundir.open_run(None, fake_run, seed=8)
    rundir.open_run(None, fake_run, seed=8, force=True)
    rundir.unlock(fake_run)
    rundir.open_run(None, fake_run, seed=9, force=True)
    forced = manifest(fake_run)["forced"]
    assert [f["changes"] for f in forced] == [["config.seed (7 -> 8)"], ["config.seed (8 -> 9)"]]
    assert all(f["time"][:2] == "20" for f in forced)
    assert manifest(fake_run)["fingerprint"]["config"]["seed"] == 9


@pytest.mark.parametrize("n,split", [(2, (1, 1)), (4, (3, 1)), (7, (5, 2)), (175, (125, 50))])
def test_num_instructions_splits_5_to_2(tmp_path, monkeypatch, n, split):
    fakes.install(monkeypatch)
    run = rundir.open_run(fakes.fake_setup(tmp_path), tmp_path / "run", num_instructions=n)
    assert (run.cfg.instructions.target.A, run.cfg.instructions.target.B) == split


def test_num_instructions_through_the_cli(tmp_path):
    r = cli("generate", "-c", fakes.fake_setup(tmp_path), "--out", tmp_path / "run", "-n", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [len((tmp_path / "run" / f"instances_{t}.jsonl").read_text().splitlines()) for t in "AB"] == [3, 1]
    one_line_error(cli("generate", "-c", fakes.fake_setup(tmp_path), "--out", tmp_path / "r2", "-n", "1"), 2,
                   "--num-instructions must be at least 2")


def test_changed_weights_are_refused_on_resume(fake_run, monkeypatch):
    fakes.install(monkeypatch)
    weights = fake_run.parent / "cards" / "model.gguf"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # another file with the same size
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"different setup: weights\.extra1\.sha256_ends"):
        rundir.open_run(None, fake_run)


# ------------------------------------------------------------ the seed matters, and only the seed

def test_same_seed_same_bytes_other_seed_other_files(tmp_path):
    cfg = fakes.fake_setup(tmp_path)
    for out, seed in (("a", 7), ("b", 7), ("c", 8)):
        r = cli("generate", "-c", cfg, "--out", tmp_path / out, "--seed", seed)
        assert r.returncode == 0, r.stderr[-2000:]
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in ("instructions_A.jsonl", "instructions_B.jsonl", "dataset.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes(), name
    seeds = lambda out: [x["seed"] for x in read_jsonl(tmp_path / out / "instructions_A.jsonl")]  # noqa: E731
    assert not set(seeds("a")) & set(seeds("c"))


# ------------------------------------------------------------ export

def test_export_never_writes_into_the_run_and_replaces_atomically(fake_run, tmp_path):
    before = (fake_run / "dataset.jsonl").read_bytes()
    for target in (fake_run / "dataset.jsonl", fake_run / "sub" / "x.json", fake_run):
        one_line_error(cli("export", fake_run, "-f", "alpaca", "-o", target, fake=False), 2,
                       "inside the run directory")
    assert (fake_run / "dataset.jsonl").read_bytes() == before and not (fake_run / "sub").exists()
    # a write that fails half way (the kernel refuses more than 100 bytes) leaves the old file whole
    out = tmp_path / "alpaca.json"
    out.write_text("[]\n")
    import resource
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))  # noqa: E731
    r = cli("export", fake_run, "-f", "alpaca", "-o", out, fake=False, preexec_fn=limit)
    one_line_error(r, 2, "cannot write: File too large")
    assert out.read_text() == "[]\n" and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    r = cli("export", fake_run, "-f", "alpaca", "-o", out, fake=False)
    assert r.returncode == 0 and len(json.loads(out.read_text())) == len(before.splitlines())


# ------------------------------------------------------------ errors: one line, an exit code each

def test_out_of_memory_while_generating_keeps_what_finished(tmp_path):
    cfg = fakes.fake_setup(tmp_path, target=(6, 1))
    r = cli("generate", "-c", cfg, "--out", tmp_path / "run", env={"INJECT_OOM_AFTER": "1"})
    last = one_line_error(r, 3, "out of memory while generating with gen", "gen.toml",
                          "CUDA out of memory", "gpu_layers", "--force")
    assert last.startswith("error: ")
    assert len((tmp_path / "run" / "instructions_A.jsonl").read_text().splitlines()) == 2  # the first batch
    events = manifest(tmp_path / "run")["events"]
    assert [e["event"] for e in events] == ["load", "free"]  # the model was freed
    r = cli("generate", "--out", tmp_path / "run")  # resumes
    assert r.returncode == 0, r.stderr[-2000:]


def test_out_of_memory_while_loading(tmp_path):
    r = cli("generate", "-c", fakes.fake_setup(tmp_path), "--out", tmp_path / "run", env={"INJECT_OOM_AFTER": "load"})
    one_line_error(r, 3, "out of memory while loading gen")


@pytest.mark.parametrize("after,during", [("load", "loading"), ("0", "generating with")])
def test_models_check_out_of_memory(tmp_path, after, during):
    fakes.fake_setup(tmp_path)
    r = cli("models", "check", tmp_path / "cards" / "gen.toml", env={"INJECT_OOM_AFTER": after})
    assert len(r.stderr.strip().splitlines()) == 1
    one_line_error(r, 3, f"out of memory while {during} gen", "fewer gpu_layers")


def _wait_for_lines(path, n, proc, timeout=60):
    deadline = time.time() + timeout
    while (not path.exists() or path.read_bytes().count(b"\n") < n) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)


def test_second_ctrl_c_stops_at_once_and_loses_nothing_finished(tmp_path):
    cfg = fakes.fake_setup(tmp_path, target=(8, 1))
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(INJECT), "generate", "-c", str(cfg), "--out", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "INJECT_FAKE": "1", "INJECT_DELAY": "2"})
    _wait_for_lines(out / "instructions_A.jsonl", 2, p)
    time.sleep(0.5)  # into the next window's 2 s: a first Ctrl-C right after a write would stop there (130)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 131, err[-2000:]  # the handler's code: the signals came while it ran
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: stopped at once")
    assert not (out / "dataset.jsonl").exists()  # and before it finished
    assert len((out / "instructions_A.jsonl").read_text().splitlines()) == 2  # the finished batch is kept
    assert not (out / ".lock").exists()
    r = cli("generate", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = tmp_path / "ref"
    assert cli("generate", "-c", cfg, "--out", ref).returncode == 0
    for name in FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_ctrl_c_while_opening_a_run(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(INJECT), "generate", "-c", str(fakes.fake_setup(tmp_path)),
                          "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "INJECT_FAKE": "1", "INJECT_SLOW_OPEN": "20",
                              "INJECT_OPENING_MARK": str(tmp_path / "opening")})
    deadline = time.time() + 60
    while not (tmp_path / "opening").exists() and time.time() < deadline:  # imports done, checking weights
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 132, err[-2000:]
    assert err.strip().splitlines() == ["interrupted: stopped while opening the run, before any stage: "
                                        "nothing was generated, nothing is damaged"]


def test_a_run_from_before_weights_were_recorded_still_resumes(fake_run, monkeypatch):
    fakes.install(monkeypatch)
    m = manifest(fake_run)
    del m["fingerprint"]["weights"]
    (fake_run / "manifest.json").write_text(json.dumps(m))
    rundir.open_run(None, fake_run)
    assert "weights" in manifest(fake_run)["fingerprint"]  # recorded from now on


def test_a_run_from_before_a_new_setting_still_resumes(fake_run, monkeypatch):
    """A setting added to the config since the run started ([ensemble.pairs]) has a default that does
    what the older version did: a resume does not count it as a change."""
    fakes.install(monkeypatch)
    m = manifest(fake_run)
    del m["fingerprint"]["config"]["ensemble"]["pairs"]
    (fake_run / "manifest.json").write_text(json.dumps(m))
    rundir.open_run(None, fake_run)
    assert "pairs" in manifest(fake_run)["fingerprint"]["config"]["ensemble"]  # recorded from now on
