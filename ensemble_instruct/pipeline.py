"""The pipeline: instructions -> instances -> extra outputs -> ensemble, through files.

Run directory:
    manifest.json                    config, hashes, versions, counts, timings (the only non-deterministic file)
    instructions_{A,B}.jsonl         one record per request: completion and every item with its fate
    instances_{A,B}.jsonl            one record per accepted instruction: parsed input/output or drop reason
    outputs_{MODEL}_{A,B}.jsonl      one record per usable instance, per extra model
    ensemble_{A,B}.jsonl             the decision for every instance
    dataset.jsonl                    the kept instances (A, then B)

Every random choice comes from (run seed, stage, type, index), requests go in batches with fixed
boundaries, and each batch is appended with one write, so a killed run resumes where it stopped
and produces the same bytes as one that was never stopped. One model is in memory at a time.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import random
import resource
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import templates
from .backends import Backend, Completion, Decoding, PromptTooLong, check_installed, load_backend, preflight
from .config import ROOT, Config, ModelCard, check_weights, file_hash, load_card, load_config
from .ensemble import decision_record, ensemble
from .errors import Interrupted, UserError
from .filters import process_completion
from .novelty import Pool, novelty_scores
from .parsing import parse_instance
from .seeds import SeedTask, load_seeds, split_types
from .store import append_jsonl, read_jsonl, write_json, write_jsonl

TYPES = ("A", "B")
PACKAGES = ("ensemble-instruct", "rapidfuzz", "numpy", "nltk", "llama_cpp_python", "torch", "transformers",
            "bitsandbytes", "accelerate")


# ---------------------------------------------------------------- determinism

def rng_for(seed: int, stage: str, typ: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{stage}/{typ}/{index}")  # str seeds hash with sha512: stable


def seed_for(seed: int, stage: str, typ: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/{typ}/{index}/sampling".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ---------------------------------------------------------------- the run

@dataclass
class Run:
    dir: Path
    cfg: Config
    generator: tuple[ModelCard, Path]
    extras: list[tuple[ModelCard, Path]]
    seeds: dict[str, list[SeedTask]]
    manifest: dict
    stop_requested: bool = False

    def file(self, name: str) -> Path:
        return self.dir / name

    def save_manifest(self) -> None:
        write_json(self.file("manifest.json"), self.manifest)


def _fingerprint(cfg: Config, cards: list[tuple[ModelCard, Path]]) -> dict:
    tdir = cfg.path(cfg.templates_dir)
    return {
        "config": cfg.model_dump(mode="json"),
        "cards": {c.name: file_hash(p) for c, p in cards},
        "templates": {p.name: file_hash(p) for p in sorted(tdir.glob("*.txt"))},
        "seeds_file": file_hash(cfg.path(cfg.seeds_file)),
    }


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} ({old!r} -> {new!r})"]


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def open_run(config: Path | None, out: Path | None, num_instructions: int | None = None,
             seed: int | None = None, force: bool = False) -> Run:
    """Load (or create) a run directory. An existing run keeps its config unless one is given;
    a config or card that differs from the one the run started with is refused unless force."""
    existing = None
    if out is not None and (out / "manifest.json").exists():
        try:
            existing = json.loads((out / "manifest.json").read_text())
        except ValueError:
            existing = None
        if not isinstance(existing, dict) or not isinstance(existing.get("fingerprint"), dict):
            raise UserError(f"{out / 'manifest.json'}: not valid JSON or not a run manifest") from None
    if config is None and existing is not None:
        cfg = Config(**existing["fingerprint"]["config"])
    else:
        config = config or ROOT / "configs" / "default.toml"
        cfg = load_config(config)
    if seed is not None or num_instructions is not None:
        data = cfg.model_dump()
        if seed is not None:
            data["seed"] = seed
        if num_instructions is not None:
            if num_instructions < 2:
                raise UserError("--num-instructions must be at least 2 (one per type)")
            a = max(1, min(num_instructions - 1, round(num_instructions * 125 / 175)))
            data["instructions"]["target"] = {"A": a, "B": num_instructions - a}
        cfg = Config(**data)
    generator = load_card(cfg.path(cfg.generator))
    extras = [load_card(cfg.path(p)) for p in cfg.extra]
    names = [c.name for c, _ in [generator, *extras]]
    if len(set(names[1:])) != len(names) - 1:
        raise UserError("each extra model must be a different card (names repeat)")
    for card, path in [generator, *extras]:  # fail before any stage, not hours into the run
        check_installed(card, path)
        check_weights(card, path)
        preflight(card, path)
    seeds = split_types(load_seeds(cfg.path(cfg.seeds_file)))
    out = out or ROOT / "runs" / (Path(config).stem if config else "run")
    fp = _fingerprint(cfg, [generator, *extras])
    if existing is not None:
        changes = _diff(existing.get("fingerprint"), fp)
        if changes and not force:
            raise UserError(f"{out} was started with a different setup: {'; '.join(changes[:3])}"
                            f"{' ...' if len(changes) > 3 else ''} (use a new --out, or --force)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{out}: run directory is not writable ({e.strerror})") from None
    manifest = existing or {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings": {}, "events": []}
    manifest.update(fingerprint=fp, seed=cfg.seed, versions=_versions())
    run = Run(out, cfg, generator, extras, seeds, manifest)
    run.save_manifest()
    return run


# ---------------------------------------------------------------- helpers

def _peak_rss_reset() -> None:
    try:  # Linux: writing 5 resets the peak-RSS counter (VmHWM) for this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def loaded(run: Run, card: ModelCard, path: Path):
    """Load one model, record load/free events and its peak memory, free it whatever happens."""
    _peak_rss_reset()
    t0 = time.perf_counter()
    run.manifest["events"].append({"event": "load", "model": card.name, "time": time.time()})
    backend = load_backend(card, path)
    load_s = time.perf_counter() - t0
    try:
        yield backend
    finally:
        backend.close()
        run.manifest["events"].append({"event": "free", "model": card.name, "time": time.time(),
                                       "load_s": round(load_s, 2), "peak_rss_mb": round(_peak_rss_mb(), 1)})
        run.save_manifest()


class Meter:
    """Time and tokens of one stage in this session, added to the manifest's totals."""

    def __init__(self, run: Run, key: str, model: str):
        self.run, self.key, self.model = run, key, model
        self.t0, self.prompt, self.gen = time.perf_counter(), 0, 0

    def add(self, completions) -> None:
        for c in completions:
            self.prompt += c.prompt_tokens
            self.gen += c.completion_tokens

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc) -> None:  # also when stopped or failed: the time was spent
        self.done()

    def done(self) -> None:
        t = self.run.manifest["timings"].setdefault(self.key, {"model": self.model, "seconds": 0.0,
                                                                "prompt_tokens": 0, "completion_tokens": 0})
        t["seconds"] = round(t["seconds"] + time.perf_counter() - self.t0, 2)
        t["prompt_tokens"] += self.prompt
        t["completion_tokens"] += self.gen
        t["tokens_per_s"] = round(t["completion_tokens"] / t["seconds"], 2) if t["seconds"] else 0.0
        t["peak_rss_mb"] = round(max(t.get("peak_rss_mb", 0), _peak_rss_mb()), 1)
        self.run.save_manifest()


