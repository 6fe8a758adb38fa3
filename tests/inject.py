"""The real CLI with test-only behaviour injected from outside the package:

    python tests/inject.py COMMAND ARGS...

INJECT_KILL_AT=torn:FILE   write half of the next batch appended to FILE, then SIGKILL (a power cut)
INJECT_KILL_AT=after:FILE  SIGKILL right after FILE is rewritten
INJECT_KILL_AT=mid:KEY:N   SIGKILL inside a window of stage KEY (e.g. instances_A): when the llama.cpp
                           backend has finished N + 1 requests of a window and handed over N
INJECT_FAKE=1              fake models (tests/fakes.py) instead of the real backends
INJECT_DELAY=S             ... that take S seconds per batch
INJECT_OOM_AFTER=N|load    ... that run out of memory after N batches, or while loading
INJECT_SLOW_OPEN=S         opening a run takes S seconds more (while the weights are checked)
INJECT_RAM_GB=X            the plan sees no GPU and X GB of free RAM (for "auto" card settings)
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ensemble_instruct import store  # noqa: E402


def _kill_hooks(spec: str) -> None:
    event, name = spec.split(":", 1)
    append, write = store.append_jsonl, store.write_jsonl

    def torn_append(path, records):
        if Path(path).name != name:
            return append(path, records)
        text = "".join(store.dumps(r) + "\n" for r in records)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def write_then_die(path, records):
        write(path, records)
        if Path(path).name == name:
            os.kill(os.getpid(), signal.SIGKILL)

    # The stages import these names when the CLI first runs them, which is after this patch.
    if event == "mid":
        _kill_mid_window(*name.rsplit(":", 1))
    elif event == "torn":
        store.append_jsonl = torn_append
    elif event == "after":
        store.write_jsonl = write_then_die
    else:
        raise SystemExit(f"unknown INJECT_KILL_AT event {event!r}")


def _kill_mid_window(key: str, n: str) -> None:
    from ensemble_instruct import runner
    from ensemble_instruct.backends.llamacpp import LlamaCppBackend

    stage = {}
    meter_init, stream = runner.Meter.__init__, LlamaCppBackend.stream

    def note_stage(self, run, k, model):  # every stage opens a Meter first
        stage["key"] = k
        meter_init(self, run, k, model)

    def killing_stream(self, *args, **kwargs):
        for i, completion in enumerate(stream(self, *args, **kwargs)):
            if stage.get("key") == key and i == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            yield completion

    runner.Meter.__init__ = note_stage
    LlamaCppBackend.stream = killing_stream


def main() -> None:
    env = os.environ
    if env.get("INJECT_KILL_AT"):
        _kill_hooks(env["INJECT_KILL_AT"])
    if env.get("INJECT_FAKE"):
        import fakes

        oom = env.get("INJECT_OOM_AFTER")
        fakes.install(delay=float(env.get("INJECT_DELAY", 0)), oom_after=int(oom) if oom and oom != "load" else None)
        if oom == "load":
            from ensemble_instruct import backends, runner

            def no_room(card, path):
                raise MemoryError()
            runner.load_backend = backends.load_backend = no_room
    if env.get("INJECT_RAM_GB"):
        from ensemble_instruct import plan

        plan.probe.gpu_free = lambda: None
        plan.probe.ram_available = lambda: float(env["INJECT_RAM_GB"]) * plan.GIB
    if env.get("INJECT_SLOW_OPEN"):
        from ensemble_instruct import rundir

        check = rundir.weights.check

        def slow(card, path):
            if env.get("INJECT_OPENING_MARK"):  # tells the test the run is being opened now
                Path(env["INJECT_OPENING_MARK"]).touch()
            time.sleep(float(env["INJECT_SLOW_OPEN"]))
            return check(card, path)
        rundir.weights.check = slow
    from ensemble_instruct.cli import main as cli_main

    sys.argv = ["run.py", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
