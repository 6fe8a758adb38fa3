"""The offline GPU check (issue 33), run by `scripts/gpu_kit.sh check KIT [--out FILE] [--cpu] [--build]`.

gpu_kit.sh has made a virtual environment over the machine's own Python (torch, transformers, peft, accelerate),
installed the kit's wheels into it and unpacked the project; this script runs in that environment:

  1. build            llama-cpp-python from the kit's trimmed sdist, with CUDA for the GPU found (one architecture,
                      ninja, all cores): time, version, architecture. --cpu: the installed package (--build: a
                      CPU build from the kit, which proves the trimmed sdist still builds).
  2. plan_vram        `run.py models check` of a small random-weight model at parallel 1 and 16: the plan's GPU
                      figure vs the VRAM peak NVML measures (target within 15%). --cpu: the plan's host figure vs
                      the peak RSS.
  3. partial_offload  the same with half of the layers on the GPU: GPU figure vs VRAM peak, host figure vs RSS.
  4. decode_speed     tokens/s at parallel 1 / 4 / 16, all layers on the GPU vs the same model on the CPU.
  5. rerun_identical  a short `run.py generate` with gpu_layers = "auto" twice: every stage file byte-identical.
  6. bnb_nf4          transformers + bitsandbytes nf4: load, generate, a sampled request alone vs in a batch.
  7. qlora            a few `run.py finetune` steps (QLoRA on a GPU), the loss goes down, the tuned card
                      answers in `run.py evaluate --models`.

The model: the SmolLM2-135M architecture (LlamaForCausalLM, its tokenizer from the kit) with fewer layers and
random weights, written as a transformers folder and as an F16 GGUF (with the `gguf` package). Everything runs
through the project's CLI in child processes, with configs and cards this script writes into WORK.
FILE gets {"device": {...}, "checks": [{"name", "ok", ...figures}], "total_s"}; ok is null for a check that
needs a GPU when there is none ("skipped": "no GPU"). Exit 0 when every check that ran passed, else 1.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

TARGET = 0.15  # plan vs measured peak: within 15%
CONTEXT = 4096  # per sequence, in the memory and speed checks
SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
             max_position_embeddings=8192, tie_word_embeddings=True)  # SmolLM2-135M, 6 of its 30 layers
GIB = 2**30


# ---------------------------------------------------------------------------------------------------------------
# The model: a random SmolLM2 as a transformers folder and as GGUF


def copy_gguf_fields(reader, writer, prefixes=("tokenizer.",)) -> int:
    """Copy the key-value fields whose names start with one of prefixes from a GGUFReader to a GGUFWriter."""
    import gguf

    n = 0
    for name, f in reader.fields.items():
        if not name.startswith(prefixes):
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, f.contents(), vtype, sub_type=gguf.GGUFValueType(f.types[-1]))
        else:
            writer.add_key_value(name, f.contents(), vtype)
        n += 1
    return n


def make_models(kit: Path, models: Path) -> dict:
    """models/tiny-hf (transformers, float32) and models/tiny.gguf (F16), the same random weights (seed 0)."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(kit / "tokenizer" / "hf")
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(models / "tiny-hf")
    tok.save_pretrained(models / "tiny-hf")

    w = gguf.GGUFWriter(str(models / "tiny.gguf"), "llama")
    w.add_name("gpu-check-tiny-smollm2")
    w.add_context_length(SHAPE["max_position_embeddings"])
    w.add_embedding_length(SHAPE["hidden_size"])
    w.add_block_count(SHAPE["num_hidden_layers"])
    w.add_feed_forward_length(SHAPE["intermediate_size"])
    w.add_head_count(SHAPE["num_attention_heads"])
    w.add_head_count_kv(SHAPE["num_key_value_heads"])
    w.add_rope_dimension_count(SHAPE["head_dim"])
    w.add_rope_freq_base(SHAPE["rope_theta"])
    w.add_layer_norm_rms_eps(SHAPE["rms_norm_eps"])
    w.add_vocab_size(len(tok))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    copy_gguf_fields(gguf.GGUFReader(str(kit / "tokenizer" / "tokenizer.gguf")), w)

    def permute(t, heads):  # transformers' rotary layout -> llama.cpp's (as convert_hf_to_gguf.py does)
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    f16 = lambda a: a.astype(np.float16)  # noqa: E731
    w.add_tensor("token_embd.weight", f16(sd["model.embed_tokens.weight"]))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    h, kv = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, key in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            w.add_tensor(f"blk.{i}.{name}.weight", sd[p + key + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", f16(permute(sd[p + "self_attn.q_proj.weight"], h)))
        w.add_tensor(f"blk.{i}.attn_k.weight", f16(permute(sd[p + "self_attn.k_proj.weight"], kv)))
        for name, key in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                          ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            w.add_tensor(f"blk.{i}.{name}.weight", f16(sd[p + key + ".weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    params = sum(p.numel() for p in model.parameters())  # the tied output layer once
    return {"params": params, "layers": SHAPE["num_hidden_layers"], "vocab": len(tok),
            "gguf_mb": round((models / "tiny.gguf").stat().st_size / 2**20, 1), "make_s": round(time.perf_counter() - t0, 1)}


def write_cards(work: Path) -> Path:
    """Model cards in WORK/cards: the GGUF at a given gpu_layers (written on demand by gguf_card), and the
    transformers folder in float32 (the finetune base) and in nf4."""
    cards = work / "cards"
    cards.mkdir(exist_ok=True)
    for name, quant, dtype in (("tiny-hf", "none", "float32"), ("tiny-hf-nf4", "nf4", "auto")):
        (cards / f"{name}.toml").write_text(
            f'name = "{name}"\nbackend = "transformers"\nquantization = "{quant}"\ndtype = "{dtype}"\n'
            f'context = 2048\nprompt_format = "plain"\nbatch_size = 4\nlicense = "Apache-2.0"\n'
            f'[source]\npath = "../models/tiny-hf"\n')
    return cards


def gguf_card(work: Path, name: str, gpu_layers, parallel) -> Path:
    q = lambda v: f'"{v}"' if isinstance(v, str) else v  # noqa: E731
    path = work / "cards" / f"{name}.toml"
    path.write_text(f'name = "{name}"\nbackend = "llama_cpp"\nquantization = "F16"\ncontext = {CONTEXT}\n'
                    f'prompt_format = "plain"\ngpu_layers = {q(gpu_layers)}\nparallel = {q(parallel)}\n'
                    f'threads = 0\nlicense = "Apache-2.0"\n[source]\npath = "../models/tiny.gguf"\n')
    return path


# ---------------------------------------------------------------------------------------------------------------
# Running the CLI and measuring it


class Ctx:
    def __init__(self, kit: Path, work: Path, project: Path, gpu: bool, build: bool):
        self.kit, self.work, self.project, self.gpu, self.build = kit, work, project, gpu, build
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def cli(self, *args, timeout=600, vram=False) -> dict:
        """`python run.py ARGS` in a child process: {"rc", "out", "err", "s", "rss_mb" (its peak, from wait4),
        "vram_gb" (with vram=True: the GPU's used memory at its peak minus before it started)}."""
        return self.run([sys.executable, str(self.project / "run.py"), *map(str, args)], timeout, vram)

    def run(self, argv, timeout=600, vram=False) -> dict:
        meter = VramMeter() if vram and self.gpu else None
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env, cwd=self.work,
                             text=True)
        texts = {}
        readers = [threading.Thread(target=lambda k, f: texts.__setitem__(k, f.read()), args=(k, f))
                   for k, f in (("out", p.stdout), ("err", p.stderr))]
        for t in readers:
            t.start()
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        _, status, usage = os.wait4(p.pid, 0)  # reaped here, so its peak RSS comes with it
        timer.cancel()
        for t in readers:
            t.join()
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        out, err = texts["out"], texts["err"]
        r = {"rc": rc, "out": out, "err": err, "s": round(time.perf_counter() - t0, 2)}
        r["rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # KiB on Linux
        if meter:
            r["vram_gb"] = meter.stop()
        return r

    def models_check(self, card: Path, parallel: int) -> dict:
        r = self.cli("models", "check", card, "--parallel", parallel, "--context", CONTEXT, "--json", vram=True)
        if r["rc"] != 0:
            raise CheckFailed(f"models check {card.stem} --parallel {parallel}: exit {r['rc']}: {tail(r['err'])}")
        out = json.loads(r["out"].strip().splitlines()[-1])
        out.update(vram_gb=r.get("vram_gb"), wall_s=r["s"])
        return out


class VramMeter:
    """The GPU's used memory, polled every 10 ms in a thread from now until stop(): peak minus the first reading,
    GiB. NVML through pynvml (nvidia-ml-py, in the kit), else nvidia-smi (slower, coarser)."""

    def __init__(self):
        self.peak = self.base = None
        self.done = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.read = lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used
        except Exception:
            self.read = lambda: int(subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                                                    "nounits", "-i", "0"], capture_output=True, text=True)
                                    .stdout.split()[0]) * 2**20
        self.base = self.peak = self.read()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.read())

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return round((self.peak - self.base) / GIB, 3)


class CheckFailed(Exception):
    pass


def tail(text: str, n: int = 400) -> str:
    lines = [x for x in (text or "").strip().splitlines() if x.strip()]
    return " | ".join(lines[-3:])[-n:]


def err_ratio(planned, measured):
    return round(planned / measured - 1, 3) if planned and measured else None


# ---------------------------------------------------------------------------------------------------------------
# The checks, in order. Each returns its figures and whether it passed; CheckFailed is a failure with a reason.


def check_build(c: Ctx) -> dict:
    if c.gpu or c.build:
        sdist = next(c.kit.glob("llama_cpp_python-*.tar.gz"), None)
        if sdist is None:
            raise CheckFailed(f"{c.kit}: no llama_cpp_python sdist (a kit made with --no-download)")
        env = {"CMAKE_GENERATOR": "Ninja", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count())}
        nvcc = None
        if c.gpu:
            cap = nvidia_smi("compute_cap").replace(".", "")  # 8.9 -> 89: this GPU's architecture only
            cmake = f"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES={cap} -DLLAVA_BUILD=OFF"
            nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).exists()), None)
            if nvcc is None:
                raise CheckFailed("no nvcc on PATH or in /usr/local/cuda/bin: the CUDA toolkit is needed to build")
            env["CUDACXX"] = nvcc
            nvcc = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        else:
            cap, cmake = None, "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
        env["CMAKE_ARGS"] = cmake
        t0 = time.perf_counter()
        log = c.work / "build.log"
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
                                 str(c.kit / "wheels"), "--no-deps", "--no-cache-dir", "--force-reinstall", "-v",
                                 str(sdist)], stdout=f, stderr=subprocess.STDOUT, env={**c.env, **env}).returncode
        build_s = round(time.perf_counter() - t0, 1)
        if rc != 0:
            raise CheckFailed(f"pip install {sdist.name} exit {rc}: see {log}: {tail(log.read_text())}")
        figures = {"built": True, "build_s": build_s, "cmake_args": cmake, "cuda_arch": cap, "nvcc": nvcc,
                   "jobs": os.cpu_count()}
    else:
        figures = {"built": False, "note": "--cpu: the installed llama-cpp-python (--build builds the kit's sdist)"}
    r = c.run([sys.executable, "-c", "import json, llama_cpp as L; print(json.dumps({'version': L.__version__, "
               "'gpu_offload': bool(L.llama_supports_gpu_offload()), 'file': L.__file__}))"])
    if r["rc"] != 0:
        raise CheckFailed(f"import llama_cpp: {tail(r['err'])}")
    info = json.loads(r["out"].strip().splitlines()[-1])
    ok = info["gpu_offload"] if c.gpu else True
    return {"ok": ok, **figures, **info}


