"""runner.py without models: run_batches, done_ids and Meter driven with the fake backend of
tests/fakes.py on a run opened on fake cards. Windows have fixed boundaries (index // window)
whatever was done before, each window lands with one write, a resume makes the bytes of an
uninterrupted run, and the time and tokens spent reach the manifest even when a stage fails."""
import json

import pytest

import fakes
from conftest import read_jsonl
from ensemble_instruct import rundir, runner
from ensemble_instruct.backends import Completion, Decoding
from ensemble_instruct.errors import Interrupted

PARAMS = Decoding(max_tokens=16, stop=("|EoS|",))
TODO = [{"id": f"x{i:02d}", "instruction": f"Item {i} please describe"} for i in range(10)]


@pytest.fixture
def run(tmp_path, monkeypatch):
    fakes.install(monkeypatch)
    return rundir.open_run(fakes.fake_setup(tmp_path), tmp_path / "run")


def backend(run, window=3, **kw):
    """A FakeBackend on the run's generator card; `.windows` lists the prompts of each call."""
    b = fakes.FakeBackend(run.generator[0], window=window, **kw)
    b.windows, generate = [], b.generate
    b.generate = lambda prompts, *a, **k: b.windows.append(list(prompts)) or generate(prompts, *a, **k)
    return b


def request(i, item):
    return f"instruction: {item['instruction']}\ninput:", 1000 + i  # the fake's text depends on both


def record(item, seed, c):
    return {"id": item["id"], "seed": seed, "output": c.text}


def batches(run, b, path, todo=TODO, key="test_stage", record=record):
    runner.run_batches(run, b, key=key, where="the test stage", path=path, todo=todo, params=PARAMS,
                       request=request, record=record)


@pytest.fixture
def appends(monkeypatch):
    """The ids of each append_jsonl call the runner makes, one list per write."""
    writes, real = [], runner.append_jsonl

    def append(path, records):
        records = list(records)
        writes.append([r["id"] for r in records])
        return real(path, records)
    monkeypatch.setattr(runner, "append_jsonl", append)
    return writes


def prompts(indices):
    return [request(i, TODO[i])[0] for i in indices]


# ------------------------------------------------------------ windows: fixed boundaries, one write each

def test_uninterrupted_windows_are_index_over_window(run, appends):
    b = backend(run, window=3)
    batches(run, b, run.file("t.jsonl"))
    assert b.windows == [prompts(range(0, 3)), prompts(range(3, 6)), prompts(range(6, 9)), prompts([9])]
    assert appends == [[t["id"] for t in TODO[s:s + 3]] for s in range(0, 10, 3)]
    assert [r["id"] for r in read_jsonl(run.file("t.jsonl"))] == [t["id"] for t in TODO]


@pytest.mark.parametrize("done", [set(), {1}, {3, 4, 5}, {0, 4, 9}, {9}, set(range(10)), {0, 1, 2, 6, 7, 8}])
def test_windows_keep_their_boundaries_whatever_was_done(run, appends, done):
    """Brute force: a window (index // 3) with any id missing is generated again whole, in the same
    composition as in an uninterrupted run, and only its missing ids are appended, in one write."""
    path = run.file("t.jsonl")
    full = backend(run)
    batches(run, full, run.file("ref.jsonl"))
    ref = read_jsonl(run.file("ref.jsonl"))
    path.write_text("".join(json.dumps(ref[i]) + "\n" for i in sorted(done)))  # as an earlier session left it
    appends.clear()
    b = backend(run)
    batches(run, b, path)
    windows = [list(range(s, min(s + 3, 10))) for s in range(0, 10, 3)]
    redo = [w for w in windows if set(w) - done]
    assert b.windows == [prompts(w) for w in redo]
    assert all(w in full.windows for w in b.windows)  # whole windows of the uninterrupted run
    assert appends == [[TODO[i]["id"] for i in w if i not in done] for w in redo]
    by_id = {r["id"]: r for r in read_jsonl(path)}
    assert sorted(by_id) == [t["id"] for t in TODO] and len(read_jsonl(path)) == 10  # no id twice
    assert all(by_id[r["id"]] == r for r in ref)


def test_nothing_missing_asks_the_backend_nothing(run, appends):
    path = run.file("t.jsonl")
    batches(run, backend(run), path)
    before, appends[:] = path.read_bytes(), []
    b = backend(run)
    batches(run, b, path)
    assert b.windows == [] and appends == [] and path.read_bytes() == before


# ------------------------------------------------------------ resume: the same bytes as an uninterrupted run

