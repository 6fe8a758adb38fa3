"""`forecast`: the pilot's measurements, how they scale, and the forecast kept by `generate`."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fakes
from conftest import ROOT, cli, one_line_error
from ensemble_instruct import forecast, pipeline, rundir
from ensemble_instruct.errors import UserError

CI = ROOT / "configs" / "ci.toml"


# ------------------------------------------------------------ the parts of the model

def test_fit_batch_time_recovers_a_line_and_falls_back_to_a_mean():
    sizes = [16, 3, 1, 8]
    a, c = forecast.fit_batch_time(sizes, [2.0 + 0.5 * s for s in sizes], 16)
    assert (round(a, 6), round(c, 6)) == (2.0, 0.5)
    assert forecast.fit_batch_time([10], [5.0], 16) == (0.0, 0.5)  # one size: per request
    # a negative intercept (noise) is no line to extrapolate: the mean per request instead
    assert forecast.fit_batch_time([10, 1], [10.0, 0.5], 16) == (0.0, 10.5 / 11)


def test_batch_time_grows_by_rounds_once_the_slots_are_full():
    a, c, slots = 1.0, 0.25, 4
    t = forecast.batch_time(np.array([0, 1, 4, 8, 12]), a, c, slots)
    assert list(t) == [0.0, 1.25, 2.0, 4.0, 6.0]  # beyond 4: (s / 4) x t(4)


def test_pilot_targets():
    assert forecast.pilot_targets({"A": 100, "B": 90}, None) == {"A": 10, "B": 9}
    assert forecast.pilot_targets({"A": 2500, "B": 1000}, None) == {"A": 250, "B": 100}
    assert forecast.pilot_targets({"A": 20, "B": 3}, None) == {"A": 4, "B": 3}  # at least 4, never over the run
    assert forecast.pilot_targets({"A": 100, "B": 90}, 16) == {"A": 16, "B": 16}
    with pytest.raises(UserError, match="--pilot must be at least 1"):
        forecast.pilot_targets({"A": 100, "B": 90}, 0)


def test_beta_binomial_is_centred_on_the_pilot_rate_and_wider_for_a_smaller_pilot():
    rng = np.random.default_rng(0)
    n = np.full(4000, 200)
    small, big = forecast._beta_binomial(rng, n, 3, 7), forecast._beta_binomial(rng, n, 30, 70)
    assert abs(small.mean() - 200 * 3.5 / 11) < 3 and abs(big.mean() - 60) < 2
    assert np.percentile(small, 95) - np.percentile(small, 5) > 2 * (np.percentile(big, 95) - np.percentile(big, 5))
    zero = forecast._beta_binomial(rng, n, 0, 10)  # none passed in the pilot: few, not certainly none
    assert zero.min() == 0 and np.percentile(zero, 95) > 0


def test_setup_key_changes_with_the_seed_and_the_size(tmp_path, monkeypatch):
    fakes.install(monkeypatch)
    cfg = fakes.fake_setup(tmp_path)
    keys = set()
    for n, seed in [(None, None), (None, 8), (10, None)]:
        c, g, e, _ = rundir.setup(cfg, None, n, seed)
        keys.add(forecast.setup_key(rundir.fingerprint(c, [g, *e])))
    assert len(keys) == 3


# ------------------------------------------------------------ a pilot on the fake backend

def test_a_fake_pilot_predicts_its_own_run(tmp_path, monkeypatch):
    """With a backend that takes a fixed time per window, the forecast of a run 5x the pilot
    counts what the run does: its requests and, window by window, its time."""
    monkeypatch.setenv("ENSEMBLE_INSTRUCT_FORECASTS", str(tmp_path / "cache"))
    fakes.install(monkeypatch, delay=0.02)
    cfg = fakes.fake_setup(tmp_path, target=(10, 10))
    fc = forecast.run_pilot(cfg, None, None, 2)
    assert fc["reused"] is False and fc["pilot_targets"] == {"A": 2, "B": 2}
    assert [s["stage"] for s in fc["stages"]] == [
        "instructions_A", "instructions_B", "instances_A", "instances_B", "outputs_extra1_A", "outputs_extra1_B",
        "outputs_extra2_A", "outputs_extra2_B"]
    for key in ("total_seconds", "kept"):
        assert fc[key]["low"] <= fc[key]["mid"] <= fc[key]["high"]
    assert fc["funnel"]["A"]["accepted"]["mid"] == 10
    again = forecast.run_pilot(cfg, None, None, 2)  # the cache: no second pilot
    assert again["reused"] is True and again["created"] == fc["created"]
    run = rundir.open_run(cfg, tmp_path / "run")
    assert forecast.attach(run)["created"] == fc["created"]
    t0 = time.perf_counter()
    pipeline.generate(run)
    wall = time.perf_counter() - t0
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["forecast"]["total_seconds"] == fc["total_seconds"] and m["wall_seconds"] <= wall + 0.1
    for s in fc["stages"]:
        done = sum(m["timings"][s["stage"]]["finish"].values())
        assert s["requests"]["low"] <= s["requests"]["mid"] <= s["requests"]["high"]
        assert s["requests"]["mid"] == pytest.approx(done, rel=0.5)


def test_a_forecast_of_another_setup_is_not_attached(tmp_path, monkeypatch):
    monkeypatch.setenv("ENSEMBLE_INSTRUCT_FORECASTS", str(tmp_path / "cache"))
    fakes.install(monkeypatch)
    cfg = fakes.fake_setup(tmp_path, target=(4, 4))
    forecast.run_pilot(cfg, None, None, 1)
    run = rundir.open_run(cfg, tmp_path / "run", seed=99)
    assert forecast.attach(run) is None and "forecast" not in run.manifest


# ------------------------------------------------------------ the command, with the tiny models

@pytest.mark.models
def test_forecast_json_then_generate_keeps_forecast_vs_actual(tmp_path):
    env = {"ENSEMBLE_INSTRUCT_FORECASTS": str(tmp_path / "cache"), "ENSEMBLE_INSTRUCT_THREADS": "1"}
    r = cli("forecast", "-c", CI, "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    fc = json.loads(r.stdout)  # stdout is the JSON alone (the pilot's progress goes to stderr)
    assert {"total_seconds", "kept", "pilot_seconds", "stages"} <= set(fc)
    assert set(fc["total_seconds"]) == {"low", "mid", "high"} == set(fc["kept"])
    for s in fc["stages"]:
        assert {"stage", "model", "seconds", "requests", "tokens"} <= set(s) and s["seconds"]["mid"] > 0
        for d in (s["seconds"], s["requests"], s["tokens"]["prompt"], s["tokens"]["generated"]):
            assert d["low"] <= d["mid"] <= d["high"]
    again = cli("forecast", "-c", CI, env=env)  # the table, from the cache
    assert again.returncode == 0 and "reused from" in again.stdout and "total" in again.stdout, again.stderr[-2000:]
    out = tmp_path / "run"
    g = cli("generate", "-c", CI, "--out", out, env=env)
    assert g.returncode == 0, g.stderr[-3000:]
    assert "forecast (" in g.stderr and "(forecast 0:" in g.stdout and "forecast vs actual" in g.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["forecast"]["stages"]) == set(m["timings"]) and m["wall_seconds"] > 0
    rep = cli("report", out, env=env)
    assert rep.returncode == 0, rep.stderr[-2000:]
    text = (out / "report" / "report.md").read_text()
    assert "## Forecast vs actual" in text and "instances_A" in text.split("## Forecast vs actual")[1]


@pytest.mark.models
def test_ctrl_c_in_the_pilot_leaves_no_forecast_and_a_rerun_finishes_it(tmp_path):
    env = {"ENSEMBLE_INSTRUCT_FORECASTS": str(tmp_path / "cache"), "ENSEMBLE_INSTRUCT_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    import os
    p = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "forecast", "-c", str(CI)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    deadline = time.time() + 300
    while not list((tmp_path / "cache").glob("*/pilot-*/instructions_A.jsonl")) and p.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert "Resume with: " in err and "forecast" in err and "Traceback" not in err
    assert not list((tmp_path / "cache").glob("*/forecast.json"))
    for line in next((tmp_path / "cache").glob("*/pilot-*/trace.jsonl")).read_text().splitlines():
        json.loads(line)  # whole lines only
    r = cli("forecast", "-c", CI, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["reused"] is False, r.stderr[-2000:]


def test_bad_pilot_is_one_line(tmp_path):
    r = cli("forecast", "-c", CI, "--pilot", "0", env={"ENSEMBLE_INSTRUCT_FORECASTS": str(tmp_path)})
    one_line_error(r, 2, "--pilot must be at least 1")
