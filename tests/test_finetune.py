"""`run.py finetune` on the real SmolLM2-135M (transformers, fp32, CPU), a few optimizer steps:
the adapter changes the answers; the tuned card works in `evaluate --models` and as an extra model
of a run; a SIGKILL mid-training resumes to the same adapter as an uninterrupted run; bad input
is one line and exit 2."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import conftest
from conftest import ROOT, one_line_error, read_jsonl, user_visible

pytestmark = pytest.mark.models

BASE = ROOT / "quantized" / "smollm2-135m-hf.toml"
# one thread: the same adapter bytes in every run, and no thread thrashing on a busy CI machine
THREADS = {"ENSEMBLE_INSTRUCT_THREADS": "1", "OMP_NUM_THREADS": "1"}
EXAMPLES = [("Give a synonym of the word.", "happy", "joyful"), ("Reverse the word.", "stop", "pots"),
            ("Name three primary colors.", "", "Red, blue and yellow."), ("Add the two numbers.", "2 and 3", "5"),
            ("What is the capital of the country?", "Italy", "Rome"),
            ("Classify the sentiment of the review.", "The food was awful.", "Negative")]
# a high learning rate, so that two steps visibly move a 135M model; short sequences for speed
CONFIG = f"""seed = 0
generator = "{ROOT}/quantized/smollm2-135m.toml"
extra = ["{ROOT}/quantized/smollm2-135m-chat.toml", "TUNED"]

[instructions]
target = {{ A = 1, B = 1 }}
seeds_per_prompt = {{ A = 4, B = 4 }}
machine_per_prompt = {{ A = 1, B = 1 }}
max_tokens = 48

[instances]
max_tokens = 64

[outputs]
max_tokens = 16

[finetune]
rank = 4
alpha = 8
dropout = 0.1
learning_rate = 3e-3
batch_size = 2
grad_accum = 1
max_length = 96
warmup_ratio = 0.0
save_every = 1
"""


def cli(*args, env=None, **kw):
    return conftest.cli(*args, env={**THREADS, **(env or {})}, timeout=900, **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    run = d / "run"
    run.mkdir()
    (run / "dataset.jsonl").write_text("".join(json.dumps({"instruction": i, "input": x, "output": o}) + "\n"
                                               for i, x, o in EXAMPLES))
    (d / "ft.toml").write_text(CONFIG)
    return d


def finetune(data, out, *extra, **kw):
    return cli("finetune", data / "run", "--base", BASE, "--out", out, "-c", data / "ft.toml", *extra, **kw)


def adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def tuned(data, hub):
    out = data / "tuned"
    # with the hub reachable (a recorder on loopback): the run must look nothing up
    r = finetune(data, out, "--max-steps", 4, "--seed", 7, env=hub.env({}), offline=False)
    assert r.returncode == 0, r.stderr[-3000:]
    (data / "tuned.stderr").write_text(r.stderr)
    return out


def test_finetune_writes_adapter_merged_card_log_manifest(tuned, hub):
    # what the user sees is progress bars only: no library warning we could have prevented (bitsandbytes'
    # hub kernel, peft's FutureWarning), and no request to the hub (bitsandbytes fetches a kernel unless told not to)
    assert user_visible((tuned.parent / "tuned.stderr").read_text()) == []
    assert hub.requests == []
    log = read_jsonl(tuned / "train_log.jsonl")
    assert [x["step"] for x in log] == [1, 2, 3, 4] and all(x["loss"] > 0 for x in log)
    manifest = json.loads((tuned / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["steps"] == 4 and manifest["finished"] and manifest["method"] == "lora"
    assert manifest["decontamination"]["against"][0] == "user-oriented" and manifest["decontamination"]["dropped"] == 0
    assert len(manifest["dataset_sha256"]) == 64 and "file" in manifest["base_weights"]
    assert (tuned / "merged" / "config.json").is_file() and not (tuned / "checkpoint").exists()
    card = (tuned / "card.toml").read_text()
    assert 'name = "tuned"' in card and 'path = "merged"' in card and 'prompt_format = "chat"' in card


def test_tuned_card_answers_differently_in_evaluate_models(tuned, data, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"instruction": i, "input": x, "output": o}) + "\n"
                             for i, x, o in [("Give a synonym of the word.", "big", "large"),
                                             ("Reverse the word.", "live", "evil")]))
    out = tmp_path / "ev"
    r = cli("evaluate", "--models", BASE, tuned / "card.toml", "--tasks", tasks, "--out", out, "-c", data / "ft.toml")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["smollm2-135m-hf", "tuned"] and metrics["rules"] == {}
    base = [x["output"] for x in read_jsonl(out / "answers_smollm2-135m-hf.jsonl")]
    mine = [x["output"] for x in read_jsonl(out / "answers_tuned.jsonl")]
    assert base != mine  # the adapter changed the model


def test_tuned_card_as_an_extra_model_of_a_run(tuned, data, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text((data / "ft.toml").read_text().replace("TUNED", str(tuned / "card.toml")))
    r = cli("generate", "-c", config, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "tuned" in [e["model"] for e in manifest["events"] if e["event"] == "load"]
    assert list((tmp_path / "run").glob("outputs_tuned_*.jsonl"))


def test_sigkill_mid_training_resumes_to_the_same_adapter(data, tuned):
    out = data / "killed"
    p = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "finetune", str(data / "run"), "--base", str(BASE),
                          "--out", str(out), "-c", str(data / "ft.toml"), "--max-steps", "4", "--seed", "7"],
                         env={**os.environ, **THREADS, "HF_HUB_OFFLINE": "1"}, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    log = out / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2 and (out / "checkpoint").exists():
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -9  # the kill landed mid-training, not after the run ended
    assert not (out / "card.toml").exists()
    r = finetune(data, out, "--max-steps", 4, "--seed", 7)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = adapter(out), adapter(tuned)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit
    assert [x["step"] for x in read_jsonl(log)] == [1, 2, 3, 4]
    assert (out / "train_log.jsonl").read_text() == (tuned / "train_log.jsonl").read_text()


def test_bad_input_is_one_line_and_exit_2(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli("finetune", empty, "--base", BASE, "--out", tmp_path / "o1"), 2, "no dataset.jsonl")
    (empty / "dataset.jsonl").write_text("")
    one_line_error(cli("finetune", empty, "--base", BASE, "--out", tmp_path / "o2"), 2, "no examples")
    bert = tmp_path / "bert"  # an encoder: nothing to generate answers with
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "distilbert", "architectures": ["DistilBertModel"]}))
    (tmp_path / "bert.toml").write_text('name = "bert"\nbackend = "transformers"\n[source]\npath = "bert"\n')
    one_line_error(cli("finetune", data / "run", "--base", tmp_path / "bert.toml", "--out", tmp_path / "o3"), 2,
                   "not a causal or seq2seq language model")
    (tmp_path / "broken.toml").write_text('name = "x"\nbackend = "transformers"\nbatch_size = "many"\n')
    one_line_error(cli("finetune", data / "run", "--base", tmp_path / "broken.toml", "--out", tmp_path / "o4"), 2,
                   "broken.toml")
    one_line_error(cli("finetune", data / "run", "--base", BASE, "--out", tmp_path / "o5", "--max-steps", 0), 2,
                   "--max-steps")