def check_plan_vram(c: Ctx) -> dict:
    """The plan's figure for parallel x CONTEXT cells vs the measured peak, all layers on the GPU (--cpu: none)."""
    layers = -1 if c.gpu else 0
    rows = []
    for par in (1, 16):
        m = c.models_check(gguf_card(c.work, f"tiny-p{par}", layers, par), par)
        if c.gpu:
            planned, peak = m["planned_gpu_gb"], m["vram_gb"]
        else:
            planned, peak = m["planned_gb"], m["peak_rss_mb"] / 1024
        rows.append({"parallel": par, "context": CONTEXT, "planned_gb": planned, "measured_gb": round(peak, 3),
                     "error": err_ratio(planned, peak), "tok_s": m["tok_s"]})
        if c.gpu:  # the host side of the same plan, for the record
            rows[-1].update(planned_host_gb=m["planned_gb"], rss_gb=round(m["peak_rss_mb"] / 1024, 3))
    plan = c.cli("plan", "-c", write_run_config(c, "plan"), "--json")
    ok = all(r["error"] is not None and abs(r["error"]) <= TARGET for r in rows) and plan["rc"] == 0
    out = {"ok": ok, "measured": "NVML: GPU memory used" if c.gpu else "peak RSS", "target": TARGET, "rows": rows}
    if plan["rc"] == 0:
        out["plan_rows"] = [{k: r[k] for k in ("card", "stage", "gpu_layers", "parallel", "total_gb", "fits")}
                            for r in json.loads(plan["out"])["models"]]
    else:
        out["plan_error"] = tail(plan["err"])
    return out


