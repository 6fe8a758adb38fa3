"""Throughput of the openai backend against a local llama-cpp-python server (SmolLM2-135M) with
1, 2 and 4 requests in flight: the same 8 prompts, greedy, 64 new tokens each.

    python bench/bench_server.py [--prompts 8] [--max-tokens 64] [--threads 2]
"""
import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from ensemble_instruct.backends import Decoding  # noqa: E402
from ensemble_instruct.backends.openai_server import OpenAIBackend  # noqa: E402
from ensemble_instruct.config import load_card  # noqa: E402
from ensemble_instruct.weights import resolve as resolve_weights  # noqa: E402
from ensemble_instruct.seeds import load_seeds  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    local, local_path = load_card("quantized/smollm2-135m.toml")
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(resolve_weights(local, local_path)),
                               "--model_alias", "smollm2-135m", "--n_ctx", "8192", "--n_threads", str(args.threads),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        card, path = load_card("quantized/smollm2-135m-server.toml")
        prompts = [t.instruction + "\n" for t in load_seeds(ROOT / "seeds" / "seed_tasks.jsonl")[: args.prompts]]
        params = Decoding(max_tokens=args.max_tokens)
        print(f"openai backend -> llama-cpp-python server, SmolLM2-135M, {args.threads} server threads, "
              f"{len(prompts)} prompts x {args.max_tokens} tokens (greedy)")
        base = None
        for inflight in (1, 2, 4):
            c = card.model_copy(update={"base_url": f"http://127.0.0.1:{port}", "concurrency": inflight})
            b = OpenAIBackend(c, path)
            b.generate(prompts[:1], params, [0])  # warm-up
            t0 = time.perf_counter()
            out = b.generate(prompts, params, [0] * len(prompts))
            dt = time.perf_counter() - t0
            b.close()
            rate = sum(o.completion_tokens for o in out) / dt
            base = base or rate
            print(f"{inflight} in flight: {rate:.1f} tok/s, {len(prompts) / dt:.2f} requests/s "
                  f"({rate / base:.2f}x of 1 in flight)")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
