"""Command line: `python run.py COMMAND` (or `ensemble-instruct COMMAND`).

Only light modules are imported here; each command imports what it needs, so `--help` and
`ensemble` start without torch or llama.cpp.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import InterruptedWhileOpening, StopNow, StoppedAtOnce, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Generate instruction-tuning data with Ensemble-Instruct on local quantized models.")


@app.callback()
def _root() -> None:
    """Generate instruction-tuning data with Ensemble-Instruct on local quantized models."""


CONFIG = typer.Option(None, "--config", "-c", help="Pipeline preset (default: configs/default.toml, "
                      "or the run's own config when resuming).")
RUN_DIR = typer.Option(None, "--out", help="Run directory (default: runs/<config name>). An existing one is resumed.")
FORCE = typer.Option(False, "--force", help="Resume even if the config or a model card changed.")
NUM_INSTRUCTIONS = typer.Option(None, "--num-instructions", "-n",
                                help="Accepted instructions in all (split 5:2 between A and B).")
SEED = typer.Option(None, "--seed", help="Run seed (every random choice derives from it).")


def _open(config, out, force, **kw):
    from .pipeline import open_run

    if config is not None:
        from .config import find_config

        config = find_config(config)
    try:
        return open_run(config, out, force=force, **kw)
    except KeyboardInterrupt:
        raise InterruptedWhileOpening("stopped while opening the run, before any stage: nothing was "
                                      "generated, nothing is damaged") from None


@app.command()
def generate(
    config: Optional[Path] = CONFIG,
    out: Optional[Path] = RUN_DIR,
    num_instructions: Optional[int] = NUM_INSTRUCTIONS,
    seed: Optional[int] = SEED,
    force: bool = FORCE,
):
    """Run every stage; the same command on an existing run directory resumes it."""
    from . import forecast as fcast, pipeline, report

    run = _open(config, out, force, num_instructions=num_instructions, seed=seed)
    fc = fcast.attach(run)
    if fc is not None:
        print(f"forecast ({fc['created']}): {fcast.span(fc['total_seconds'])}, "
              f"{fcast.span(fc['kept'], str)} examples kept", file=sys.stderr)
    pipeline.generate(run)
    report.print_summary(run.dir)


@app.command()
def forecast(
    config: Optional[Path] = CONFIG,
    num_instructions: Optional[int] = NUM_INSTRUCTIONS,
    seed: Optional[int] = SEED,
    pilot: Optional[int] = typer.Option(None, "--pilot", help="Instructions per type in the pilot "
                                        "(default: a tenth of each type's target, at least 4)."),
    as_json: bool = typer.Option(False, "--json", help="Print the forecast as JSON."),
):
    """Predict a run's time, cost and yield from a short pilot of the same pipeline (cached in
    runs/.forecast; `generate` with the same options shows it and keeps forecast vs actual)."""
    from . import forecast as fcast

    if pilot is not None and pilot < 1:
        raise UserError(f"--pilot must be at least 1 instruction per type, not {pilot}")
    if config is not None:
        from .config import find_config

        config = find_config(config)
    try:  # with --json, stdout carries the JSON alone: the pilot's progress goes to stderr
        with contextlib.redirect_stdout(sys.stderr if as_json else sys.stdout):
            fc = fcast.run_pilot(config, num_instructions, seed, pilot, resume_command=_same_command())
    except KeyboardInterrupt:
        raise InterruptedWhileOpening("stopped outside the pilot's stages: nothing is half-written; the same "
                                      "command resumes the pilot") from None
    if as_json:
        print(fcast.as_json(fc))
    else:
        fcast.print_table(fc)


@app.command()
def instructions(config: Optional[Path] = CONFIG, out: Optional[Path] = RUN_DIR, force: bool = FORCE):
    """Stage 1 only: generate and filter instructions with the generator model."""
    from . import pipeline

    run = _open(config, out, force)
    with pipeline.stop_on_ctrl_c(run):
        pipeline.run_generator_stages(run, (pipeline.instructions.NAME,))


@app.command()
def instances(config: Optional[Path] = CONFIG, out: Optional[Path] = RUN_DIR, force: bool = FORCE):
    """Stage 2 only: generate an instance for every accepted instruction."""
    from . import pipeline

    run = _open(config, out, force)
    with pipeline.stop_on_ctrl_c(run):
        pipeline.run_generator_stages(run, (pipeline.instances.NAME,))


@app.command()
def outputs(model: str = typer.Option(..., "--model", "-m", help="Card path or name of one of the run's extra models."),
            config: Optional[Path] = CONFIG, out: Optional[Path] = RUN_DIR, force: bool = FORCE):
    """Stage 3 only: extra outputs from one model."""
    from . import pipeline

    run = _open(config, out, force)
    match = [(c, p) for c, p in run.extras if model in (c.name, str(p), p.name, p.stem) or Path(model).resolve() == p]
    if not match:
        raise UserError(f"{model}: not an extra model of this run ({', '.join(c.name for c, _ in run.extras)})")
    with pipeline.stop_on_ctrl_c(run):
        pipeline.run_outputs_stage(run, *match[0])


@app.command()
def ensemble(
    instances: Optional[Path] = typer.Argument(None, help="JSONL with instruction, input, output (the generator's), optional id."),
    outputs: Optional[List[Path]] = typer.Argument(None, help="Two or more JSONL files with output (optional id, instruction)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Where to write the kept instances (JSONL)."),
    threshold: float = typer.Option(0.01, help="Keep only if every pairwise ROUGE-L F1 is above this."),
    run_dir: Optional[Path] = typer.Option(None, "--run", help="Run the ensemble stage of this run directory instead."),
    rule: str = typer.Option("paper", "--rule", help="Selection rule: paper | weighted | weighted-f1 | "
                             "weighted-chrf | quorum (see `evaluate`)."),
    quorum: int = typer.Option(0, "--quorum", help="quorum rule: agreeing candidates needed (0 = a majority)."),
    pairs_out: Optional[Path] = typer.Option(None, "--pairs", help="Also write preference pairs (JSONL): the "
                                             "consensus output as chosen, the least agreed-with as rejected "
                                             "([ensemble.pairs] defaults; a run writes RUN/pairs.jsonl)."),
):
    """Keep only the instances whose candidate outputs agree (CPU only, no model)."""
    from . import ensemble as ens
    from .rules import RULES, select
    from .store import read_jsonl, write_jsonl

    if run_dir is not None and pairs_out is not None:
        raise UserError("--pairs is for INSTANCES OUTPUTS...; ensemble --run writes the run's pairs.jsonl itself")
    if run_dir is not None:
        from . import report
        from .rundir import open_existing
        from .stages import ensemble as stage

        stage.run_stage(open_existing(run_dir, lock_it=True))  # needs no model: only the stage files
        report.print_summary(run_dir)
        return
    if instances is None or out is None:
        raise UserError("give INSTANCES OUTPUTS... -o OUT, or --run RUN_DIR")
    outputs = outputs or []
    if len(outputs) < 2:
        raise UserError(f"ensemble{' --pairs' if pairs_out else ''} needs at least 2 OUTPUTS files "
                        f"(3 candidates per instance), got {len(outputs)}")
    if not 0 <= threshold < 1:
        raise UserError(f"--threshold must be in [0, 1), got {threshold}")
    if rule not in RULES:
        raise UserError(f"--rule {rule}: unknown rule (one of {', '.join(RULES)})")
    for p in [instances, *outputs]:
        if not p.is_file():
            raise UserError(f"{p}: file not found")
    names = [str(p) for p in [instances, *outputs]]
    inst = read_jsonl(instances, "user")  # the user's own files: a last line without newline is data
    cands = ens.align(inst, [read_jsonl(p, "user") for p in outputs], names)
    decisions = select(cands, rule, threshold, quorum)
    sources = ["generator"] + [p.stem for p in outputs]
    write_jsonl(out, (ens.decision_record(i, d, sources) for i, d in zip(inst, decisions) if d.kept))
    if pairs_out is not None:
        from .pairs import pick_pairs

        picked = pick_pairs([(i["instruction"], i.get("input", ""), list(zip(sources, c))) for i, c in zip(inst, cands)])
        # id: as in OUT; an instance without one is named by its line in INSTANCES
        write_jsonl(pairs_out, (ens.pair_record({"id": n, **i}, p) for n, (i, p) in enumerate(zip(inst, picked), 1)
                                if p is not None))
        typer.echo(f"{sum(p is not None for p in picked)} preference pairs -> {pairs_out}")
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d.rule] = counts.get(d.rule, 0) + 1
    kept = sum(d.kept for d in decisions)
    typer.echo(f"kept {kept} of {len(decisions)}, dropped {len(decisions) - kept} "
               f"(exact match: {counts.get('exact', 0)}, {'rouge-l' if rule == 'paper' else rule}: "
               f"{counts.get('rouge' if rule == 'paper' else rule, 0)}, "
               f"below threshold: {counts.get('below_threshold', 0)}) -> {out}")


def _same_command() -> str:
    """The command being run, as the user can type it again (what resumes an evaluation)."""
    import shlex

    return "python run.py " + shlex.join(sys.argv[1:])


@app.command()
def evaluate(
    tasks: Optional[str] = typer.Option(None, "--tasks", help="JSONL with instruction, input, gold output, optional "
                                        "id; or user-oriented (Self-Instruct's 252, bundled) or superni (see "
                                        "scripts/superni_sample.py). Default: the 175 seed tasks."),
    models: Optional[List[str]] = typer.Option(None, "--models", help="Cards to answer the tasks: --models CARD "
                                               "[CARD ...] (e.g. a base and its fine-tuned card.toml)."),
    outputs: Optional[List[Path]] = typer.Option(None, "--outputs", help="Precomputed answers: --outputs F1 F2 F3 ... "
                                                 "(JSONL with output, optional id), instead of running the models."),
    more: Optional[List[Path]] = typer.Argument(None, hidden=True, metavar="MORE"),  # --outputs F1 F2 F3, --models A B
    config: Optional[Path] = CONFIG,
    out: Optional[Path] = typer.Option(None, "--out", help="Evaluation directory (default: runs/evaluate-<config>, "
                                       "or runs/evaluate with --outputs). Model answers there are resumed."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N tasks."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Keep threshold (default: the config's ensemble threshold, 0.01)."),
    force: bool = FORCE,
):
    """Measure the ensemble on tasks with gold answers: each model, each selection rule, a threshold sweep."""
    from . import evaluate as ev
    from . import tasksets
    from .config import ROOT, Config, load_config

    if outputs and models:
        raise UserError("give --outputs (answers made elsewhere) or --models (cards to run), not both")
    files = [*(outputs or []), *(more or [])] if not models else []
    cards = [*models, *map(str, more or [])] if models else []
    if more and not (outputs or models):
        raise UserError("unexpected arguments: answer files go after --outputs, cards after --models")
    if tasks is not None and tasks not in tasksets.NAMES and not Path(tasks).is_file():
        raise UserError(f"{tasks}: file not found (or a task set: {', '.join(tasksets.NAMES)})")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if threshold is not None and not 0 <= threshold < 1:  # before any model is loaded
        raise UserError(f"--threshold must be in [0, 1), got {threshold}")
    all_tasks, tasks_name = tasksets.load(tasks) if tasks in tasksets.NAMES else \
        ev.load_tasks(Path(tasks) if tasks else None)
    task_list = all_tasks[:limit] if limit else all_tasks
    if cards:  # any number of models, e.g. a base and its fine-tuned versions
        if config is not None and not config.is_file():
            raise UserError(f"{config}: config file not found")
        cfg = load_config(config) if config else Config(generator="-", extra=["-", "-"])
        out = out or ROOT / "runs" / "evaluate-models"
        run, pairs = ev.open_models(out, cfg, cards)
        run.resume_command = _same_command()
        names, cands = ev.answer_with_models(run, all_tasks, tasks_name, force, limit, models=pairs)
    elif files:
        if config is not None and not config.is_file():
            raise UserError(f"{config}: config file not found")
        cfg = load_config(config) if config else Config(generator="-", extra=["-", "-"])
        names, cands = ev.read_outputs(task_list, files, tasks_name, limited=limit is not None)
        out = out or ROOT / "runs" / "evaluate"
    else:
        out = out or ROOT / "runs" / f"evaluate-{config.stem if config else 'default'}"
        run = _open(config, out, force)
        run.resume_command = _same_command()  # an evaluation directory: `generate` would not resume it
        cfg = run.cfg
        names, cands = ev.answer_with_models(run, all_tasks, tasks_name, force, limit)
    threshold = cfg.ensemble.threshold if threshold is None else threshold
    ev.run_evaluation(out, task_list, tasks_name, names, cands, threshold, cfg.ensemble.quorum, cfg.ensemble.rule)
    typer.echo(f"report: {out / 'report.md'}, {out / 'report.html'}")


@app.command()
def finetune(
    run_dir: Path = typer.Argument(..., help="A finished run directory (its dataset.jsonl is the training data; "
                                   "its pairs.jsonl for --method dpo)."),
    base: str = typer.Option(..., "--base", help="Card of the model to tune (transformers, or a GGUF card)."),
    out: Path = typer.Option(..., "--out", help="Folder for the adapter, merged weights, card.toml, logs. "
                             "An unfinished one is resumed."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A config with a [finetune] section "
                                          "(default: the section's defaults, for a 24 GB GPU; CPU: -c finetune-cpu)."),
    method: str = typer.Option("sft", "--method", help="sft: LoRA on the kept examples | dpo: DPO (TRL) with "
                               "LoRA on the run's preference pairs ([finetune.dpo] settings)."),
    sft: Optional[Path] = typer.Option(None, "--sft", help="With --method dpo: the --out folder of a finished SFT "
                                       "finetune of the same run and base; DPO starts from its merged model."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Adapter initialisation and data order."),
):
    """LoRA (QLoRA on a CUDA GPU) on a run's kept examples, or DPO on its preference pairs; writes
    OUT/card.toml for the tuned model."""
    from .config import Config, find_config, load_config

    if method not in ("sft", "dpo"):
        raise UserError(f"unknown --method {method!r} (sft or dpo)")
    if sft is not None and method != "dpo":
        raise UserError("--sft goes with --method dpo (DPO on top of that SFT fine-tune)")
    cfg = load_config(find_config(config)) if config is not None else Config(generator="-", extra=["-", "-"])
    if method == "dpo":
        from .dpo import dpo

        card = dpo(run_dir, base, out, cfg.finetune, cfg.path(cfg.templates_dir), sft, max_steps, seed)
    else:
        from .finetune import finetune as train

        card = train(run_dir, base, out, cfg.finetune, cfg.path(cfg.templates_dir), max_steps, seed)
    typer.echo(f"tuned model: {card} (python run.py evaluate --models {base} {card} --tasks user-oriented)")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory."),
           sample: int = typer.Option(5, help="Kept and dropped examples to show.")):
    """Write RUN_DIR/report/: report.md, a self-contained report.html, and PNG plots."""
    from . import report as rep

    out = rep.build_report(run_dir, sample)
    rep.print_summary(run_dir)
    typer.echo(f"report: {out / 'report.md'}, {out / 'report.html'}")


@app.command()
def export(run_dir: Path = typer.Argument(..., help="A finished run directory."),
           format: str = typer.Option("alpaca", "--format", "-f", help="alpaca | jsonl (chat messages) | sharegpt | hf | "
                                "dpo (preference pairs, TRL's format) | dpo-chat (the same as chat messages)"),
           out: Path = typer.Option(..., "-o", "--out", help="Output file (a folder for hf).")):
    """Export the kept examples (or, as dpo, the preference pairs) for fine-tuning."""
    from .export import export as do_export

    n = do_export(run_dir, format, out)
    typer.echo(f"exported {n} examples as {format} -> {out}")


models_app = typer.Typer(help="Model cards in quantized/.", invoke_without_command=True)
app.add_typer(models_app, name="models")


@models_app.callback()
def models(ctx: typer.Context):
    """List the model cards: backend, quantization, computed memory (python run.py plan: per stage)."""
    if ctx.invoked_subcommand is not None:
        return
    from .config import ROOT, load_card
    from .plan import GIB, check_memory

    rows = [("card", "backend", "quantization", "memory GB", "license", "source")]
    for path in sorted((ROOT / "quantized").glob("*.toml")):
        card, _ = load_card(path)
        s = card.source
        src = (s.path or (f"package {s.package}" + (f"/{s.file}" if s.file else " (assembled)")) if s.package
               else f"hub {s.hub_repo}" + (f"/{s.hub_file}" if s.hub_file else "")) if s else "server " + ", ".join(card.endpoints)
        rows.append((path.stem, card.backend, card.quantization, _memory_figure(card, path, check_memory, GIB),
                     card.license, src))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:  # plain columns: readable in a terminal and in a pipe
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
    typer.echo("memory GB: weights + KV cache + compute + process, all devices, at the card's parallel x context "
               "(its worst case; a stage needs less: python run.py plan)")


def _memory_figure(card, path, check_memory, gib) -> str:
    if card.backend == "openai":
        return "server"
    try:
        m = check_memory(card, path)
    except UserError:
        return "?"  # no [shape] and no local file
    return f"{(m.host_total + sum(m.gpu.values())) / gib:.2f}"


@app.command()
def plan(config: Optional[Path] = CONFIG,
         vram: Optional[float] = typer.Option(None, "--vram", help="GPU memory to plan for, GB (default: the free "
                                              "memory of the GPU NVML finds; none: the CPU)."),
         ram: Optional[float] = typer.Option(None, "--ram", help="Host memory to plan for, GB (default on the CPU: "
                                             "the available RAM)."),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")):
    """Memory per model and stage of a config, and the gpu_layers and parallel that fit."""
    from . import plan as P
    from .config import ROOT, find_config, load_config

    for name, v in (("--vram", vram), ("--ram", ram)):
        if v is not None and v <= 0:
            raise UserError(f"{name} must be a positive number of GB, got {v:g}")
    cfg = load_config(find_config(config) if config is not None else ROOT / "configs" / "default.toml")
    budget = P.probe.detect_budget(vram, ram)
    plans = P.plan_config(cfg, budget)
    if as_json:
        import json

        typer.echo(json.dumps({"models": [r.row() for mp in plans for r in mp.rows]}))
        return
    P.print_plan(plans, budget, config.stem if config is not None else "default")


@models_app.command("check")
def models_check(card: str = typer.Argument(..., help="Card path or name (e.g. smollm2-135m)."),
                 parallel: Optional[int] = typer.Option(None, "--parallel", help="llama.cpp: sequences decoded "
                                                        "together (default: the card's)."),
                 context: Optional[int] = typer.Option(None, "--context", help="Cells per sequence (default: the "
                                                       "card's context)."),
                 as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Load a model, hold the card's worst-case KV cache (parallel x context), generate, and report
    load time, tokens/s, peak memory and the planned figure next to it."""
    import time

    from . import settings
    from .backends import Decoding, load_backend, oom_as_error
    from .config import load_card
    from .plan import GIB, check_memory
    from .runner import peak_rss_mb, peak_rss_reset

    c, path = load_card(card)
    if parallel is not None and parallel < 1 or context is not None and context < 64:
        raise UserError("--parallel must be at least 1 and --context at least 64")
    if parallel is not None and c.backend != "llama_cpp":
        raise UserError(f"{path}: --parallel is a llama.cpp setting ({c.backend} card)")
    upd = {"context": context} if context else {}
    if parallel:
        upd["parallel"] = parallel
    # "auto" as everywhere else (settings.resolve), here for the card's worst case; nothing to record
    [(c, _)], _ = settings.resolve([(c.model_copy(update=upd), path)], [c.name], ["check"], None, {})
    n = c.parallel if c.backend == "llama_cpp" else 1
    peak_rss_reset()
    t0 = time.perf_counter()
    with oom_as_error(c, path, "loading"):
        backend = load_backend(c, path)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        with oom_as_error(c, path, "generating with"):
            backend.reserve(c.context)  # the card's worst case: parallel x context cells
            outs = backend.generate(["Once upon a time, in a small village by the sea,"] * n, Decoding(max_tokens=32),
                                    list(range(n)))
        gen_s = time.perf_counter() - t0
        on_gpu = _offloads(backend)
    finally:
        backend.close()
    peak = peak_rss_mb()
    tokens = sum(o.completion_tokens for o in outs)
    m = check_memory(c, path, on_gpu=on_gpu)
    planned = m.host_total / GIB if m is not None else None
    result = {"card": c.name, "backend": c.backend, "parallel": n, "context": c.context, "load_s": round(load_s, 2),
              "tokens": tokens, "tok_s": round(tokens / gen_s, 1) if gen_s > 0 else 0.0,
              "peak_rss_mb": round(peak, 1), "planned_gb": round(planned, 3) if planned is not None else None,
              "planned_gpu_gb": round(sum(m.gpu.values()) / GIB, 3) if m is not None and m.gpu else None,
              "text": outs[0].text}
    if as_json:
        import json

        typer.echo(json.dumps(result))
        return
    ratio = f", {planned * 1024 / peak:.2f} x the peak" if planned and peak else ""
    typer.echo(f"{c.name}: loaded in {load_s:.1f} s, {tokens} tokens in {gen_s:.1f} s "
               f"({result['tok_s']} tok/s, {n} parallel), peak RSS {peak:.0f} MB; planned "
               f"{planned * 1024:.0f} MB{ratio}" if planned is not None else
               f"{c.name}: loaded in {load_s:.1f} s, {tokens} tokens in {gen_s:.1f} s, peak RSS {peak:.0f} MB")
    typer.echo(f"  -> {outs[0].text.strip()[:200]!r}")