def check_partial_offload(c: Ctx) -> dict:
    half = SHAPE["num_hidden_layers"] // 2
    m = c.models_check(gguf_card(c.work, "tiny-half", half, 4), 4)
    gpu_err = err_ratio(m["planned_gpu_gb"], m["vram_gb"])
    host_err = err_ratio(m["planned_gb"], m["peak_rss_mb"] / 1024)
    ok = gpu_err is not None and abs(gpu_err) <= TARGET and m["tokens"] > 0
    return {"ok": ok, "gpu_layers": half, "n_layers": SHAPE["num_hidden_layers"], "parallel": 4, "context": CONTEXT,
            "planned_gpu_gb": m["planned_gpu_gb"], "vram_gb": m["vram_gb"], "gpu_error": gpu_err,
            "planned_host_gb": m["planned_gb"], "rss_gb": round(m["peak_rss_mb"] / 1024, 3), "host_error": host_err,
            "tok_s": m["tok_s"]}


def check_decode_speed(c: Ctx) -> dict:
    """Tokens/s of `models check` (P prompts x 32 new tokens, P x CONTEXT cells reserved)."""
    rows = []
    for where, layers in (("gpu", -1), ("cpu", 0)) if c.gpu else (("cpu", 0),):
        for par in (1, 4, 16):
            m = c.models_check(gguf_card(c.work, f"tiny-{where}-p{par}", layers, par), par)
            rows.append({"device": where, "parallel": par, "tok_s": m["tok_s"], "tokens": m["tokens"]})
    speed = {(r["device"], r["parallel"]): r["tok_s"] for r in rows}
    ok = all(r["tokens"] > 0 for r in rows)
    out = {"ok": ok, "threads": os.environ.get("ENSEMBLE_INSTRUCT_THREADS") or "all cores", "rows": rows}
    if c.gpu:
        out["gpu_over_cpu"] = {p: round(speed["gpu", p] / speed["cpu", p], 2) for p in (1, 4, 16)}
        out["ok"] = ok and speed["gpu", 16] > speed["cpu", 16]
    return out


