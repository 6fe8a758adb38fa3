"""Ctrl-C during `run.py evaluate` (fake models, no model package): the message names the command
that resumes the evaluation directory (the same evaluate command), not `generate`, and that command
finishes it."""
import json
import os
import shlex
import signal
import subprocess
import sys

import fakes
from test_rundir import INJECT, _wait_for_lines, cli


def test_ctrl_c_during_evaluate_says_the_evaluate_command_resumes(tmp_path):
    cfg = fakes.fake_setup(tmp_path)
    out = tmp_path / "eval"
    args = ["evaluate", "-c", str(cfg), "--tasks", "user-oriented", "--limit", "40", "--out", str(out)]
    p = subprocess.Popen([sys.executable, str(INJECT), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "INJECT_FAKE": "1", "INJECT_DELAY": "1"})
    _wait_for_lines(out / "answers_gen.jsonl", 1, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("interrupted: stopped during evaluate (gen)"), last
    hint = last.split("Resume with: ", 1)[1]
    assert hint == "python run.py " + shlex.join(args) and "generate" not in hint
    assert not (out / "metrics.json").exists()
    r = cli(*shlex.split(hint)[2:])  # the hint, run (with the same fake models)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["rows"] == 40


def test_eta_is_the_sessions_average_pace_not_the_last_batch():
    from ensemble_instruct.runner import eta

    # 20 tasks answered in 170 s (5 batches of 4, each finished at once): 232 left take 232 * 8.5 s
    assert eta(170.0, 20, 232) == "0:32:52"
    assert eta(3600 * 2, 1, 1) == "2:00:00"
    assert eta(0.0, 0, 252) == eta(5.0, 0, 252) == "-:--:--"  # nothing finished yet: no estimate
    assert eta(5.0, 3, 0) == "0:00:00"
