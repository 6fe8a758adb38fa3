"""`run.py finetune --method dpo` (TRL's DPOTrainer, LoRA) on the real SmolLM2-135M (transformers, fp32,
CPU), a few optimizer steps on a handful of preference pairs: the loss and rewards are logged, the
adapter, merged model and card are written, `evaluate --models` loads the tuned cards; DPO on top of an
SFT fine-tune of the same run; a SIGKILL mid-training resumes to the same adapter as an uninterrupted
run; bad input is one line and exit 2."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, one_line_error, read_jsonl, user_visible
from test_finetune import BASE, CONFIG, EXAMPLES, THREADS, adapter, cli

pytestmark = pytest.mark.models

# chosen: the answer; rejected: the kinds of answer the pair rule rejects (a loop, an echo, a lead-in, wrong)
REJECTED = ["happy happy happy happy", "Reverse the word.", "Sure! Here is", "23", "Paris", "Positive"]
DPO = CONFIG + "\n[finetune.dpo]\nbeta = 0.1\nlearning_rate = 3e-3\n"
STEPS = ["--max-steps", 3, "--seed", 7]


def write_run(run):
    run.mkdir()
    (run / "dataset.jsonl").write_text("".join(json.dumps({"instruction": i, "input": x, "output": o}) + "\n"
                                               for i, x, o in EXAMPLES))
    (run / "pairs.jsonl").write_text("".join(
        json.dumps({"id": k, "type": "A", "instruction": i, "input": x, "chosen": o, "rejected": r,
                    "chosen_model": "generator", "rejected_model": "m", "rejected_flaw": None, "scores": {}}) + "\n"
        for k, ((i, x, o), r) in enumerate(zip(EXAMPLES, REJECTED))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    write_run(d / "run")
    (d / "ft.toml").write_text(DPO)
    return d


def finetune(data, out, *extra, run=None, **kw):
    return cli("finetune", run or data / "run", "--base", BASE, "--out", out, "-c", data / "ft.toml", *extra, **kw)


@pytest.fixture(scope="module")
def dpo(data, hub):
    out = data / "dpo"
    r = finetune(data, out, "--method", "dpo", *STEPS, env=hub.env({}), offline=False)
    assert r.returncode == 0, r.stderr[-3000:]
    (data / "dpo.stderr").write_text(r.stderr)
    return out


@pytest.fixture(scope="module")
def sft(data):
    out = data / "sft"
    r = finetune(data, out, "--max-steps", 2, "--seed", 7)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sft_dpo(data, sft):
    out = data / "sft_dpo"
    r = finetune(data, out, "--method", "dpo", "--sft", sft, *STEPS)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_dpo_logs_loss_and_writes_adapter_merged_card_manifest(dpo, hub):
    assert user_visible((dpo.parent / "dpo.stderr").read_text()) == []  # progress bar only
    assert hub.requests == []
    log = read_jsonl(dpo / "train_log.jsonl")
    assert [x["step"] for x in log] == [1, 2, 3]
    assert abs(log[0]["loss"] - 0.693147) < 1e-4  # log 2: the policy starts as the reference
    assert all(k in log[-1] for k in ("reward_chosen", "reward_rejected", "reward_margins", "reward_accuracies"))
    m = json.loads((dpo / "manifest.json").read_text())
    assert m["objective"] == "dpo" and m["sft"] is None and m["pairs"] == 6 and m["steps"] == 3 and m["seed"] == 7
    assert m["finished"] and m["beta"] == 0.1 and m["learning_rate"] == 3e-3 and "trl" in m["versions"]
    assert m["decontamination"]["against"][0] == "user-oriented" and m["decontamination"]["dropped"] == 0
    assert len(m["pairs_sha256"]) == 64
    assert (dpo / "merged" / "config.json").is_file() and not (dpo / "trainer").exists()
    card = (dpo / "card.toml").read_text()
    assert 'name = "dpo"' in card and 'path = "merged"' in card and 'prompt_format = "chat"' in card
    r = finetune(dpo.parent, dpo, "--method", "dpo", *STEPS)  # finished: nothing to do
    assert r.returncode == 0 and "already finished" in r.stdout


def test_dpo_on_top_of_sft_and_evaluate_models_loads_them(data, dpo, sft, sft_dpo, tmp_path):
    m = json.loads((sft_dpo / "manifest.json").read_text())
    assert m["sft"]["dir"] == str(sft.resolve()) and len(m["sft"]["adapter_sha256"]) == 64
    assert "SFT + DPO" in (sft_dpo / "card.toml").read_text()
    a, b = adapter(dpo), adapter(sft_dpo)
    assert a.keys() == b.keys() and any((a[k] != b[k]).any() for k in a)  # another start, another adapter
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"instruction": i, "input": x, "output": o}) + "\n"
                             for i, x, o in [("Give a synonym of the word.", "big", "large"),
                                             ("Reverse the word.", "live", "evil")]))
    out = tmp_path / "ev"
    r = cli("evaluate", "--models", BASE, dpo / "card.toml", sft_dpo / "card.toml", "--tasks", tasks, "--out", out,
            "-c", data / "ft.toml")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["smollm2-135m-hf", "dpo", "sft_dpo"]


def test_sigkill_mid_training_resumes_to_the_same_adapter(data, sft, sft_dpo):
    out = data / "killed"
    p = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "finetune", str(data / "run"), "--base", str(BASE),
                          "--out", str(out), "-c", str(data / "ft.toml"), "--method", "dpo", "--sft", str(sft),
                          *map(str, STEPS)],
                         env={**os.environ, **THREADS, "HF_HUB_OFFLINE": "1"}, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    log = out / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 1 and \
                list((out / "trainer").glob("checkpoint-*/trainer_state.json")):
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -9  # the kill landed mid-training, not after the run ended
    assert not (out / "card.toml").exists()
    r = finetune(data, out, "--method", "dpo", "--sft", sft, *STEPS)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = adapter(out), adapter(sft_dpo)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit
    assert (out / "train_log.jsonl").read_text() == (sft_dpo / "train_log.jsonl").read_text()


def test_bad_input_is_one_line_and_exit_2(data, dpo, sft, tmp_path):
    nopairs = tmp_path / "nopairs"
    nopairs.mkdir()
    shutil.copy(data / "run" / "dataset.jsonl", nopairs)
    one_line_error(finetune(data, tmp_path / "o1", "--method", "dpo", run=nopairs), 2, "no pairs.jsonl")
    (nopairs / "pairs.jsonl").write_text("")
    one_line_error(finetune(data, tmp_path / "o2", "--method", "dpo", run=nopairs), 2, "no preference pairs")
    one_line_error(finetune(data, tmp_path / "o3", "--method", "ppo"), 2, "unknown --method 'ppo'")
    one_line_error(finetune(data, tmp_path / "o4", "--sft", sft), 2, "--sft goes with --method dpo")
    one_line_error(finetune(data, tmp_path / "o5", "--method", "dpo", "--sft", tmp_path), 2,
                   "not a finetune output folder")
    one_line_error(finetune(data, tmp_path / "o6", "--method", "dpo", "--sft", dpo), 2, "a dpo fine-tune")
    other = tmp_path / "other"
    write_run(other)
    one_line_error(finetune(data, tmp_path / "o7", "--method", "dpo", "--sft", sft, run=other), 2, "another run")
    one_line_error(finetune(data, tmp_path / "o8", "--method", "dpo", "--max-steps", 0), 2, "--max-steps")