def write_run_config(c: Ctx, name: str) -> Path:
    """A short generation preset: the random GGUF with gpu_layers and parallel "auto" as generator and extras."""
    gen = gguf_card(c.work, f"{name}-gen", "auto", "auto")
    ex1, ex2 = gguf_card(c.work, f"{name}-x1", "auto", 4), gguf_card(c.work, f"{name}-x2", "auto", 1)
    path = c.work / f"{name}.toml"
    path.write_text(f'seed = 5\ngenerator = "{gen}"\nextra = ["{ex1}", "{ex2}"]\n\n'
                    '[instructions]\ntarget = { A = 3, B = 2 }\nmax_requests_factor = 2\nmax_tokens = 48\n\n'
                    '[instances]\nmax_tokens = 48\n\n[outputs]\nmax_tokens = 24\n')
    return path


def check_rerun_identical(c: Ctx) -> dict:
    cfg = write_run_config(c, "rerun")
    runs, times = [], []
    for i in (1, 2):
        out = c.work / f"rerun-{i}"
        shutil.rmtree(out, ignore_errors=True)  # a second `check` in the same WORK starts afresh
        r = c.cli("generate", "-c", cfg, "--out", out)
        if r["rc"] != 0:
            raise CheckFailed(f"generate #{i}: exit {r['rc']}: {tail(r['err'])}")
        runs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))})
        times.append(r["s"])
    manifest = json.loads((c.work / "rerun-1" / "manifest.json").read_text())
    same = runs[0] == runs[1]
    differ = sorted(k for k in set(runs[0]) | set(runs[1]) if runs[0].get(k) != runs[1].get(k))
    lines = sum(v.count(b"\n") for v in runs[0].values())
    auto = manifest.get("auto") or {}
    gen = auto.get("generator") or {}  # what the plan picked: planned for the GPU, with layers on it
    on_gpu = str(gen.get("budget", "")).startswith("GPU") and gen.get("gpu_layers") not in (0, None)
    return {"ok": same and lines > 0 and (on_gpu or not c.gpu), "files": len(runs[0]), "lines": lines,
            "differ": differ, "run_s": times,
            "auto": manifest.get("auto"), "completion_tokens": _manifest_tokens(manifest)}


