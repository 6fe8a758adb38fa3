"""Held-out task sets and decontamination (no model): the bundled user-oriented tasks, the SuperNI
sample script on a folder laid out like allenai/natural-instructions, and the contamination test."""
import json
import os

from conftest import cli, one_line_error, read_jsonl

from ensemble_instruct import tasksets


def test_user_oriented_tasks_are_bundled_with_gold():
    tasks = tasksets.user_oriented()
    assert len(tasks) == 252 and len({t["id"] for t in tasks}) == 252
    assert all(t["output"] and t["instruction"] for t in tasks)
    assert sum(bool(t["input"]) for t in tasks) == 208  # the instance input goes in `input`
    assert tasks[0]["id"] == "user_oriented_task_0" and tasks[0]["input"].startswith("If you have any questions")


def test_contamination_by_rouge_and_by_13_gram():
    tasks = tasksets.user_oriented()
    copy = dict(instruction=tasks[5]["instruction"] + " Please.", input="", output="x")
    long_in = tasks[0]["input"]  # 25+ words: a 13-gram of it in a generated input is a leak
    gram = dict(instruction="Make this shorter.", input="Note: " + long_in, output="y")
    clean = dict(instruction="Name a fruit that is yellow.", input="", output="banana")
    hits = tasksets.contaminated([clean, copy, gram], tasks)
    assert [(h["index"], h["why"], h["task"]) for h in hits] == [
        (1, "rouge_l", tasks[5]["id"]), (2, "13-gram", tasks[0]["id"])]
    assert hits[0]["rouge_l"] > 0.7


def fake_superni(tmp_path):
    repo = tmp_path / "natural-instructions"
    (repo / "tasks").mkdir(parents=True)
    (repo / "splits" / "default").mkdir(parents=True)
    names = ["task001_quoref_question_generation", "task020_mctaco_span_based_question"]
    (repo / "splits" / "default" / "test_tasks.txt").write_text("\n".join(names) + "\n")
    for k, name in enumerate(names):
        task = {"Definition": [f"Definition of task {k}."], "Positive Examples": [],
                "Instances": [{"id": f"{name}-{i}", "input": f"input {k}.{i}", "output": [f"gold {k}.{i}", "other"]}
                              for i in range(7)]}
        (repo / "tasks" / f"{name}.json").write_text(json.dumps(task))
    (repo / "tasks" / "task999_not_in_test.json").write_text(json.dumps({"Definition": ["x"], "Instances": []}))
    return repo, names


def test_superni_sample_script_and_tasks_superni(tmp_path):
    repo, names = fake_superni(tmp_path)
    env = {**os.environ, "ENSEMBLE_INSTRUCT_CACHE": str(tmp_path / "cache")}
    # before the sample is built, --tasks superni says how to build it (one line, exit 2)
    r = cli("evaluate", "--tasks", "superni", "--outputs", "a", "b", "c", env=env, timeout=120)
    one_line_error(r, 2, "scripts/superni_sample.py --repo", "not built (this tool cannot download SuperNI)")
    r = cli("--repo", repo, script="scripts/superni_sample.py", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    sample = read_jsonl(tmp_path / "cache" / "superni" / "test_sample.jsonl")
    assert len(sample) == 10  # the first 5 instances of each test task, in order; the first gold output
    assert sample[0] == {"id": f"{names[0]}/{names[0]}-0", "instruction": "Definition of task 0.",
                         "input": "input 0.0", "output": "gold 0.0"}
    assert sample[-1]["id"] == f"{names[1]}/{names[1]}-4"
    # --tasks superni reads it: three answer files scored against its gold
    for name in "abc":
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"id": t["id"], "output": t["output"]}) + "\n"
                                                         for t in sample))
    r = cli("evaluate", "--tasks", "superni", "--outputs", *(tmp_path / f"{n}.jsonl" for n in "abc"),
            "--out", tmp_path / "ev", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["rows"] == 10 and all(m["exact"] == 1.0 for m in metrics["models"].values())


def test_evaluate_models_refuses_bad_combinations_before_loading(tmp_path):
    def run(*args):
        return cli("evaluate", *args, timeout=120)
    r = run("--models", "smollm2-135m-hf", "smollm2-135m-hf", "--tasks", "user-oriented", "--out", tmp_path / "e")
    one_line_error(r, 2, "two cards are named 'smollm2-135m-hf'")
    r = run("--models", "smollm2-135m-hf", "--outputs", "a.jsonl", "--out", tmp_path / "e")
    assert r.returncode == 2 and "not both" in r.stderr
    r = run("--models", "smollm2-135m-hf", "--tasks", "nonesuch", "--out", tmp_path / "e")
    assert r.returncode == 2 and "user-oriented, superni" in r.stderr
