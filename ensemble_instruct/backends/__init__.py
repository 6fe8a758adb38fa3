"""Backends turn prompts + decoding parameters into completions, and free their memory on close.

Each backend lives in its own module and imports its heavy package (llama_cpp, torch,
transformers, httpx) only when it is loaded, so the rest of the tool starts fast.
"""
from __future__ import annotations

import importlib
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..config import ModelCard
from ..errors import OutOfMemory, UserError


@dataclass(frozen=True)
class Decoding:
    max_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    # End a completion early ("loop") once loop_test(its text so far) is true, checked every
    # LOOP_EVERY tokens from LOOP_MIN on: the stage's own filter for repetition loops, so what is cut
    # would be dropped anyway, and a loop otherwise runs to max_tokens, often alone at a window's tail.
    loop_test: Callable[[str], bool] | None = None
    ignore_eos: bool = False  # benchmarks only: never sample the end-of-text token


# Checked against 1,748 uncut completions of the tiny models (bench/bench_loops.py): from 64 tokens on,
# the stages' loop tests never fired on a completion that the final filters keep.
LOOP_MIN, LOOP_EVERY = 64, 16
FINISH = ("stop", "eos", "length", "prompt_too_long", "loop")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish: str  # why it ended: a stop string, the end-of-text token, the token limit, no room to start, a loop


def too_long(n_prompt: int = 0) -> Completion:
    """What a backend returns for a prompt that leaves no room to generate (the batch goes on)."""
    return Completion("", n_prompt, 0, "prompt_too_long")


class Backend:
    """What every backend provides. `window`: how many requests it schedules together. Requests go
    in windows of that many, from the start of the list it is given; a request's result may depend
    on the other requests of its window (batched decoding), never on anything outside it, so a
    caller that keeps window boundaries fixed gets the same bytes on a rerun and on a resume."""
    card: ModelCard
    window: int
    prefix_seconds: float = 0.0  # time spent on shared prefixes since the load (a backend that caches them)

    def stream(self, prompts: list[str], params: Decoding, seeds: list[int],
               prefix: str | None = None) -> Iterator[Completion]:
        """One completion per prompt, in prompt order, each as soon as it and every one before it
        are done. `prefix` is a text every prompt starts with (a fixed few-shot prefix): a backend
        may compute it once and reuse it; results are the same. Closing the iterator stops the work."""
        raise NotImplementedError

    def generate(self, prompts: list[str], params: Decoding, seeds: list[int],
                 prefix: str | None = None) -> list[Completion]:
        return list(self.stream(prompts, params, seeds, prefix))

    def reserve(self, per_seq: int) -> None:
        """Allocate now what the card's worst case needs (`models check`); a backend whose memory
        grows with the work (transformers, a server) has nothing to do."""

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


_MODULES = {"llama_cpp": ("llamacpp", "llama"), "transformers": ("hf", "hf"), "openai": ("openai_server", "server")}
_PACKAGES = {"llama_cpp": ["llama_cpp"], "transformers": ["torch", "transformers", "accelerate"], "openai": ["httpx"]}


def check_installed(card: ModelCard, card_path: Path) -> None:
    """A missing optional dependency is a one-line error that names the extra to install."""
    for pkg in _PACKAGES[card.backend]:
        if importlib.util.find_spec(pkg) is None:
            raise UserError(f"{card_path}: backend {card.backend} needs the package {pkg!r} "
                            f"(pip install -e '.[{_MODULES[card.backend][1]}]')")


def preflight(card: ModelCard, card_path: Path) -> None:
    """Checks that need the backend's module but load no weights (a server that answers)."""
    if card.backend == "openai":
        importlib.import_module(f".{_MODULES['openai'][0]}", __name__).preflight(card, card_path)


def load_backend(card: ModelCard, card_path: Path) -> Backend:
    if card.backend == "llama_cpp" and "auto" in (card.gpu_layers, card.parallel):
        # settings.resolve picks the numbers once per directory and records them; a backend that
        # picked its own at each load could cut a resumed run's windows differently
        raise ValueError(f"{card.name}: gpu_layers / parallel = \"auto\" must be resolved before loading")
    check_installed(card, card_path)
    module = importlib.import_module(f".{_MODULES[card.backend][0]}", __name__)
    return module.load(card, card_path)


_LOWER = {"llama_cpp": "fewer gpu_layers, a smaller parallel or context, or a smaller quantization",
          "transformers": "a smaller batch_size, quantization nf4 or 8bit, or a smaller model",
          "openai": "fewer requests in flight (concurrency)"}


def out_of_memory(card: ModelCard, card_path: Path, during: str, e: BaseException) -> OutOfMemory | None:
    """MemoryError, torch's (CUDA) OutOfMemoryError, or an allocator's "out of memory" as a one-line
    error that names the card and what to lower; None for any other exception."""
    oom = isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())
    if not oom:
        return None
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return OutOfMemory(f"{card_path}: out of memory while {during} {card.name} ({detail}); everything finished "
                       f"so far is saved. Lower the card's settings ({_LOWER[card.backend]}) and run the same "
                       "command again (with --force: the card changed)")


@contextmanager
def oom_as_error(card: ModelCard, card_path: Path, during: str):
    """Inside this block, running out of memory is an OutOfMemory error naming the card."""
    try:
        yield
    except Exception as e:
        oom = out_of_memory(card, card_path, during, e)
        if oom is None:
            raise
        raise oom from None


def stop_at(text, stops) -> int:
    """Where the first stop string starts (str or bytes), or -1. Leading white space is not
    searched: a model that opens its answer with a new line has not finished it (the reference's
    "\\n\\n" stop was written for models that never do)."""
    lead = len(text) - len(text.lstrip())
    return min((i for i in (text.find(x, lead) for x in stops) if i >= 0), default=-1)


def trim_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Cut the text at the first stop string (the stop string itself is not kept)."""
    cut = stop_at(text, stop)
    return text if cut < 0 else text[:cut]
