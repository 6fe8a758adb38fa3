"""Stand-ins for models, for the tests that need none: a setup whose cards point at small fake
GGUF files, a scripted backend whose text depends on the prompt and the seed (as a real sampler's
does), and the patches that put them in place of the real backends."""
from __future__ import annotations

import random
import re
import time
from pathlib import Path

from ensemble_instruct.backends import Backend, Completion, trim_at_stop

WORDS = ("list the three main reasons people enjoy quiet mornings near rivers with friends and "
         "explain which small habits help students remember new vocabulary during long summer "
         "holidays compare two popular ways of cooking rice describe how bees choose flowers "
         "suggest a polite reply to an angry customer email about late delivery rewrite this "
         "sentence in simple english summarize the story of a lost kitten finding home translate "
         "greeting into spanish classify each animal as mammal bird or fish sort numbers from "
         "smallest to largest name famous bridges in europe").split()
WORDS = sorted(set(WORDS) - {"a", "the", "in", "of", "to", "or", "and", "with", "from", "as", "this", "each"})


def answer_for(instruction: str) -> str:
    """What every fake model answers to an instruction: so the ensemble finds agreement."""
    return "answer " + " ".join(instruction.lower().split()[:3])


class FakeBackend(Backend):
    """Instruction prompts get a new instruction, instance prompts an input and output, output
    prompts an answer; all drawn from (seed, prompt), so a seed changes the run, a rerun does not."""

    def __init__(self, card, window: int = 2, delay: float = 0.0, oom_after: int | None = None):
        self.card, self.window, self.delay, self.oom_after, self.calls = card, window, delay, oom_after, 0

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, prompts, params, seeds, prefix=None):
        for i in range(0, len(prompts), self.window):  # one (scripted) window at a time
            yield from self.generate(prompts[i:i + self.window], params, seeds[i:i + self.window], prefix)

    def generate(self, prompts, params, seeds, prefix=None):
        self.calls += 1
        if self.oom_after is not None and self.calls > self.oom_after:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        time.sleep(self.delay)
        out = []
        for prompt, seed in zip(prompts, seeds):
            text = trim_at_stop(self.text(prompt, seed), params.stop)
            out.append(Completion(text, len(prompt.split()), len(text.split()), "stop"))
        return out

    def text(self, prompt: str, seed: int) -> str:
        rng = random.Random(f"{seed}/{prompt}")
        if re.search(r"\n\d+\.$", prompt):  # instruction generation: continue the numbered list
            return " " + " ".join(rng.sample(WORDS, 7)).capitalize() + ". |EoS|"
        instruction = re.findall(r"instruction: (.*)\n", prompt)[-1] if "instruction:" in prompt else ""
        if prompt.endswith("\ninput:"):
            return f" {' '.join(rng.sample(WORDS, 4))}\noutput: {answer_for(instruction)}\n|EoS|"
        if prompt.endswith("\noutput:"):
            return f" {answer_for(instruction)}\n|EoS|"
        return answer_for(prompt.split("\n")[0])

    def close(self):
        pass


class OutOfMemoryError(RuntimeError):
    """Named as torch's CUDA out-of-memory error is."""


def fake_setup(tmp_path: Path, extra_config: str = "", target: tuple[int, int] = (2, 1), **config) -> Path:
    """A config like configs/ci.toml whose three llama.cpp cards point at fake GGUF files; card
    paths are relative to the config's folder."""
    cards = tmp_path / "cards"
    cards.mkdir(parents=True, exist_ok=True)
    (cards / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    for name in ("gen", "extra1", "extra2"):
        (cards / f"{name}.toml").write_text(f'name = "{name}"\nbackend = "llama_cpp"\nparallel = 2\n'
                                            '[source]\npath = "model.gguf"\n')
    body = {"seed": 7, "generator": '"cards/gen.toml"', "extra": '["cards/extra1.toml", "cards/extra2.toml"]', **config}
    text = "".join(f"{k} = {v}\n" for k, v in body.items())
    text += (f"[instructions]\ntarget = {{ A = {target[0]}, B = {target[1]} }}\n"
             "seeds_per_prompt = { A = 8, B = 4 }\n"
             "machine_per_prompt = { A = 2, B = 1 }\nmax_tokens = 64\n[instances]\nmax_tokens = 96\n"
             "[outputs]\nmax_tokens = 40\n" + extra_config)
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def install(monkeypatch=None, **backend_kw) -> None:
    """Skip the backend checks (no package, no server) and load FakeBackends instead of models."""
    from ensemble_instruct import backends, rundir, runner

    load = lambda card, path: FakeBackend(card, **backend_kw)  # noqa: E731
    patches = [(rundir, "check_installed", lambda *a: None), (rundir, "preflight", lambda *a: None),
               (runner, "load_backend", load), (backends, "load_backend", load)]
    for module, name, value in patches:
        if monkeypatch is not None:
            monkeypatch.setattr(module, name, value)
        else:
            setattr(module, name, value)
