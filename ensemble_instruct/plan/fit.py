"""The settings that fit a budget: gpu_layers and parallel per model for a config's stages, the
numbers "auto" card settings resolve to, and what `models check` holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ModelCard
from . import probe  # probe.detect_budget: tests replace it there
from .memory import Memory, hf_memory, llama_memory
from .needs import Need, stage_needs
from .probe import Budget
from .shapes import GIB, Shape, shape_for


MAX_PARALLEL = 16


def check_memory(card: ModelCard, path: Path, parallel: int | None = None, context: int | None = None,
                 on_gpu: bool = False, shape: Shape | None = None) -> Memory | None:
    """What `models check` holds: `parallel` sequences of `context` cells each, no shared prefix
    (backend.reserve(context): the card's worst case). None for a server card."""
    if card.backend == "openai":
        return None
    upd = {"context": context or card.context}
    if card.backend == "llama_cpp":
        upd["parallel"] = parallel or (card.parallel if card.parallel != "auto" else 1)
    card = card.model_copy(update=upd)
    shape = shape or shape_for(card, path)
    need = Need("check", card.context, 0)
    if card.backend == "transformers":
        return hf_memory(card, shape, need, on_gpu)
    g = card.gpu_layers if card.gpu_layers != "auto" else -1
    return llama_memory(card, shape, need, card.parallel, g, on_gpu)


def fits(m: Memory, budget: Budget) -> bool:
    if budget.gpu and sum(m.gpu.values()) > budget.vram:
        return False
    return budget.ram is None or m.host_total <= budget.ram


@dataclass
class ModelPlan:
    card: ModelCard
    path: Path
    role: str
    rows: list[Memory]
    fits: bool
    gpu_layers: int | None = None
    parallel: int | None = None
    lower: str = ""


def plan_model(card: ModelCard, path: Path, role: str, cfg: Config, budget: Budget,
               gpu_layers: int | None = None, parallel: int | None = None, shape: Shape | None = None,
               needs: list[Need] | None = None) -> ModelPlan:
    """The largest gpu_layers (all, then partial offload) and then the largest parallel (1..16)
    with which every stage of the card fits the budget. A given gpu_layers or parallel is kept."""
    shape = shape or shape_for(card, path)
    needs = needs or stage_needs(cfg, card, role)
    if card.backend == "openai":
        rows = [Memory(card.name, n.stage, None, shape.n_layers if shape else 0, None, card.context, None) for n in needs]
        return ModelPlan(card, path, role, rows, True)
    if card.backend == "transformers":
        rows = _worst([hf_memory(card, shape, n, budget.gpu) for n in needs])
        ok = all(fits(r, budget) for r in rows)
        for r in rows:
            r.fits = fits(r, budget)
        lower = ""
        if not ok:
            smaller = [b for b in range(card.batch_size - 1, 0, -1) if all(
                fits(hf_memory(card.model_copy(update={"batch_size": b}), shape, n, budget.gpu), budget) for n in needs)]
            lower = (f"the card's batch_size to {smaller[0]}" if smaller else
                     f"the card's context ({card.context}) or [outputs] max_tokens, "
                     + ("use quantization nf4 " if card.quantization not in ("nf4", "fp4") else "")
                     + "or a smaller model (the weights alone need "
                     + f"{shape.weights_bytes / GIB:.1f} GB)")
        return ModelPlan(card, path, role, rows, ok, lower=lower)

    L = shape.n_layers
    pars = [parallel] if parallel else list(range(MAX_PARALLEL, 0, -1))
    if not budget.gpu:
        layer_opts = [0]
    elif gpu_layers is not None:
        layer_opts = [gpu_layers]
    else:
        layer_opts = [-1] + list(range(L, -1, -1))

    def at(g: int, p: int) -> list[Memory]:
        return _worst([llama_memory(card, shape, n, p, g, budget.gpu) for n in needs])

    def ok(g: int, p: int) -> bool:
        return all(fits(r, budget) for r in at(g, p))

    chosen = None
    for g in layer_opts:  # the most layers that fit at the smallest parallel, then the largest parallel
        if ok(g, pars[-1]):
            chosen = (g, next(p for p in pars if ok(g, p)))
            break
    if chosen is None:
        g, p = layer_opts[-1], pars[-1]
        rows = at(g, p)
        for r in rows:
            r.fits = fits(r, budget)
        return ModelPlan(card, path, role, rows, False, g, p, lower=too_long(card, needs) or _lower(card, cfg, role, budget))
    rows = at(*chosen)
    long = too_long(card, needs)
    for r in rows:  # a stage whose prompts cannot fit the context does not run, whatever the memory
        r.fits = not (long and r.stage == "instances")
    return ModelPlan(card, path, role, rows, not long, *chosen, lower=long)


def _worst(rows: list[Memory]) -> list[Memory]:
    """One row per stage: the type (A or B) that needs the most (the engine's cache only grows)."""
    out: dict[str, Memory] = {}
    for r in rows:
        if r.stage not in out or r.total > out[r.stage].total:
            out[r.stage] = r
    return list(out.values())


def too_long(card: ModelCard, needs: list[Need]) -> str:
    """Why a stage cannot start at this context, whatever the memory ('' when it can)."""
    for n in needs:
        if n.required > card.context:
            return (f"{card.name}: the {n.stage} stage needs about {n.required} tokens (its demonstrations + "
                    f"max_tokens + 64) but the card's context is {card.context}: fewer or fixed demonstrations, "
                    "a smaller [instances] max_tokens, or a longer context")
    return ""


def _lower(card: ModelCard, cfg: Config, role: str, budget: Budget) -> str:
    what = (["[instructions] max_tokens", "[instances] max_tokens"] if role == "generator"
            else ["[outputs] max_tokens"])
    where = "gpu_layers (more on the CPU), " if budget.gpu else ""
    return (f"{card.name} does not fit even at parallel 1{' and gpu_layers 0' if budget.gpu else ''}: "
            f"lower {where}the card's context ({card.context}) or {' / '.join(what)}, "
            "use a smaller quantization, or a machine with more memory")


def plan_config(cfg: Config, budget: Budget) -> list[ModelPlan]:
    from ..config import load_card

    out = []
    cards = [(load_card(cfg.path(cfg.generator)), "generator")] + [(load_card(cfg.path(p)), "extra") for p in cfg.extra]
    for (card, path), role in cards:
        out.append(plan_model(card, path, role, cfg, budget, shape=None if card.backend != "openai" else _no_shape()))
    return out


def _no_shape():
    return Shape(0, 1, (0,), 0, 0, 0, 0)


def has_auto(card: ModelCard) -> bool:
    return card.backend == "llama_cpp" and "auto" in (card.gpu_layers, card.parallel)


def resolve_auto(card: ModelCard, path: Path, role: str, cfg: Config | None,
                 budget: Budget | None = None) -> tuple[ModelCard, str]:
    """(the card with gpu_layers / parallel = "auto" as the numbers the plan picks, the budget it
    planned for). For a config's stages (role "generator" or "extra"); without a config, for the
    card's worst case (parallel x context, as `models check`). When nothing fits: the smallest
    settings (the run then fails with its own out-of-memory message, naming the card)."""
    if not has_auto(card):
        return card, ""
    budget = budget or probe.detect_budget()
    needs = None if cfg is not None else [Need("check", card.context, 0)]
    p = plan_model(card, path, role, cfg, budget, needs=needs,
                   gpu_layers=None if card.gpu_layers == "auto" else card.gpu_layers,
                   parallel=None if card.parallel == "auto" else card.parallel)
    gl = p.gpu_layers if budget.gpu else (-1 if card.gpu_layers == "auto" else card.gpu_layers)
    return card.model_copy(update={"gpu_layers": gl if card.gpu_layers == "auto" else card.gpu_layers,
                                   "parallel": p.parallel if card.parallel == "auto" else card.parallel}), budget.source
