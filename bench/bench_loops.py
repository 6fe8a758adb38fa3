"""When may the engine cut a repetition loop short? Checked on completions that were not cut.

The llama.cpp backend applies a stage's loop test to a completion every LOOP_EVERY tokens from
LOOP_MIN on and ends it as a loop (then dropped): `parsing.looping` for instances (input and
output each on its own, as the instance filter checks them), `outputs.loops` for extra outputs.
That is lossless only if the check never fires on a completion that the final filters would keep. This reads finished runs and `evaluate` folders
(instance completions, extra outputs and answers, as the models wrote them), re-tokenizes each text
with its model, replays the check at every candidate (LOOP_MIN, LOOP_EVERY), and prints how often it
fires, the tokens it would save, and every completion it would have cut although it was kept
(a false positive). An instance completion already cut at the old start (192) counts only before it.

    python bench/bench_loops.py DIR [DIR ...]
"""
import argparse
import json
import sys
from collections import Counter
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ensemble_instruct.backends import LOOP_EVERY, LOOP_MIN, load_backend  # noqa: E402
from ensemble_instruct.config import load_card  # noqa: E402
from ensemble_instruct.parsing import looping, repetitive  # noqa: E402
from ensemble_instruct.stages.outputs import loops  # noqa: E402

RULES = [(192, 32), (128, 32), (96, 16), (64, 16), (48, 16), (32, 16), (32, 8)]


def completions(folder: Path):
    """(kind, model, text, kept by the final filters, why it ended, the stage's loop test) of every
    completion in a folder."""
    instance_files = sorted(folder.glob("instances_*.jsonl"))
    if instance_files:  # a run directory (an evaluate folder has answers only)
        generator = json.loads((folder / "manifest.json").read_text())["fingerprint"]["config"]["generator"]
    for f in instance_files:
        for line in f.open():  # kept: by the filters as they are now (a record may predate one)
            r = json.loads(line)
            kept = r["reason"] is None and not (repetitive(r["input"]) or repetitive(r["output"]))
            yield "instances", generator, r["completion"], kept, r["finish"], partial(looping, with_input=r["type"] == "A")
    for f in sorted(folder.glob("outputs_*.jsonl")) + sorted(folder.glob("answers_*.jsonl")):
        model = f.stem.split("_", 1)[1]
        model = model[:-2] if model.endswith(("_A", "_B")) else model
        for line in f.open():
            r = json.loads(line)
            kept = r.get("reason") is None and bool(r["output"]) and not repetitive(r["output"])
            yield "outputs", model, r["output"], kept, r["finish"], loops


def prefixes(backend, text: str) -> list[bytes]:
    """The text after each of its tokens."""
    tokens = backend.tokenize(text)
    if tokens and backend.add_bos:
        tokens = tokens[1:]
    out, acc = [], bytearray()
    for t in tokens:
        acc += backend.piece(t)
        out.append(bytes(acc))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", type=Path, help="run directories or evaluate folders")
    args = ap.parse_args()
    backends, corpus = {}, []
    for folder in args.dirs:
        for kind, model, text, kept, finish, test in completions(folder):
            if model not in backends:  # a card's path (a run's generator) or a bundled card's name
                card, path = load_card(ROOT / model if model.endswith(".toml") else model)
                backends[model] = load_backend(card.model_copy(update={"parallel": 1}), path)
            pieces = prefixes(backends[model], text)
            # An instance cut as a loop by the old rule (from 192) shows nothing after that point.
            end = min(len(pieces), 192) if kind == "instances" and finish == "loop" else len(pieces)
            corpus.append((kind, Path(model).stem, pieces, end, kept, test))
    for b in backends.values():
        b.close()
    print(f"{len(corpus)} completions: " + ", ".join(f"{k} {m}: {n}" for (k, m), n in
                                                      sorted(Counter((k, m) for k, m, *_ in corpus).items())))
    print(f"{'start':>5} {'every':>5} {'cut':>5} {'tokens saved':>12} {'false positives':>15}")
    for start, every in RULES:
        fires = saved = 0
        wrong = []
        for kind, name, pieces, end, kept, test in corpus:
            at = next((n for n in range(start, end, every)
                       if test(pieces[n - 1].decode("utf-8", errors="replace"))), None)
            if at is None:
                continue
            fires += 1
            saved += len(pieces) - at
            if kept:
                wrong.append((kind, name, at, pieces[-1][:160]))
        mark = "  <- the engine's rule" if (start, every) == (LOOP_MIN, LOOP_EVERY) else ""
        print(f"{start:5d} {every:5d} {fires:5d} {saved:12d} {len(wrong):15d}{mark}")
        for w in wrong:
            print("      would cut a kept completion:", w)


if __name__ == "__main__":
    main()
