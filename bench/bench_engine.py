"""The llama.cpp engine on stage-shaped work, against its own decoding ceiling.

Ceiling: 16 short prompts x 128 tokens with the end-of-text token never sampled, so all 16 slots
stay live: the most the engine decodes per second for those weights, parallel 16.
Workloads (the real templates, stops and decoding parameters of the default preset; the seed
tasks' own instructions stand in for machine-made ones):
- instances: SmolLM2-135M, the fixed type-A prefix (templates/instances_A.txt), T=0.7, 512 tokens,
  stop |EoS| / a new block, loops cut short;
- outputs-gemma: Gemma-3-270M base, its `Answer:` template, greedy, stop at the end of the line;
- outputs-chat: SmolLM2-135M in its chat format, greedy, 256 tokens, stop at a blank line.
Each runs with static groups (window = parallel: no slot is refilled, the old engine's schedule)
and with continuous batching in one window of all of them, in the split and the unified KV layout.
Printed: completion tokens/s and its share of the ceiling.

    python bench/bench_engine.py [--n 64] [--layouts split unified] [--workloads instances outputs-gemma outputs-chat]
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ensemble_instruct.backends import Decoding  # noqa: E402
from ensemble_instruct.backends.llamacpp import LlamaCppBackend  # noqa: E402
from ensemble_instruct.config import load_card, load_config  # noqa: E402
from ensemble_instruct.weights import resolve as resolve_weights  # noqa: E402
from ensemble_instruct.seeds import load_seeds, split_types  # noqa: E402
from ensemble_instruct.stages import instances, outputs  # noqa: E402

STORY = "cat dog king queen robot pirate farmer doctor teacher child bird fish wizard dragon knight baker".split()
SEEDS = load_seeds(ROOT / "seeds" / "seed_tasks.jsonl")


def backend(name: str, **update) -> LlamaCppBackend:
    card, path = load_card(name)
    card = card.model_copy(update=update)
    return LlamaCppBackend(card, resolve_weights(card, path))


def rate(b: LlamaCppBackend, prompts, params, seeds, prefix=None) -> tuple[float, int, float]:
    t0 = time.perf_counter()
    outs = b.generate(prompts, params, seeds, prefix=prefix)
    dt = time.perf_counter() - t0
    tokens = sum(o.completion_tokens for o in outs)
    return tokens / dt, tokens, dt


def ceiling(name: str, layout: str) -> float:
    b = backend(name, parallel=16, kv=layout)
    r, _, _ = rate(b, [f"Write a long story about a {w} who" for w in STORY], Decoding(128, 0.7, 50, 1.0, ignore_eos=True),
                   list(range(1, 17)))
    b.close()
    return r


def workload(kind: str, n: int):
    """(card, prompts, params, prefix) of one stage-shaped workload."""
    cfg = load_config(ROOT / "configs" / "default.toml")  # each stage decodes as in the default preset
    if kind == "instances":  # type A, the fixed demonstrations
        tasks = split_types(SEEDS)["A"][-n:]  # the template's demonstrations come from the first ones
        prompts, prefix = instances.fixed_requests(cfg, "A", [t.instruction for t in tasks])
        return "smollm2-135m", prompts, instances.decoding(cfg, "A"), prefix
    name = {"outputs-gemma": "gemma3-270m", "outputs-chat": "smollm2-135m-chat"}[kind]
    card, _ = load_card(name)
    prompts = outputs.requests(cfg, card, [{"instruction": t.instruction, "input": t.input} for t in SEEDS[:n]])
    return name, prompts, outputs.decoding(cfg, card, stop_loops=False), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64, help="requests per workload")
    ap.add_argument("--layouts", nargs="+", default=["split", "unified"])
    ap.add_argument("--continuous-only", action="store_true", help="skip the static-groups runs")
    ap.add_argument("--workloads", nargs="+", default=["instances", "outputs-gemma", "outputs-chat"])
    args = ap.parse_args()
    ceilings = {}
    for kind in args.workloads:
        name, prompts, params, prefix = workload(kind, args.n)
        seeds = list(range(1, len(prompts) + 1))
        for layout in args.layouts:
            key = (name, layout)
            if key not in ceilings:
                ceilings[key] = ceiling(name, layout)
                print(f"ceiling {name} {layout}: {ceilings[key]:.1f} tok/s (16 live sequences)", flush=True)
            schedules = ((("static groups of 16", 16),) if not args.continuous_only else ()) + \
                ((f"continuous, window {len(prompts)}", len(prompts)),)
            for label, window in schedules:
                b = backend(name, parallel=16, window=window, kv=layout)
                if prefix:  # the prefix is evaluated once per model load, not per request: apart
                    b.generate([prompts[0]], Decoding(1), [0], prefix=prefix)
                r, tokens, dt = rate(b, prompts, params, seeds, prefix)
                layout_used = b.layout
                b.close()
                print(f"{kind:<14} {layout_used:<8} {label:<22} {r:6.1f} tok/s = {r / ceilings[key]:.2f} of the ceiling "
                      f"({tokens} tokens in {dt:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
