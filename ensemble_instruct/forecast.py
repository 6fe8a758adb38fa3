"""`forecast`: a short pilot of a config's own pipeline predicts the full run's time and yield.

The pilot is the same pipeline (models, cards, settings, seed) with about a tenth of the
instructions of each type, run in a cache folder (runs/.forecast/<config>-<setup key>/), so a
second forecast of the same setup reuses it, and `generate` finds the forecast by the same key.
What the pilot measures, and how each part scales to the full run:

- instructions: a batch of s requests takes t(s) = a + c*s while s fits the backend's slots, and
  (s / slots) * t(slots) beyond (slots busy: throughput), fitted on the pilot's batches (one big
  batch, then the small ones that fill the target). How many requests the target needs comes from
  the accepted items per pilot request, resampled, batch by batch as the stage asks for them.
- instances: the shared few-shot prefix once per type (the backend's own clock) + c per request.
- outputs: c per request of each extra model, times the usable instances the funnel predicts.
- model loads, peak memory, and the rest of the run (opening it, the ensemble): as measured.
- the funnel: usable | accepted and kept | usable are Beta-Binomial draws from the pilot's counts.

An interval is the 5th to 95th percentile over Monte-Carlo draws of all of the above (each draw
resamples the pilot's requests, so a stage whose requests vary a lot gets a wide interval); the
time's is widened by MARGIN for what a pilot cannot see (another job on the machine, the fuller
batches of the long run).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

from .config import ModelCard
from .errors import UserError
from .rundir import TYPES, Run, fingerprint, open_existing, open_run, setup
from .runner import clock
from .stages import ensemble, instances, instructions, outputs
from .store import append_jsonl, read_jsonl, write_json

PILOT_SHARE = 0.1  # of each type's instructions
PILOT_MIN = 4  # instructions per type, whatever the share (a small run: its pilot stays under a quarter)
DRAWS = 2000
MARGIN = 0.15  # the time interval's widening, each side (docs/forecast.md: measured pairs)
TRACE = "trace.jsonl"
FORECAST = "forecast.json"


def cache_root() -> Path:
    return Path(os.environ.get("ENSEMBLE_INSTRUCT_FORECASTS", Path("runs") / ".forecast"))


def setup_key(fp: dict) -> str:
    """What a forecast is for: the run's whole setup (config with seed and sizes, cards, weights,
    engines, templates, seeds), as a run's manifest records it."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def pilot_targets(targets: dict[str, int], pilot: int | None) -> dict[str, int]:
    if pilot is not None and pilot < 1:
        raise UserError(f"--pilot must be at least 1 instruction per type, not {pilot}")
    want = {t: pilot if pilot is not None else max(PILOT_MIN, math.ceil(PILOT_SHARE * n)) for t, n in targets.items()}
    return {t: min(n, targets[t]) for t, n in want.items()}


def slots(card: ModelCard) -> int:
    """Requests a backend decodes at the same time."""
    return {"llama_cpp": card.parallel, "transformers": card.batch_size, "openai": card.concurrency}[card.backend]


def window(card: ModelCard) -> int:
    """Requests a backend is given at once (Backend.window)."""
    if card.backend == "llama_cpp":
        return card.window or 8 * card.parallel
    return slots(card)


# ---------------------------------------------------------------- the pilot

def run_pilot(config: Path | None, num_instructions: int | None, seed: int | None, pilot: int | None,
              resume_command: str = "") -> dict:
    """The forecast for this setup: from the cache when a pilot of this size has run, else after
    running (or finishing) one."""
    from . import pipeline

    cfg, generator, extras, _ = setup(config, None, num_instructions, seed)
    key = setup_key(fingerprint(cfg, [generator, *extras]))
    name = Path(config).stem if config else "default"
    targets = {t: getattr(cfg.instructions.target, t) for t in TYPES}
    small = pilot_targets(targets, pilot)
    folder = cache_root() / f"{name}-{key}"
    cached = folder / FORECAST
    if cached.exists():
        fc = json.loads(cached.read_text())
        if fc.get("pilot_targets") == small:
            return {**fc, "reused": True}
    pilot_dir = folder / f"pilot-{'-'.join(f'{t}{n}' for t, n in small.items())}"
    run = open_run(config, pilot_dir, num_instructions, seed, targets=small)
    run.resume_command = resume_command
    run.trace = []
    t0 = time.perf_counter()
    try:
        pipeline.generate(run)
    finally:  # what the pilot measured so far, in one write: a resumed pilot adds to it
        run.trace.append({"key": "_session", "seconds": round(time.perf_counter() - t0, 3)})
        append_jsonl(pilot_dir / TRACE, run.trace)
    fc = predict(open_existing(pilot_dir, lock_it=False), read_jsonl(pilot_dir / TRACE, "run"), targets)
    fc.update(config=name, key=key, seed=cfg.seed, targets=targets, pilot_targets=small,
              created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), pilot_dir=str(pilot_dir))
    write_json(cached, fc)
    return {**fc, "reused": False}


