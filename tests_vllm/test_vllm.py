"""Against a real vLLM server (`make test-vllm` starts it with scripts/vllm.sh and stops it after).
Not part of `make test`: these need the separate vLLM venv and several minutes. A server that is
not there is a failure."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "vllm-ci.toml"
URL = "http://127.0.0.1:" + os.environ.get("VLLM_PORT", "8765")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def server_is_up():
    try:
        r = httpx.get(URL + "/v1/models", timeout=5)
    except httpx.HTTPError as e:
        pytest.fail(f"no vLLM server at {URL} ({type(e).__name__}): start it with scripts/vllm.sh start")
    assert r.status_code == 200 and r.json()["data"][0]["max_model_len"] == 2048


def generate(out, config=CONFIG):
    return [sys.executable, str(ROOT / "run.py"), "generate", "-c", str(config), "--out", str(out)]


def files(run):
    return {f.name: f.read_bytes() for f in sorted(Path(run).glob("*.jsonl"))}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "ref"
    r = subprocess.run(generate(out), capture_output=True, text=True, env=ENV, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_run_records_finish_reasons_and_length_share(ref):
    m = json.loads((ref / "manifest.json").read_text())
    for key in ("instructions_A", "instances_A", "outputs_smollm2-135m-vllm-chat_A"):
        t = m["timings"][key]
        assert t["model"].startswith("smollm2-135m-vllm") and sum(t["finish"].values()) > 0
        assert set(t["finish"]) <= {"stop", "eos", "length", "prompt_too_long"} and 0 <= t["length_share"] <= 1
    recs = [json.loads(l) for l in (ref / "outputs_smollm2-135m-vllm-chat_A.jsonl").read_text().splitlines()]
    assert recs and all(r["finish"] in ("stop", "eos", "length") for r in recs)


def test_rerun_is_byte_identical(ref, tmp_path):
    r = subprocess.run(generate(tmp_path / "again"), capture_output=True, text=True, env=ENV, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert files(tmp_path / "again") == files(ref)


@pytest.mark.parametrize("target,lines", [("instances_A.jsonl", 1), ("outputs_smollm2-135m-vllm-chat_A.jsonl", 1)])
def test_sigkill_mid_stage_then_resume(ref, tmp_path, target, lines):
    run = tmp_path / "run"
    p = subprocess.Popen(generate(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 900
    while time.time() < deadline and p.poll() is None:
        f = run / target
        if f.exists() and f.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)  # does nothing if the run already exited: then wait() is 0, not -9
    assert p.wait() == -signal.SIGKILL, "the run ended before the kill"
    assert (run / target).exists() and not (run / "dataset.jsonl").exists()  # killed mid-run
    r = subprocess.run(generate(run), capture_output=True, text=True, env=ENV, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert files(run) == files(ref)


def test_card_context_above_max_model_len_is_refused(tmp_path):
    card = (ROOT / "quantized" / "smollm2-135m-vllm.toml").read_text().replace("context = 2048", "context = 4096")
    (tmp_path / "card.toml").write_text(card)
    cfg = CONFIG.read_text().replace('"quantized/smollm2-135m-vllm.toml"', f'"{tmp_path / "card.toml"}"')
    (tmp_path / "c.toml").write_text(cfg)
    r = subprocess.run(generate(tmp_path / "run", tmp_path / "c.toml"), capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "max_model_len 2048" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_window_keeps_request_order_and_equals_one_by_one():
    from ensemble_instruct.backends import Decoding, load_backend
    from ensemble_instruct.config import load_card

    card, path = load_card(ROOT / "quantized" / "smollm2-135m-vllm.toml")
    b = load_backend(card, path)
    prompts = [f"List {n} animals that live in the sea:\n" for n in range(2, 12)]
    p = Decoding(max_tokens=24, temperature=0.7, top_k=50, top_p=1.0)
    window = list(b.stream(prompts, p, list(range(10))))
    one = [b.generate([q], p, [s])[0] for s, q in enumerate(prompts)]
    b.close()
    assert [c.text for c in window] == [c.text for c in one]
