"""`run.py evaluate`: how good is the consensus, on tasks whose gold answers we know?

Candidates are N >= 3 models' answers to the same tasks (made here by the config's models, or
read from `--outputs` files). Every selection rule in `rules.RULES` runs on them without seeing
gold; then gold tells us, per rule, how many rows it keeps, how good its picks are on those rows
next to each model and the best single model on the same rows, and what a threshold sweep buys.

ROUGE-L is rouge-score's (stemming on, gold as target) computed with rapidfuzz (`similarity`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from . import ensemble as ens
from . import rules, settings
from .errors import UserError
from .similarity import Vocab, encode_texts, rouge_pairs_encoded
from .store import read_jsonl, write_json, write_jsonl

SWEEP = (0.0, 0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9)


# ---------------------------------------------------------------- inputs

def read_user_jsonl(path: Path) -> list[dict]:
    """A user's JSONL file: unlike a stage file, a last line without its newline is data."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    records = read_jsonl(path, "user")
    if not records:
        raise UserError(f"{path}: no records (empty file)")
    return records


def load_tasks(path: Path | None) -> tuple[list[dict], str]:
    """Tasks with gold answers (id, instruction, input, output) and a name for the report.
    Default: the seed tasks, whose first instance's output is the gold answer."""
    if path is None:
        from .config import ROOT
        from .seeds import load_seeds

        seeds = ROOT / "seeds" / "seed_tasks.jsonl"
        return [{"id": t.id, "instruction": t.instruction, "input": t.input, "output": t.output}
                for t in load_seeds(seeds)], "seeds/seed_tasks.jsonl"
    recs = read_user_jsonl(path)
    tasks = []
    for n, r in enumerate(recs, 1):
        if not isinstance(r.get("instruction"), str):
            raise UserError(f"{path}: record {n}: missing string 'instruction'")
        if not isinstance(r.get("output"), str):
            raise UserError(f"{path}: record {n}: no gold 'output' (evaluate needs tasks with gold answers)")
        if not isinstance(r.get("input", ""), str):
            raise UserError(f"{path}: record {n}: 'input' must be a string")
        tasks.append({"id": str(r.get("id", f"task_{n}")), "instruction": r["instruction"],
                      "input": r.get("input", ""), "output": r["output"], **({} if "id" in r else {"auto_id": True})})
    ids = [t["id"] for t in tasks]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{path}: id {dup!r} appears twice")
    return tasks, str(path)


def read_outputs(tasks: list[dict], files: list[Path], tasks_name: str,
                 limited: bool = False) -> tuple[list[str], list[list[str]]]:
    """Model names and candidates per task from precomputed answer files (matched as `ensemble` does).
    `limited`: the tasks are the first N of the file (--limit), so answers to the others are skipped."""
    if len(files) < 3:
        raise UserError(f"evaluate needs at least 3 --outputs files (3 candidates per task), got {len(files)}")
    outs = [read_user_jsonl(p) for p in files]
    if limited:
        ids = {t["id"] for t in tasks}
        outs = [[r for r in o if r.get("id") in ids] if all("id" in r for r in o) else o[:len(tasks)] for o in outs]
    # match by id only when every task and every answer has one (seed tasks always do)
    inst = [{k: v for k, v in t.items() if not (k == "id" and t.get("auto_id"))} for t in tasks]
    cols = ens.align(inst, outs, [tasks_name, *map(str, files)])
    names = [p.stem for p in files]
    if len(set(names)) < len(names):
        names = [str(p) for p in files]
    return names, [c[1:] for c in cols]


# ---------------------------------------------------------------- measuring

def gold_rouge(gold: list[str], candidates: list[list[str]]) -> np.ndarray:
    """R[k, m]: ROUGE-L F1 (stemmed) of model m's answer to task k against gold."""
    rows, n = len(gold), len(candidates[0])
    vocab = Vocab()
    g = encode_texts(gold, True, vocab)
    R = np.zeros((rows, n))
    for m in range(n):
        R[:, m] = rouge_pairs_encoded(g, encode_texts([c[m] for c in candidates], True, vocab))
    return R


