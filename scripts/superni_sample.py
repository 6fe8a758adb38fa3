"""Build the `--tasks superni` sample from a local clone of allenai/natural-instructions.

SuperNI cannot be downloaded by this tool, and must not be copied from elsewhere: clone it yourself
(git clone https://github.com/allenai/natural-instructions), then

    python scripts/superni_sample.py --repo PATH_TO_THE_CLONE [--per-task 5]

The sample is fixed and documented: for each task named in `splits/default/test_tasks.txt` (119
tasks in the real repository), in that file's order, the first `--per-task` instances of
`tasks/<name>.json`, in the file's order; instruction = the task's "Definition" (joined if a list),
input = the instance's input, gold = the first of its "output" list. Written to the cache
(`ENSEMBLE_INSTRUCT_CACHE`, default ~/.cache/ensemble-instruct) as superni/test_sample.jsonl, with
one id per record: <task name>/<instance id>.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from ensemble_instruct.store import write_jsonl  # noqa: E402
from ensemble_instruct.tasksets import SUPERNI  # noqa: E402


def sample(repo: Path, per_task: int) -> list[dict]:
    split = repo / "splits" / "default" / "test_tasks.txt"
    if not split.is_file():
        raise SystemExit(f"error: {split} not found (is {repo} a clone of allenai/natural-instructions?)")
    names = [line.strip() for line in split.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for name in names:
        path = repo / "tasks" / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} not found (named in {split})")
        task = json.loads(path.read_text(encoding="utf-8"))
        definition = task["Definition"]
        definition = " ".join(definition) if isinstance(definition, list) else definition
        for inst in task["Instances"][:per_task]:
            records.append({"id": f"{name}/{inst['id']}", "instruction": definition.strip(),
                            "input": inst["input"], "output": inst["output"][0]})
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True, help="a local clone of allenai/natural-instructions")
    ap.add_argument("--per-task", type=int, default=5, help="instances per test task (default 5)")
    ap.add_argument("--out", type=Path, default=SUPERNI, help=f"where to write (default {SUPERNI})")
    a = ap.parse_args()
    records = sample(a.repo, a.per_task)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(a.out, records)
    print(f"wrote {len(records)} instances of {len({r['id'].split('/')[0] for r in records})} tasks -> {a.out}")


if __name__ == "__main__":
    main()
