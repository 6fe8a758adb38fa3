"""`run.py plan`: the memory each model and stage of a config needs, and the settings that fit.

gguf (the header reader) -> shapes (a model's shape) -> needs (what each stage asks) -> memory (bytes
per model and stage) -> probe (the free memory) -> fit (the settings that fit) -> render (the table).

Nothing here loads a model. The model's shape comes from the GGUF header (read directly: the
`gguf` package's reader parses every tokenizer array and takes ~20 s on Gemma 3; only its type
tables are used), from config.json + safetensors headers for a local transformers folder, or from
the card's `[shape]` table (the bundled hub cards carry one, so a plan needs no download). A local
file wins over the card.

Memory per (model, stage), llama.cpp (measured on the CPU, see the README's `plan` section):
- weights: the GGUF's tensors. With `gpu_layers` g, the last min(g, n_layers) repeating layers go to
  the GPU, and the output layer too when g > n_layers (llama.cpp's rule); the token embeddings
  stay on the CPU. On the CPU the file is mmapped and all of it is touched (resident).
- KV cache: `kvcache.kv_cells` cells (the formula the engine sizes its cache with) x
  n_layers x n_kv_heads x (head_k + head_v) x 2 bytes (f16); each layer's part on its layer's device.
- compute: llama.cpp reserves the peak of a worst-case graph: max(logits n_ubatch x n_vocab x 4 B,
  attention scores n_ubatch x n_kv x n_heads x 4 B) + a few n_ubatch x n_embd x 4 B activations,
  n_kv = the cells one sequence's attention scans (a stream: split; the whole cache: unified).
  A GPU allocates it whole; on the CPU only the pages a pass writes are resident (malloc), so the
  host figure is what one pass of a stage's largest step touches, not the reservation.
- output buffer (host): n_seq x n_vocab x 4 B of logits; with the logits rows of the compute buffer
  and the samplers' candidate arrays, ~20 B per sequence and vocabulary entry are resident.
- process: Python + our imports ~32 MB, llama.cpp's library ~40 MB; on a GPU ~0.4 GB of CUDA
  context on the card.

GB here are GiB (2^30 bytes): what a "24 GB" card holds (nvidia-smi's 24,564 MiB) and what `free -g`
counts. Hub file sizes are given in decimal GB (19.85 GB = 18.49 GiB).
"""
from . import probe  # noqa: F401  (probe.detect_budget, gpu_free, ram_available: patch them there)
from .fit import MAX_PARALLEL, ModelPlan, check_memory, fits, has_auto, plan_config, plan_model, resolve_auto, too_long
from .memory import Memory, hf_memory, llama_memory
from .needs import Need, cells_for, estimate_tokens, layout, stage_needs
from .probe import Budget
from .render import print_plan
from .shapes import GIB, MIB, Shape, card_shape, gguf_shape, hf_shape, shape_for

__all__ = ["Budget", "GIB", "MAX_PARALLEL", "MIB", "Memory", "ModelPlan", "Need", "Shape", "card_shape", "cells_for",
           "check_memory", "estimate_tokens", "fits", "gguf_shape", "has_auto", "hf_memory", "hf_shape", "layout",
           "llama_memory", "plan_config", "plan_model", "print_plan", "resolve_auto", "shape_for",
           "stage_needs", "too_long"]
