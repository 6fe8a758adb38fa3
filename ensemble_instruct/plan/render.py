"""`run.py plan`'s table.
"""
from __future__ import annotations

from .fit import ModelPlan
from .probe import Budget
from .shapes import GIB


def print_plan(plans: list[ModelPlan], budget: Budget, name: str) -> None:
    """The plan as a table a person reads at a glance, then what to lower where something does not fit."""
    import sys

    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    gpu = budget.gpu
    t = Table(title=f"plan for {name}: {budget.source}", title_justify="left", box=box.SIMPLE_HEAD)
    for col, right in (("model", False), ("stage", False), ("gpu layers", True), ("parallel", True), ("kv", False),
                       ("KV cells", True), ("weights", True), ("KV", True), ("compute", True),
                       ("GPU GB" if gpu else "RAM GB", True), *((("host GB", True),) if gpu else ()), ("fits", False)):
        t.add_column(col, justify="right" if right else "left", no_wrap=True)
    f = lambda b: f"{b / GIB:.2f}"
    for mp in plans:
        for i, r in enumerate(mp.rows):
            first = i == 0
            if mp.card.backend == "openai":
                t.add_row(mp.card.name if first else "", r.stage, "-", "-", "server", "-", "-", "-", "-", "-",
                          *(("-",) if gpu else ()), "yes")
                continue
            layers = "-" if r.gpu_layers is None else ("all" if r.gpu_layers < 0 or r.gpu_layers > r.n_layers
                                                         else f"{r.gpu_layers}/{r.n_layers}")
            t.add_row(mp.card.name if first else "", r.stage, layers if gpu else "-",
                      "-" if r.parallel is None else str(r.parallel), r.kv or "-", str(r.cells or "-"),
                      f(r.part("weights")), f(r.part("kv")), f(r.part("compute")), f(r.total),
                      *((f(r.host_total),) if gpu else ()), "yes" if r.fits else "[bold red]NO[/]")
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(t)
    for mp in plans:
        if not mp.fits:
            console.print(f"[bold red]{mp.card.name} does not fit:[/] lower {escape(mp.lower)}" if not mp.lower.startswith(
                mp.card.name) else f"[bold red]does not fit:[/] {escape(mp.lower)}")
        elif mp.card.backend == "llama_cpp":
            want = (mp.gpu_layers if gpu else mp.card.gpu_layers, mp.parallel)
            have = (mp.card.gpu_layers, mp.card.parallel)
            if gpu and have[0] != "auto" and _layers_norm(have[0], mp.rows[0].n_layers) > _layers_norm(want[0], mp.rows[0].n_layers) \
                    or have[1] != "auto" and have[1] > want[1]:
                console.print(f"{mp.card.name}: the card's gpu_layers {have[0]}, parallel {have[1]} would not fit: "
                              f"set gpu_layers = {want[0]}, parallel = {want[1]} (or \"auto\")")
    console.print("GB = GiB. Rows are each stage's worst case (the longest prompts a config allows); "
                  "a llama.cpp card with gpu_layers / parallel = \"auto\" gets these numbers when a run opens.")


def _layers_norm(g, n_layers: int) -> int:
    return n_layers + 1 if g == -1 else g
