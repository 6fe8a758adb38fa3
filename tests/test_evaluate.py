"""`run.py evaluate` without models: hand-built answer files whose numbers are known, rouge-score as
the reference, monotone sweeps, one-line errors. The selection rules themselves: tests/test_rules.py."""
import json
import random

import pytest
from rouge_score import rouge_scorer

from conftest import ROOT, cli, one_line_error, random_candidates, random_text, read_jsonl, write_jsonl
from ensemble_instruct import rules
from ensemble_instruct.evaluate import SWEEP, gold_rouge, measure


# Four tasks, three models; the numbers below are worked out by hand (see each row).
GOLD = ["alpha beta gamma delta", "red green blue", "a b c d e f g h i j", "x"]
M1 = ["alpha beta gamma delta", "red green blue", "a b c d e f g x y z", ""]  # 1, 1, 0.7, 0
M2 = ["Alpha beta, gamma delta!", "red green", "a b c d e f g h i j", ""]  # 1, 0.8, 1, 0
M3 = ["zeta", "yellow", "a b c d e f g", "x"]  # 0, 0, 2*.7/1.7, 1
R3 = 2 * 0.7 / 1.7  # 7 of 10 gold tokens, all 7 of the answer's: p = 1, r = 0.7


def hand_built(tmp_path, newline_at_end=True):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"id": f"t{k}", "instruction": f"task {k}", "input": "", "output": g}
                                                   for k, g in enumerate(GOLD)], newline_at_end)
    files = [write_jsonl(tmp_path / f"m{i}.jsonl", [{"id": f"t{k}", "output": o} for k, o in enumerate(col)][::-1],
                         newline_at_end) for i, col in enumerate((M1, M2, M3), 1)]
    return tasks, files


