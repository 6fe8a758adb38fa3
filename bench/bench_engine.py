"""The llama.cpp generation engine: prefix reuse and batched decoding, one run each.

1. Instance stage, fixed 18-demo prefix (templates/instances_A.txt), SmolLM2-135M: seconds per
   instance for the old path (a bare `llama_cpp.Llama`, `reset()` and the whole prompt evaluated per
   request, one request at a time) vs our backend (prefix evaluated once per load, its KV state
   copied into each sequence, `parallel` sequences decoded together). Also ours with reuse only
   (parallel 1), to show where the gain comes from. The prefix's one-off cost per model load is
   printed apart: a real stage has ~100 instances per load.
2. Aggregate generated tokens/s of our backend with 1/4/8/16 parallel sequences, both tiny models:
   16 short prompts, no stop string (a request ends at max_tokens or the end-of-text token).

    python bench/bench_engine.py [--instances 16] [--prompts 16] [--max-tokens 128] [--skip-instances]
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_generation import bare  # noqa: E402  (this folder is on sys.path when run as a script)
from ensemble_instruct import templates  # noqa: E402
from ensemble_instruct.backends import Decoding  # noqa: E402
from ensemble_instruct.backends.llamacpp import LlamaCppBackend  # noqa: E402
from ensemble_instruct.config import load_card, resolve_weights  # noqa: E402
from ensemble_instruct.seeds import load_seeds, split_types  # noqa: E402
from ensemble_instruct.stages.instances import STOP  # noqa: E402

INSTRUCTIONS = [  # new instructions, none of them a demonstration of the prefix
    "Convert the temperature from Fahrenheit to Celsius.", "Sort the list of numbers in ascending order.",
    "Find the capital city of the given country.", "Rewrite the sentence in the passive voice.",
    "Classify the review as positive or negative.", "Summarize the paragraph in one sentence.",
    "Translate the sentence into Spanish.", "Count the vowels in the given word.",
    "Name the author of the given book.", "Correct the spelling mistakes in the text.",
    "Give an antonym for the given word.", "Extract the dates mentioned in the text.",
    "Calculate the area of a circle with the given radius.", "Suggest a title for the short story.",
    "Identify the verb in the sentence.", "Explain the idiom in simple words.",
]


STORY = "cat dog king queen robot pirate farmer doctor teacher child bird fish wizard dragon knight baker".split()


def backend(name: str, parallel: int, reuse: bool = True) -> LlamaCppBackend:
    card, path = load_card(name)
    card = card.model_copy(update={"parallel": parallel})
    return LlamaCppBackend(card, resolve_weights(card, path), reuse_prefix=reuse)


def timed(b: LlamaCppBackend, prompts, params, seeds, prefix=None):
    t0 = time.perf_counter()
    outs = b.generate(prompts, params, seeds, prefix=prefix)
    return time.perf_counter() - t0, sum(o.completion_tokens for o in outs)


def old_path(name: str, prompts, params, seeds):
    """What the instance stage did before: the high-level Llama, reset, the whole prompt each time
    (bench_generation's bare loop)."""
    card, path = load_card(name)
    tokens, dt = bare(resolve_weights(card, path), card, prompts, params, seeds)
    return dt, tokens


def bench_instances(n: int) -> None:
    name = "quantized/smollm2-135m.toml"
    tpl = templates.load("instances_A.txt")
    prefix = templates.prefix(tpl, "instruction")
    prompts = [templates.fill(tpl, instruction=t) for t in INSTRUCTIONS[:n]]
    params = Decoding(512, 0.7, 50, 1.0, STOP)  # the default preset's instance decoding
    seeds = list(range(1, n + 1))
    card, _ = load_card(name)
    b = backend(name, 1)
    print(f"1. instance stage, {card.name}, fixed prefix of {b.count_tokens(prefix)} tokens (18 demos), "
          f"{n} instances, type A")
    b.close()
    dt, tokens = old_path(name, prompts, params, seeds)
    base = dt / n
    print(f"   old path: Llama.reset() + whole prompt, one at a time: {base:.2f} s/instance ({tokens} tokens)")
    for parallel in (1, card.parallel):
        b = backend(name, parallel)
        # The prefix is evaluated once per model load (here with a throw-away request).
        once, _ = timed(b, [templates.fill(tpl, instruction="Name a fruit.")], Decoding(1), [0], prefix=prefix)
        dt, tokens = timed(b, prompts, params, seeds, prefix=prefix)
        b.close()
        per = dt / n
        print(f"   ours, prefix reuse, parallel {parallel:>2}: {per:.2f} s/instance ({tokens} tokens) + {once:.1f} s once "
              f"per load: {base / per:.1f}x per instance; a {n}-instance stage {n * base:.0f} s -> {once + dt:.0f} s "
              f"({n * base / (once + dt):.1f}x)")


def bench_parallel(n: int, max_tokens: int) -> None:
    """Decoding throughput: short prompts, so prompt processing (which batching does not speed up
    here: it runs one sequence at a time, at ~240 tokens/s for SmolLM2) is a small part."""
    prompts = [f"Write a long story about a {w} who" for w in STORY[:n]]
    params = Decoding(max_tokens, 0.7, 50, 1.0)
    seeds = list(range(1, n + 1))
    print(f"2. aggregate generated tok/s, {n} short prompts x up to {max_tokens} tokens (no stop string)")
    for name in ("quantized/smollm2-135m.toml", "quantized/gemma3-270m.toml"):
        one = None
        for parallel in (1, 4, 8, 16):
            b = backend(name, parallel)
            dt, tokens = timed(b, prompts, params, seeds)
            b.close()
            rate = tokens / dt
            one = one or rate
            print(f"   {b.card.name:<14} parallel {parallel:>2}: {rate:7.1f} tok/s  {rate / one:4.2f}x vs one at a time")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--skip-instances", action="store_true")
    args = ap.parse_args()
    if not args.skip_instances:
        bench_instances(args.instances)
    bench_parallel(args.prompts, args.max_tokens)


if __name__ == "__main__":
    main()
