"""Stage 2: one instance (input + output for type A, output for type B) per accepted instruction.

By default every request of a type shares one fixed few-shot prefix (templates/instances_{A,B}.txt,
as in the reference implementation), so a backend evaluates it once per model load. With
`[instances] demos = {A = n, B = m}` each request samples its own demonstrations instead.
"""
from __future__ import annotations

from functools import partial

from .. import templates
from ..backends import Backend, Decoding
from ..config import Config
from ..errors import UserError
from ..parsing import looping, parse_instance
from ..runner import done_ids, run_batches
from ..rundir import Run, rng_for, seed_for
from . import instructions

# The parser cuts a completion where the model starts another block anyway; stopping there too
# saves generating up to max_tokens of it.
STOP = (templates.EOS, "\ninstruction:")
NAME = "instances"


def key(typ: str) -> str:
    """The stage's name for type `typ`: its file's stem and its timings' key in the manifest."""
    return f"{NAME}_{typ}"


def file_name(typ: str) -> str:
    return f"{key(typ)}.jsonl"


def path(run: Run, typ: str):
    return run.file(file_name(typ))


def todo(run: Run, typ: str) -> list[dict]:
    return instructions.accepted(instructions.records(run, typ))


def pending(run: Run, typ: str) -> bool:
    done = done_ids(run, path(run, typ))
    return instructions.pending(run, typ) or any(it["id"] not in done for it in todo(run, typ))


def usable(run: Run, typ: str) -> list[dict]:
    return [r for r in run.read(path(run, typ)) if r["reason"] is None]


def template(cfg: Config, typ: str) -> str:
    fixed = cfg.instances.demos == "fixed"
    name = f"instances_{typ}.txt" if fixed else f"instances_random_{typ}.txt"
    return templates.load(name, cfg.path(cfg.templates_dir))


def fixed_requests(cfg: Config, typ: str, instructions: list[str]) -> tuple[list[str], str]:
    """The prompts of `instructions` with the fixed demonstrations, and the prefix they share
    (benchmarks replay a run's requests with it)."""
    tpl = template(cfg, typ)
    return [templates.fill(tpl, instruction=t) for t in instructions], templates.prefix(tpl, "instruction")


def check_fits(run: Run, backend: Backend) -> None:
    """Before any request: the demonstrations, an instruction and max_tokens fit the context.
    Demonstrations are never dropped to make a prompt fit."""
    c = run.cfg.instances
    for typ in ("A", "B"):
        tpl = template(run.cfg, typ)
        if c.demos == "fixed":
            prompt = templates.fill(tpl, instruction="")
            what = f"the fixed prefix of templates/instances_{typ}.txt"
        else:  # the worst case: the longest demonstrations
            n = getattr(c.demos, typ)
            demos = sorted(run.seeds[typ], key=lambda t: -len(templates.demo_block(t, typ == "A")))[:n]
            prompt = templates.instance_prompt(tpl, demos, "", typ == "A")
            what = f"{n} demonstrations (type {typ}, the longest)"
        need = backend.count_tokens(prompt) + c.max_tokens + 64  # 64: room for the instruction
        if need > backend.card.context:
            raise UserError(f"{backend.card.name}: {what} + [instances] max_tokens {c.max_tokens} + an instruction "
                            f"need {need} tokens, more than its context of {backend.card.context}; use fewer or "
                            "shorter demonstrations, a smaller max_tokens, or a model with a longer context")


def decoding(cfg: Config, typ: str) -> Decoding:
    """How the stage samples an instance of type `typ` (benchmarks replay it too)."""
    c = cfg.instances
    return Decoding(c.max_tokens, c.temperature, c.top_k, c.top_p, STOP,
                    loop_test=partial(looping, with_input=typ == "A"))


def run_stage(run: Run, backend: Backend, typ: str) -> None:
    c = run.cfg.instances
    with_input = typ == "A"
    tpl = template(run.cfg, typ)
    fixed = c.demos == "fixed"
    prefix = templates.prefix(tpl, "instruction") if fixed else None
    demo_ids: dict[str, list[str]] = {}

    def request(index: int, it: dict) -> tuple[str, int]:
        seed = seed_for(run.cfg.seed, "instances", typ, index)
        if fixed:
            return templates.fill(tpl, instruction=it["text"]), seed
        rng = rng_for(run.cfg.seed, "instances", typ, index)
        demos = rng.sample(run.seeds[typ], min(getattr(c.demos, typ), len(run.seeds[typ])))
        demo_ids[it["id"]] = [d.id for d in demos]
        return templates.instance_prompt(tpl, demos, it["text"], with_input), seed

    def record(it: dict, seed: int, comp) -> dict:
        p = parse_instance(comp.text, with_input, it["text"], comp.finish)
        rec = {"id": it["id"], "type": typ, "instruction": it["text"], "input": p.input, "output": p.output,
               "reason": p.reason, "seed": seed, "finish": comp.finish}
        if not fixed:
            rec["demos"] = demo_ids[it["id"]]
        rec["completion"] = comp.text
        return rec

    run_batches(run, backend, key=key(typ), where=f"instance generation ({typ})", path=path(run, typ),
                todo=todo(run, typ), params=decoding(run.cfg, typ), request=request, record=record, prefix=prefix)