def exact(gold: list[str], candidates: list[list[str]]) -> np.ndarray:
    return np.array([[bool(ens.normalize(x)) and ens.normalize(x) == ens.normalize(g) for x in c]
                     for g, c in zip(gold, candidates)], dtype=float).reshape(len(gold), -1)


def _mean(x) -> float | None:
    return float(np.mean(x)) if len(x) else None


def rule_numbers(R: np.ndarray, scored: rules.Scored, keep: np.ndarray, names: list[str]) -> dict:
    """On the kept rows: the pick, each model, the best single model, the oracle; on the dropped: each model."""
    rows = len(R)
    picked = R[np.arange(rows), scored.pick]
    per_model = {m: _mean(R[keep, i]) for i, m in enumerate(names)}
    best = max(names, key=lambda m: per_model[m] or 0.0) if keep.any() else None
    out = {"kept": int(keep.sum()), "kept_fraction": float(keep.mean()) if rows else 0.0,
           "pick": _mean(picked[keep]), "models_kept": per_model, "best_model": best,
           "best_single": per_model[best] if best else None, "oracle": _mean(R[keep].max(axis=1)),
           "models_dropped": {m: _mean(R[~keep, i]) for i, m in enumerate(names)},
           "weights": {m: round(float(w), 4) for m, w in zip(names, scored.weights)}}
    out["pick_minus_best"] = out["pick"] - out["best_single"] if best else None
    return out


def score_all(candidates: list[list[str]], quorum: int = 0) -> dict[str, rules.Scored]:
    return {rule: rules.score(candidates, rule, quorum) for rule in rules.RULES}


def measure(names: list[str], gold: list[str], candidates: list[list[str]], threshold: float = 0.01,
            quorum: int = 0, sweep=SWEEP, scores: dict[str, rules.Scored] | None = None) -> dict:
    R = gold_rouge(gold, candidates)
    E = exact(gold, candidates)
    result = {"rows": len(gold), "threshold": threshold,
              "models": {m: {"rouge_l": float(R[:, i].mean()), "exact": float(E[:, i].mean())}
                         for i, m in enumerate(names)},
              "rules": {}, "sweep": {}}
    if scores is None:  # fewer than 3 models: no selection rule has candidates to choose among
        scores = score_all(candidates, quorum) if len(names) >= 3 else {}
    for rule, scored in scores.items():
        result["rules"][rule] = rule_numbers(R, scored, rules.kept_mask(scored, candidates, threshold), names)
        result["sweep"][rule] = [{"threshold": t, **{k: v for k, v in rule_numbers(
            R, scored, rules.kept_mask(scored, candidates, t), names).items()
            if k in ("kept_fraction", "pick", "best_single", "oracle")}} for t in sweep]
    return result


def row_records(tasks: list[dict], names: list[str], candidates: list[list[str]], threshold: float,
                scores: dict[str, rules.Scored]) -> list[dict]:
    """Per task: each model's ROUGE-L vs gold, and each rule's pick and whether it kept the row."""
    R = gold_rouge([t["output"] for t in tasks], candidates)
    picks = {rule: (s.pick, rules.kept_mask(s, candidates, threshold), s.confidence) for rule, s in scores.items()}
    return [{"id": t["id"], "rouge_l": {m: round(float(R[k, i]), 4) for i, m in enumerate(names)},
             "rules": {r: {"kept": bool(kept[k]), "pick": names[int(p[k])], "confidence": round(float(c[k]), 4)}
                       for r, (p, kept, c) in picks.items()}}
            for k, t in enumerate(tasks)]


# ---------------------------------------------------------------- answering with models