@pytest.mark.parametrize("window,fail_after", [(3, 1), (3, 3), (4, 2), (1, 5), (16, 0)])
def test_resume_after_a_failure_makes_the_uninterrupted_bytes(run, window, fail_after):
    ref, path = run.file("ref.jsonl"), run.file("t.jsonl")
    batches(run, backend(run, window), ref)
    b = backend(run, window, oom_after=fail_after)  # raises in its call fail_after + 1
    with pytest.raises(fakes.OutOfMemoryError):
        batches(run, b, path)
    assert len(read_jsonl(path) if path.exists() else []) == fail_after * window  # the finished windows
    assert runner.done_ids(run, path) == {t["id"] for t in TODO[:fail_after * window]}
    batches(run, backend(run, window), path)
    assert path.read_bytes() == ref.read_bytes()


def test_resume_after_a_torn_write_makes_the_uninterrupted_bytes(run):
    ref, path = run.file("ref.jsonl"), run.file("t.jsonl")
    batches(run, backend(run), ref)
    whole = ref.read_bytes()
    first_two = sum(len(line) for line in whole.splitlines(keepends=True)[:6])  # two windows
    path.write_bytes(whole[:first_two + 25])  # the third window's write, cut by a crash
    assert runner.done_ids(run, path) == {t["id"] for t in TODO[:6]}  # the torn line is cut off
    b = backend(run)
    batches(run, b, path)
    assert b.windows == [prompts(range(6, 9)), prompts([9])]
    assert path.read_bytes() == whole
    assert [r["file"] for r in run.manifest["repairs"]] == ["t.jsonl"]


def test_a_stop_request_finishes_the_window_then_stops(run):
    """The first Ctrl-C sets stop_requested: the window in progress is written, then Interrupted."""
    ref, path = run.file("ref.jsonl"), run.file("t.jsonl")
    batches(run, backend(run), ref)

    def stop_at_4(item, seed, c):  # the request at index 4 finished: Ctrl-C during window 1
        if item["id"] == TODO[4]["id"]:
            run.stop_requested = True
        return record(item, seed, c)
    with pytest.raises(Interrupted, match="stopped during the test stage"):
        batches(run, backend(run), path, record=stop_at_4)
    assert runner.done_ids(run, path) == {t["id"] for t in TODO[:6]}  # windows 0 and 1, whole
    run.stop_requested = False
    batches(run, backend(run), path)
    assert path.read_bytes() == ref.read_bytes()


def test_done_ids(run):
    path = run.file("t.jsonl")
    assert runner.done_ids(run, path) == set()  # no file yet
    path.write_text('{"id": "a", "output": "x"}\n{"id": "b", "output": "y"}\n{"id": "a", "output": "z"}\n')
    assert runner.done_ids(run, path) == {"a", "b"}


# ------------------------------------------------------------ Meter: the time and tokens spent

def timings(run, key):
    return json.loads(run.file("manifest.json").read_text())["timings"][key]


def test_meter_adds_to_the_manifest_even_when_the_stage_raises(run):
    gen = fakes.FakeBackend(run.generator[0].model_copy(update={"name": "gen"}))
    with pytest.raises(RuntimeError, match="boom"):
        with runner.Meter(run, "stage", gen) as m:
            m.add([Completion("a", 3, 5, "stop"), Completion("b", 2, 7, "length")])
            raise RuntimeError("boom")
    t = timings(run, "stage")  # saved to disk, not only in memory
    assert (t["model"], t["prompt_tokens"], t["completion_tokens"]) == ("gen", 5, 12)
    assert t["finish"] == {"length": 1, "stop": 1} and t["length_share"] == 0.5 and t["seconds"] >= 0
    with runner.Meter(run, "stage", gen) as m:  # a second session adds to the first
        m.add([Completion("c", 1, 1, "stop")])
    t = timings(run, "stage")
    assert (t["prompt_tokens"], t["completion_tokens"], t["finish"]) == (6, 13, {"length": 1, "stop": 2})
    assert t["length_share"] == round(1 / 3, 4)


def test_run_batches_meters_the_windows_that_finished_before_a_failure(run):
    b = backend(run, 3, oom_after=2)
    with pytest.raises(fakes.OutOfMemoryError):
        batches(run, b, run.file("t.jsonl"), key="failing")
    rows = read_jsonl(run.file("t.jsonl"))
    t = timings(run, "failing")
    assert t["completion_tokens"] == sum(len(r["output"].split()) for r in rows)  # the fake counts words
    assert t["prompt_tokens"] == sum(len(p.split()) for p in prompts(range(6)))
    assert sum(t["finish"].values()) == 6


def test_eta():
    assert runner.eta(10.0, 5, 5) == "0:00:10"
    assert runner.eta(1.0, 1, 3725) == "1:02:05"
    assert runner.eta(0.0, 0, 3) == "-:--:--"
    assert runner.eta(5.0, 5, 0) == "0:00:00"
