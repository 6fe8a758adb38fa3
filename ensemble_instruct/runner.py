"""What every generation stage shares: one model loaded at a time, metering, progress with an
ETA, Ctrl-C, and the batched-request loop that makes a killed run resume without gaps.

Requests go to the backend in windows with fixed boundaries (index // window), whatever was done
before a stop, and each window is appended with one write: results that depend on the other
requests of their window (batched decoding) come out the same on a rerun and on a resume.
"""
from __future__ import annotations

import resource
import signal
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .backends import Backend, Completion, Decoding, load_backend, oom_as_error
from .config import ModelCard
from .errors import Interrupted, StopNow
from .rundir import Run
from .store import append_jsonl


def peak_rss_reset() -> None:
    try:  # Linux: writing 5 resets the peak-RSS counter (VmHWM) for this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def loaded(run: Run, card: ModelCard, path: Path):
    """Load one model, record load/free events and its peak memory, free it whatever happens."""
    peak_rss_reset()
    t0 = time.perf_counter()
    run.manifest["events"].append({"event": "load", "model": card.name, "time": time.time()})
    with oom_as_error(card, path, "loading"):
        backend = load_backend(card, path)
    load_s = time.perf_counter() - t0
    try:  # finished windows are on disk already; the one that failed is redone on resume
        if card.source is not None and card.source.hub_repo:
            run.hub_resolved(card, path)  # the load may have downloaded: are these the bytes recorded?
        with oom_as_error(card, path, "generating with"):
            yield backend
    finally:
        backend.close()
        run.manifest["events"].append({"event": "free", "model": card.name, "time": time.time(),
                                       "load_s": round(load_s, 2), "peak_rss_mb": round(peak_rss_mb(), 1)})
        run.save_manifest()


class Meter:
    """Time, tokens and how completions ended, for one stage in this session, added to the
    manifest's totals (also when the stage stops early or fails: the time was spent). With a
    `run.trace` list (a `forecast` pilot), each batch of completions is also noted there, with its
    time since the stage started and the backend's time on shared prefixes."""

    def __init__(self, run: Run, key: str, backend: Backend):
        self.run, self.key, self.backend = run, key, backend
        self.t0, self.prompt, self.gen, self.finish = time.perf_counter(), 0, 0, Counter()
        self.prefix0 = backend.prefix_seconds
        self.session = time.time()

    def add(self, completions: list[Completion]) -> None:
        for c in completions:
            self.prompt += c.prompt_tokens
            self.gen += c.completion_tokens
            self.finish[c.finish] += 1
        if self.run.trace is not None:
            self.run.trace.append({"key": self.key, "session": self.session,
                                   "t": round(time.perf_counter() - self.t0, 4),
                                   "prompt": [c.prompt_tokens for c in completions],
                                   "gen": [c.completion_tokens for c in completions]})

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self.t0
        t = self.run.manifest["timings"].setdefault(self.key, {"model": self.backend.card.name, "seconds": 0.0,
                                                                "prompt_tokens": 0, "completion_tokens": 0})
        t["seconds"] = round(t["seconds"] + seconds, 2)
        t["prompt_tokens"] += self.prompt
        t["completion_tokens"] += self.gen
        t["tokens_per_s"] = round(t["completion_tokens"] / t["seconds"], 2) if t["seconds"] else 0.0
        t["peak_rss_mb"] = round(max(t.get("peak_rss_mb", 0), peak_rss_mb()), 1)
        finish = Counter(t.get("finish", {})) + self.finish
        t["finish"] = dict(sorted(finish.items()))
        total = sum(finish.values())
        t["length_share"] = round(finish["length"] / total, 4) if total else 0.0
        if self.run.trace is not None:
            self.run.trace.append({"key": self.key, "session": self.session, "end": round(seconds, 4),
                                   "prefix_s": round(self.backend.prefix_seconds - self.prefix0, 4)})
        self.run.save_manifest()