def answer_with_models(run, tasks: list[dict], tasks_name: str, force: bool = False,
                       limit: int | None = None, models: list | None = None) -> tuple[list[str], list[list[str]]]:
    """The generator and each extra model (or `models`: any number of (card, path)) answer every
    task (the first `limit`) zero-shot, one model loaded at a time, into RUN/answers_<model>.jsonl;
    a rerun skips what is on disk."""
    from .runner import loaded, stop_on_ctrl_c
    from .stages.outputs import answer

    tag = {"tasks": tasks_name, "ids": len(tasks), "hash": _tasks_hash(tasks)}  # all tasks: --limit may grow
    tasks = tasks[:limit] if limit else tasks
    old = run.manifest.get("evaluate")
    if old and old.get("hash") != tag["hash"] and not force:
        raise UserError(f"{run.dir} holds answers to other tasks ({old.get('tasks')}); use a new --out, or --force")
    run.manifest["evaluate"] = tag
    run.save_manifest()
    if models is None:
        models, seen = [], set()
        for card, path in [run.generator, *run.extras]:
            if card.name not in seen:
                seen.add(card.name)
                models.append((card, path))
        if len(models) < 3:
            raise UserError(f"evaluate needs at least 3 different models in the config, got {len(models)}")
    with stop_on_ctrl_c(run):
        for card, path in models:
            out = run.file(f"answers_{card.name}.jsonl")
            done = {r["id"] for r in run.read(out)}
            if all(t["id"] in done for t in tasks):
                continue
            with loaded(run, card, path) as backend:
                answer(run, backend, tasks, out, key=f"evaluate_{card.name}", stage=f"evaluate/{card.name}",
                       typ="all", where=f"evaluate ({card.name})")
    cols = []
    for card, _ in models:
        # as in the ensemble stage: an answer that can never be kept (echo, loop) counts as empty
        table = {r["id"]: "" if r.get("reason") else r["output"]
                 for r in run.read(run.file(f"answers_{card.name}.jsonl"))}
        cols.append([table[t["id"]] for t in tasks])
    return [c.name for c, _ in models], [list(x) for x in zip(*cols)]


def open_models(out: Path, cfg, cards: list[str]):
    """An evaluation directory for `--models CARD ...` (a base and its tuned versions side by side):
    every card checked before any loads; the directory locked like a run's."""
    import time

    from .backends import check_installed, preflight
    from . import weights
    from .config import load_card
    from .rundir import Run, lock

    models = [load_card(c) for c in cards]
    names = [c.name for c, _ in models]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"--models: two cards are named {dup!r}; each model needs its own name")
    for card, path in models:
        check_installed(card, path)
        weights.check(card, path)
        preflight(card, path)
    out.mkdir(parents=True, exist_ok=True)
    lock(out)
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings": {}, "events": []}
    manifest["models"] = {c.name: str(p) for c, p in models}
    # "auto" settings: picked when the directory is first opened, kept on resume (settings.py)
    models, auto = settings.resolve(models, names, ["extra"] * len(models), None, manifest.get("auto", {}))
    run = Run(out, cfg, models[0], models[1:], {}, manifest)
    if auto:
        manifest.setdefault("auto", {}).update(auto)
        run.save_manifest()  # on disk before any answer is: a killed evaluation resumes with these numbers
    return run, models


