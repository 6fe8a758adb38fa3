"""Held-out task sets with gold answers, for `evaluate --tasks` and for decontamination.

    user-oriented   Self-Instruct's 252 user-oriented tasks, bundled in tasks/ (Apache-2.0)
    superni         a sample of SuperNI's test tasks, built from a local clone of
                    allenai/natural-instructions by scripts/superni_sample.py into the cache
    FILE            JSONL with instruction, input, output (gold), optional id

Every set becomes the same records: id, instruction, input, output (gold).
"""
from __future__ import annotations

from .config import CACHE, ROOT
from .errors import UserError
from .similarity import rouge_matrix, tokenize
from .store import read_jsonl

NAMES = ("user-oriented", "superni")
USER_ORIENTED = ROOT / "tasks" / "user_oriented_instructions.jsonl"
SUPERNI = CACHE / "superni" / "test_sample.jsonl"  # written by scripts/superni_sample.py


def user_oriented() -> list[dict]:
    """The first (and only) instance of each task: its input goes in `input`, its output is gold."""
    return [{"id": r["id"], "instruction": r["instruction"], "input": r["instances"][0]["input"],
             "output": r["instances"][0]["output"]} for r in read_jsonl(USER_ORIENTED, "user")]


def superni() -> list[dict]:
    if not SUPERNI.is_file():
        raise UserError(f"--tasks superni: the SuperNI test sample is not built (this tool cannot download "
                        f"SuperNI); clone allenai/natural-instructions, then python scripts/superni_sample.py "
                        f"--repo PATH writes it to {SUPERNI}")
    return read_jsonl(SUPERNI, "user")


def load(name: str) -> tuple[list[dict], str]:
    """A named set's tasks and the name the report shows."""
    if name == "user-oriented":
        return user_oriented(), "user-oriented (Self-Instruct, 252 tasks)"
    if name == "superni":
        return superni(), f"superni ({SUPERNI})"
    raise UserError(f"--tasks {name}: not a file, nor one of {', '.join(NAMES)}")


def available() -> list[str]:
    """The named sets present here (superni only once its sample was built)."""
    return ["user-oriented"] + (["superni"] if SUPERNI.is_file() else [])


# ---------------------------------------------------------------- decontamination

ROUGE_MAX = 0.7  # as the novelty filter: an instruction above this is a near-copy
NGRAM = 13  # a shared 13-gram is the usual contamination test (GPT-3, FLAN)


def _ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    t = tokenize(text)
    return {tuple(t[i:i + n]) for i in range(len(t) - n + 1)}


def contaminated(examples: list[dict], tasks: list[dict]) -> list[dict]:
    """For each example whose instruction is close to an evaluation task's (ROUGE-L F1 > 0.7, no
    stemming, as the novelty filter; or a shared 13-gram of instruction + input): which task, why."""
    if not examples or not tasks:
        return []
    R = rouge_matrix([e["instruction"] for e in examples], [t["instruction"] for t in tasks])
    index: dict[tuple, str] = {}
    for t in tasks:
        for g in _ngrams(f"{t['instruction']} {t.get('input', '')}"):
            index.setdefault(g, t["id"])
    hits = []
    for k, e in enumerate(examples):
        j = int(R[k].argmax())
        if R[k, j] > ROUGE_MAX:
            hits.append({"index": k, "instruction": e["instruction"], "task": tasks[j]["id"],
                         "why": "rouge_l", "rouge_l": round(float(R[k, j]), 4)})
            continue
        shared = next((index[g] for g in _ngrams(f"{e['instruction']} {e.get('input', '')}") if g in index), None)
        if shared is not None:
            hits.append({"index": k, "instruction": e["instruction"], "task": shared, "why": f"{NGRAM}-gram",
                         "rouge_l": round(float(R[k, j]), 4)})
    return hits


def for_decontamination() -> tuple[list[dict], list[str]]:
    """Every held-out set present here, and their names."""
    names = available()
    return [t for n in names for t in load(n)[0]], names
