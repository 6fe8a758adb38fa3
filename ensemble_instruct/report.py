"""What a run made: the funnel through every stage, read from the run directory's files."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from . import lockfile
from .rundir import TYPES
from .stages import ensemble, instances, instructions
from .store import read_jsonl


def funnel(run_dir: Path) -> dict:
    """Counts per type: requests, items, rejections per reason, instances, ensemble rules, winners."""
    run_dir = Path(run_dir)
    out = {}
    pairs = read_jsonl(run_dir / ensemble.PAIRS, "run") if (run_dir / ensemble.PAIRS).exists() else None
    for typ in TYPES:
        reqs = read_jsonl(run_dir / instructions.file_name(typ), "run")
        items = [it for r in reqs for it in r["items"]]
        inst = read_jsonl(run_dir / instances.file_name(typ), "run")
        ens = read_jsonl(run_dir / ensemble.file_name(typ), "run")
        out[typ] = {
            "requests": len(reqs),
            "raw_instructions": len(items),
            "instruction_rejected": dict(Counter(it["reason"] for it in items if it["status"] != "accepted")),
            "accepted_instructions": sum(it["status"] == "accepted" for it in items),
            "instances": len(inst),
            "instance_dropped": dict(Counter(r["reason"] for r in inst if r["reason"])),
            "usable_instances": sum(r["reason"] is None for r in inst),
            "ensemble_rules": dict(Counter(r["rule"] for r in ens)),
            "kept": sum(r["kept"] for r in ens),
            "winners": dict(Counter(r["source"] for r in ens if r["kept"])),
            # a run made before pairs existed has none on disk (ensemble --run writes them)
            "pairs": sum(p["type"] == typ for p in pairs) if pairs is not None else "-",
        }
    return out


def print_summary(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    f = funnel(run_dir)
    fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"  # noqa: E731
    table = Table("", "type A", "type B", title=f"run {run_dir}")
    rows = [("requests", "requests"), ("raw instructions", "raw_instructions"),
            ("rejected instructions", "instruction_rejected"), ("accepted instructions", "accepted_instructions"),
            ("instances dropped", "instance_dropped"), ("usable instances", "usable_instances"),
            ("ensemble rule", "ensemble_rules"), ("kept", "kept"), ("kept output from", "winners"),
            ("preference pairs", "pairs")]
    for label, key in rows:
        table.add_row(label, *(fmt(f[t][key]) if isinstance(f[t][key], dict) else str(f[t][key]) for t in TYPES))
    console = Console(stderr=True)
    console.print(table)
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    console.print(f"dataset: {Path(run_dir) / ensemble.DATASET} ({manifest.get('dataset_size', 0)} examples)")
    fc = manifest.get("forecast")
    if fc and manifest.get("wall_seconds"):
        console.print(f"forecast vs actual: {fc['total_seconds']['mid']:.0f} s ({fc['total_seconds']['low']:.0f}-"
                      f"{fc['total_seconds']['high']:.0f}) vs {manifest['wall_seconds']:.0f} s; kept {fc['kept']['mid']} "
                      f"({fc['kept']['low']}-{fc['kept']['high']}) vs {manifest.get('dataset_size', 0)}")


def forecast_vs_actual(manifest: dict, kept: int) -> list[str]:
    """The report's section comparing a run with the forecast made for its setup (if one was)."""
    fc = manifest.get("forecast")
    if not fc:
        return []
    timings = manifest.get("timings", {})
    span = lambda d: f"{d['mid']:.0f} ({d['low']:.0f}-{d['high']:.0f})"  # noqa: E731
    rows = [[k, span(s), timings.get(k, {}).get("seconds", "-"),
             f"{timings[k]['seconds'] / s['mid']:.2f}" if k in timings and s["mid"] else "-"]
            for k, s in fc["stages"].items()]
    wall = manifest.get("wall_seconds")
    rows.append(["**total** (every session of `generate`)", span(fc["total_seconds"]), wall if wall else "-",
                 f"{wall / fc['total_seconds']['mid']:.2f}" if wall else "-"])
    rows.append(["**kept examples**", span(fc["kept"]), kept, f"{kept / fc['kept']['mid']:.2f}" if fc["kept"]["mid"] else "-"])
    return ["", "## Forecast vs actual", "",
            f"The forecast made for this setup on {fc['created']} (`python run.py forecast`); its intervals are "
            "5-95%. Seconds are wall time on this machine.", "",
            md_table(["stage", "forecast s", "actual s", "actual / forecast"], rows)]


# ---------------------------------------------------------------- the full report

def _words(text: str) -> int:
    return len(text.split())


def leading_verbs(instructions: list[str], top: int = 20) -> list[tuple[str, int]]:
    """The first word of each instruction, lowercased, without punctuation: in imperative
    instructions that is the verb ("write", "classify"); questions show their question word."""
    words = [re.sub(r"[^a-z'-]", "", t.split()[0].lower()) for t in instructions if t.split()]
    return Counter(w for w in words if w).most_common(top)


