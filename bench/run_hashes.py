"""The sha256 of every file a run writes, against a recorded list: proof that a change (a refactor, a
new lock) left a run's bytes alone.

    python bench/run_hashes.py RUN_DIR                         # print the list
    python bench/run_hashes.py RUN_DIR --write bench/default-seed42.sha256
    python bench/run_hashes.py RUN_DIR --check bench/default-seed42.sha256   # exit 1 on any difference

The recorded list is of `make generate` (configs/default.toml, seed 42):
    python run.py generate -c configs/default.toml --out runs/default
The manifest (timings, versions) and the report are left out: they are meant to differ.
"""
import argparse
import hashlib
import sys
from pathlib import Path

SKIP = {"manifest.json", ".lock"}


def hashes(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in SKIP and "report" not in p.relative_to(run).parts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--write", type=Path)
    ap.add_argument("--check", type=Path)
    a = ap.parse_args()
    now = hashes(a.run)
    text = "".join(f"{h}  {name}\n" for name, h in now.items())
    if a.write:
        a.write.write_text(text)
    if not a.check:
        print(text, end="")
        return 0
    recorded = {name: h for h, name in (line.split("  ", 1) for line in a.check.read_text().splitlines())}
    changed = sorted(n for n in recorded if n in now and recorded[n] != now[n])
    missing, new = sorted(recorded.keys() - now.keys()), sorted(now.keys() - recorded.keys())
    for name in changed:
        print(f"differs: {name} (recorded {recorded[name][:12]}, now {now[name][:12]})")
    for name in missing:
        print(f"missing: {name} (recorded {recorded[name][:12]})")
    for name in new:
        print(f"new: {name} (not recorded; now {now[name][:12]})")
    same = len(recorded) - len(changed) - len(missing)
    bad = changed + missing + new
    print(f"{same} of {len(recorded)} recorded files identical" + ("" if bad else ": same bytes"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
