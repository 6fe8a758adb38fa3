"""Even logit rows: a run's stages replayed with and without the padding, in one process,
alternating, so both sides see the same machine.

For each extra-output and instance stage of a finished run (llama.cpp models; instances with fixed
demonstrations), its requests go through the engine N times with `even_rows` on and N times off,
in turns. Prints the best and the median seconds of each side, their ratio, and whether the texts
are equal (they must be: the padding row is never sampled).

    python bench/bench_even_rows.py RUN_DIR [--reps 4] [--only STAGE ...]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_stages import has_bound, stage_requests  # noqa: E402
from ensemble_instruct.backends.llamacpp import LlamaCppBackend  # noqa: E402
from ensemble_instruct.config import Config, load_card  # noqa: E402
from ensemble_instruct.weights import resolve as resolve_weights  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--only", nargs="+", metavar="STAGE")
    args = ap.parse_args()
    run = Path(args.run)
    m = json.loads((run / "manifest.json").read_text())
    cfg = Config(**m["fingerprint"]["config"]).located(Path(m["config_dir"]))
    cards = {}
    for path in [cfg.generator, *cfg.extra]:
        card, card_path = load_card(cfg.path(path))
        cards[card.name] = (card, card_path)
    llama = {name for name, (c, _) in cards.items() if c.backend == "llama_cpp"}
    print(f"{'stage':<32} {'padded: best / median s':>24} {'plain: best / median s':>24} {'best ratio':>10}  texts")
    for key, t in m["timings"].items():
        if not has_bound(key, t, llama, cfg) or (args.only and key not in args.only):
            continue
        card, card_path = cards[t["model"]]
        prompts, prefix, params = stage_requests(run, cfg, key, card)
        seeds = list(range(len(prompts)))
        b = LlamaCppBackend(card, resolve_weights(card, card_path))
        times, texts = {True: [], False: []}, {}
        for _ in range(args.reps):
            for pad in (True, False):
                b.even_rows = pad
                t0 = time.perf_counter()
                outs = b.generate(prompts, params, seeds, prefix)
                times[pad].append(time.perf_counter() - t0)
                texts.setdefault(pad, [o.text for o in outs])
        b.close()
        same = sum(a == c for a, c in zip(texts[True], texts[False]))
        cell = {pad: f"{min(ts):.2f} / {statistics.median(ts):.2f}" for pad, ts in times.items()}
        print(f"{key:<32} {cell[True]:>24} {cell[False]:>24} {min(times[True]) / min(times[False]):10.3f}  "
              f"{same}/{len(prompts)} equal", flush=True)


if __name__ == "__main__":
    main()
