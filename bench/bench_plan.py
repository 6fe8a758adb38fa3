"""How far `run.py plan`'s memory figure is from the measured peak, on the CPU.

For each tiny model (cards smollm2-135m and gemma3-270m) at parallel 1 and 16, context 4,096:
`python run.py models check CARD --parallel P --context 4096 --json` runs as a child process. It
reserves the card's worst case (P x 4,096 KV cells) right after loading, generates with P prompts
and prints `planned_gb` (the plan's host figure for that setting) and its own peak RSS (VmHWM).
The peak is also taken from outside: the child's ru_maxrss from os.wait4. Printed: planned, both
peaks, and planned / peak (target: within 15%, i.e. 0.85-1.15). Memory only: timings on a busy
machine mean nothing here.

    python bench/bench_plan.py [--cards smollm2-135m gemma3-270m] [--parallel 1 16] [--context 4096]
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(card: str, parallel: int, context: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ENSEMBLE_INSTRUCT_THREADS": os.environ.get("ENSEMBLE_INSTRUCT_THREADS", "1")}
    p = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "models", "check", card, "--parallel", str(parallel),
                          "--context", str(context), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = p.stdout.read(), p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{card} parallel {parallel}: exit {p.returncode}: {err.decode()[-500:]}")
    r = json.loads(out.decode().strip().splitlines()[-1])
    r["outside_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cards", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--parallel", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--context", type=int, default=4096)
    a = ap.parse_args()
    rows = []
    print(f"| card | parallel | context | planned MB | peak RSS inside MB | peak RSS outside MB | planned / peak (outside) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for card in a.cards:
        for par in a.parallel:
            r = measure(card, par, a.context)
            planned = r["planned_gb"] * 1024
            ratio = planned / r["outside_mb"]
            rows.append(ratio)
            print(f"| {card} | {par} | {a.context} | {planned:.0f} | {r['peak_rss_mb']:.0f} | {r['outside_mb']:.0f} | "
                  f"{ratio:.3f} |", flush=True)
    worst = max(abs(x - 1) for x in rows)
    print(f"\nworst error {worst:.1%} (target <= 15%): {'met' if worst <= 0.15 else 'MISSED'}")


if __name__ == "__main__":
    main()