def find(fp: dict) -> dict | None:
    """The forecast made for this setup, if any (what `generate` shows and keeps)."""
    for path in sorted(cache_root().glob(f"*-{setup_key(fp)}/{FORECAST}")):
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------- what the pilot measured

def _stage_trace(trace: list[dict], key: str) -> tuple[list[list[dict]], float, float]:
    """A stage's batches per session (each: t since the stage started, prompt and generated tokens
    per request), its seconds in all, and its time on shared prefixes in the longest session."""
    sessions: dict[float, list[dict]] = {}
    seconds, prefix = 0.0, 0.0
    for r in trace:
        if r.get("key") != key:
            continue
        if "end" in r:
            seconds += r["end"]
            prefix = max(prefix, r["prefix_s"])
        else:
            sessions.setdefault(r["session"], []).append(r)
    return list(sessions.values()), seconds, prefix


def _requests(sessions: list[list[dict]]) -> list[tuple[int, int]]:
    """(prompt tokens, generated tokens) of every request of a stage's batches."""
    return [(p, g) for batches in sessions for b in batches for p, g in zip(b["prompt"], b["gen"])]


def fit_batch_time(sizes: list[int], durations: list[float], slots_: int) -> tuple[float, float]:
    """t(s) = a + c*s by least squares over the pilot's batches (a >= 0, c > 0); one size: a = 0."""
    n = len(sizes)
    if n >= 2 and len(set(sizes)) >= 2:
        ms, md = sum(sizes) / n, sum(durations) / n
        var = sum((s - ms) ** 2 for s in sizes)
        c = sum((s - ms) * (d - md) for s, d in zip(sizes, durations)) / var
        a = md - c * ms
        if a >= 0 and c > 0:
            return a, c
    return 0.0, sum(durations) / max(1, sum(sizes))


def batch_time(s, a: float, c: float, slots_: int):
    """Seconds for a batch of s requests (s: a number or a numpy array)."""
    import numpy as np

    s = np.asarray(s, dtype=float)
    full = a + c * slots_
    return np.where(s <= slots_, a + c * s, s / slots_ * full) * (s > 0)


def _pct(values) -> dict:
    import numpy as np

    lo, mid, hi = np.percentile(values, [5, 50, 95])
    return {"low": float(lo), "mid": float(mid), "high": float(hi)}


def _rounded(d: dict, digits: int = 1) -> dict:
    return {k: round(v, digits) if digits else int(round(v)) for k, v in d.items()}


def _instruction_draws(rng, run: Run, trace: list[dict], typ: str, target: int, draws: int):
    """Per draw, the instruction stage of the full run, batch by batch as the stage asks for them:
    (accepted instructions, requests, seconds), and the pilot's (prompt, generated) tokens per request."""
    import numpy as np

    card, c = run.generator[0], run.cfg.instructions
    recs = instructions.records(run, typ)
    got = np.array([sum(it["status"] == "accepted" or it.get("reason") == "over_target" for it in r["items"])
                    for r in recs], dtype=float)  # what each request would add to a pool not yet full
    if not len(got):
        raise UserError(f"the pilot made no instruction requests of type {typ}")
    if got.sum() == 0:
        raise UserError(f"the pilot accepted no instruction of type {typ} in {len(got)} requests: "
                        "this setup would make none; check the generator and [instructions]")
    sizes, durations, prompt, gen = [], [], [], []
    for batches in _stage_trace(trace, instructions.key(typ))[0]:
        last = 0.0
        for b in batches:
            sizes.append(len(b["gen"]))
            durations.append(b["t"] - last)
            last = b["t"]
            prompt += b["prompt"]
            gen += b["gen"]
    a, per = fit_batch_time(sizes, durations, slots(card))
    w, max_requests = window(card), target * c.max_requests_factor
    pool, reqs, seconds = np.zeros(draws), np.zeros(draws), np.zeros(draws)
    cost = _cost_factor(rng, np.array(prompt) + np.array(gen), draws)
    while True:
        s = np.minimum.reduce([np.full(draws, w), max_requests - reqs, target - pool]).clip(min=0)
        if not s.any():
            break
        width = int(s.max())
        picks = rng.choice(got, size=(draws, width)) * (np.arange(width) < s[:, None])
        pool = np.minimum(target, pool + picks.sum(axis=1))
        reqs += s
        seconds += batch_time(s, a, per, slots(card)) * cost
    return pool, reqs, seconds, list(zip(prompt, gen))


