"""The whole run: the generator loaded once for instructions + instances, then each extra model in
turn (never two models in memory at once), then the ensemble on the CPU."""
from __future__ import annotations

import time
from pathlib import Path

from .config import ModelCard
from .errors import UserError
from .rundir import TYPES, Run, open_run  # noqa: F401  (open_run: the CLI's entry point)
from .runner import loaded, stop_on_ctrl_c
from .stages import ensemble, instances, instructions, outputs


GENERATOR_STAGES = {s.NAME: s for s in (instructions, instances)}  # in the order they run


def run_generator_stages(run: Run, names=tuple(GENERATOR_STAGES)) -> None:
    """The generator's stages among `names` (stage names), in data-flow order, each type in turn."""
    stages = [s for name, s in GENERATOR_STAGES.items() if name in names]
    if instructions not in stages and any(instructions.pending(run, t) for t in TYPES):
        raise UserError(f"{run.dir}: instruction generation is not finished: run the instructions stage first")
    todo = [(s, t) for s in stages for t in TYPES if s.pending(run, t)]
    if not todo:
        return
    with loaded(run, *run.generator) as backend:  # loaded once for both stages
        if instances in stages:
            instances.check_fits(run, backend)
        for stage, t in todo:
            stage.run_stage(run, backend, t)


def run_outputs_stage(run: Run, card: ModelCard, path: Path) -> None:
    if any(instances.pending(run, t) for t in TYPES):
        raise UserError(f"{run.dir}: instance generation is not finished: run the instances stage first")
    todo = [t for t in TYPES if outputs.pending(run, card, t)]
    if not todo:
        return
    with loaded(run, card, path) as backend:
        for t in todo:
            outputs.run_stage(run, backend, t)


def generate(run: Run) -> None:
    t0 = time.perf_counter()
    try:
        with stop_on_ctrl_c(run):
            run_generator_stages(run)
            for card, path in run.extras:  # one model at a time, never two
                run_outputs_stage(run, card, path)
            ensemble.run_stage(run)
    finally:  # every session's time, what a forecast's total predicts
        run.manifest["wall_seconds"] = round(run.manifest.get("wall_seconds", 0.0) + time.perf_counter() - t0, 2)
        run.save_manifest()
