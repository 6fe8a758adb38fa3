"""The openai backend against a real OpenAI-compatible server: llama-cpp-python's, on 127.0.0.1."""
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cli, one_line_error, read_jsonl
from ensemble_instruct.backends import Decoding, load_backend
from ensemble_instruct.config import load_card
from ensemble_instruct.weights import resolve as resolve_weights
from ensemble_instruct.errors import UserError

pytestmark = pytest.mark.models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int):
        card, path = load_card("quantized/smollm2-135m.toml")
        self.model, self.port, self.proc = resolve_weights(card, path), port, None

    def start(self):
        import httpx  # the server extra: imported here so the module collects without it (-m "not models")

        self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(self.model),
                                      "--model_alias", "smollm2-135m", "--n_ctx", "8192", "--n_threads", "1",
                                      "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()


@pytest.fixture(scope="module")
def server():
    s = Server(free_port()).start()
    yield s
    s.kill()


def write_setup(tmp_path, port, model="smollm2-135m", retries=5, extra=""):
    card = (ROOT / "quantized" / "smollm2-135m-server.toml").read_text()
    card = card.replace("http://127.0.0.1:8123", f"http://127.0.0.1:{port}")
    card = card.replace('model = "smollm2-135m"', f'model = "{model}"').replace("retries = 5", f"retries = {retries}")
    (tmp_path / "server.toml").write_text(extra + card)  # top-level keys go before the tables
    cfg = (ROOT / "configs" / "ci-server.toml").read_text()
    cfg = cfg.replace('"quantized/smollm2-135m-server.toml"', f'"{tmp_path / "server.toml"}"')
    cfg = cfg.replace("target = { A = 3, B = 2 }", "target = { A = 6, B = 2 }")
    (tmp_path / "config.toml").write_text(cfg)
    return tmp_path / "config.toml"


def generate(config, out, **popen):
    return [sys.executable, str(ROOT / "run.py"), "generate", "-c", str(config), "--out", str(out)]