def _manifest_tokens(manifest: dict) -> dict:
    """{stage: completion tokens} from the run's manifest (a figure only)."""
    t = manifest.get("timings") or {}
    return {k: v.get("completion_tokens") for k, v in t.items() if isinstance(v, dict)}


def check_bnb_nf4(c: Ctx) -> dict:
    r = c.run([sys.executable, __file__, "--child", "bnb", "--work", str(c.work), "--project", str(c.project)],
              timeout=300)
    if r["rc"] != 0:
        raise CheckFailed(f"exit {r['rc']}: {tail(r['err'])}")
    out = json.loads(r["out"].strip().splitlines()[-1])
    ok = out["alone_equals_batched"] and out["quantized_4bit"] and out["tokens"] > 0
    if c.gpu:
        ok = ok and out["device"].startswith("cuda")
    return {"ok": ok, **out}


def child_bnb(work: Path, project: Path) -> dict:
    """In a child process: load the nf4 card, generate greedily in a batch of 4, then one sampled request alone
    and the same request (same seed) in a batch of 4."""
    sys.path.insert(0, str(project))
    from ensemble_instruct.backends import Decoding, load_backend
    from ensemble_instruct.config import load_card

    card, path = load_card(str(work / "cards" / "tiny-hf-nf4.toml"))
    t0 = time.perf_counter()
    b = load_backend(card, path)
    load_s = time.perf_counter() - t0
    model = b.model
    quantized = any("4bit" in type(p).__name__ for p in model.parameters())
    prompts = ["Write a poem about the sea.", "List three colors.", "What is 2 + 2?", "Name a city in France."]
    t0 = time.perf_counter()
    greedy = b.generate(prompts, Decoding(max_tokens=16), [0, 1, 2, 3])
    gen_s = time.perf_counter() - t0
    sampled = Decoding(max_tokens=16, temperature=0.8, top_k=50, top_p=0.95)
    alone = b.generate(prompts[:1], sampled, [11])
    batched = b.generate(prompts, sampled, [11, 12, 13, 14])
    out = {"device": str(model.device), "quantized_4bit": quantized, "load_s": round(load_s, 2),
           "tokens": sum(x.completion_tokens for x in greedy), "greedy_s": round(gen_s, 2),
           "alone_equals_batched": alone[0].text == batched[0].text, "sampled_text": alone[0].text[:80]}
    import torch

    if torch.cuda.is_available():
        out["max_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    b.close()
    return out


FT_EXAMPLES = [("Give the opposite of the word.", "hot", "cold"), ("Give the opposite of the word.", "up", "down"),
               ("Add the two numbers.", "2 and 3", "5"), ("Add the two numbers.", "10 and 4", "14"),
               ("Say hello in French.", "", "Bonjour"), ("Name the color of the sky.", "", "Blue"),
               ("Spell the word backwards.", "stop", "pots"), ("Count the letters.", "tree", "4")]


def check_qlora(c: Ctx) -> dict:
    run = c.work / "ft-run"
    run.mkdir(exist_ok=True)
    (run / "dataset.jsonl").write_text("".join(json.dumps({"instruction": i, "input": x, "output": o}) + "\n"
                                               for i, x, o in FT_EXAMPLES))
    cfg = c.work / "ft.toml"  # one batch of all 8 examples: every step sees the same data, the loss must fall
    cards = [gguf_card(c.work, f"ft-{n}", 0, 1) for n in ("gen", "x1", "x2")]  # a valid config; not loaded
    cfg.write_text(f'generator = "{cards[0]}"\nextra = ["{cards[1]}", "{cards[2]}"]\n\n[outputs]\n'
                   'max_tokens = 12\n\n[finetune]\nrank = 8\nalpha = 16\ndropout = 0.0\nlearning_rate = 1e-2\n'
                   'batch_size = 8\ngrad_accum = 1\nmax_length = 64\nwarmup_ratio = 0.0\nsave_every = 100\n')
    out = c.work / "ft-out"
    for d in (out, c.work / "ft-eval"):  # a finished finetune or evaluation would only be read back
        shutil.rmtree(d, ignore_errors=True)
    steps = 6
    r = c.cli("finetune", run, "--base", c.work / "cards" / "tiny-hf.toml", "--out", out, "-c", cfg,
              "--max-steps", steps, "--seed", 1)
    if r["rc"] != 0:
        raise CheckFailed(f"finetune: exit {r['rc']}: {tail(r['err'])}")
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    manifest = json.loads((out / "manifest.json").read_text())
    tasks = c.work / "ft-tasks.jsonl"
    tasks.write_text("".join(json.dumps({"instruction": i, "input": x, "output": o}) + "\n" for i, x, o in
                             FT_EXAMPLES[:2]))
    ev = c.cli("evaluate", "--models", c.work / "cards" / "tiny-hf.toml", out / "card.toml", "--tasks", tasks,
               "--out", c.work / "ft-eval", "-c", cfg)
    answers = c.work / "ft-eval" / "answers_ft-out.jsonl"
    losses = [x["loss"] for x in log]
    method_ok = manifest.get("method") == ("qlora" if c.gpu else "lora")
    ok = (len(losses) == steps and losses[-1] < losses[0] and method_ok and ev["rc"] == 0 and answers.is_file())
    res = {"ok": ok, "method": manifest.get("method"), "device": manifest.get("device"), "steps": len(losses),
           "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
           "finetune_s": r["s"], "train_s": manifest.get("train_s"), "evaluate_rc": ev["rc"], "evaluate_s": ev["s"],
           "tuned_answers": answers.is_file()}
    if ev["rc"] != 0:
        res["evaluate_error"] = tail(ev["err"])
    return res


CHECKS = [("build", check_build, False), ("plan_vram", check_plan_vram, False),
          ("partial_offload", check_partial_offload, True), ("decode_speed", check_decode_speed, False),
          ("rerun_identical", check_rerun_identical, False), ("bnb_nf4", check_bnb_nf4, False),
          ("qlora", check_qlora, False)]  # (name, function, needs a GPU)


# ---------------------------------------------------------------------------------------------------------------
# The device, the summary, main


def nvidia_smi(field: str) -> str:
    return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader", "-i", "0"],
                          capture_output=True, text=True, check=True).stdout.strip()


