"""Stage 3: each extra model answers every usable instance zero-shot and greedily, as in the
reference implementation: the instruction, a new line, the input; stop at a blank line or |EoS|."""
from __future__ import annotations

from pathlib import Path

from .. import templates
from ..backends import Backend, Decoding
from ..config import Config, ModelCard
from ..parsing import echo, repetitive
from ..runner import done_ids, run_batches
from ..rundir import Run, seed_for
from . import instances


NAME = "outputs"


def key(model: str, typ: str) -> str:
    """The stage's name for one model and type: its file's stem and its timings' key."""
    return f"{NAME}_{model}_{typ}"


def file_name(model: str, typ: str) -> str:
    return f"{key(model, typ)}.jsonl"


def path(run: Run, card: ModelCard, typ: str) -> Path:
    return run.file(file_name(card.name, typ))


def pending(run: Run, card: ModelCard, typ: str) -> bool:
    done = done_ids(run, path(run, card, typ))
    return any(it["id"] not in done for it in instances.usable(run, typ))


def reason(text: str, finish: str, instance: dict) -> str | None:
    """Why an extra output can never be kept (None: it is a candidate)."""
    if finish == "prompt_too_long":
        return "prompt_too_long"
    if finish == "loop":  # the backend cut a repetition loop short
        return "repetitive"
    if not text:
        return "empty_output"
    if "\ufffd" in text:
        return "invalid_text"
    if repetitive(text):
        return "repetitive"
    if echo(text, instance["instruction"], instance["input"]):
        return "echo"
    return None


def loops(text: str) -> bool:
    """The early loop test of the extra-output stage: what `reason` calls repetitive."""
    return repetitive(text.strip())


def decoding(cfg: Config, card: ModelCard, stop_loops: bool) -> Decoding:
    """How an extra output (or an `evaluate` answer, without `stop_loops`) is decoded: greedily."""
    c = cfg.outputs
    return Decoding(c.max_tokens, stop=(*c.stop, *card.output_stop), loop_test=loops if stop_loops else None)


def template(cfg: Config, card: ModelCard) -> str:
    return templates.load(card.output_template or "output.txt", cfg.path(cfg.templates_dir), templates.FIELDS["output"])


def requests(cfg: Config, card: ModelCard, items: list[dict]) -> list[str]:
    """The prompts of `items` (instruction, input) as this stage sends them to `card`."""
    tpl = template(cfg, card)
    return [templates.output_prompt(tpl, it["instruction"], it["input"]) for it in items]


def answer(run: Run, backend: Backend, todo: list[dict], out: Path, *, key: str, stage: str, typ: str,
           where: str, stop_loops: bool = False) -> None:
    """Each item of `todo` (id, instruction, input) answered zero-shot and greedily into `out`;
    `evaluate` reuses this for tasks with gold answers (there without `stop_loops`: a looping
    answer is scored as the model wrote it)."""
    card = backend.card
    tpl = template(run.cfg, card)

    def request(index: int, it: dict) -> tuple[str, int]:
        return templates.output_prompt(tpl, it["instruction"], it["input"]), seed_for(run.cfg.seed, stage, typ, index)

    def record(it: dict, seed: int, comp) -> dict:
        text = comp.text.strip()
        return {"id": it["id"], "output": text, "reason": reason(text, comp.finish, it), "finish": comp.finish}

    run_batches(run, backend, key=key, where=where, path=out, todo=todo,
                params=decoding(run.cfg, card, stop_loops), request=request, record=record)


def seed_stage(card: ModelCard) -> str:
    """The stage name this model's extra-output seeds are derived under (`seed_for`)."""
    return f"outputs/{card.name}"


def run_stage(run: Run, backend: Backend, typ: str) -> None:
    card = backend.card
    answer(run, backend, instances.usable(run, typ), path(run, card, typ), key=key(card.name, typ),
           stage=seed_stage(card), typ=typ, where=f"extra outputs ({card.name}, {typ})", stop_loops=True)
