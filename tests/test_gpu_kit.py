"""scripts/gpu_kit.sh (docs/gpu-check.md): the kit's trimming and manifest on local fakes (no network), the refusal
without a GPU, and `check --cpu` on a kit made here without downloading (the checks that run on a CPU)."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

from conftest import ROOT, one_line_error

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_kit_prepare as prep  # noqa: E402  (stdlib only at import)

KIT_SH = ROOT / "scripts" / "gpu_kit.sh"


def make_tar(path, files: dict):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_trim_sdist_keeps_what_a_cuda_build_needs(tmp_path):
    keep = ["pyproject.toml", "README.md", "PKG-INFO", "CMakeLists.txt", "llama_cpp/__init__.py",
            "vendor/llama.cpp/CMakeLists.txt", "vendor/llama.cpp/src/llama.cpp", "vendor/llama.cpp/common/common.cpp",
            "vendor/llama.cpp/vendor/nlohmann/json.hpp", "vendor/llama.cpp/ggml/src/ggml-cuda/ggml-cuda.cu",
            "vendor/llama.cpp/ggml/src/ggml-cpu/ggml-cpu.c", "vendor/llama.cpp/ggml/src/ggml-blas/ggml-blas.cpp",
            "vendor/llama.cpp/modelsX/not-a-trimmed-prefix.txt"]
    drop = [".git/HEAD", "docs/index.md", "tests/test_llama.py", "examples/x.py",
            "vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf", "vendor/llama.cpp/docs/build.md",
            "vendor/llama.cpp/tools/mtmd/mtmd.cpp", "vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp",
            "vendor/llama.cpp/ggml/src/ggml-metal/ggml-metal.m", "vendor/llama.cpp/gguf-py/gguf/gguf.py",
            "vendor/llama.cpp/convert_hf_to_gguf.py", "llama_cpp/__pycache__/x.cpython-311.pyc"]
    src = make_tar(tmp_path / "llama_cpp_python-9.9.9.tar.gz",
                   {f"llama_cpp_python-9.9.9/{n}": n.encode() * 10 for n in keep + drop})
    (tmp_path / "out").mkdir()
    info = prep.trim_sdist(src, tmp_path / "out")
    with tarfile.open(tmp_path / "out" / src.name) as tar:
        names = sorted(m.name.split("/", 1)[1] for m in tar if m.isfile())
        assert tar.extractfile("llama_cpp_python-9.9.9/llama_cpp/__init__.py").read() == b"llama_cpp/__init__.py" * 10
    assert names == sorted(keep)
    assert info["kept_files"] == len(keep) and info["removed_bytes"] == sum(len(n) * 10 for n in drop)
    assert ".git" in info["removed"] and "vendor/llama.cpp/models" in info["removed"]
    assert info["original_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_trim_bnb_keeps_the_cpu_and_the_chosen_cuda_libraries(tmp_path):
    whl = tmp_path / "bitsandbytes-1.0-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda118.so", "libbitsandbytes_cuda128.so",
            "libbitsandbytes_cuda130.so", "libbitsandbytes_rocm64.so", "libbitsandbytes_xpu2025.so"]
    files = {"bitsandbytes/__init__.py": b"x = 1\n", **{f"bitsandbytes/{n}": n.encode() for n in libs}}
    record = "".join(f"{n},sha256=abc,{len(d)}\n" for n, d in files.items()) + "bitsandbytes-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("bitsandbytes-1.0.dist-info/RECORD", record)
    info = prep.trim_bnb(whl, ["128", "130"])
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        rec = z.read("bitsandbytes-1.0.dist-info/RECORD").decode()
    assert {f"bitsandbytes/{n}" for n in ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda128.so",
                                          "libbitsandbytes_cuda130.so", "__init__.py")} <= names
    assert info["dropped"] == ["libbitsandbytes_cuda118.so", "libbitsandbytes_rocm64.so", "libbitsandbytes_xpu2025.so"]
    assert not any(d in n for d in info["dropped"] for n in names) and not any(d in rec for d in info["dropped"])
    assert "libbitsandbytes_cuda128.so" in rec and "RECORD,," in rec


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "a.whl").write_bytes(b"a" * 1000)
    (tmp_path / "b.tar.gz").write_bytes(b"b" * 24)
    m = prep.write_manifest(tmp_path, {"python": "3.11"}, 60)
    assert json.loads((tmp_path / "manifest.json").read_text()) == m
    assert m["files"] == [{"path": "b.tar.gz", "bytes": 24, "sha256": hashlib.sha256(b"b" * 24).hexdigest()},
                          {"path": "wheels/a.whl", "bytes": 1000, "sha256": hashlib.sha256(b"a" * 1000).hexdigest()}]
    assert m["total_bytes"] == 1024 and m["limit_mib"] == 60 and m["python"] == "3.11"


def test_the_lock_pins_every_wheel_of_the_kit():
    lock = prep.locked_versions()
    assert all(n in lock for n in prep.LOCKED_WHEELS + [prep.LLAMA_PKG])
    assert all(len(h) == 64 for _, hashes in lock.values() for h in hashes)
    assert all("==" in s for s in prep.EXTRA_WHEELS)


def run_kit(*args, path_dir=None, env=None, timeout=60):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, **(env or {})}
    if path_dir:
        full["PATH"] = f"{path_dir}:{full['PATH']}"
    return subprocess.run(["bash", str(KIT_SH), *map(str, args)], capture_output=True, text=True, env=full,
                          timeout=timeout)


def test_check_without_a_gpu_is_one_line_exit_2(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (bin_ / "nvidia-smi").chmod(0o755)
    one_line_error(run_kit("check", tmp_path, path_dir=bin_), 2, "no NVIDIA GPU", "--cpu")
    one_line_error(run_kit("check", tmp_path, "--cpu", path_dir=bin_), 2, "not a kit")
    assert run_kit("frobnicate", tmp_path).returncode == 2


@pytest.fixture(scope="module")
def local_kit(tmp_path_factory):
    """A kit made here without the network: no sdist, no wheels (check --cpu uses the installed packages)."""
    kit = tmp_path_factory.mktemp("gpukit") / "kit"
    r = run_kit("prepare", kit, "--no-download", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return kit


@pytest.mark.models
def test_check_cpu_passes_and_skips_the_gpu_only_checks(local_kit, tmp_path):
    manifest = json.loads((local_kit / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} >= {"project.tar.gz", "gpu_kit.sh", "tokenizer/tokenizer.gguf",
                                                      "tokenizer/hf/tokenizer.json"}
    out = tmp_path / "result.json"
    r = run_kit("check", local_kit, "--cpu", "--out", out, env={"ENSEMBLE_INSTRUCT_THREADS": "1",
                                                                "GPU_KIT_WORK": tmp_path / "work"}, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(out.read_text())
    checks = {c["name"]: c for c in res["checks"]}
    assert list(checks) == ["build", "plan_vram", "partial_offload", "decode_speed", "rerun_identical", "bnb_nf4",
                            "qlora"]
    assert checks["partial_offload"] == {"name": "partial_offload", "ok": None, "skipped": "no GPU", "s": 0.0}
    assert all(c["ok"] for n, c in checks.items() if n != "partial_offload") and res["ok"]
    assert res["device"]["gpu"] is None and res["device"]["mode"] == "cpu"
    assert all(abs(row["error"]) <= 0.15 for row in checks["plan_vram"]["rows"])
    assert checks["qlora"]["method"] == "lora" and checks["qlora"]["loss_last"] < checks["qlora"]["loss_first"]
    assert checks["rerun_identical"]["differ"] == [] and checks["bnb_nf4"]["alone_equals_batched"]
    assert "all checks passed" in r.stdout and "skip  partial_offload: no GPU" in r.stdout
