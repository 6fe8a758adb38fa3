"""Aggregate generated tokens/s against a real vLLM server (`scripts/vllm.sh start`, SmolLM2-135M)
at 1, 8 and 32 requests in flight: our openai backend vs raw concurrent HTTP requests (httpx, a
thread pool) with the same bodies. Greedy, `ignore_eos`, 64 new tokens per request; each side
runs twice, alternating, and the best of each is kept.

    python bench/bench_vllm.py [--prompts 32] [--max-tokens 64] [--levels 1 8 32]
"""
import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from ensemble_instruct.backends import Decoding  # noqa: E402
from ensemble_instruct.backends.openai_server import OpenAIBackend  # noqa: E402
from ensemble_instruct.config import load_card  # noqa: E402
from ensemble_instruct.seeds import load_seeds  # noqa: E402

URL = "http://127.0.0.1:" + os.environ.get("VLLM_PORT", "8765")


def raw(prompts, max_tokens, level):
    body = lambda p: {"model": "smollm2-135m", "prompt": p, "max_tokens": max_tokens, "temperature": 0.0,  # noqa: E731
                      "top_p": 1.0, "seed": 0, "ignore_eos": True}
    with httpx.Client(base_url=URL, timeout=600) as client, ThreadPoolExecutor(level) as pool:
        t0 = time.perf_counter()
        outs = list(pool.map(lambda p: client.post("/v1/completions", json=body(p)).json(), prompts))
        dt = time.perf_counter() - t0
    return sum(o["usage"]["completion_tokens"] for o in outs), dt


def ours(prompts, max_tokens, level):
    card, path = load_card(ROOT / "quantized" / "smollm2-135m-vllm.toml")
    card = card.model_copy(update={"concurrency": level, "extra_body": {"ignore_eos": True}})
    b = OpenAIBackend(card, path)
    t0 = time.perf_counter()
    outs = b.generate(prompts, Decoding(max_tokens=max_tokens), [0] * len(prompts))
    dt = time.perf_counter() - t0
    b.close()
    return sum(o.completion_tokens for o in outs), dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()
    seeds = load_seeds(ROOT / "seeds" / "seed_tasks.jsonl")
    prompts = [f"{t.instruction}\n{t.input}".strip() + "\n" for t in seeds[:args.prompts]]
    print(f"vLLM at {URL}: {len(prompts)} prompts x {args.max_tokens} tokens, greedy, ignore_eos")
    print("in flight | raw httpx tok/s | ours tok/s | ratio")
    for level in args.levels:
        ps = prompts if level > 1 else prompts[:8]  # one at a time: 8 requests give the rate
        # alternate, twice each, and keep the best: the server shares two cores with the client
        runs_raw, runs_ours = [], []
        for _ in range(2):
            runs_raw.append(raw(ps, args.max_tokens, level))
            runs_ours.append(ours(ps, args.max_tokens, level))
        assert {t for t, _ in runs_raw} == {t for t, _ in runs_ours} == {len(ps) * args.max_tokens}
        r, o = max(t / d for t, d in runs_raw), max(t / d for t, d in runs_ours)
        print(f"{level:>9} | {r:15.1f} | {o:10.1f} | {o / r:.3f}")


if __name__ == "__main__":
    main()