def _tasks_hash(tasks: list[dict]) -> str:
    import hashlib

    text = json.dumps([[t["id"], t["instruction"], t["input"]] for t in tasks], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- reporting

def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def tables(result: dict, configured: str) -> list[tuple[str, list[str], list[list[str]]]]:
    names = list(result["models"])
    models = ("Models vs gold", ["model", "ROUGE-L F1", "exact match"],
              [[m, _f(v["rouge_l"]), f"{100 * v['exact']:.1f}%"] for m, v in result["models"].items()])
    kept = (f"Selection rules at threshold {result['threshold']:g} (ROUGE-L vs gold on the kept rows)",
            ["rule", "kept", "pick", *names, "best single", "pick - best", "oracle"],
            [[r + (" *" if r == configured else ""), f"{v['kept']} ({100 * v['kept_fraction']:.0f}%)", _f(v["pick"]),
              *(_f(v["models_kept"][m]) for m in names), f"{_f(v['best_single'])} ({v['best_model'] or '-'})",
              "-" if v["pick_minus_best"] is None else f"{v['pick_minus_best']:+.3f}", _f(v["oracle"])]
             for r, v in result["rules"].items()])
    dropped = ("Each model on the dropped rows (ROUGE-L vs gold)", ["rule", "dropped", *names, "vote weights"],
               [[r, str(result["rows"] - v["kept"]), *(_f(v["models_dropped"][m]) for m in names),
                 ", ".join(f"{m} {w:.2f}" for m, w in v["weights"].items())] for r, v in result["rules"].items()])
    return [models, kept, dropped] if result["rules"] else [models]


def print_terminal(result: dict, configured: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a pipe or a log file: wide enough that no cell wraps
        console = Console(width=200)
    for title, header, rows in tables(result, configured):
        t = Table(*header, title=title, title_justify="left")
        for r in rows:
            t.add_row(*r)
        console.print(t)


def _plots(out: Path, result: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    if not result["rules"]:  # one or two models: no sweep
        return _model_plot(out, result, plt, plots)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for rule, points in result["sweep"].items():
        pts = [p for p in points if p["pick"] is not None]
        x = [p["kept_fraction"] for p in pts]
        axes[0].plot(x, [p["pick"] for p in pts], marker="o", ms=3, label=rule)
        axes[1].plot(x, [p["pick"] - p["best_single"] for p in pts], marker="o", ms=3, label=rule)
    axes[0].set_ylabel("picked output's ROUGE-L vs gold (kept rows)")
    axes[1].set_ylabel("pick minus best single model (same rows)")
    axes[1].axhline(0, color="black", lw=0.8)
    for ax in axes:
        ax.set_xlabel("kept fraction")
        ax.legend(fontsize=8)
    fig.suptitle("Threshold sweep: fewer rows kept, better rows?")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)
    plots.append(("sweep.png", "Threshold sweep"))
    return _model_plot(out, result, plt, plots)


def _model_plot(out: Path, result: dict, plt, plots: list) -> list[tuple[str, str]]:
    names = list(result["models"])
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names) + 2), 3.5))
    x = np.arange(len(names))
    for k, (key, label) in enumerate((("rouge_l", "ROUGE-L F1"), ("exact", "exact match"))):
        bars = ax.bar(x + (k - 0.5) * 0.4, [result["models"][m][key] for m in names], width=0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_title("Each model against gold (all rows)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "models.png", dpi=110)
    plt.close(fig)
    plots.append(("models.png", "Models against gold"))
    return plots


def write_report(out: Path, result: dict, configured: str, tasks_name: str) -> None:
    from .report import html_page, md_table

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    try:
        plots = _plots(out, result)
    except ImportError:  # the core install has no matplotlib: the tables are the report then
        plots = []
        print("plots skipped: matplotlib is not installed (pip install -e '.[report]')", file=sys.stderr)
    md = ["# Evaluation report", "",
          f"{result['rows']} tasks from `{tasks_name}`, {len(result['models'])} models; the configured rule is "
          f"marked *. ROUGE-L is rouge-score's F1 with stemming, gold as the target.", "",
          *(f"- `{r}`: {rules.HELP[r]}" for r in result["rules"]), ""]
    for title, header, rows in tables(result, configured):
        md += [f"## {title}", "", md_table(header, rows), ""]
    md += [] if not result["rules"] else ["## Threshold sweep", "",
           md_table(["rule", "threshold", "kept", "pick", "best single", "oracle"],
                  [[r, f"{p['threshold']:g}", f"{100 * p['kept_fraction']:.0f}%", _f(p["pick"]),
                    _f(p["best_single"]), _f(p["oracle"])] for r, pts in result["sweep"].items() for p in pts]), ""]
    md += ["## Plots", ""] + [f"### {title}\n\n![{title}]({name})\n" for name, title in plots]
    text = "\n".join(md)
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "report.html").write_text(html_page(text, out), encoding="utf-8")


def run_evaluation(out: Path, tasks: list[dict], tasks_name: str, names: list[str], candidates: list[list[str]],
                   threshold: float, quorum: int, configured: str) -> dict:
    # each rule scores the rows once; thresholds come after. Rules need 3+ candidates.
    scores = score_all(candidates, quorum) if len(names) >= 3 else {}
    result = measure(names, [t["output"] for t in tasks], candidates, threshold, quorum, scores=scores)
    result["configured_rule"] = configured
    write_report(out, result, configured, tasks_name)
    write_jsonl(out / "rows.jsonl", row_records(tasks, names, candidates, threshold, scores))
    print_terminal(result, configured)
    return result