def test_known_numbers_end_to_end(tmp_path):
    tasks, files = hand_built(tmp_path)
    out = tmp_path / "eval"
    r = cli("evaluate", "--tasks", tasks, "--outputs", *files, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "Selection rules" in r.stdout and "paper *" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["rows"] == 4
    assert m["models"]["m1"] == {"rouge_l": pytest.approx(2.7 / 4), "exact": 0.5}
    assert m["models"]["m2"] == {"rouge_l": pytest.approx(2.8 / 4), "exact": 0.5}
    assert m["models"]["m3"] == {"rouge_l": pytest.approx((R3 + 1) / 4), "exact": 0.25}
    p = m["rules"]["paper"]
    # t0: exact match m1 = m2 (kept, m1's text); t1: m3 shares no word (dropped); t2: all agree, m3 is
    # the medoid (sums 0.7+R3 for m1 and m2, 2*R3 for m3); t3: two empty answers never agree (dropped)
    assert p["kept"] == 2 and p["kept_fraction"] == 0.5
    assert p["pick"] == pytest.approx((1 + R3) / 2)
    assert p["models_kept"] == pytest.approx({"m1": 0.85, "m2": 1.0, "m3": R3 / 2})
    assert p["best_model"] == "m2" and p["best_single"] == 1.0 and p["oracle"] == 1.0
    assert p["pick_minus_best"] == pytest.approx((1 + R3) / 2 - 1)
    assert p["models_dropped"] == pytest.approx({"m1": 0.5, "m2": 0.4, "m3": 0.5})
    # quorum (a majority: 2 of 3) also keeps t1, where m1 and m2 agree
    assert m["rules"]["quorum"]["kept"] == 3
    for name in ("report.md", "report.html", "rows.jsonl"):
        assert (out / name).stat().st_size > 0
    rows = read_jsonl(out / "rows.jsonl")
    assert rows[2]["rules"]["paper"] == {"kept": True, "pick": "m3", "confidence": 0.7}


@pytest.mark.models  # no model, but matplotlib (the report extra), which the core install lacks
def test_plots_in_the_report(tmp_path):
    tasks, files = hand_built(tmp_path)
    out = tmp_path / "eval"
    r = cli("evaluate", "--tasks", tasks, "--outputs", *files, "--out", out)
    assert r.returncode == 0 and "matplotlib is not installed" not in r.stderr, r.stderr
    for name in ("sweep.png", "models.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2


def test_last_line_without_newline_is_data(tmp_path):
    tasks, files = hand_built(tmp_path, newline_at_end=False)
    r = cli("evaluate", "--tasks", tasks, "--outputs", *files, "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["rows"] == 4


def test_matched_by_line_without_ids(tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"instruction": f"task {k}", "output": g} for k, g in enumerate(GOLD)])
    files = [write_jsonl(tmp_path / f"m{i}.jsonl", [{"output": o} for o in col]) for i, col in enumerate((M1, M2, M3), 1)]
    r = cli("evaluate", "--tasks", tasks, "--outputs", *files, "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["rules"]["paper"]["kept"] == 2


def test_seed_tasks_are_the_default(tmp_path):
    seeds = read_jsonl(ROOT / "seeds" / "seed_tasks.jsonl")
    files = [write_jsonl(tmp_path / f"m{i}.jsonl", [{"id": s["id"], "output": s["instances"][0]["output"][: 20 * i]}
                                                    for s in seeds]) for i in (1, 2, 3)]
    r = cli("evaluate", "--outputs", *files, "--out", tmp_path / "eval", "--limit", 50)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["rows"] == 50 and 0 < m["models"]["m1"]["rouge_l"] < m["models"]["m3"]["rouge_l"] <= 1


def test_bad_input_is_one_line_exit_2(tmp_path):
    tasks, (f1, f2, f3) = hand_built(tmp_path)
    no_gold = write_jsonl(tmp_path / "nogold.jsonl", [{"id": "t0", "instruction": "x", "input": ""}])
    other_ids = write_jsonl(tmp_path / "other.jsonl", [{"id": f"u{k}", "output": "y"} for k in range(4)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    cases = [
        (("--tasks", no_gold, "--outputs", f1, f2, f3), "no gold 'output'"),
        (("--tasks", tasks, "--outputs", f1, f2, other_ids), "ids do not match"),
        (("--tasks", tasks, "--outputs", f1, f2), "at least 3 --outputs"),
        (("--tasks", empty, "--outputs", f1, f2, f3), "empty file"),
        (("--tasks", tasks, "--outputs", f1, f2, blank), "empty file"),
        (("--tasks", tasks, "--outputs", f1, f2, tmp_path / "nope.jsonl"), "file not found"),
        (("--tasks", tmp_path / "nope.jsonl", "--outputs", f1, f2, f3), "file not found"),
        (("--tasks", tasks, "--outputs", f1, f2, f3, "--threshold", "1.5"), "--threshold"),
        (("--tasks", tasks, "--outputs", f1, f2, f3, "--limit", "0"), "--limit"),
        (("--tasks", tasks, f1, f2, f3), "after --outputs"),
    ]
    for args, msg in cases:
        r = cli("evaluate", *args, "--out", tmp_path / "eval")
        one_line_error(r, 2, msg)
    bad_rule = tmp_path / "bad.toml"
    bad_rule.write_text('generator = "x"\nextra = ["y", "z"]\n[ensemble]\nrule = "best"\n')
    r = cli("evaluate", "--tasks", tasks, "--outputs", f1, f2, f3, "-c", bad_rule, "--out", tmp_path / "eval")
    one_line_error(r, 2, "ensemble.rule")
    big_quorum = tmp_path / "q.toml"
    big_quorum.write_text('generator = "x"\nextra = ["y", "z"]\n[ensemble]\nquorum = 4\n')
    r = cli("evaluate", "--tasks", tasks, "--outputs", f1, f2, f3, "-c", big_quorum, "--out", tmp_path / "eval")
    assert r.returncode == 2 and "quorum 4" in r.stderr


def test_gold_rouge_equals_rouge_score():
    rng = random.Random(5)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    gold = [random_text(rng) for _ in range(400)]
    cands = [[g if rng.random() < 0.1 else " ".join(g.split()[: rng.randint(0, 12)]) + " " + random_text(rng, 0, 4)
              for _ in range(3)] for g in gold]
    R = gold_rouge(gold, cands)
    for k, (g, c) in enumerate(zip(gold, cands)):
        for m in range(3):
            assert R[k, m] == scorer.score(g, c[m])["rougeL"].fmeasure, (g, c[m])


@pytest.mark.parametrize("n", [3, 5])
def test_sweep_is_monotone_and_nested(n):
    gold, cands = random_candidates(1, n=n)
    names = [f"m{i}" for i in range(n)]
    result = measure(names, gold, cands)
    for rule in rules.RULES:
        kept = [p["kept_fraction"] for p in result["sweep"][rule]]
        assert kept == sorted(kept, reverse=True), (rule, kept)  # thresholds rise, kept fraction falls
        assert kept[0] > kept[-1]
        s = rules.score(cands, rule)
        masks = [rules.kept_mask(s, cands, t) for t in SWEEP]
        for a, b in zip(masks, masks[1:]):
            assert not (b & ~a).any()  # a higher threshold keeps a subset of the rows


def test_same_metrics_twice(tmp_path):
    tasks, files = hand_built(tmp_path)
    outs = []
    for k in range(2):
        assert cli("evaluate", "--tasks", tasks, "--outputs", *files, "--out", tmp_path / f"e{k}").returncode == 0
        outs.append((tmp_path / f"e{k}" / "metrics.json").read_bytes())
    assert outs[0] == outs[1]


def test_ensemble_command_takes_a_rule(tmp_path):
    inst = write_jsonl(tmp_path / "inst.jsonl", [{"id": f"t{k}", "instruction": f"task {k}", "input": "", "output": o}
                                                 for k, o in enumerate(M1)])
    o2 = write_jsonl(tmp_path / "m2.jsonl", [{"id": f"t{k}", "output": o} for k, o in enumerate(M2)])
    o3 = write_jsonl(tmp_path / "m3.jsonl", [{"id": f"t{k}", "output": o} for k, o in enumerate(M3)])
    for rule, kept in (("paper", 2), ("weighted", 2), ("quorum", 3)):
        r = cli("ensemble", inst, o2, o3, "-o", tmp_path / "out.jsonl", "--rule", rule)
        assert r.returncode == 0 and f"kept {kept} of 4" in r.stdout, (rule, r.stdout, r.stderr)
    r = cli("ensemble", inst, o2, o3, "-o", tmp_path / "out.jsonl", "--rule", "best")
    assert r.returncode == 2 and "unknown rule" in r.stderr