def _collect(run_dir: Path) -> dict:
    data = {"novelty": {}, "agreement": {}, "lengths": {}, "instructions": {}, "kept": [], "dropped": []}
    for typ in TYPES:
        items = [it for r in read_jsonl(run_dir / instructions.file_name(typ), "run") for it in r["items"]]
        data["novelty"][typ] = [it["max_rouge"] for it in items if "max_rouge" in it]
        ens = read_jsonl(run_dir / ensemble.file_name(typ), "run")
        data["agreement"][typ] = [sum(r["scores"].values()) / len(r["scores"]) for r in ens if r.get("scores")]
        data["instructions"][typ] = [it["text"] for it in items if it["status"] == "accepted"]
        kept = [r for r in ens if r["kept"]]
        data["lengths"][typ] = {"instruction": [_words(r["instruction"]) for r in kept],
                                "input": [_words(r["input"]) for r in kept if r["input"]],
                                "output": [_words(r["output"]) for r in kept]}
        data["kept"] += kept
        inst = {r["id"]: r for r in read_jsonl(run_dir / instances.file_name(typ), "run")}
        data["dropped"] += [{**r, "output": inst[r["id"]]["output"]} for r in ens if not r["kept"]]
    return data


def _plots(out: Path, f: dict, data: dict, cfg: dict, cards: list[str]) -> list[tuple[str, str]]:
    try:
        import matplotlib
    except ImportError:
        from .errors import UserError
        raise UserError("the report's plots need matplotlib (pip install '.[report]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plots = []

    def save(fig, name: str, title: str, counts: str = "y") -> None:
        for ax in fig.axes:  # counts are whole numbers
            getattr(ax, f"{counts}axis").set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        plots.append((name, title))

    def grouped_bars(name: str, title: str, labels: list[str], values: dict[str, list[int]], ylabel: str) -> None:
        fig, ax = plt.subplots(figsize=(8, 4))
        for k, typ in enumerate(TYPES):
            bars = ax.bar([i + (k - 0.5) * 0.4 for i in range(len(labels))], values[typ], width=0.4,
                          label=f"type {typ}")
            ax.bar_label(bars, fontsize=8)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        save(fig, name, title)

    def score_hist(name: str, title: str, values: dict[str, list[float]], xlabel: str, ylabel: str,
                   threshold: float) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist([values[t] for t in TYPES], bins=20, range=(0, 1), label=[f"type {t}" for t in TYPES])
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        save(fig, name, title)

    steps = [("requests", "requests"), ("raw_instructions", "raw\ninstructions"),
             ("accepted_instructions", "accepted\ninstructions"), ("instances", "instances"),
             ("usable_instances", "usable\ninstances"), ("kept", "kept by\nensemble")]
    grouped_bars("funnel.png", "Funnel: from requests to kept examples", [label for _, label in steps],
                 {t: [f[t][key] for key, _ in steps] for t in TYPES}, "count")
    score_hist("novelty.png", "Instruction novelty (lower = more novel; above the line: rejected)", data["novelty"],
               "max ROUGE-L F1 to the seed + accepted pool", "instructions", cfg["instructions"]["novelty_threshold"])
    score_hist("agreement.png", "Ensemble agreement", data["agreement"],
               "mean pairwise ROUGE-L F1 of the candidate outputs (instances without an exact match)", "instances",
               cfg["ensemble"]["threshold"])
    models = list(dict.fromkeys([*cards, *(m for t in TYPES for m in f[t]["winners"])]))  # generator first
    grouped_bars("winners.png", "Whose output the ensemble kept", models,
                 {t: [f[t]["winners"].get(m, 0) for m in models] for t in TYPES}, "kept examples")

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    for ax, field in zip(axes, ("instruction", "input", "output")):
        ax.hist([data["lengths"][t][field] for t in TYPES], bins=20, label=[f"type {t}" for t in TYPES])
        ax.set_xlabel(f"{field} length (words)")
        ax.set_ylabel("kept examples")
        ax.legend()
    fig.suptitle("Lengths of kept examples")
    save(fig, "lengths.png", "Lengths of instructions, inputs and outputs")

    verbs = leading_verbs(data["instructions"]["A"] + data["instructions"]["B"])
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(verbs) + 1)))
    ax.barh([v for v, _ in verbs][::-1], [n for _, n in verbs][::-1])
    ax.set_xlabel("accepted instructions")
    ax.set_title("Most frequent leading words of instructions")
    save(fig, "verbs.png", "Leading verbs", counts="x")
    return plots


