"""What each stage of a config asks of a model (its longest prompt, shared prefix, new tokens), and
the KV layout and cells the engine gives it (kvcache.py: the engine's own rules).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import kvcache
from ..config import Config, ModelCard
from ..kvcache import kv_cells
from .shapes import Shape


CHARS_PER_TOKEN = 3.0  # a bound without a tokenizer: templates/instances_A.txt's prefix is 3,240
#                        chars = 904 SmolLM2 tokens (3.58 chars/token); 3.0 leaves room for
#                        tokenizers that split text (numbers, code) more finely
CHAT_OVERHEAD = 32  # tokens a chat template wraps a prompt in


@dataclass(frozen=True)
class Need:
    """What one stage asks of a model: its longest prompt, a shared prefix (tokens, 0: none),
    and the new tokens per request."""
    stage: str
    prompt: int
    new: int
    prefix: int = 0
    required: int = 0  # tokens the stage refuses to start without (instances.check_fits), 0: none


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def stage_needs(cfg: Config, card: ModelCard, role: str, count=estimate_tokens) -> list[Need]:
    """The stages a card runs in a config (role "generator" or "extra"), each as the bound of its
    requests: the longest seeds a prompt can show, an instruction of instructions.max_tokens, an
    input of instances.max_tokens. Types A and B: the larger of the two."""
    from .. import templates
    from ..seeds import load_seeds, split_types

    tdir = cfg.path(cfg.templates_dir)
    seeds = split_types(load_seeds(cfg.path(cfg.seeds_file)))
    chat = CHAT_OVERHEAD if card.prompt_format == "chat" else 0
    ins, inst = cfg.instructions, cfg.instances
    needs = []
    if role == "generator":
        for typ in ("A", "B"):
            tpl = templates.load(f"instructions_{typ}.txt", tdir)
            k = getattr(ins.seeds_per_prompt, typ) + getattr(ins.machine_per_prompt, typ)
            longest = sorted((t.instruction for t in seeds[typ] or seeds["A"] + seeds["B"]), key=len)[-k:]
            needs.append(Need("instructions", count(templates.instruction_prompt(tpl, longest)) + chat, ins.max_tokens))
        for typ in ("A", "B"):
            if inst.demos == "fixed":
                tpl = templates.load(f"instances_{typ}.txt", tdir)
                prefix = 0 if chat else count(templates.prefix(tpl, "instruction"))
                demos = count(templates.fill(tpl, instruction=""))
            else:  # each request its own demonstrations: the longest ones, as instances.check_fits
                tpl = templates.load(f"instances_random_{typ}.txt", tdir)
                n = getattr(inst.demos, typ)
                longest = sorted(seeds[typ], key=lambda t: -len(templates.demo_block(t, typ == "A")))[:n]
                prefix, demos = 0, count(templates.instance_prompt(tpl, longest, "", typ == "A"))
            # + an instruction; the stage refuses to start without demos + max_tokens + 64 (check_fits)
            needs.append(Need("instances", demos + ins.max_tokens + chat, inst.max_tokens, prefix,
                              demos + chat + inst.max_tokens + 64))
    else:
        tpl = templates.load(card.output_template or "output.txt", tdir, templates.FIELDS["output"])
        prompt = count(templates.output_prompt(tpl, "", "")) + ins.max_tokens + inst.max_tokens + chat
        needs.append(Need("outputs", prompt, cfg.outputs.max_tokens))
    return needs


def layout(card: ModelCard, shape: Shape, prefix: int) -> str:
    """The KV layout the engine picks, without a loaded model."""
    return kvcache.layout(card.kv, shape.sliding_window > 0, bool(prefix), card.prompt_format == "chat")


def cells_for(card: ModelCard, shape: Shape, need: Need, parallel: int) -> tuple[str, int, int, int]:
    """(layout, cells, sequences, cells one sequence's attention scans) for a stage, as the engine
    sizes them: kv_cells with per-sequence cells capped at the card's context."""
    lay = layout(card, shape, need.prefix)
    total = min(need.prompt + need.new, card.context)
    prefix = min(need.prefix, total - 1) if need.prefix else 0
    per_seq = total - (prefix if lay == "unified" else 0)
    cells, n_seq = kv_cells(lay, parallel, prefix, per_seq)
    return lay, cells, n_seq, (cells if lay == "unified" else cells // n_seq)