@contextmanager
def progress_bar(description: str, total: int, done: int = 0):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[rate]}"),
                  transient=False) as p:
        task = p.add_task(description, total=total, completed=done, rate="")
        start, tokens = time.perf_counter(), 0

        def advance(n: int, completions=()) -> None:
            nonlocal tokens
            tokens += sum(c.completion_tokens for c in completions)
            elapsed = time.perf_counter() - start
            p.update(task, advance=n, rate=f"{tokens / elapsed:.1f} tok/s" if elapsed > 0 and tokens else "")
        yield advance


def _check_stop(run: Run, where: str) -> None:
    if run.stop_requested:
        raise Interrupted(f"stopped during {where}; everything finished so far is on disk in {run.dir}. "
                          f"Resume with: python run.py generate --out {run.dir}")


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield i // size, items[i:i + size]


# ---------------------------------------------------------------- stage 1: instructions

def instruction_records(run: Run, typ: str) -> list[dict]:
    path = run.file(f"instructions_{typ}.jsonl")
    recs = read_jsonl(path, repair=True)
    for n, r in enumerate(recs):
        if r.get("request") != n:
            raise UserError(f"{path}:{n + 1}: expected request {n}, found {r.get('request')!r} (file edited by hand?)")
    return recs


def accepted_instructions(records: list[dict]) -> list[dict]:
    return [item for r in records for item in r["items"] if item["status"] == "accepted"]


