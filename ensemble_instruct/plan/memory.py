"""Memory per (model, stage): weights, KV cache, compute and output buffers, process overhead, on
the GPU and on the host (the formulas are in the package docstring).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelCard
from ..kvcache import N_UBATCH
from .needs import Need, cells_for
from .shapes import GIB, MIB, Shape


PROCESS_BYTES = 32 * MIB  # Python + our imports
LLAMA_LIB_BYTES = 34 * MIB  # llama.cpp's library, mapped and touched
LOGIT_ROW_BYTES = 20  # host bytes per sequence and vocabulary entry while decoding (see llama_memory)
VOCAB_BYTES = 110  # per token: llama.cpp's vocabulary (strings, maps; SmolLM2 49k: +5 MB, Gemma 3 262k: +29 MB)
CUDA_CONTEXT_BYTES = int(0.4 * GIB)  # per GPU process: CUDA context + cuBLAS workspace
TORCH_PROCESS_BYTES = int(0.45 * GIB)  # Python + torch + transformers, host


@dataclass
class Memory:
    """One (model, stage) at given settings. GPU and host (CPU) parts, bytes."""
    card: str
    stage: str
    gpu_layers: int | None
    n_layers: int
    parallel: int | None
    context: int
    kv: str | None
    cells: int = 0
    gpu: dict = field(default_factory=dict)  # weights, kv, compute, other
    host: dict = field(default_factory=dict)
    on_gpu: bool = False
    fits: bool = True

    def part(self, key: str) -> int:
        return (self.gpu if self.on_gpu else self.host).get(key, 0)

    @property
    def total(self) -> int:
        return sum((self.gpu if self.on_gpu else self.host).values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def row(self) -> dict:
        g = lambda b: round(b / GIB, 3)
        return {"card": self.card, "stage": self.stage, "gpu_layers": self.gpu_layers, "n_layers": self.n_layers,
                "parallel": self.parallel, "context": self.context, "kv": self.kv,
                "weights_gb": g(self.part("weights")), "kv_gb": g(self.part("kv")),
                "compute_gb": g(self.part("compute")), "total_gb": g(self.total), "fits": self.fits}


def llama_memory(card: ModelCard, shape: Shape, need: Need, parallel: int, gpu_layers: int, on_gpu: bool) -> Memory:
    """A llama.cpp stage at `parallel` and `gpu_layers` (-1: all, output layer included)."""
    lay, cells, n_seq, n_kv = cells_for(card, shape, need, parallel)
    L = shape.n_layers
    g = L + 1 if gpu_layers < 0 else gpu_layers
    g = g if on_gpu else 0
    gl = min(g, L)
    gpu_range = range(L - gl, L)  # llama.cpp offloads the last layers
    out_on_gpu = g > L
    layers = shape.layer_bytes or (shape.weights_bytes // L,) * L
    offloaded = sum(layers[i] for i in gpu_range)
    gpu_w = offloaded + (shape.output_bytes if out_on_gpu else 0)
    # The host keeps (mmapped, touched) what is not offloaded; a tied output layer on the GPU is a
    # copy of the embeddings, which stay on the host for the input.
    host_w = shape.weights_bytes - offloaded - (shape.output_bytes if out_on_gpu and not shape.tied else 0)
    kv_gpu = cells * shape.kv_bytes_per_cell(gpu_range)
    kv_host = cells * shape.kv_bytes_per_cell(range(0, L - gl))
    act = 3 * N_UBATCH * shape.n_embd * 4
    logits = N_UBATCH * shape.n_vocab * 4
    scores = N_UBATCH * n_kv * shape.n_heads * 4
    reserved = max(logits if (out_on_gpu or not on_gpu) else 0, scores) + act
    # On the host only written pages are resident: one micro-batch's activations (feed-forward
    # included) and attention scores over a prompt, and per sequence ~20 B per vocabulary entry
    # (its logits row in the compute buffer and in the output buffer, and the sampler's candidate
    # array): measured 22 MB (SmolLM2) and 78 MB (Gemma 3) above the KV cache at 16 sequences.
    touched = min(reserved, N_UBATCH * (4 * shape.n_embd + 3 * (shape.n_ff or 4 * shape.n_embd)) * 4
                  + N_UBATCH * min(n_kv, N_UBATCH) * shape.n_heads * 4) + n_seq * shape.n_vocab * LOGIT_ROW_BYTES
    m = Memory(card.name, need.stage, gpu_layers if on_gpu else 0, L, parallel, card.context, lay, cells, on_gpu=on_gpu)
    m.host = {"weights": host_w, "kv": kv_host, "compute": touched,
              "other": PROCESS_BYTES + LLAMA_LIB_BYTES + VOCAB_BYTES * shape.n_vocab}
    if g > 0:
        m.gpu = {"weights": gpu_w, "kv": kv_gpu, "compute": reserved, "other": CUDA_CONTEXT_BYTES}
    return m


def hf_memory(card: ModelCard, shape: Shape, need: Need, on_gpu: bool) -> Memory:
    """A transformers stage: weights, a KV cache of batch_size x (prompt + new) tokens in the compute
    dtype, the prompt pass's activations and the float32 logits of the last tokens."""
    half = 4 if card.dtype == "float32" else 2
    tokens = min(need.prompt + need.new, card.context)
    kv = card.batch_size * tokens * shape.n_layers * shape.n_kv_heads * (shape.head_k + shape.head_v) * half
    compute = card.batch_size * (need.prompt * (4 * shape.n_embd + 2 * (shape.n_ff or 4 * shape.n_embd)) * half
                                 + 2 * shape.n_vocab * 4)
    m = Memory(card.name, need.stage, None, shape.n_layers, None, card.context, None, on_gpu=on_gpu)
    part = {"weights": shape.weights_bytes, "kv": kv, "compute": compute}
    if on_gpu:
        m.gpu = {**part, "other": CUDA_CONTEXT_BYTES}
        m.host = {"other": TORCH_PROCESS_BYTES}
    else:
        m.host = {**part, "other": TORCH_PROCESS_BYTES}
    return m
