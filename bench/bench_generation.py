"""Generation overhead and peak memory.

1. The same prompts through our llama.cpp backend and through a bare
   `llama_cpp.Llama.create_completion` loop: same model file, parameters and seeds. Prints the
   generated tokens/s of each and the ratio (ours / bare).
2. Peak RSS of a whole `generate` run (configs/ci.toml, three models one after another) vs the
   largest single model loaded alone and generating, each in a fresh process.

    python bench/bench_generation.py [--prompts 8] [--max-tokens 128] [--skip-rss]
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ensemble_instruct import templates  # noqa: E402
from ensemble_instruct.backends import Decoding, load_backend  # noqa: E402
from ensemble_instruct.config import load_card  # noqa: E402
from ensemble_instruct.weights import resolve as resolve_weights  # noqa: E402
from ensemble_instruct.seeds import load_seeds, split_types  # noqa: E402


def prompts(n: int) -> list[str]:
    seeds = [t.instruction for t in split_types(load_seeds(ROOT / "seeds" / "seed_tasks.jsonl"))["A"]]
    tpl = templates.load("instructions_A.txt")
    return [templates.instruction_prompt(tpl, random.Random(i).sample(seeds, 20)) for i in range(n)]


def bare(path: Path, card, ps, params, seeds):
    import llama_cpp

    threads = card.threads or os.cpu_count()  # as our backend (Llama's default is half the cores)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=card.context, n_gpu_layers=card.gpu_layers,
                          n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    t0, tokens = time.perf_counter(), 0
    for p, s in zip(ps, seeds):
        llm.reset()
        out = llm.create_completion(p, max_tokens=params.max_tokens, temperature=params.temperature,
                                    top_k=params.top_k, top_p=params.top_p, min_p=0.0, typical_p=1.0,
                                    repeat_penalty=1.0, stop=list(params.stop), seed=s)
        tokens += out["usage"]["completion_tokens"]
    dt = time.perf_counter() - t0
    llm.close()
    return tokens, dt


def ours(card, card_path, ps, params, seeds):
    b = load_backend(card.model_copy(update={"parallel": 1}), card_path)  # a single stream, as the bare loop
    t0 = time.perf_counter()
    outs = b.generate(ps, params, seeds)
    dt = time.perf_counter() - t0
    b.close()
    return sum(o.completion_tokens for o in outs), dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    card, card_path = load_card("quantized/smollm2-135m.toml")
    ps = prompts(args.prompts)
    # no stop string: every request generates max_tokens, so the time is mostly generation
    params = Decoding(max_tokens=args.max_tokens, temperature=0.7, top_k=50, top_p=1.0)
    seeds = list(range(1, len(ps) + 1))
    # alternate, twice each, and keep the best: the two cores are shared with whatever else runs
    runs_bare, runs_ours = [], []
    for _ in range(2):
        runs_bare.append(bare(resolve_weights(card, card_path), card, ps, params, seeds))
        runs_ours.append(ours(card, card_path, ps, params, seeds))
    assert {t for t, _ in runs_bare} == {t for t, _ in runs_ours}, "different token counts: not the same work"
    tb = max(t / d for t, d in runs_bare)
    to = max(t / d for t, d in runs_ours)
    print(f"generation, {card.name}, {len(ps)} prompts x up to {args.max_tokens} tokens, {card.threads or os.cpu_count()} thread(s), "
          f"{runs_bare[0][0]} tokens each run")
    print(f"bare llama_cpp create_completion loop: {tb:.1f} tok/s")
    print(f"ensemble-instruct llama.cpp backend:  {to:.1f} tok/s")
    print(f"ratio (ours / bare): {to / tb:.3f}")
    if args.skip_rss:
        return
    # Each measurement in a fresh process that reports its own peak (ru_maxrss).
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import sys; sys.path.insert(0, %r)\n"
                "from ensemble_instruct.config import load_card\nfrom ensemble_instruct.backends import load_backend, Decoding\n"
                "c, p = load_card(%r); b = load_backend(c, p); b.generate(['Hello there'], Decoding(max_tokens=16), [0])\n")
        single = {}
        for name in ("smollm2-135m", "gemma3-270m", "smollm2-135m-hf-nf4"):
            single[name] = subprocess.run(
                [sys.executable, "-c", code % (str(ROOT), name) +
                 "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                capture_output=True, text=True, check=True).stdout.split()[-1]
        out = subprocess.run([sys.executable, "-c",
                              "import runpy, sys, resource; sys.argv = ['run.py', 'generate', '-c', %r, '--out', %r]\n"
                              "try:\n    runpy.run_path(%r, run_name='__main__')\nfinally:\n"
                              "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
                              % (str(ROOT / "configs" / "ci.toml"), tmp + "/run", str(ROOT / "run.py"))],
                             capture_output=True, text=True, check=True).stdout.split()[-1]
    largest = max(single, key=lambda k: int(single[k]))
    print("peak RSS, each model alone: " + ", ".join(f"{k} {int(v) / 1024:.0f} MB" for k, v in single.items()))
    print(f"peak RSS, whole generate run (configs/ci.toml, 3 models in turn): {int(out) / 1024:.0f} MB")
    print(f"ratio (run / largest single model, {largest}): {int(out) / int(single[largest]):.2f}")


if __name__ == "__main__":
    main()
