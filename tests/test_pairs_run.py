"""Preference pairs where a user meets them: a run's pairs.jsonl (written by the ensemble stage,
rewritten by `ensemble --run`), `ensemble --pairs` on the user's own files, and the dpo exports.
The pair rule itself is tested in test_pairs.py."""
import json
import shutil

import pytest

from conftest import cli, one_line_error, read_jsonl, write_jsonl
from ensemble_instruct import pairs as P

FIELDS = {"id", "type", "instruction", "input", "chosen", "rejected", "chosen_model", "rejected_model",
          "rejected_flaw", "scores"}


def candidates_of(run, typ):
    """Each usable instance's candidates as the run's files hold them (generator first)."""
    m = json.loads((run / "manifest.json").read_text())
    names = [c["name"] for c in m["fingerprint"]["cards"]]
    inst = [r for r in read_jsonl(run / f"instances_{typ}.jsonl") if r["reason"] is None]
    cols = [{r["id"]: r["output"] for r in read_jsonl(run / f"outputs_{n}_{typ}.jsonl")} for n in names[1:]]
    return inst, [list(zip(names, [it["output"], *(c[it["id"]] for c in cols)])) for it in inst]


@pytest.mark.models
def test_a_run_writes_its_pairs_and_ensemble_run_rewrites_the_same_bytes(reference_run, tmp_path):
    pairs = read_jsonl(reference_run / "pairs.jsonl")
    assert pairs, "the CI run yields no pair"
    want = []
    for typ in ("A", "B"):
        inst, cands = candidates_of(reference_run, typ)
        for it, p in zip(inst, P.pick_pairs([(i["instruction"], i["input"], c) for i, c in zip(inst, cands)])):
            if p is not None:
                want.append((it["id"], p.chosen, p.rejected, p.chosen_model, p.rejected_model))
    assert [(r["id"], r["chosen"], r["rejected"], r["chosen_model"], r["rejected_model"]) for r in pairs] == want
    assert all(set(r) == FIELDS and r["chosen"] != r["rejected"] for r in pairs)
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["pairs"] == len(pairs)
    copy = tmp_path / "run"
    shutil.copytree(reference_run, copy)
    (copy / "pairs.jsonl").unlink()
    r = cli("ensemble", "--run", copy)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (copy / "pairs.jsonl").read_bytes() == (reference_run / "pairs.jsonl").read_bytes()


@pytest.mark.models
def test_dpo_exports_and_a_run_from_before_pairs(reference_run, tmp_path):
    pairs = read_jsonl(reference_run / "pairs.jsonl")
    r = cli("export", reference_run, "-f", "dpo", "-o", tmp_path / "dpo.jsonl")
    assert r.returncode == 0, r.stderr[-2000:]
    dpo = read_jsonl(tmp_path / "dpo.jsonl")
    # the prompt the fine-tune step and evaluate send: templates/output.txt, instruction \n input
    assert dpo == [{"prompt": f"{p['instruction'].strip()}\n{p['input'].strip()}", "chosen": p["chosen"],
                    "rejected": p["rejected"]} for p in pairs]
    r = cli("export", reference_run, "-f", "dpo-chat", "-o", tmp_path / "chat.jsonl")
    assert r.returncode == 0, r.stderr[-2000:]
    chat = read_jsonl(tmp_path / "chat.jsonl")
    assert [c["prompt"][0]["role"] for c in chat] == ["user"] * len(pairs)
    assert [(c["chosen"][0]["content"], c["rejected"][0]["content"]) for c in chat] == \
        [(p["chosen"], p["rejected"]) for p in pairs]
    # a run made before pairs existed: no pairs.jsonl, a manifest without [ensemble.pairs]
    old = tmp_path / "old"
    shutil.copytree(reference_run, old)
    (old / "pairs.jsonl").unlink()
    m = json.loads((old / "manifest.json").read_text())
    del m["fingerprint"]["config"]["ensemble"]["pairs"]
    (old / "manifest.json").write_text(json.dumps(m))
    r = cli("export", old, "-f", "dpo", "-o", tmp_path / "old.jsonl")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "old.jsonl").read_bytes() == (tmp_path / "dpo.jsonl").read_bytes()
    assert not (old / "pairs.jsonl").exists()  # an export never writes into the run
    import datasets
    assert cli("export", reference_run, "-f", "hf", "-o", tmp_path / "hf").returncode == 0
    d = datasets.load_from_disk(str(tmp_path / "hf"))
    assert list(zip(d["pairs"]["prompt"], d["pairs"]["chosen"])) == [(x["prompt"], x["chosen"]) for x in dpo]


def test_ensemble_pairs_on_files(tmp_path):
    inst = write_jsonl(tmp_path / "inst.jsonl", [
        {"id": "a", "instruction": "Name three primary colors.", "input": "",
         "output": "The three primary colors are red, yellow and blue."},
        {"id": "b", "instruction": "Add the numbers.", "input": "2 + 2", "output": "4"},
    ])
    o1 = write_jsonl(tmp_path / "m1.jsonl", [{"id": "a", "output": "The primary colors are red, yellow and blue."},
                                             {"id": "b", "output": "4"}])
    o2 = write_jsonl(tmp_path / "m2.jsonl", [{"id": "a", "output": "Name three primary colors."},  # an echo
                                             {"id": "b", "output": "4"}])
    out, pairs = tmp_path / "out.jsonl", tmp_path / "pairs.jsonl"
    r = cli("ensemble", inst, o1, o2, "-o", out, "--pairs", pairs)
    assert r.returncode == 0, r.stderr
    assert "1 preference pairs" in r.stdout
    [p] = read_jsonl(pairs)
    assert (p["id"], p["chosen_model"], p["rejected_model"], p["rejected_flaw"]) == ("a", "generator", "m2", "echo")
    assert p["rejected"] == "Name three primary colors." and set(p) == FIELDS - {"type"}
    # no ids: named by the line in INSTANCES
    for f in (inst, o1, o2):
        write_jsonl(f, [{k: v for k, v in x.items() if k != "id"} for x in read_jsonl(f)])
    assert cli("ensemble", inst, o1, o2, "-o", out, "--pairs", pairs).returncode == 0
    assert [p["id"] for p in read_jsonl(pairs)] == [1]


def test_pairs_bad_input_is_one_line(tmp_path):
    inst = write_jsonl(tmp_path / "inst.jsonl", [{"id": "a", "instruction": "x", "output": "y"}])
    o1 = write_jsonl(tmp_path / "m1.jsonl", [{"id": "a", "output": "z"}])
    r = cli("ensemble", inst, o1, "-o", tmp_path / "o.jsonl", "--pairs", tmp_path / "p.jsonl")
    one_line_error(r, 2, "ensemble --pairs needs at least 2 OUTPUTS files")
    r = cli("ensemble", "--run", tmp_path, "--pairs", tmp_path / "p.jsonl")
    one_line_error(r, 2, "--pairs is for INSTANCES OUTPUTS")
    bad = tmp_path / "bad.toml"
    bad.write_text('generator = "quantized/smollm2-135m.toml"\nextra = ["quantized/gemma3-270m.toml", "quantized/smollm2-135m-chat.toml"]\n[ensemble.pairs]\nmax_length_ratio = 0.5\n')
    r = cli("plan", "-c", bad)
    one_line_error(r, 2, "ensemble.pairs", "max_length_ratio must be 0 (off) or at least 1")
