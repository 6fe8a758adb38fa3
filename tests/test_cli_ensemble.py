import subprocess
import sys

from conftest import ROOT, cli, one_line_error, read_jsonl, write_jsonl


def test_help_is_fast_and_imports_no_torch():
    r = cli("--help")
    assert r.returncode == 0 and "ensemble" in r.stdout
    code = ("import sys, ensemble_instruct.cli, ensemble_instruct.ensemble, ensemble_instruct.novelty;"
            "assert not {'torch', 'transformers', 'llama_cpp'} & set(sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_ensemble_by_id_and_by_line(tmp_path):
    inst = write_jsonl(tmp_path / "inst.jsonl", [
        {"id": "a", "instruction": "Capital of France?", "input": "", "output": "Paris."},
        {"id": "b", "instruction": "Add", "input": "2+2", "output": "4"},
        {"id": "c", "instruction": "Say hi", "input": "", "output": "hello there friend"},
    ])
    o1 = write_jsonl(tmp_path / "m1.jsonl", [{"id": "c", "output": "hello there"}, {"id": "a", "output": "paris"},
                                             {"id": "b", "output": "five"}])
    o2 = write_jsonl(tmp_path / "m2.jsonl", [{"id": "a", "output": "Lyon"}, {"id": "b", "output": "six"},
                                             {"id": "c", "output": "hello friend"}])
    out = tmp_path / "out.jsonl"
    r = cli("ensemble", inst, o1, o2, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "kept 2 of 3" in r.stdout and "exact match: 1" in r.stdout and "below threshold: 1" in r.stdout
    rows = read_jsonl(out)
    assert [(x["id"], x["output"], x["rule"]) for x in rows] == [("a", "Paris.", "exact"), ("c", "hello there friend", "rouge")]
    assert rows[0]["agreeing"] == ["generator", "m1"]
    # line by line, no ids
    for p in (inst, o1, o2):
        write_jsonl(p, [{k: v for k, v in x.items() if k != "id"} for x in read_jsonl(p)])
    r = cli("ensemble", inst, o1, o2, "-o", out)
    assert r.returncode == 0 and "kept 0 of 3" in r.stdout  # by line, m1 no longer lines up with inst


def test_ensemble_errors_are_one_line(tmp_path):
    inst = write_jsonl(tmp_path / "inst.jsonl", [{"id": "a", "instruction": "x", "output": "y"}])
    o1 = write_jsonl(tmp_path / "o1.jsonl", [{"id": "a", "output": "y"}])
    o2 = write_jsonl(tmp_path / "o2.jsonl", [{"id": "z", "output": "y"}])
    short = write_jsonl(tmp_path / "short.jsonl", [])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "output": "y"}\n{oops\n')
    cases = [
        ((inst, o1, o2), "ids do not match"),
        ((inst, o1, short), "empty file"),
        ((inst, o1, bad), "bad.jsonl:2: not valid JSON"),
        ((inst, o1, tmp_path / "nope.jsonl"), "file not found"),
        ((inst, o1), "at least 2 OUTPUTS"),
    ]
    for files, msg in cases:
        r = cli("ensemble", *files, "-o", tmp_path / "out.jsonl")
        one_line_error(r, 2, msg)
    r = cli("ensemble", inst, o1, o1, "-o", tmp_path / "out.jsonl", "--threshold", "-1")
    assert r.returncode == 2 and "--threshold" in r.stderr
    write_jsonl(o2, [{"output": "y"}, {"output": "z"}])
    write_jsonl(inst, [{"instruction": "x", "output": "y"}])
    r = cli("ensemble", inst, o1, o2, "-o", tmp_path / "out.jsonl")
    assert r.returncode == 2 and "2 outputs for 1 instances" in r.stderr
