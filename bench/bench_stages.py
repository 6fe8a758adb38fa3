"""The generating stages as they run, against the engine's ceiling for each model's weights.

Runs `run.py generate` with a preset (default: configs/default.toml) into a fresh folder, or reads a
finished run (--run). For each stage: completion tokens/s from the manifest (its seconds include
prompt evaluation and the prefix, as a user waits for them). Then, in the same process run, each
llama.cpp model's ceiling: its card's settings (threads), parallel 16, the faster of the two KV
layouts, 16 short prompts x 128 tokens with the end-of-text token never sampled, so all 16 slots
stay live. Prints each
stage's share of its ceiling next to the targets (instances >= 0.55, extra outputs >= 0.5),
the total stage time and the kept count.

With --bound, also each instance and extra-output stage's own bound: its requests (their prompts,
the shared prefix) replayed with every slot live on every step (end-of-text never sampled), each
generating the stage's mean completion length. That is the share a perfect schedule would reach
with this stage's prompts, which the short-prompt ceiling does not pay for; "of bound" is the
stage's tok/s over the bound's.

With --pairs N (and --only STAGE ...), each such stage is measured N more times in one process,
each figure between two ceilings, so that both sides see the machine of the same minute: its bound,
and the stage itself replayed (its requests, seeds, stops and windows: the same schedule and the
same tokens as in the run, which the output checks). On a shared machine whose speed drifts over
the minutes of a run, these shares are steadier than the run's own.

    python bench/bench_stages.py [-c configs/default.toml] [--run DIR | --out DIR] [--bound]
        [--pairs N [--only STAGE ...]]
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
from ensemble_instruct.config import Config, ModelCard, load_card  # noqa: E402
from ensemble_instruct.rundir import seed_for  # noqa: E402
from ensemble_instruct.stages import instances, outputs  # noqa: E402

STORY = "cat dog king queen robot pirate farmer doctor teacher child bird fish wizard dragon knight baker".split()
TARGETS = {"instances": 0.55, "outputs": 0.5}


def ceiling(card: ModelCard, card_path: Path) -> tuple[float, str]:
    """The engine's best for these weights and the KV layout that gave it (the faster of the two; a
    sliding-window model has one)."""
    return max((_ceiling(card.model_copy(update={"kv": kv}), card_path), kv) for kv in ("split", "unified"))


def _ceiling(card: ModelCard, card_path: Path) -> float:
    return decode_rate(card.model_copy(update={"parallel": 16}), card_path,
                       [f"Write a long story about a {w} who" for w in STORY],
                       Decoding(128, 0.7, 50, 1.0, ignore_eos=True), list(range(1, 17)))[0]


def decode_rate(card: ModelCard, card_path: Path, prompts: list[str], params: Decoding, seeds: list[int],
                prefix: str | None = None) -> tuple[float, int]:
    """tok/s of one `generate` call on a freshly loaded model (the load not timed), and its tokens."""
    b = load_backend(card, card_path)
    t0 = time.perf_counter()
    outs = b.generate(prompts, params, seeds, prefix)
    dt = time.perf_counter() - t0
    b.close()
    n = sum(o.completion_tokens for o in outs)
    return n / dt, n


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_requests(run: Path, cfg: Config, key: str, card: ModelCard) -> tuple[list[str], str | None, Decoding]:
    """A stage's prompts, shared prefix and decoding, asked of the stage itself for the requests in
    the run's files (the run's templates; instances with the fixed demonstrations only)."""
    typ = key[-1]
    if key == instances.key(typ):
        prompts, prefix = instances.fixed_requests(cfg, typ, [r["instruction"] for r in read(run / f"{key}.jsonl")])
        return prompts, prefix, instances.decoding(cfg, typ)
    insts = {r["id"]: r for r in read(run / instances.file_name(typ))}
    prompts = outputs.requests(cfg, card, [insts[r["id"]] for r in read(run / f"{key}.jsonl")])
    return prompts, None, outputs.decoding(cfg, card, stop_loops=True)


def bound(run: Path, cfg: Config, key: str, t: dict, card: ModelCard, card_path: Path) -> float:
    """tok/s of the stage's requests with every slot live, each generating the stage's mean length."""
    prompts, prefix, p = stage_requests(run, cfg, key, card)
    mean = max(1, round(t["completion_tokens"] / len(prompts)))
    params = Decoding(mean, p.temperature, p.top_k, p.top_p, ignore_eos=True)  # no stops: every slot stays live
    return decode_rate(card, card_path, prompts, params, list(range(len(prompts))), prefix)[0]


def replay(run: Path, cfg: Config, key: str, card: ModelCard, card_path: Path) -> tuple[float, int]:
    """tok/s of the stage's own requests decoded as the stage decoded them (its seeds, stops, loop
    test and windows: the same schedule, so the same tokens), and how many tokens that was."""
    prompts, prefix, p = stage_requests(run, cfg, key, card)
    typ = key[-1]
    if key == instances.key(typ):
        seeds = [r["seed"] for r in read(run / f"{key}.jsonl")]
    else:
        seeds = [seed_for(cfg.seed, outputs.seed_stage(card), typ, i) for i in range(len(prompts))]
    return decode_rate(card, card_path, prompts, p, seeds, prefix)


def has_bound(key: str, t: dict, ceilings: dict, cfg: Config) -> bool:
    """Instance and extra-output stages of a llama.cpp model (instances: fixed demonstrations)."""
    kind = key.split("_")[0]
    return t["model"] in ceilings and kind in TARGETS and (kind == "outputs" or cfg.instances.demos == "fixed")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-c", "--config", default=str(ROOT / "configs" / "default.toml"))
    ap.add_argument("--run", help="a finished run directory to read instead of generating one")
    ap.add_argument("--out", help="generate into this folder and keep it (default: a temporary one)")
    ap.add_argument("--bound", action="store_true", help="also each stage's bound: its own requests, all slots live")
    ap.add_argument("--pairs", type=int, default=0, metavar="N",
                    help="then measure each bound N more times, each between two ceilings")
    ap.add_argument("--only", nargs="+", metavar="STAGE", help="--pairs for these stages only (e.g. instances_A)")
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
    best = {name: ceiling(c, p) for name, (c, p) in cards.items() if c.backend == "llama_cpp"}
    ceilings = {name: r for name, (r, _) in best.items()}
    cfg = Config(**m["fingerprint"]["config"]).located(Path(m["config_dir"]))
    print(f"run: {run}  ({'this run' if wall else 'read'})")
    for name, r in ceilings.items():
        print(f"ceiling {name:<18} {r:6.1f} tok/s (parallel 16, all live; the run used kv = {cards[name][0].kv})")
    print(f"{'stage':<32} {'model':<18} {'seconds':>8} {'tok/s':>7} {'share':>6}" +
          (f" {'bound':>6} {'of bound':>8}" if args.bound else "") + "  target")
    total = 0.0
    for key, t in m["timings"].items():
        total += t["seconds"]
        kind = key.split("_")[0]
        share = t["tokens_per_s"] / ceilings[t["model"]] if t["model"] in ceilings else None
        target = TARGETS.get(kind)
        verdict = "" if target is None or share is None else f">= {target}: {'met' if share >= target else 'MISSED'}"
        extra = ""
        if args.bound:
            extra = f" {'-':>6} {'-':>8}"
            if has_bound(key, t, ceilings, cfg):
                card, card_path = cards[t["model"]]
                b = bound(run, cfg, key, t, card, card_path)
                extra = f" {b / ceilings[t['model']]:6.2f} {t['tokens_per_s'] / b:8.2f}"
        print(f"{key:<32} {t['model']:<18} {t['seconds']:8.1f} {t['tokens_per_s']:7.1f} "
              f"{'-' if share is None else f'{share:.2f}':>6}{extra}  {verdict}", flush=True)
    print(f"stage time in all: {total:.0f} s ({total / 60:.1f} min)" + (f"; wall time of generate: {wall:.0f} s" if wall else ""))
    print(f"kept: {m.get('dataset_size')}")
    # One bound is as noisy as the machine; a pair of ceilings around each bound measures its share
    # against the machine's speed of that minute.
    for key, t in m["timings"].items():
        if args.pairs and has_bound(key, t, ceilings, cfg) and (not args.only or key in args.only):
            card, card_path = cards[t["model"]]
            at = card.model_copy(update={"kv": best[t["model"]][1]})
            bounds, stages = [], []
            for _ in range(args.pairs):
                before = _ceiling(at, card_path)
                b = bound(run, cfg, key, t, card, card_path)
                rate, n = replay(run, cfg, key, card, card_path)
                mid = _ceiling(at, card_path)
                bounds.append(2 * b / (before + mid))
                stages.append((2 * rate / (mid + _ceiling(at, card_path)), n))
            print(f"{key}, each between two ceilings: bound " + ", ".join(f"{x:.3f}" for x in bounds) +
                  "; the stage replayed " + ", ".join(f"{x:.3f}" for x, _ in stages) +
                  f" ({'the same' if all(n == t['completion_tokens'] for _, n in stages) else 'NOT the same'}"
                  f" {t['completion_tokens']} tokens as in the run; in the run: "
                  f"{t['tokens_per_s'] / ceilings[t['model']]:.3f} of the first ceiling)", flush=True)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
