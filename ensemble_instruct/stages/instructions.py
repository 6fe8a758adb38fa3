"""Stage 1: new instructions from the generator, filtered and kept only if novel.

One record per request (also requests with nothing accepted), so request indices, and with them
every prompt and sampling seed, are the same on a resume.
"""
from __future__ import annotations

from .. import templates
from ..backends import Backend, Decoding
from ..config import Config
from ..errors import UserError
from ..filters import process_completion
from ..novelty import Pool, novelty_scores
from ..runner import Meter, check_stop, forecast_note, progress_bar
from ..rundir import Run, rng_for, seed_for
from ..store import append_jsonl, write_jsonl

NAME = "instructions"


def key(typ: str) -> str:
    """The stage's name for type `typ`: its file's stem and its timings' key in the manifest."""
    return f"{NAME}_{typ}"


def file_name(typ: str) -> str:
    return f"{key(typ)}.jsonl"


def path(run: Run, typ: str):
    return run.file(file_name(typ))


def template(cfg: Config, typ: str) -> str:
    return templates.load(f"instructions_{typ}.txt", cfg.path(cfg.templates_dir))


def decoding(cfg: Config) -> Decoding:
    c = cfg.instructions
    return Decoding(c.max_tokens, c.temperature, c.top_k, c.top_p, (templates.EOS,))


def records(run: Run, typ: str) -> list[dict]:
    """The requests on disk. A batch cut short by a crash is removed whole: its prompts were
    made from the pool at the batch start, so it is generated again from the same state."""
    file = path(run, typ)
    recs = run.read(file)
    for n, r in enumerate(recs):
        if r.get("request") != n:
            raise UserError(f"{file}:{n + 1}: expected request {n}, found {r.get('request')!r} (file edited by hand?)")
    if recs:
        first, size = recs[-1].get("batch", (recs[-1]["request"], 1))
        if len(recs) < first + size:
            run.note_repair(file, f"removed requests {first}-{len(recs) - 1}: their batch was cut short")
            recs = recs[:first]
            write_jsonl(file, recs)
    return recs


def accepted(recs: list[dict]) -> list[dict]:
    return [item for r in recs for item in r["items"] if item["status"] == "accepted"]


def pending(run: Run, typ: str) -> bool:
    recs, c = records(run, typ), run.cfg.instructions
    target = getattr(c.target, typ)
    return len(accepted(recs)) < target and len(recs) < target * c.max_requests_factor


def run_stage(run: Run, backend: Backend, typ: str) -> None:
    c = run.cfg.instructions
    target, max_requests = getattr(c.target, typ), getattr(c.target, typ) * c.max_requests_factor
    out = path(run, typ)
    recs = records(run, typ)
    pool = [item["text"] for item in accepted(recs)]
    seed_texts = [t.instruction for t in run.seeds[typ]]
    novelty_pool = Pool(seed_texts + pool)  # tokenized once, grows with each accepted item
    tpl, params = template(run.cfg, typ), decoding(run.cfg)
    with Meter(run, key(typ), backend) as meter, \
            progress_bar(f"instructions {typ}{forecast_note(run, key(typ))}", target, min(len(pool), target)) as advance:
        while len(pool) < target and len(recs) < max_requests:
            check_stop(run, f"instruction generation ({typ})")
            first = len(recs)
            # About one instruction per request (each stops at |EoS|): ask for no more than needed.
            # One window of the backend: its results depend on each other, and it is written whole.
            size = min(backend.window, max_requests - first, target - len(pool))
            indices = range(first, first + size)
            prompts, seeds = [], []
            for i in indices:  # every prompt of a batch sees the pool as it was at the batch start
                rng = rng_for(run.cfg.seed, "instructions", typ, i)
                shown = rng.sample(seed_texts, min(getattr(c.seeds_per_prompt, typ), len(seed_texts)))
                shown += rng.sample(pool, min(getattr(c.machine_per_prompt, typ), len(pool)))
                rng.shuffle(shown)
                prompts.append(templates.instruction_prompt(tpl, shown))
                seeds.append(seed_for(run.cfg.seed, "instructions", typ, i))
            completions = backend.generate(prompts, params, seeds)
            meter.add(completions)
            batch, before = [], len(pool)
            for i, s, comp in zip(indices, seeds, completions):
                items = [{"text": t, "status": "rejected", "reason": r} for t, r in process_completion(comp.text)]
                passing = [it for it in items if it["reason"] is None]
                for it, nov in zip(passing, novelty_scores([it["text"] for it in passing], novelty_pool,
                                                           c.novelty_threshold)):
                    it["max_rouge"] = nov.max_score
                    if not nov.keep:
                        it["reason"] = "not_novel"
                    elif len(pool) >= target:
                        it["reason"] = "over_target"
                    else:
                        pool.append(it["text"])
                        novelty_pool.add(it["text"])
                        it.update(status="accepted", reason=None, id=f"{typ}{len(pool):05d}",
                                  mean_rouge=nov.mean_score, most_similar=nov.most_similar)
                batch.append({"id": f"{typ}-request-{i:05d}", "type": typ, "request": i, "batch": [first, size], "seed": s,
                              "finish": comp.finish, "completion": comp.text, "items": items})
            append_jsonl(out, batch)
            recs.extend(batch)
            advance(len(pool) - before, completions)
