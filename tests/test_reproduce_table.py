"""scripts/reproduce_table.py, the last step of `make reproduce` (no model): the evaluation folders are
written by the real `run.py evaluate --outputs`, so the table reads what evaluate really writes."""
import json
import os

from conftest import cli, one_line_error, read_jsonl

from ensemble_instruct import tasksets


def evaluate(out, tmp_path, answers, env=None, tasks="user-oriented", limit=20):
    files = []
    for name, answer in answers.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"id": t["id"], "output": answer(t)}) + "\n"
                                                         for t in tasksets.user_oriented()[:limit]))
        files.append(str(tmp_path / f"{name}.jsonl"))
    r = cli("evaluate", "--tasks", tasks, "--limit", limit, "--outputs", *files, "--out", out, env=env, timeout=300)
    assert r.returncode == 0, r.stderr


def table(out, env=None):
    return cli(out, script="scripts/reproduce_table.py", env=env, timeout=120)


def test_table_says_superni_was_not_evaluated_and_gives_the_paired_interval(tmp_path):
    out = tmp_path / "repro"
    (out / "tuned").mkdir(parents=True)
    (out / "tuned" / "manifest.json").write_text(json.dumps({
        "run": str(tmp_path / "run"), "examples": 42, "decontamination": {"dropped": 1}, "steps": 22,
        "train_s": 90.5, "device": "cpu", "method": "lora"}))
    # base: empty answers on half the tasks; tuned: gold on the first 5 tasks, else the base's answer
    base = lambda t: "" if int(t["id"].rsplit("_", 1)[1]) % 2 else "an answer"
    tuned = lambda t: t["output"] if int(t["id"].rsplit("_", 1)[1]) < 5 else base(t)
    evaluate(out / "eval-user-oriented", tmp_path, {"base": base, "tuned": tuned, "other": base})

    r = table(out)
    assert r.returncode == 0, r.stderr
    text = (out / "reproduce.md").read_text()
    assert text == r.stdout.rstrip("\n") + "\n"
    head, sep, base_row, tuned_row = text.split("\n")[2:6]
    assert head == "| model | training data | user-oriented ROUGE-L (20 tasks) | superni ROUGE-L |"
    assert base_row.startswith("| base | - (base) | 0.") and base_row.endswith("| not evaluated |")
    assert tuned_row.startswith("| tuned | ") and "42 kept examples (1 dropped as close to an evaluation task), 22 steps" in tuned_row
    assert tuned_row.endswith("| not evaluated |")
    assert "SuperNI was **not evaluated**" in text and "scripts/superni_sample.py --repo PATH" in text
    metrics = json.loads((out / "eval-user-oriented" / "metrics.json").read_text())["models"]
    assert f"{metrics['tuned']['rouge_l']:.3f}" in tuned_row
    # 5 tasks better, none worse: the interval lies above 0
    line = next(x for x in text.splitlines() if x.startswith("- user-oriented, tuned minus base"))
    assert "better on 5, worse on 0, equal on 15" in line
    low = float(line.split("interval [")[1].split(",")[0])
    assert low > 0
    assert "Fine-tuning: 90.5 s of training on cpu (lora)" in text


def test_table_shows_superni_once_its_sample_was_evaluated(tmp_path):
    from test_tasksets import fake_superni

    out = tmp_path / "repro"
    (out / "tuned").mkdir(parents=True)
    (out / "tuned" / "manifest.json").write_text(json.dumps({
        "run": "r", "examples": 3, "decontamination": {"dropped": 0}, "steps": 2}))
    evaluate(out / "eval-user-oriented", tmp_path, {"base": lambda t: "x", "tuned": lambda t: "y", "c": lambda t: "z"})
    repo, _ = fake_superni(tmp_path)
    env = {**os.environ, "ENSEMBLE_INSTRUCT_CACHE": str(tmp_path / "cache")}
    cli("--repo", repo, script="scripts/superni_sample.py", env=env, check=True, timeout=120)
    sample = read_jsonl(tmp_path / "cache" / "superni" / "test_sample.jsonl")
    files = []
    (tmp_path / "s").mkdir()
    for name in ("base", "tuned", "c"):  # the same model names as in eval-user-oriented
        (tmp_path / "s" / f"{name}.jsonl").write_text("".join(json.dumps({"id": t["id"], "output": t["output"]})
                                                              + "\n" for t in sample))
        files.append(str(tmp_path / "s" / f"{name}.jsonl"))
    r = cli("evaluate", "--tasks", "superni", "--outputs", *files, "--out", out / "eval-superni", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    r = table(out)
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()[2]
    assert head == "| model | training data | user-oriented ROUGE-L (20 tasks) | superni ROUGE-L (10 tasks) |"
    assert "not evaluated" not in r.stdout and "| 1.000 |" in r.stdout.splitlines()[4]


def test_missing_steps_are_one_line_and_exit_2(tmp_path):
    r = table(tmp_path / "nothing")
    one_line_error(r, 2, "manifest.json not found")
    (tmp_path / "nothing" / "tuned").mkdir(parents=True)
    (tmp_path / "nothing" / "tuned" / "manifest.json").write_text("{}")
    r = table(tmp_path / "nothing")
    one_line_error(r, 2, "no eval-*/metrics.json")
