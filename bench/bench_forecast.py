"""How good is `forecast`? For each case: a forecast (fresh cache), then the run it forecasts,
right after, on the same machine; the actual time and kept count against the forecast's point
and 5-95% interval, and what the pilot cost as a share of the run.

    python bench/bench_forecast.py                      # default preset: 190 at seed 42, 140 at 1, 100 at 2
    python bench/bench_forecast.py --case default:60:3  # config:num_instructions:seed (empty n: the config's)

Prints one table and writes each case's numbers as a JSON line to --out (bench/forecast-pairs.jsonl).
Run it on a quiet machine: the forecast measures the machine as it is at the pilot.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["default::42", "default:140:1", "default:100:2"]


def timed(args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r


def inside(x: float, d: dict) -> bool:
    return d["low"] <= x <= d["high"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", help="config:num_instructions:seed (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "forecast-pairs.jsonl")
    ap.add_argument("--keep", type=Path, help="keep the run directories here")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-forecast-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ENSEMBLE_INSTRUCT_FORECASTS": str(work / "cache")}
    rows = []
    for case in a.case or CASES:
        config, n, seed = case.split(":")
        opts = ["-c", f"configs/{config}.toml", "--seed", seed] + (["-n", n] if n else [])
        f_wall, r = timed(["forecast", *opts, "--json"], env)
        fc = json.loads(r.stdout)
        out = (a.keep or work) / f"{config}-{n or 'cfg'}-{seed}"
        shutil.rmtree(out, ignore_errors=True)
        g_wall, _ = timed(["generate", *opts, "--out", str(out)], env)
        m = json.loads((out / "manifest.json").read_text())
        actual, kept = m["wall_seconds"], m["dataset_size"]
        t, k = fc["total_seconds"], fc["kept"]
        row = {"case": case, "date": time.strftime("%Y-%m-%d"), "targets": fc["targets"], "pilot": fc["pilot_targets"],
               "forecast_s": t, "actual_s": actual, "error": round(t["mid"] / actual - 1, 3), "time_inside": inside(actual, t),
               "forecast_kept": k, "actual_kept": kept, "kept_inside": inside(kept, k),
               "pilot_s": fc["pilot_seconds"], "forecast_process_s": round(f_wall, 1), "generate_process_s": round(g_wall, 1),
               "pilot_share": round(f_wall / g_wall, 3),
               "stages": {s["stage"]: [s["seconds"]["mid"], m["timings"][s["stage"]]["seconds"]] for s in fc["stages"]}}
        rows.append(row)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{case}: forecast {t['mid']:.0f} s ({t['low']:.0f}-{t['high']:.0f}), actual {actual:.0f} s "
              f"({row['error']:+.0%}, inside {row['time_inside']}); kept {k['mid']} ({k['low']}-{k['high']}), actual "
              f"{kept} (inside {row['kept_inside']}); pilot {f_wall:.0f} s = {row['pilot_share']:.0%} of the run's "
              f"{g_wall:.0f} s", flush=True)
        for stage, (fs, act) in row["stages"].items():
            print(f"    {stage:32s} forecast {fs:7.1f} s  actual {act:7.1f} s  {fs / act - 1:+.0%}", flush=True)
    print("\n| case | instructions (pilot) | forecast s (5-95%) | actual s | error | inside | kept forecast (5-95%) "
          "| kept | inside | pilot / run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, k = r["forecast_s"], r["forecast_kept"]
        print(f"| {r['case']} | {r['targets']['A']}+{r['targets']['B']} ({r['pilot']['A']}+{r['pilot']['B']}) | "
              f"{t['mid']:.0f} ({t['low']:.0f}-{t['high']:.0f}) | {r['actual_s']:.0f} | {r['error']:+.0%} | "
              f"{'yes' if r['time_inside'] else 'NO'} | {k['mid']} ({k['low']}-{k['high']}) | {r['actual_kept']} | "
              f"{'yes' if r['kept_inside'] else 'NO'} | {r['pilot_share']:.0%} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