def predict(run: Run, trace: list[dict], targets: dict[str, int], draws: int = DRAWS, seed: int = 0) -> dict:
    """The full run's forecast from a finished pilot run directory and its trace."""
    import numpy as np

    rng = np.random.default_rng(seed)
    gen_card = run.generator[0]
    manifest = run.manifest
    stages_out, stage_draws = [], []
    total = np.zeros(draws)
    kept_total = np.zeros(draws)
    funnel = {}
    for typ in TYPES:
        # ---- instructions: batches until the target
        recs = instructions.records(run, typ)
        accepted, reqs, t_instr, tokens = _instruction_draws(rng, run, trace, typ, targets[typ], draws)
        stage_draws.append((instructions.key(typ), gen_card.name, t_instr, reqs, tokens))
        # ---- instances: the shared prefix once, then per request
        sessions, seconds, prefix = _stage_trace(trace, instances.key(typ))
        inst_reqs = _requests(sessions)
        n_inst = max(1, len(inst_reqs))
        per = max(0.0, seconds - prefix * len(sessions)) / n_inst
        weights = np.array([g + 1 for _, g in inst_reqs] or [1.0])
        t_inst = prefix + accepted * per * _cost_factor(rng, weights, draws)
        stage_draws.append((instances.key(typ), gen_card.name, t_inst, accepted, inst_reqs))
        # ---- the funnel: usable | accepted, kept | usable
        n_acc = len(instructions.accepted(recs))
        n_use = len(instances.usable(run, typ))
        n_kept = sum(r["kept"] for r in run.read(run.file(ensemble.file_name(typ))))
        usable = _beta_binomial(rng, accepted, n_use, n_acc - n_use)
        kept = _beta_binomial(rng, usable, n_kept, n_use - n_kept)
        kept_total += kept
        funnel[typ] = {"accepted": _rounded(_pct(accepted), 0), "usable": _rounded(_pct(usable), 0),
                       "kept": _rounded(_pct(kept), 0),
                       "pilot": {"accepted": n_acc, "usable": n_use, "kept": n_kept}}
        # ---- extra outputs: per usable instance
        for card, _ in run.extras:
            sessions, seconds, _ = _stage_trace(trace, outputs.key(card.name, typ))
            reqs_o = _requests(sessions)
            if not reqs_o:  # no usable instance of this type in the pilot: the other type's pace
                sessions, seconds, _ = _stage_trace(trace, outputs.key(card.name, "B" if typ == "A" else "A"))
                reqs_o = _requests(sessions)
            if not reqs_o:
                raise UserError(f"the pilot kept no usable instance to time {card.name} on: "
                                "use a larger --pilot")
            per = seconds / len(reqs_o)
            weights = np.array([p + g for p, g in reqs_o], dtype=float)
            t_out = usable * per * _cost_factor(rng, weights, draws)
            stage_draws.append((outputs.key(card.name, typ), card.name, t_out, usable, reqs_o))
    # the order the run goes in: the generator's stages, then each extra model's
    order = [instructions.key(t) for t in TYPES] + [instances.key(t) for t in TYPES] + \
        [outputs.key(c.name, t) for c, _ in run.extras for t in TYPES]
    stage_draws.sort(key=lambda d: order.index(d[0]))
    for key, model, t, reqs, tokens in stage_draws:
        total += t
        # tokens: the requests times their mean over resampled pilot requests
        picks = rng.choice(np.array(tokens or [(0, 0)], dtype=float), size=(draws, max(1, len(tokens))))
        stages_out.append({"stage": key, "model": model, "seconds": _rounded(_pct(t)), "requests": _rounded(_pct(reqs), 0),
                           "tokens": {"prompt": _rounded(_pct(reqs * picks[:, :, 0].mean(axis=1)), 0),
                                      "generated": _rounded(_pct(reqs * picks[:, :, 1].mean(axis=1)), 0)}})
    loads, peaks = {}, {}
    for e in manifest["events"]:
        if e["event"] == "free":
            loads[e["model"]] = max(loads.get(e["model"], 0.0), e["load_s"])
            peaks[e["model"]] = max(peaks.get(e["model"], 0.0), e["peak_rss_mb"])
    pilot_seconds = sum(r["seconds"] for r in trace if r.get("key") == "_session")
    spent = sum(r["end"] for r in trace if "end" in r) + sum(
        e["load_s"] for e in manifest["events"] if e["event"] == "free")
    overhead = max(0.0, pilot_seconds - spent)  # opening the run, the ensemble, the summary
    total += overhead + sum(loads.values())
    seconds = _pct(total)
    seconds["low"] *= 1 - MARGIN
    seconds["high"] *= 1 + MARGIN
    return {"total_seconds": _rounded(seconds), "kept": _rounded(_pct(kept_total), 0),
            "pilot_seconds": round(pilot_seconds, 1), "stages": stages_out, "funnel": funnel,
            "loads": [{"model": m, "seconds": round(s, 2)} for m, s in loads.items()],
            "peak_memory_mb": [{"model": m, "mb": round(v, 1)} for m, v in peaks.items()],
            "other_seconds": round(overhead, 1), "margin": MARGIN, "draws": draws}