def clock(seconds: float) -> str:
    """h:mm:ss, as the progress bars and `forecast` show times."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def eta(elapsed: float, advanced: int, remaining: int) -> str:
    """Time left at this session's average pace. (rich's own estimate looks at the last 30 s only: a
    batched backend finishes a batch's requests at once, and with batches over 30 s apart it read
    0:00:01 with 232 of 252 evaluation tasks left.)"""
    if remaining <= 0:
        return "0:00:00"
    if advanced <= 0 or elapsed <= 0:
        return "-:--:--"
    return clock(remaining * elapsed / advanced)


def forecast_note(run: Run, key: str) -> str:
    """The stage's forecast time, shown by its progress bar when this setup was forecast."""
    f = run.manifest.get("forecast", {}).get("stages", {}).get(key)
    if not f:
        return ""
    return f" (forecast {clock(f['mid'])})"


@contextmanager
def progress_bar(description: str, total: int, done: int = 0):
    """A rich progress bar with elapsed time, ETA and generated tokens/s; yields advance(n, completions)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[rate]}"), transient=False) as p:
        task = p.add_task(description, total=total, completed=done, rate="", eta=eta(0, 0, total - done))
        start, tokens, advanced = time.perf_counter(), 0, 0

        def advance(n: int, completions=()) -> None:
            nonlocal tokens, advanced
            tokens += sum(c.completion_tokens for c in completions)
            advanced += n
            elapsed = time.perf_counter() - start
            p.update(task, advance=n, rate=f"{tokens / elapsed:.1f} tok/s" if elapsed > 0 and tokens else "",
                     eta=eta(elapsed, advanced, total - done - advanced))
        yield advance


def check_stop(run: Run, where: str) -> None:
    if run.stop_requested:
        raise Interrupted(f"stopped during {where}; everything finished so far is on disk in {run.dir}. "
                          f"Resume with: {run.resume_hint()}")


@contextmanager
def stop_on_ctrl_c(run: Run):
    """First Ctrl-C: finish the current window, then stop. Second: stop at once (the window in
    progress is lost and generated again on resume; everything appended before stays)."""
    def handler(signum, frame):
        if run.stop_requested:
            raise StopNow(f"stopped at once; every finished window is on disk in {run.dir}. "
                          f"Resume with: {run.resume_hint()}")
        run.stop_requested = True
        print("\nstopping after the current window (Ctrl-C again to stop at once)...", file=sys.stderr)
    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def done_ids(run: Run, path: Path) -> set[str]:
    return {r["id"] for r in run.read(path)}


def run_batches(run: Run, backend: Backend, *, key: str, where: str, path: Path, todo: list[dict],
                params: Decoding, request: Callable[[int, dict], tuple[str, int]],
                record: Callable[[dict, int, Completion], dict], prefix: str | None = None) -> None:
    """Generate one record per item of `todo` (each has an `id`) into `path`, skipping ids on disk.

    request(index, item) -> (prompt, seed); record(item, seed, completion) -> the JSONL record.
    Windows of `backend.window` items at fixed boundaries: a window with any id missing on disk
    is generated again whole (its results depend on each other) and only what is missing is
    appended, with one write per window. The backend gets every such window in one stream, so it
    never waits at a window boundary for the writes.
    """
    done = done_ids(run, path)
    w = backend.window
    starts = [s for s in range(0, len(todo), w) if any(it["id"] not in done for it in todo[s:s + w])]
    pending = [(i, todo[i]) for s in starts for i in range(s, min(s + w, len(todo)))]
    reqs = [request(i, it) for i, it in pending]
    with Meter(run, key, backend) as meter, \
            progress_bar(key.replace("_", " ") + forecast_note(run, key), len(todo), sum(it["id"] in done for it in todo)) as advance:
        if not pending:
            return
        check_stop(run, where)
        completions = backend.stream([p for p, _ in reqs], params, [s for _, s in reqs], prefix=prefix)
        window = []
        try:
            for (i, it), (_, seed), c in zip(pending, reqs, completions):
                meter.add([c])
                window.append((it, seed, c))
                advance(it["id"] not in done, [c])  # progress as requests finish; the file per window
                if (i + 1) % w == 0 or i + 1 == len(todo):  # the window's last request
                    append_jsonl(path, [record(it, s, c) for it, s, c in window if it["id"] not in done])
                    window = []
                    check_stop(run, where)
        finally:
            completions.close()  # a stop or an error: the backend drops the window in progress