def device_info(gpu: bool) -> dict:
    import torch

    d = {"gpu": None, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
         "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node()}
    try:
        d["cpu"] = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib import metadata

    for pkg in ("transformers", "peft", "accelerate", "bitsandbytes", "numpy"):
        try:
            d[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            d[pkg] = None
    if gpu:
        d.update(gpu=nvidia_smi("name"), driver=nvidia_smi("driver_version"), compute_cap=nvidia_smi("compute_cap"),
                 vram_mib=nvidia_smi("memory.total"))
    return d


def summary_line(ch: dict) -> str:
    status = {True: "PASS", False: "FAIL", None: "skip"}[ch["ok"]]
    n = ch["name"]
    if ch["ok"] is None:
        return f"{status}  {n}: {ch['skipped']}"
    if "error" in ch and isinstance(ch["error"], str):
        return f"{status}  {n}: {ch['error']}"
    if n == "build":
        how = f"built in {ch['build_s']} s (arch {ch['cuda_arch']}, {ch['jobs']} jobs)" if ch["built"] else "installed"
        return f"{status}  {n}: llama-cpp-python {ch['version']} {how}, GPU offload {ch['gpu_offload']}"
    if n == "plan_vram":
        rows = ", ".join(f"parallel {r['parallel']}: planned {r['planned_gb']} GB vs {r['measured_gb']} GB "
                         f"({r['error']:+.1%})" if r["error"] is not None else f"parallel {r['parallel']}: no figure"
                         for r in ch["rows"])
        return f"{status}  {n} ({ch['measured']}): {rows}"
    if n == "partial_offload":
        return (f"{status}  {n}: {ch['gpu_layers']}/{ch['n_layers']} layers, GPU planned {ch['planned_gpu_gb']} vs "
                f"{ch['vram_gb']} GB ({ch['gpu_error']}), host {ch['planned_host_gb']} vs {ch['rss_gb']} GB")
    if n == "decode_speed":
        return f"{status}  {n}: " + ", ".join(f"{r['device']} p{r['parallel']} {r['tok_s']} tok/s" for r in ch["rows"])
    if n == "rerun_identical":
        return (f"{status}  {n}: {ch['files']} files, {ch['lines']} lines, "
                f"{sum(x or 0 for x in ch['completion_tokens'].values())} tokens generated, "
                f"{'identical' if not ch['differ'] else 'differ: ' + ', '.join(ch['differ'])}; runs {ch['run_s']} s")
    if n == "bnb_nf4":
        return (f"{status}  {n}: on {ch['device']}, 4-bit {ch['quantized_4bit']}, {ch['tokens']} tokens, sampled "
                f"alone == in a batch: {ch['alone_equals_batched']}")
    if n == "qlora":
        return (f"{status}  {n}: {ch['method']} on {ch['device']}, loss {ch['loss_first']} -> {ch['loss_last']} in "
                f"{ch['steps']} steps, evaluate --models exit {ch['evaluate_rc']}")
    return f"{status}  {n}"


def run_checks(c: Ctx, only: list | None = None) -> list:
    results = []
    for name, fn, needs_gpu in CHECKS:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        if needs_gpu and not c.gpu:
            ch = {"name": name, "ok": None, "skipped": "no GPU"}
        else:
            try:
                ch = {"name": name, **fn(c)}
            except CheckFailed as e:
                ch = {"name": name, "ok": False, "error": str(e)}
            except Exception as e:  # a bug or a broken package: the other checks still run
                ch = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
        ch["s"] = round(time.perf_counter() - t0, 1)
        results.append(ch)
        print(summary_line(ch) + f"  [{ch['s']} s]", flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kit", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--project", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cpu", action="store_true", help="no GPU: run what runs on the CPU")
    ap.add_argument("--build", action="store_true", help="--cpu: build llama-cpp-python from the kit anyway")
    ap.add_argument("--only", nargs="+", help="run these checks only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child == "bnb":
        print(json.dumps(child_bnb(a.work, a.project)))
        return 0
    t0 = time.perf_counter()
    c = Ctx(a.kit.resolve(), a.work.resolve(), a.project.resolve(), gpu=not a.cpu, build=a.build)
    (c.work / "models").mkdir(parents=True, exist_ok=True)
    device = {**device_info(c.gpu), "mode": "cpu" if a.cpu else "gpu"}
    print(f"device: {device['gpu'] or 'no GPU'}; {device['cpu']}, {device['cores']} cores; torch {device['torch']}",
          flush=True)
    model = make_models(c.kit, c.work / "models")
    write_cards(c.work)
    print(f"model: random SmolLM2 shape, {model['layers']} layers, {model['params'] / 1e6:.1f} M parameters, "
          f"GGUF {model['gguf_mb']} MB (made in {model['make_s']} s)", flush=True)
    checks = run_checks(c, a.only)
    report = {"device": device, "model": model, "checks": checks, "total_s": round(time.perf_counter() - t0, 1)}
    failed = [ch["name"] for ch in checks if ch["ok"] is False]
    report["ok"] = not failed
    out = a.out or c.work / "gpu-check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)} in {report['total_s']} s; "
          f"results: {out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