def _instructions_pending(run: Run, typ: str) -> bool:
    recs = instruction_records(run, typ)
    c = run.cfg.instructions
    return len(accepted_instructions(recs)) < getattr(c.target, typ) and len(recs) < getattr(c.target, typ) * c.max_requests_factor


def stage_instructions(run: Run, backend: Backend, typ: str) -> None:
    c = run.cfg.instructions
    target, max_requests = getattr(c.target, typ), getattr(c.target, typ) * c.max_requests_factor
    path = run.file(f"instructions_{typ}.jsonl")
    records = instruction_records(run, typ)
    pool = [item["text"] for item in accepted_instructions(records)]
    seed_texts = [t.instruction for t in run.seeds[typ]]
    novelty_pool = Pool(seed_texts + pool)  # tokenized once, grows with each accepted item
    template = templates.load(f"instructions_{typ}.txt", run.cfg.path(run.cfg.templates_dir))
    params = Decoding(c.max_tokens, c.temperature, c.top_k, c.top_p, (templates.EOS,))
    with Meter(run, f"instructions_{typ}", backend.card.name) as meter, \
            progress_bar(f"instructions {typ}", target, min(len(pool), target)) as advance:
        while len(pool) < target and len(records) < max_requests:
            _check_stop(run, f"instruction generation ({typ})")
            first = len(records)
            indices = range(first, min(first + backend.batch_size, max_requests))
            prompts, seeds = [], []
            for i in indices:  # every prompt of a batch sees the pool as it was at the batch start
                rng = rng_for(run.cfg.seed, "instructions", typ, i)
                shown = rng.sample(seed_texts, min(getattr(c.seeds_per_prompt, typ), len(seed_texts)))
                shown += rng.sample(pool, min(getattr(c.machine_per_prompt, typ), len(pool)))
                rng.shuffle(shown)
                prompts.append(templates.instruction_prompt(template, shown))
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
                batch.append({"id": f"{typ}-request-{i:05d}", "type": typ, "request": i, "seed": s,
                              "completion": comp.text, "items": items})
            append_jsonl(path, batch)
            records.extend(batch)
            advance(len(pool) - before, completions)


# ---------------------------------------------------------------- stage 2: instances

def _resume_batch(path: Path, batch: list[dict], done: set[str]) -> None:
    """Append the records of a batch that are not on disk yet (a torn batch keeps its head)."""
    append_jsonl(path, [r for r in batch if r["id"] not in done])


def _instances_todo(run: Run, typ: str) -> tuple[list[dict], set[str]]:
    todo = accepted_instructions(instruction_records(run, typ))
    done = {r["id"] for r in read_jsonl(run.file(f"instances_{typ}.jsonl"), repair=True)}
    return todo, done


def _fit_demos(backend: Backend, template: str, demos: list[SeedTask], instruction: str, with_input: bool,
               max_tokens: int) -> tuple[str, list[SeedTask]]:
    """Drop demonstrations from the end until prompt + generation fit the context."""
    while True:
        prompt = templates.instance_prompt(template, demos, instruction, with_input)
        if not demos or backend.count_tokens(prompt) + max_tokens <= backend.card.context:
            return prompt, demos
        demos = demos[:-1]


