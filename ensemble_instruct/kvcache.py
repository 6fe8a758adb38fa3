"""How the llama.cpp engine lays out and sizes its KV cache: one module that the engine and
`run.py plan` both import, so the plan predicts the cache the engine builds (and `plan` starts
without importing the engine or numpy).

Two layouts (card setting `kv`; "auto" decides by the requests):
- unified: one stream; a shared prefix is stored once and every slot adds its own cells.
- split: a stream per sequence, all of one size; a prefix (when there is one) is a sequence of its
  own and is copied into each slot's stream.
"""
from __future__ import annotations

KV_PAD = 256  # llama.cpp pads a context to this many cells
N_BATCH = 2048  # tokens per llama_decode call; a larger step is split into several calls
N_UBATCH = 512  # tokens per pass over the weights (llama.cpp's micro-batch); sizes the compute buffer


def layout(setting: str, sliding_window: bool, prefix: bool, chat: bool) -> str:
    """The layout for requests with (or without) a shared prefix. "auto" (measured on the CPU, see
    docs/engine.md): one shared stream when they share a prefix, stored once and mixed freely into
    each pass; a stream per sequence otherwise, whose attention scans only its own cells. A
    sliding-window model (Gemma 3) is always split: in a unified cache llama.cpp reuses cells that
    fell out of the window, so where a window's tokens land would depend on earlier windows."""
    if sliding_window:
        return "split"
    if setting != "auto":
        return setting
    return "unified" if prefix and not chat else "split"


def kv_cells(layout: str, parallel: int, prefix: int, per_seq: int) -> tuple[int, int]:
    """(context cells, sequences) of a llama.cpp context for `parallel` slots whose requests share
    a cached prefix of `prefix` tokens (0: none) and need at most `per_seq` cells each: prompt +
    new tokens ("unified": beyond the prefix)."""
    pad = lambda n: -(-n // KV_PAD) * KV_PAD  # noqa: E731
    if layout == "unified":
        return pad(prefix + parallel * per_seq), parallel + 1
    n_seq = parallel + (1 if prefix else 0)
    return n_seq * pad(max(per_seq, prefix)), n_seq
