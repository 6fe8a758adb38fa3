"""Report and exports of a real tiny-model run, loaded back and checked."""
import json
from collections import Counter

import pytest

from conftest import cli, read_jsonl
from ensemble_instruct.report import leading_verbs

pytestmark = pytest.mark.models


def dataset(run):
    return read_jsonl(run / "dataset.jsonl")


def funnel_by_hand(run):
    """The report's funnel table, counted here from the stage files with plain json (not with
    report.funnel, which wrote the report), each count checked against the next stage's file."""
    load = lambda name: read_jsonl(run / name)  # noqa: E731
    fmt = lambda c: ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "-"  # noqa: E731
    kept, pairs = load("dataset.jsonl"), load("pairs.jsonl")
    table = {}
    for t in "AB":
        requests, instances, ens = load(f"instructions_{t}.jsonl"), load(f"instances_{t}.jsonl"), load(f"ensemble_{t}.jsonl")
        items = [it for r in requests for it in r["items"]]
        accepted = [it for it in items if it["status"] == "accepted"]
        assert len(accepted) == len(instances)  # one instance per accepted instruction
        usable = [r for r in instances if r["reason"] is None]
        for o in run.glob(f"outputs_*_{t}.jsonl"):  # every extra model answered every usable instance
            assert [r["id"] for r in load(o.name)] == [r["id"] for r in usable], o.name
        assert [r["id"] for r in ens] == [r["id"] for r in usable]
        kept_t = [r for r in kept if r["type"] == t]
        assert [r["id"] for r in kept_t] == [r["id"] for r in ens if r["kept"]]
        column = [len(requests), len(items), fmt(Counter(it["reason"] for it in items if it not in accepted)),
                  len(accepted), len(instances), fmt(Counter(r["reason"] for r in instances if r["reason"])),
                  len(usable), fmt(Counter(r["rule"] for r in ens)), len(kept_t),
                  fmt(Counter(r["source"] for r in kept_t)), sum(p["type"] == t for p in pairs)]
        assert {p["id"] for p in pairs if p["type"] == t} <= {r["id"] for r in usable}
        table[t] = [str(v) for v in column]
    labels = ["generation requests", "raw instructions", "rejected (reason: count)", "accepted instructions",
              "instances generated", "instances dropped (reason: count)", "usable instances",
              "ensemble rule (rule: count)", "kept", "kept output from", "preference pairs"]
    return {label: [a, b] for label, a, b in zip(labels, table["A"], table["B"])}


def test_leading_verbs():
    assert leading_verbs(["Write a poem.", "write: a haiku", "Classify it", "  ", "What is x?"]) == [
        ("write", 2), ("classify", 1), ("what", 1)]


def test_report(reference_run):
    r = cli("report", reference_run)
    assert r.returncode == 0, r.stderr[-2000:]
    out = reference_run / "report"
    for name in ("funnel.png", "novelty.png", "agreement.png", "winners.png", "lengths.png", "verbs.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    md = (out / "report.md").read_text()
    lines = md.splitlines()
    table = lines[lines.index("## Funnel") + 4:]  # heading, blank, header, separator
    table = table[:table.index("")]
    assert {row.split(" | ")[0][2:]: row[2:-2].split(" | ")[1:] for row in table} == funnel_by_hand(reference_run)
    for section in ("## Funnel", "## Cost per stage", "## Plots", "## Most frequent leading words",
                    "## Sample of kept examples", "## Sample of dropped examples", "## Sample of preference pairs"):
        assert section in md
    assert "smollm2-135m-hf-nf4" in md and "tokens/s" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "src=\"funnel.png\"" not in html  # self-contained


def test_exports_round_trip(reference_run, tmp_path):
    rows = dataset(reference_run)
    assert rows
    expect = [(r["instruction"], r["input"], r["output"]) for r in rows]
    user = [f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"] for r in rows]

    assert cli("export", reference_run, "-f", "alpaca", "-o", tmp_path / "a.json").returncode == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert [(r["instruction"], r["input"], r["output"]) for r in a] == expect

    assert cli("export", reference_run, "-f", "jsonl", "-o", tmp_path / "c.jsonl").returncode == 0
    c = read_jsonl(tmp_path / "c.jsonl")
    assert [m["messages"][0]["content"] for m in c] == user
    assert [m["messages"][1]["content"] for m in c] == [r["output"] for r in rows]
    assert {m["messages"][0]["role"] for m in c} == {"user"}

    assert cli("export", reference_run, "-f", "sharegpt", "-o", tmp_path / "s.json").returncode == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert [(x["conversations"][0]["value"], x["conversations"][1]["value"]) for x in s] == list(
        zip(user, [r["output"] for r in rows]))

    import datasets
    assert cli("export", reference_run, "-f", "hf", "-o", tmp_path / "hf").returncode == 0
    d = datasets.load_from_disk(str(tmp_path / "hf"))
    assert list(zip(d["train"]["instruction"], d["train"]["input"], d["train"]["output"])) == expect


def test_export_errors(tmp_path):
    r = cli("export", tmp_path, "-f", "xml", "-o", tmp_path / "x")
    assert r.returncode == 2 and "unknown format 'xml'" in r.stderr
    r = cli("export", tmp_path, "-o", tmp_path / "x")
    assert r.returncode == 2 and "not a run directory" in r.stderr
    (tmp_path / "manifest.json").write_text('{"fingerprint": {}}')  # a run that has not finished
    r = cli("export", tmp_path, "-o", tmp_path.parent / "x")
    assert r.returncode == 2 and "no dataset.jsonl" in r.stderr
    r = cli("report", tmp_path / "nope")
    assert r.returncode == 2 and "not a run directory" in r.stderr