def stage_instances(run: Run, backend: Backend, typ: str) -> None:
    c = run.cfg.instances
    path = run.file(f"instances_{typ}.jsonl")
    todo, done = _instances_todo(run, typ)
    template = templates.load(f"instances_{typ}.txt", run.cfg.path(run.cfg.templates_dir))
    params = Decoding(c.max_tokens, c.temperature, c.top_k, c.top_p, (templates.EOS,))
    with_input = typ == "A"
    with Meter(run, f"instances_{typ}", backend.card.name) as meter, \
            progress_bar(f"instances {typ}", len(todo), len(done)) as advance:
        for b, batch in _batches(todo, backend.batch_size):
            if all(it["id"] in done for it in batch):
                continue
            _check_stop(run, f"instance generation ({typ})")
            prompts, seeds, demo_ids = [], [], []
            for k, it in enumerate(batch):
                index = b * backend.batch_size + k
                rng = rng_for(run.cfg.seed, "instances", typ, index)
                demos = rng.sample(run.seeds[typ], min(getattr(c.demos, typ), len(run.seeds[typ])))
                prompt, demos = _fit_demos(backend, template, demos, it["text"], with_input, c.max_tokens)
                prompts.append(prompt)
                seeds.append(seed_for(run.cfg.seed, "instances", typ, index))
                demo_ids.append([d.id for d in demos])
            completions = backend.generate(prompts, params, seeds)
            meter.add(completions)
            records = []
            for it, s, demos, comp in zip(batch, seeds, demo_ids, completions):
                p = parse_instance(comp.text, with_input)
                records.append({"id": it["id"], "type": typ, "instruction": it["text"], "input": p.input,
                                "output": p.output, "reason": p.reason, "seed": s, "demos": demos,
                                "completion": comp.text})
            _resume_batch(path, records, done)
            advance(sum(r["id"] not in done for r in records), completions)


# ---------------------------------------------------------------- stage 3: extra outputs

def usable_instances(run: Run, typ: str) -> list[dict]:
    return [r for r in read_jsonl(run.file(f"instances_{typ}.jsonl"), repair=True) if r["reason"] is None]


def outputs_path(run: Run, card: ModelCard, typ: str) -> Path:
    return run.file(f"outputs_{card.name}_{typ}.jsonl")


def _outputs_todo(run: Run, card: ModelCard, typ: str) -> tuple[list[dict], set[str]]:
    return usable_instances(run, typ), {r["id"] for r in read_jsonl(outputs_path(run, card, typ), repair=True)}


def stage_outputs(run: Run, backend: Backend, typ: str) -> None:
    card = backend.card
    path = outputs_path(run, card, typ)
    todo, done = _outputs_todo(run, card, typ)
    template = templates.load("output.txt", run.cfg.path(run.cfg.templates_dir))
    params = Decoding(run.cfg.outputs.max_tokens)  # zero-shot, greedy
    with Meter(run, f"outputs_{card.name}_{typ}", card.name) as meter, \
            progress_bar(f"outputs {card.name} {typ}", len(todo), len(done)) as advance:
        for b, batch in _batches(todo, backend.batch_size):
            if all(it["id"] in done for it in batch):
                continue
            _check_stop(run, f"extra outputs ({card.name}, {typ})")
            prompts = [templates.output_prompt(template, it["instruction"], it["input"]) for it in batch]
            seeds = [seed_for(run.cfg.seed, f"outputs/{card.name}", typ, b * backend.batch_size + k)
                     for k in range(len(batch))]
            try:
                completions = backend.generate(prompts, params, seeds)
                errors = [None] * len(batch)
            except PromptTooLong:  # one at a time, so only the long prompt loses its output
                completions, errors = [], []
                for p, s in zip(prompts, seeds):
                    try:
                        completions += backend.generate([p], params, [s])
                        errors.append(None)
                    except PromptTooLong:
                        completions.append(Completion("", 0, 0))
                        errors.append("prompt_too_long")
            meter.add(completions)
            records = [{"id": it["id"], "output": comp.text.strip(), **({"error": e} if e else {})}
                       for it, comp, e in zip(batch, completions, errors)]
            _resume_batch(path, records, done)
            advance(sum(r["id"] not in done for r in records), completions)


