"""A model's shape (layers, heads, sizes): from a local file's header (GGUF, or config.json +
safetensors headers) or the card's `[shape]` table; a local file wins over the card. GB here are
GiB (GIB).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from .. import weights
from ..config import ModelCard
from ..errors import UserError
from .gguf import _Array, _Header, _gguf_params


GIB = 1 << 30
MIB = 1 << 20


# Bits per weight of the embedding / output tensors of a GGUF quantization (llama.cpp's choice for
# the mix: Q4_K_M keeps token_embd at Q4_K and output at Q6_K), to split a file without its header.
_EMBD_BITS = {"Q4_K_M": (4.5, 6.5625), "Q4_K_S": (4.5, 6.5625), "Q5_K_M": (5.5, 6.5625), "Q6_K": (6.5625, 6.5625),
              "Q8_0": (8.5, 8.5), "Q4_0": (4.5, 6.5625), "Q4_1": (5.0, 6.5625), "F16": (16, 16), "BF16": (16, 16)}


@dataclass(frozen=True)
class Shape:
    n_layers: int
    n_heads: int
    kv_heads: tuple[int, ...]  # per layer
    head_k: int
    head_v: int
    n_embd: int
    n_vocab: int
    n_ff: int = 0
    sliding_window: int = 0
    weights_bytes: int = 0  # all weights as loaded (a GGUF: its tensors; transformers: quantized)
    layer_bytes: tuple[int, ...] = ()  # per repeating layer (GGUF)
    embd_bytes: int = 0  # token embeddings (stay on the CPU in llama.cpp)
    output_bytes: int = 0  # the output layer (a tied model: a copy of the embeddings)
    tied: bool = False  # the output layer is the token embeddings
    source: str = "card"  # where it came from: "gguf header", "config.json", "card"

    @property
    def n_kv_heads(self) -> int:
        return max(self.kv_heads)

    def kv_bytes_per_cell(self, layers: range | None = None) -> int:
        """f16 K and V of one cell over `layers` (default: all)."""
        idx = range(self.n_layers) if layers is None else layers
        return sum(self.kv_heads[i] * (self.head_k + self.head_v) * 2 for i in idx)


def gguf_shape(path: Path) -> Shape:
    """A GGUF file's shape, from its header (milliseconds; no tensor data is read)."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # lazy: imports numpy
    except ImportError:
        raise UserError(f"{path}: reading a GGUF header needs the package gguf (pip install -e '.[llama]')") from None

    h = _Header(path)
    arch = h.kv.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{path}: GGUF header has no general.architecture")

    def get(key, default=None):
        v = h.kv.get(f"{arch}.{key}", default)
        if v is None:
            raise UserError(f"{path}: GGUF header lacks {arch}.{key}")
        return v

    n_layers, n_embd = int(get("block_count")), int(get("embedding_length"))
    heads = get("attention.head_count")
    n_heads = max(heads.values) if isinstance(heads, _Array) else int(heads)
    kv = get("attention.head_count_kv", heads)
    kv_heads = tuple(int(x) for x in kv.values) if isinstance(kv, _Array) else (int(kv),) * n_layers
    head_k = int(get("attention.key_length", n_embd // n_heads))
    head_v = int(get("attention.value_length", n_embd // n_heads))
    tokens = h.kv.get("tokenizer.ggml.tokens")
    n_vocab = tokens.n if isinstance(tokens, _Array) else int(get("vocab_size"))
    ff = h.kv.get(f"{arch}.feed_forward_length", 0)
    n_ff = max(ff.values) if isinstance(ff, _Array) else int(ff)
    swa = int(h.kv.get(f"{arch}.attention.sliding_window", 0) or 0)

    def nbytes(n: int, t: int) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
        return n // block * size

    layer = [0] * n_layers
    embd = out = total = 0
    for name, n, t in h.tensors:
        b = nbytes(n, t)
        total += b
        if name.startswith("blk."):
            layer[int(name.split(".")[1])] += b
        elif name == "token_embd.weight":
            embd = b
        elif name == "output.weight":
            out = b
    return Shape(n_layers, n_heads, kv_heads, head_k, head_v, n_embd, n_vocab, n_ff, swa, total,
                 tuple(layer), embd, out or embd, not out, "gguf header")


def hf_shape(folder: Path, quantization: str, dtype: str) -> Shape:
    """A transformers folder: config.json, and the parameter count from the safetensors headers."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    n_embd = cfg.get("hidden_size") or cfg.get("d_model")
    n_heads = cfg.get("num_attention_heads") or cfg.get("num_heads")
    n_layers = cfg.get("num_hidden_layers") or cfg.get("num_decoder_layers") or cfg.get("num_layers")
    kv = cfg.get("num_key_value_heads") or n_heads
    head = cfg.get("head_dim") or cfg.get("d_kv") or n_embd // n_heads
    vocab = cfg["vocab_size"]
    params = embed = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(info["shape"])
            params += count
            if "embed" in name or "lm_head" in name or "shared" in name:
                embed += count
    if not params:
        raise UserError(f"{folder}: no safetensors weights to count")
    return Shape(n_layers, n_heads, (kv,) * n_layers, head, head, n_embd, vocab, cfg.get("intermediate_size") or
                 cfg.get("d_ff") or 0, 0, hf_weights(params, embed, quantization, dtype), source="config.json")


def hf_weights(params: int, embed: int, quantization: str, dtype: str) -> int:
    """Bytes of a transformers model's weights: bitsandbytes quantizes the linear layers (8 or 4
    bits, plus a scale per 64 weights for nf4/fp4); embeddings and lm_head stay in the compute dtype."""
    half = 4 if dtype == "float32" else 2
    bits = {"8bit": 8, "nf4": 4.5, "fp4": 4.5}.get(quantization)
    if bits is None:
        return params * half
    return int((params - embed) * bits / 8) + embed * half


def card_shape(card: ModelCard) -> Shape | None:
    s = card.shape
    if s is None:
        return None
    head_k = s.head_dim or s.n_embd // s.n_heads
    kv = tuple(s.n_kv_heads) if isinstance(s.n_kv_heads, list) else (s.n_kv_heads,) * s.n_layers
    if card.backend == "transformers":
        weights = hf_weights(s.params, s.embed_params, card.quantization, card.dtype)
        return Shape(s.n_layers, s.n_heads, kv, head_k, s.head_dim_v or head_k, s.n_embd, s.n_vocab, s.n_ff, 0,
                     weights, source="card")
    weights = int(s.file_gb * 1e9)
    bits = _EMBD_BITS.get(card.quantization.upper(), (4.5, 6.5625))
    embd = int(s.n_vocab * s.n_embd * bits[0] / 8)
    out = int(s.n_vocab * s.n_embd * bits[1] / 8) if not s.tied else embd
    rest = weights - embd - (0 if s.tied else out)
    return Shape(s.n_layers, s.n_heads, kv, head_k, s.head_dim_v or head_k, s.n_embd, s.n_vocab, s.n_ff,
                 s.sliding_window, weights, (rest // s.n_layers,) * s.n_layers, embd, out, s.tied, "card")


def shape_for(card: ModelCard, card_path: Path) -> Shape:
    """The model's shape: a local file's header wins over the card's [shape] table."""
    local = weights.local(card, card_path)
    if local is not None:
        if local.is_file() and local.suffix == ".gguf":
            shape = gguf_shape(local)
            if card.backend == "transformers":  # a GGUF converted to safetensors, then quantized
                params = _gguf_params(local)
                shape = replace(shape, weights_bytes=hf_weights(params[0], params[1], card.quantization, card.dtype),
                                layer_bytes=(), source="gguf header")
            return shape
        if local.is_dir() and (local / "config.json").exists():
            return hf_shape(local, card.quantization, card.dtype)
    shape = card_shape(card)
    if shape is None:
        raise UserError(f"{card_path}: the plan needs the model's shape: download the weights or add a [shape] "
                        "table to the card (n_layers, n_heads, n_kv_heads, n_embd, n_vocab, ...)")
    return shape
