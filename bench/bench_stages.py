"""The generating stages as they run, against the engine's ceiling for each model's weights.

Runs `run.py generate` with a preset (default: configs/default.toml) into a fresh folder, or reads a
finished run (--run). For each stage: completion tokens/s from the manifest (its seconds include
prompt evaluation and the prefix, as a user waits for them). Then, in the same process run, each
llama.cpp model's ceiling: its card's settings (threads), parallel 16, the faster of the two KV
layouts, 16 short prompts x 128 tokens with the end-of-text token never sampled, so all 16 slots
stay live. Prints each
stage's share of its ceiling next to the targets (instances >= 0.55, extra outputs >= 0.5),
the total stage time and the kept count.

    python bench/bench_stages.py [-c configs/default.toml] [--run DIR | --out DIR]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ensemble_instruct.backends import Decoding, load_backend  # noqa: E402
from ensemble_instruct.config import ModelCard, load_card  # noqa: E402

STORY = "cat dog king queen robot pirate farmer doctor teacher child bird fish wizard dragon knight baker".split()
TARGETS = {"instances": 0.55, "outputs": 0.5}


def ceiling(card: ModelCard, card_path: Path) -> float:
    """The engine's best for these weights: the faster KV layout (a sliding-window model has one)."""
    return max(_ceiling(card.model_copy(update={"kv": kv}), card_path) for kv in ("split", "unified"))


def _ceiling(card: ModelCard, card_path: Path) -> float:
    b = load_backend(card.model_copy(update={"parallel": 16}), card_path)
    params = Decoding(128, 0.7, 50, 1.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = b.generate([f"Write a long story about a {w} who" for w in STORY], params, list(range(1, 17)))
    dt = time.perf_counter() - t0
    b.close()
    return sum(o.completion_tokens for o in outs) / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-c", "--config", default=str(ROOT / "configs" / "default.toml"))
    ap.add_argument("--run", help="a finished run directory to read instead of generating one")
    ap.add_argument("--out", help="generate into this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    tmp = None
    if args.run:
        run, wall = Path(args.run), None
    else:
        if args.out:
            run = Path(args.out)
        else:
            tmp = tempfile.TemporaryDirectory()
            run = Path(tmp.name) / "run"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "run.py"), "generate", "-c", args.config, "--out", str(run)],
                       check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
    m = json.loads((run / "manifest.json").read_text())
    cards = {}
    for path in [m["fingerprint"]["config"]["generator"], *m["fingerprint"]["config"]["extra"]]:
        card, card_path = load_card(ROOT / path if not Path(path).is_absolute() else path)
        cards[card.name] = (card, card_path)
    ceilings = {name: ceiling(c, p) for name, (c, p) in cards.items() if c.backend == "llama_cpp"}
    print(f"run: {run}  ({'this run' if wall else 'read'})")
    for name, r in ceilings.items():
        print(f"ceiling {name:<18} {r:6.1f} tok/s (parallel 16, all live; the run used kv = {cards[name][0].kv})")
    print(f"{'stage':<32} {'model':<18} {'seconds':>8} {'tok/s':>7} {'share':>6}  target")
    total = 0.0
    for key, t in m["timings"].items():
        total += t["seconds"]
        kind = key.split("_")[0]
        share = t["tokens_per_s"] / ceilings[t["model"]] if t["model"] in ceilings else None
        target = TARGETS.get(kind)
        verdict = "" if target is None or share is None else f">= {target}: {'met' if share >= target else 'MISSED'}"
        print(f"{key:<32} {t['model']:<18} {t['seconds']:8.1f} {t['tokens_per_s']:7.1f} "
              f"{'-' if share is None else f'{share:.2f}':>6}  {verdict}")
    print(f"stage time in all: {total:.0f} s ({total / 60:.1f} min)" + (f"; wall time of generate: {wall:.0f} s" if wall else ""))
    print(f"kept: {m.get('dataset_size')}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