def _offloads(backend) -> bool:
    """Whether a llama.cpp backend put layers on a GPU (a CPU-only build ignores gpu_layers)."""
    L = getattr(backend, "L", None)
    return bool(L is not None and L.llama_supports_gpu_offload() and backend.card.gpu_layers != 0)


@models_app.command("export-hf")
def models_export_hf(card: str = typer.Argument(..., help="Card of a GGUF model (e.g. smollm2-135m)."),
                     out: Path = typer.Argument(..., help="Folder to write (a Hugging Face checkpoint).")):
    """Write a GGUF card's model as a Hugging Face folder (dequantized, float32) that vLLM can serve."""
    from .backends import check_installed
    from .backends.hf import export_hf
    from . import weights
    from .config import load_card

    c, path = load_card(card)
    gguf = weights.resolve(c, path)
    if gguf.suffix != ".gguf":
        raise UserError(f"{path}: export-hf converts GGUF cards; {gguf} is not a .gguf file")
    check_installed(c.model_copy(update={"backend": "transformers"}), path)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty")
    export_hf(gguf, out)
    typer.echo(f"{c.name}: wrote {out} (serve it with: python -m vllm.entrypoints.openai.api_server --model {out})")


def main() -> None:
    """Every error the user can act on is one line and an exit code of its own (errors.py)."""
    try:
        app()
    except StopNow as e:
        _exit(StoppedAtOnce(str(e) or "stopped at once"))
    except UserError as e:
        _exit(e)


def _exit(e: UserError) -> None:
    typer.echo(f"{e.label}: {e}", err=True)
    sys.exit(e.exit_code)