def test_greedy_stage_equals_in_process_llama_cpp_and_resume_after_server_death(server, tmp_path):
    cfg = write_setup(tmp_path, server.port, retries=2)
    ref = tmp_path / "ref"
    r = cli("generate", "-c", cfg, "--out", ref, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for typ in "AB":
        via_server = read_jsonl(ref / f"outputs_smollm2-135m-server_{typ}.jsonl")
        in_process = read_jsonl(ref / f"outputs_smollm2-135m_{typ}.jsonl")
        assert via_server and [x["output"] for x in via_server] == [x["output"] for x in in_process]
    manifest = (ref / "manifest.json").read_text()
    assert "smollm2-135m-server" in manifest

    # the server dies in the middle of the extra-outputs stage: a clear error, nothing lost
    run = tmp_path / "run"
    p = subprocess.Popen(generate(cfg, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = run / "outputs_smollm2-135m-server_A.jsonl"
    deadline = time.time() + 600
    while not (target.exists() and target.read_bytes().count(b"\n") >= 2) and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None  # the run still needs the server: it dies mid-stage, not after the run
    assert server.kill() == -signal.SIGKILL  # it was still serving when killed
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-2000:]
    # reported once, at once: a refused connection is not retried for minutes
    assert "stopped accepting connections" in err and "Traceback" not in err
    assert len([l for l in err.splitlines() if l.startswith("error:")]) == 1
    assert 2 <= target.read_bytes().count(b"\n") < 6
    # another run while it is down is refused before any stage starts
    r = cli("generate", "-c", cfg, "--out", run, timeout=300)
    assert r.returncode == 2 and "cannot reach the server" in r.stderr
    server.start()
    r = cli("generate", "-c", cfg, "--out", run, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in sorted(ref.glob("*.jsonl")):
        assert (run / f.name).read_bytes() == f.read_bytes(), f.name


def test_unreachable_server_and_unknown_model(server, tmp_path):
    cfg = write_setup(tmp_path, free_port())
    r = cli("generate", "-c", cfg, "--out", tmp_path / "run", timeout=300)
    one_line_error(r, 2, "cannot reach the server at http://127.0.0.1:")
    assert not (tmp_path / "run").exists()
    cfg = write_setup(tmp_path, server.port, model="gpt-9")
    r = cli("generate", "-c", cfg, "--out", tmp_path / "run", timeout=300)
    assert r.returncode == 2 and "does not serve model 'gpt-9' (it serves: smollm2-135m)" in r.stderr


def test_context_exceeded_concurrency_and_api_key(server, tmp_path, monkeypatch):
    write_setup(tmp_path, server.port, extra='api_key_env = "TEST_SERVER_KEY"\n')
    card, path = load_card(tmp_path / "server.toml")
    with pytest.raises(UserError, match="TEST_SERVER_KEY"):
        load_backend(card, path)
    monkeypatch.setenv("TEST_SERVER_KEY", "secret-123")
    b = load_backend(card, path)
    assert b.client.headers["Authorization"] == "Bearer secret-123"
    long = b.generate(["word " * 9000], Decoding(max_tokens=8), [0])[0]
    assert (long.text, long.finish) == ("", "prompt_too_long")
    prompts = ["Name a colour.\n", "Name a fruit.\n", "Name a city.\n", "Name an animal.\n", "Name a tool.\n"]
    many = b.generate(prompts, Decoding(max_tokens=12), [0] * 5)  # 2 in flight; order kept
    one_by_one = [b.generate([p], Decoding(max_tokens=12), [0])[0] for p in prompts]
    assert [c.text for c in many] == [c.text for c in one_by_one]
    assert b.count_tokens("hello world") == 2
    b.close()


def test_two_servers_one_dies_mid_stage(server, tmp_path):
    """base_urls: requests spread over two servers; when one dies its requests go to the other and
    the outputs are the same as the in-process model's (greedy)."""
    second = Server(free_port()).start()
    cfg = write_setup(tmp_path, server.port)
    card = tmp_path / "server.toml"
    card.write_text(card.read_text().replace(f'base_url = "http://127.0.0.1:{server.port}"',
                                             f'base_urls = ["http://127.0.0.1:{server.port}", '
                                             f'"http://127.0.0.1:{second.port}"]'))
    assert "base_urls" in card.read_text()
    run = tmp_path / "run"
    p = subprocess.Popen(generate(cfg, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = run / "outputs_smollm2-135m-server_A.jsonl"
    deadline = time.time() + 600
    while not (target.exists() and target.read_bytes().count(b"\n") >= 1) and time.time() < deadline:
        time.sleep(0.02)
    at_kill = target.read_bytes().count(b"\n")
    assert p.poll() is None  # the run still needs the servers: one dies mid-stage
    assert second.kill() == -signal.SIGKILL
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-2000:]
    assert 1 <= at_kill < len(read_jsonl(target))  # the stage was not done when the second server died
    for typ in "AB":
        via = read_jsonl(run / f"outputs_smollm2-135m-server_{typ}.jsonl")
        assert via and [x["output"] for x in via] == [x["output"] for x in read_jsonl(run / f"outputs_smollm2-135m_{typ}.jsonl")]


def test_forecast_through_a_server(server, tmp_path):
    """`forecast` times a server backend as it is: its stage is measured and scaled like any other."""
    cfg = write_setup(tmp_path, server.port)
    env = {"ENSEMBLE_INSTRUCT_FORECASTS": str(tmp_path / "cache")}
    r = cli("forecast", "-c", cfg, "--pilot", "2", "--json", env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    fc = json.loads(r.stdout)
    by_stage = {s["stage"]: s for s in fc["stages"]}
    assert fc["pilot_targets"] == {"A": 2, "B": 2} and fc["targets"] == {"A": 6, "B": 2}
    for typ in "AB":
        served = by_stage[f"outputs_smollm2-135m-server_{typ}"]
        assert served["model"] == "smollm2-135m-server" and served["seconds"]["mid"] > 0
    assert by_stage["instructions_A"]["requests"]["mid"] >= 6