def _cost_factor(rng, weights, draws: int):
    """Per draw: how much more (or less) a run's requests cost than the pilot's, from resampling
    the pilot's requests' token counts (their mean over the mean)."""
    import numpy as np

    weights = np.asarray(weights, dtype=float)
    if len(weights) < 2 or weights.mean() <= 0:
        return np.ones(draws)
    picks = rng.choice(weights, size=(draws, len(weights)))
    return picks.mean(axis=1) / weights.mean()


def _beta_binomial(rng, n, yes: int, no: int):
    """Per draw, how many of n items pass, when `yes` of `yes + no` passed in the pilot (Jeffreys)."""
    import numpy as np

    p = rng.beta(yes + 0.5, no + 0.5, size=len(n))
    return rng.binomial(np.asarray(n, dtype=np.int64), p).astype(float)


# ---------------------------------------------------------------- showing it

def span(d: dict, fmt=clock) -> str:
    return f"{fmt(d['mid'])} ({fmt(d['low'])}-{fmt(d['high'])})"


def print_table(fc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"forecast: {fc['config']}, seed {fc['seed']}, "
                        f"{' + '.join(f'{n} {t}' for t, n in fc['targets'].items())} instructions",
                  caption="requests and tokens: the median (--json has their 5-95% intervals too)")
    for name in ("stage", "model", "requests", "tokens in", "tokens out", "time (5-95%)"):
        table.add_column(name, no_wrap=True)
    for s in fc["stages"]:
        table.add_row(s["stage"], s["model"], str(s["requests"]["mid"]), str(s["tokens"]["prompt"]["mid"]),
                      str(s["tokens"]["generated"]["mid"]), span(s["seconds"]))
    table.add_row("loads, opening, ensemble", "", "", "", "",
                  clock(sum(x["seconds"] for x in fc["loads"]) + fc["other_seconds"]))
    console = Console(width=max(Console().width, 130))  # one line per stage, also when piped
    console.print(table)
    f = fc["funnel"]
    console.print("funnel per type (5-95%): " + "; ".join(
        f"{t}: {f[t]['accepted']['mid']} accepted, {span(f[t]['usable'], str)} usable, {span(f[t]['kept'], str)} kept"
        for t in TYPES))
    console.print("peak memory: " + ", ".join(f"{m['model']} {m['mb']:.0f} MB" for m in fc["peak_memory_mb"]))
    pilot = ("reused from " + fc["created"]) if fc.get("reused") else "just run"
    console.print(f"[bold]total {span(fc['total_seconds'])}, kept {span(fc['kept'], str)} examples[/bold]; "
                  f"the pilot ({' + '.join(f'{n} {t}' for t, n in fc['pilot_targets'].items())} instructions, "
                  f"{pilot}) took {clock(fc['pilot_seconds'])}")


def as_json(fc: dict) -> str:
    keys = ("config", "seed", "targets", "pilot_targets", "total_seconds", "kept", "pilot_seconds", "reused",
            "stages", "funnel", "loads", "peak_memory_mb", "other_seconds", "margin", "created")
    return json.dumps({k: fc[k] for k in keys if k in fc}, indent=2)


def attach(run: Run) -> dict | None:
    """Keep this setup's forecast in the run's manifest (forecast vs actual, for the report); the
    stages' progress bars show it."""
    fc = find(run.manifest["fingerprint"])
    if fc is None:
        return None
    run.manifest["forecast"] = {"created": fc["created"], "total_seconds": fc["total_seconds"], "kept": fc["kept"],
                                "stages": {s["stage"]: s["seconds"] for s in fc["stages"]}}
    run.save_manifest()
    return fc
