import json
import os
import random
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "seeds" / "seed_tasks.jsonl"
sys.path.insert(0, str(ROOT))

WORDS = ("the a an cat cats dog dogs running runs run ran quickly quick write writes writing "
         "generous generously generate generation generated list lists listing summary summarize "
         "summarizing happy happiness happily 42 7 x y z caring cares care connect connected "
         "connection relational relate relating").split()


def random_text(rng: random.Random, lo: int = 0, hi: int = 12) -> str:
    n = rng.randint(lo, hi)
    out = []
    for _ in range(n):
        w = rng.choice(WORDS)
        r = rng.random()
        if r < 0.1:
            w = w.upper()
        elif r < 0.2:
            w += rng.choice([",", ".", "!", "'s", "-", "—", "é", "ß"])
        elif r < 0.23:
            w = rng.choice(["...", "日本", "ÉCOLE", "naïve", "\t", "İstanbul", "ﬁne"])
        out.append(w)
    return rng.choice([" ", "  ", "\n"]).join(out)


def paper_rule_by_hand(cands: list[str], threshold: float = 0.01) -> int | None:
    """The spec's ensemble rule (DESIGN.md, Ensemble), written the slow and obvious way on the
    rouge-score package; it shares no code with the package. Returns the kept candidate's index,
    or None when the instance is dropped."""
    from rouge_score import rouge_scorer  # dev dependency; imported here so conftest loads without it

    norm = [" ".join(c.lower().translate(str.maketrans("", "", string.punctuation)).split()) for c in cands]
    groups = [[i for i in range(len(cands)) if norm[i] == norm[j]] for j in range(len(cands)) if norm[j]]
    groups = [g for g in groups if len(g) >= 2]
    if groups:  # the largest group, then the one whose earliest member comes first
        return max(groups, key=lambda g: (len(g), -g[0]))[0]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    n = len(cands)
    f1 = [[scorer.score(norm[i], norm[j])["rougeL"].fmeasure for j in range(n)] for i in range(n)]
    if min(f1[i][j] for i in range(n) for j in range(i + 1, n)) <= threshold:
        return None
    agreement = [sum(f1[i][j] for j in range(n) if j != i) for i in range(n)]
    return agreement.index(max(agreement))  # ties: the earliest


def random_candidates(seed=0, rows=300, n=3):
    """(gold, candidates): rows of n answers, each the gold text (15 %) or a part of its words with
    random words after it; every rule's branches (exact, kept, dropped) occur."""
    rng = random.Random(seed)
    gold, cands = [], []
    for _ in range(rows):
        g = random_text(rng, 1, 12)
        row = [g if rng.random() < 0.15 else " ".join(w for w in g.split() if rng.random() < 0.7) + " " +
               random_text(rng, 0, 5) for _ in range(n)]
        gold.append(g)
        cands.append(row)
    return gold, cands


@pytest.fixture(autouse=True)
def release_run_locks():
    """A test that opens runs in this process releases their locks, as the CLI does on exit."""
    yield
    from ensemble_instruct import rundir

    for path in list(rundir._held):
        rundir.unlock(path.parent)


@pytest.fixture
def rng():
    return random.Random(1234)


def cli(*args, env=None, cwd=None, timeout=600, script="run.py", wrapper=None, offline=True, **kw):
    """`python run.py ARGS...` in a subprocess, stdout and stderr captured as text, in the repository
    root unless cwd says otherwise. The environment is this process's, with HF_HUB_OFFLINE=1 (unset
    with offline=False, for a test that points HF_ENDPOINT at a HubRecorder) and env's variables on
    top. script: another script instead of run.py (relative to the root: tests/inject.py, scripts/...).
    wrapper: Python code run first in the same process, then the real CLI (a patch that simulates the
    environment). The rest goes to subprocess.run (preexec_fn, check, ...)."""
    if wrapper is not None:
        code = (f"import sys\n{wrapper}\nfrom ensemble_instruct.cli import main\n"
                f"sys.argv = ['run.py'] + {list(map(str, args))!r}\nmain()")
        argv = [sys.executable, "-c", code]
    else:
        argv = [sys.executable, str(ROOT / script), *map(str, args)]
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if not offline:
        full.pop("HF_HUB_OFFLINE")
    return subprocess.run(argv, capture_output=True, text=True, env=full, cwd=cwd or ROOT, timeout=timeout, **kw)


def one_line_error(r, code, *fragments) -> str:
    """r exited with code, and its stderr is exactly one non-empty line (no traceback, no progress)
    that contains each fragment. Returns that line."""
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, err[-2000:])
    assert err and "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    for f in fragments:
        assert f in err, (f, err)
    return err


def read_jsonl(path) -> list:
    """The records of a JSONL file, one a line (a blank or broken line fails the test)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows, newline_at_end=True):
    """rows as a JSONL file at path (without the last newline when newline_at_end is false, as an
    editor may save it); returns path."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text if newline_at_end else text.rstrip("\n"))
    return path


def run_generate(out, *extra, env=None, config=None):
    """`run.py generate` in a subprocess, on the CI preset (the embedded tiny models). With an
    INJECT_* variable in env, through tests/inject.py (crash hooks, fake models)."""
    script = "tests/inject.py" if any(k.startswith("INJECT_") for k in env or {}) else "run.py"
    return cli("generate", "-c", config or ROOT / "configs" / "ci.toml", "--out", out, *extra, env=env,
               script=script, timeout=900)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """One uninterrupted CI-preset run that other runs are compared with, byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = run_generate(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


class HubRecorder:
    """A stand-in for the model hub on loopback that answers 404 and records every request, so a
    test can prove that nothing was looked up: point HF_ENDPOINT at `.url` and unset HF_HUB_OFFLINE."""

    def __init__(self):
        import http.server
        import threading

        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(f"{self.command} {self.path}")
                self.send_response(404)
                self.end_headers()

            do_HEAD = do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self, base: dict) -> dict:
        env = {k: v for k, v in base.items() if k != "HF_HUB_OFFLINE"}
        return {**env, "HF_ENDPOINT": self.url}


@pytest.fixture(scope="module")
def hub():
    recorder = HubRecorder()
    yield recorder
    recorder.server.shutdown()


def user_visible(stderr: str) -> list[str]:
    """The lines of stderr a person reads once progress bars have redrawn themselves: what is left
    after dropping tqdm's bars (each redraw ends in '\\r') and blank lines."""
    lines = [line.split("\r")[-1] for line in stderr.splitlines()]
    return [line for line in lines if line.strip() and not _PROGRESS.search(line)]


_PROGRESS = re.compile(r"\|\s*\d+/\d+ \[[^\]]*\]$|^\s*\d+%\|")