def md_table(header: list[str], rows: list[list]) -> str:
    """A markdown table (also used by `evaluate`'s report); a cell's `|` and newlines are escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _clip(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def build_report(run_dir: Path, sample: int = 5) -> Path:
    """Write RUN_DIR/report/ (report.md, report.html, PNG plots); return the folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").exists():
        from .errors import UserError
        raise UserError(f"{run_dir}: not a run directory (no manifest.json)")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    f, data = funnel(run_dir), _collect(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    cards = manifest["fingerprint"]["cards"]  # a list in role order; older runs: keyed by name
    names = [c["name"] for c in cards] if isinstance(cards, list) else list(cards)
    plots = _plots(out, f, data, manifest["fingerprint"]["config"], names)

    fmt = lambda d: ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "-"  # noqa: E731
    md = [f"# Run report: `{run_dir.name}`", "",
          f"Seed {manifest.get('seed')}, generator `{Path(manifest['fingerprint']['config']['generator']).stem}`, "
          f"extra models {', '.join('`' + Path(p).stem + '`' for p in manifest['fingerprint']['config']['extra'])}; "
          f"dataset: **{sum(f[t]['kept'] for t in TYPES)} examples**.", "",
          f"Environment: Python {manifest.get('versions', {}).get('python', '?')}, "
          f"{lockfile.describe(manifest.get('versions', {}).get('lock'))}.", "", "## Funnel", ""]
    keys = [("requests", "generation requests"), ("raw_instructions", "raw instructions"),
            ("instruction_rejected", "rejected (reason: count)"), ("accepted_instructions", "accepted instructions"),
            ("instances", "instances generated"), ("instance_dropped", "instances dropped (reason: count)"),
            ("usable_instances", "usable instances"), ("ensemble_rules", "ensemble rule (rule: count)"),
            ("kept", "kept"), ("winners", "kept output from"), ("pairs", "preference pairs")]
    md += [md_table(["", "type A", "type B"],
                  [[label, *(fmt(f[t][k]) if isinstance(f[t][k], dict) else f[t][k] for t in TYPES)] for k, label in keys])]
    md += ["", "## Cost per stage", ""]
    rows = [[k, t["model"], t["seconds"], t["prompt_tokens"], t["completion_tokens"], t["tokens_per_s"],
             f'{100 * t["length_share"]:.1f}%' if "length_share" in t else "", fmt(t.get("finish", {})),
             t.get("peak_rss_mb", "")]
            for k, t in manifest.get("timings", {}).items()]
    md += [md_table(["stage", "model", "wall s", "prompt tokens", "generated tokens", "tokens/s", "hit token limit",
                   "how completions ended", "peak RSS MB"], rows)]
    md += forecast_vs_actual(manifest, sum(f[t]["kept"] for t in TYPES))
    md += ["", "## Plots", ""] + [f"### {title}\n\n![{title}]({name})\n" for name, title in plots]
    md += ["## Most frequent leading words", "",
           md_table(["word", "instructions"], leading_verbs(data["instructions"]["A"] + data["instructions"]["B"])), ""]
    md += ["## Sample of kept examples", "",
           md_table(["id", "rule", "from", "instruction", "input", "output"],
                  [[r["id"], r["rule"], r["source"], _clip(r["instruction"]), _clip(r["input"]), _clip(r["output"])]
                   for r in data["kept"][:sample]]), ""]
    md += ["## Sample of dropped examples", "",
           md_table(["id", "pairwise ROUGE-L", "instruction", "generator output"],
                  [[r["id"], fmt({k: round(v, 3) for k, v in r.get("scores", {}).items()}), _clip(r["instruction"]),
                    _clip(r["output"])] for r in data["dropped"][:sample]]), ""]
    pairs = read_jsonl(run_dir / ensemble.PAIRS, "run") if (run_dir / ensemble.PAIRS).exists() else []
    md += ["## Sample of preference pairs", "",
           "Chosen: the answer the models agree with most; rejected: the one they agree with least "
           "(export them with `--format dpo`).", "",
           md_table(["id", "instruction", "input", "chosen (model)", "rejected (model, flaw)", "agreement"],
                  [[p["id"], _clip(p["instruction"]), _clip(p["input"]), f"{_clip(p['chosen'])} ({p['chosen_model']})",
                    f"{_clip(p['rejected'])} ({p['rejected_model']}{', ' + p['rejected_flaw'] if p['rejected_flaw'] else ''})",
                    f"{p['scores']['chosen_agreement']:.2f} vs {p['scores']['rejected_agreement']:.2f}"]
                   for p in pairs[:sample]]), ""]
    text = "\n".join(md)
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "report.html").write_text(html_page(text, out), encoding="utf-8")
    return out


def html_page(markdown_text: str, folder: Path) -> str:
    """A self-contained page: our markdown subset (headings, tables, images) with images inlined."""
    import base64
    import html

    body, table = [], []

    def flush():
        if table:
            head, *rows = [[c.strip() for c in r.strip().strip("|").split(" | ")] for r in table if not r.startswith("|---")]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" +
                        "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) +
                        "</table>")
            table.clear()

    for line in markdown_text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if m := re.match(r"^(#+) (.*)", line):
            n = len(m.group(1))
            body.append(f"<h{n}>{html.escape(m.group(2))}</h{n}>")
        elif m := re.match(r"^!\[(.*)\]\((.*)\)$", line):
            b64 = base64.b64encode((folder / m.group(2)).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{b64}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;vertical-align:top;font-size:14px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>ensemble-instruct report</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
