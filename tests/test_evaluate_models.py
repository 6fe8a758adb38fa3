"""`run.py evaluate` with the tiny models: each answers a few seed tasks, one model at a time,
into the evaluation directory; a rerun loads no model and gives the same numbers."""
import json

import pytest

from conftest import ROOT, cli, read_jsonl

pytestmark = pytest.mark.models


def evaluate(*args):
    return cli("evaluate", "-c", ROOT / "configs" / "ci.toml", *args, timeout=900)


def test_evaluate_with_the_tiny_models(tmp_path):
    out = tmp_path / "eval"
    r = evaluate("--limit", 6, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    names = ["smollm2-135m", "gemma3-270m", "smollm2-135m-hf-nf4"]  # generator, then the extras
    for name in names:
        rows = read_jsonl(out / f"answers_{name}.jsonl")
        assert [x["id"] for x in rows] == [f"seed_task_{k}" for k in range(6)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == 6 and list(metrics["models"]) == names
    assert set(metrics["rules"]) >= {"paper", "weighted", "quorum"} and metrics["configured_rule"] == "paper"
    assert (out / "report.html").stat().st_size > 0 and (out / "sweep.png").stat().st_size > 0
    manifest = json.loads((out / "manifest.json").read_text())
    loads = [e["model"] for e in manifest["events"] if e["event"] == "load"]
    assert loads == names  # one model at a time, each once

    r = evaluate("--limit", 6, "--out", out)  # everything is on disk: no model is loaded again
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["model"] for e in manifest["events"] if e["event"] == "load"] == names
    assert json.loads((out / "metrics.json").read_text()) == metrics

    r = evaluate("--tasks", tmp_path / "none.jsonl", "--out", out)
    assert r.returncode == 2 and "file not found" in r.stderr


def test_a_resumed_evaluation_keeps_the_auto_settings_it_was_opened_with(tmp_path):
    """`evaluate --models` with a card whose parallel is "auto": the number is picked when the
    directory is first opened (here with 0.4 GB free: parallel 2, windows of 16 requests), recorded in
    its manifest, and kept when the evaluation is killed mid-window and resumed with 2 GB free (the
    plan alone would now say 16, windows of 128). The answers are the bytes of an uninterrupted
    evaluation."""
    card = tmp_path / "smollm2-auto.toml"
    card.write_text((ROOT / "quantized" / "smollm2-135m.toml").read_text().replace("parallel = 16", 'parallel = "auto"'))
    answers = "answers_smollm2-135m.jsonl"

    def evaluate_models(out, ram_gb, **env):
        return cli("evaluate", "--models", card, "--tasks", "user-oriented", "--limit", 20, "-c", ROOT / "configs" / "ci.toml", "--out", out,
                   script="tests/inject.py", env={"INJECT_RAM_GB": str(ram_gb), "ENSEMBLE_INSTRUCT_THREADS": "1", **env},
                   timeout=900)

    whole = tmp_path / "whole"
    r = evaluate_models(whole, 0.4)
    assert r.returncode == 0, r.stderr[-3000:]
    recorded = json.loads((whole / "manifest.json").read_text())["auto"]["smollm2-135m"]
    assert recorded["parallel"] == 2 and recorded["card"]["parallel"] == "auto" and "0.4 GB" in recorded["budget"]

    killed = tmp_path / "killed"
    r = evaluate_models(killed, 0.4, INJECT_KILL_AT=f"torn:{answers}")  # half of the first window, then SIGKILL
    assert r.returncode == -9, r.stderr[-3000:]
    r = evaluate_models(killed, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((killed / "manifest.json").read_text())["auto"]["smollm2-135m"]["parallel"] == 2
    assert (killed / answers).read_bytes() == (whole / answers).read_bytes()