# ---------------------------------------------------------------- stage 4: ensemble

def stage_ensemble(run: Run) -> None:
    """Decide every usable instance (rewritten whole each time: it is fast and needs no resume)."""
    kept_all = []
    names = [c.name for c, _ in run.extras]
    for typ in TYPES:
        instances = usable_instances(run, typ)
        columns = []
        for card, _ in run.extras:
            table = {r["id"]: r["output"] for r in read_jsonl(outputs_path(run, card, typ))}
            missing = [it["id"] for it in instances if it["id"] not in table]
            if missing:
                raise UserError(f"{outputs_path(run, card, typ)}: no output for {missing[0]} "
                                f"({len(missing)} missing): run the outputs stage first")
            columns.append([table[it["id"]] for it in instances])
        cands = [[it["output"], *(col[k] for col in columns)] for k, it in enumerate(instances)]
        decisions = ensemble(cands, run.cfg.ensemble.threshold) if cands else []
        sources = [run.generator[0].name, *names]
        records = [decision_record(it, d, sources) for it, d in zip(instances, decisions)]
        for r, d in zip(records, decisions):
            r["kept"] = d.kept
        write_jsonl(run.file(f"ensemble_{typ}.jsonl"), records)
        kept_all += [{k: v for k, v in r.items() if k != "kept"} for r in records if r["kept"]]
    write_jsonl(run.file("dataset.jsonl"), kept_all)
    run.manifest["dataset_size"] = len(kept_all)
    run.save_manifest()


# ---------------------------------------------------------------- all stages

@contextmanager
def stop_on_ctrl_c(run: Run):
    """First Ctrl-C: finish the current request or batch, then stop. Second: stop at once."""
    def handler(signum, frame):
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True
        print("\nstopping after the current batch (Ctrl-C again to stop at once)...", file=sys.stderr)
    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _missing(todo_done: tuple[list[dict], set[str]]) -> bool:
    todo, done = todo_done
    return any(it["id"] not in done for it in todo)


def run_generator_stages(run: Run, stages=("instructions", "instances")) -> None:
    if "instructions" not in stages and any(_instructions_pending(run, t) for t in TYPES):
        raise UserError(f"{run.dir}: instruction generation is not finished: run the instructions stage first")

    def pending(stage: str, typ: str) -> bool:
        if stage == "instructions":
            return _instructions_pending(run, typ)
        return _instructions_pending(run, typ) or _missing(_instances_todo(run, typ))

    if not any(pending(s, t) for s in stages for t in TYPES):
        return
    with loaded(run, *run.generator) as backend:  # loaded once for both stages
        for s in stages:
            for t in TYPES:
                if pending(s, t):
                    (stage_instructions if s == "instructions" else stage_instances)(run, backend, t)


def run_outputs_stage(run: Run, card: ModelCard, path: Path) -> None:
    if any(_missing(_instances_todo(run, t)) for t in TYPES):
        raise UserError(f"{run.dir}: instance generation is not finished: run the instances stage first")
    pending = [t for t in TYPES if _missing(_outputs_todo(run, card, t))]
    if not pending:
        return
    with loaded(run, card, path) as backend:
        for t in pending:
            stage_outputs(run, backend, t)


def generate(run: Run) -> None:
    with stop_on_ctrl_c(run):
        run_generator_stages(run)
        for card, path in run.extras:  # one model at a time, never two
            run_outputs_stage(run, card, path)
        stage_ensemble(run)
