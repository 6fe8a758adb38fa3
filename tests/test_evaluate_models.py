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
