"""`run.py plan`: the memory each model and stage of a config needs, and the settings that fit.

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
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import kvcache
from .kvcache import N_UBATCH, kv_cells  # the engine's cache formula and micro-batch (its compute buffer)
from .config import CACHE, Config, ModelCard, _hub_cached, _package_dir
from .errors import UserError

GIB = 1 << 30
MIB = 1 << 20
MAX_PARALLEL = 16
CHARS_PER_TOKEN = 3.0  # a bound without a tokenizer: templates/instances_A.txt's prefix is 3,240
#                        chars = 904 SmolLM2 tokens (3.58 chars/token); 3.0 leaves room for
#                        tokenizers that split text (numbers, code) more finely
CHAT_OVERHEAD = 32  # tokens a chat template wraps a prompt in
PROCESS_BYTES = 32 * MIB  # Python + our imports
LLAMA_LIB_BYTES = 34 * MIB  # llama.cpp's library, mapped and touched
LOGIT_ROW_BYTES = 20  # host bytes per sequence and vocabulary entry while decoding (see llama_memory)
VOCAB_BYTES = 110  # per token: llama.cpp's vocabulary (strings, maps; SmolLM2 49k: +5 MB, Gemma 3 262k: +29 MB)
CUDA_CONTEXT_BYTES = int(0.4 * GIB)  # per GPU process: CUDA context + cuBLAS workspace
TORCH_PROCESS_BYTES = int(0.45 * GIB)  # Python + torch + transformers, host
# Bits per weight of the embedding / output tensors of a GGUF quantization (llama.cpp's choice for
# the mix: Q4_K_M keeps token_embd at Q4_K and output at Q6_K), to split a file without its header.
_EMBD_BITS = {"Q4_K_M": (4.5, 6.5625), "Q4_K_S": (4.5, 6.5625), "Q5_K_M": (5.5, 6.5625), "Q6_K": (6.5625, 6.5625),
              "Q8_0": (8.5, 8.5), "Q4_0": (4.5, 6.5625), "Q4_1": (5.0, 6.5625), "F16": (16, 16), "BF16": (16, 16)}


# ---------------------------------------------------------------------------------------- shape

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


_TYPES = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Header:
    """A GGUF file's key/value pairs and tensor table, read straight from the mapped file."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0
        try:
            if self.buf[:4] != b"GGUF":
                raise UserError(f"{path}: not a GGUF file")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", self.buf, 4)
            if version < 2:
                raise UserError(f"{path}: GGUF version {version} is too old")
            self.pos = 24
            self.kv = {}
            for _ in range(n_kv):
                key = self._str()
                self.kv[key] = self._value(self._u32())
            self.tensors = []  # (name, n_elements, ggml type)
            for _ in range(n_tensors):
                name = self._str()
                n_dims = self._u32()
                dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.pos)
                self.pos += 8 * n_dims
                ttype = self._u32()
                self.pos += 8  # data offset
                self.tensors.append((name, math.prod(dims), ttype))
        except struct.error:
            raise UserError(f"{path}: truncated GGUF header") from None
        finally:
            self.buf.close()

    def _u32(self) -> int:
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def _str(self) -> str:
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        s = bytes(self.buf[self.pos + 8:self.pos + 8 + n])
        self.pos += 8 + n
        return s.decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype == 8:
            return self._str()
        if vtype == 9:  # array: kept as its length, and its values when they are numbers
            etype = self._u32()
            (n,) = struct.unpack_from("<Q", self.buf, self.pos)
            self.pos += 8
            if etype == 8:
                for _ in range(n):
                    (m,) = struct.unpack_from("<Q", self.buf, self.pos)
                    self.pos += 8 + m
                return _Array(n, None)
            if etype == 9:
                raise UserError("nested GGUF arrays are not supported")
            fmt = _TYPES[etype]
            size = struct.calcsize(fmt)
            values = struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.pos) if n <= 4096 else None
            self.pos += size * n
            return _Array(n, values)
        fmt = _TYPES[vtype]
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v


@dataclass(frozen=True)
class _Array:
    n: int
    values: tuple | None


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


def local_weights(card: ModelCard, card_path: Path) -> Path | None:
    """The card's weights if they are on this machine now: no download, no assembly."""
    src = card.source
    if src is None:
        return None
    if src.path:
        p = Path(os.path.expanduser(src.path))
        p = p if p.is_absolute() else (card_path.parent / p).resolve()
        return p if p.exists() else None
    if src.package:
        if src.assemble:
            p = CACHE / "models" / f"{card.name}.gguf"
            return p if p.exists() else None
        try:
            p = _package_dir(src.package, card_path) / src.file
        except UserError:
            return None
        return p if p.exists() else None
    return _hub_cached(src)


def shape_for(card: ModelCard, card_path: Path) -> Shape:
    """The model's shape: a local file's header wins over the card's [shape] table."""
    local = local_weights(card, card_path)
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


def _gguf_params(path: Path) -> tuple[int, int]:
    h = _Header(path)
    total = sum(n for _, n, _ in h.tensors)
    embed = sum(n for name, n, _ in h.tensors if name in ("token_embd.weight", "output.weight"))
    return total, embed


# ---------------------------------------------------------------------------------------- needs

@dataclass(frozen=True)
class Need:
    """What one stage asks of a model: its longest prompt, a shared prefix (tokens, 0: none),
    and the new tokens per request."""
    stage: str
    prompt: int
    new: int
    prefix: int = 0
    required: int = 0  # tokens the stage refuses to start without (instances.check_fits), 0: none


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def stage_needs(cfg: Config, card: ModelCard, role: str, count=estimate_tokens) -> list[Need]:
    """The stages a card runs in a config (role "generator" or "extra"), each as the bound of its
    requests: the longest seeds a prompt can show, an instruction of instructions.max_tokens, an
    input of instances.max_tokens. Types A and B: the larger of the two."""
    from . import templates
    from .seeds import load_seeds, split_types

    tdir = cfg.path(cfg.templates_dir)
    seeds = split_types(load_seeds(cfg.path(cfg.seeds_file)))
    chat = CHAT_OVERHEAD if card.prompt_format == "chat" else 0
    ins, inst = cfg.instructions, cfg.instances
    needs = []
    if role == "generator":
        for typ in ("A", "B"):
            tpl = templates.load(f"instructions_{typ}.txt", tdir)
            k = getattr(ins.seeds_per_prompt, typ) + getattr(ins.machine_per_prompt, typ)
            longest = sorted((t.instruction for t in seeds[typ] or seeds["A"] + seeds["B"]), key=len)[-k:]
            needs.append(Need("instructions", count(templates.instruction_prompt(tpl, longest)) + chat, ins.max_tokens))
        for typ in ("A", "B"):
            if inst.demos == "fixed":
                tpl = templates.load(f"instances_{typ}.txt", tdir)
                prefix = 0 if chat else count(templates.prefix(tpl, "instruction"))
                demos = count(templates.fill(tpl, instruction=""))
            else:  # each request its own demonstrations: the longest ones, as instances.check_fits
                tpl = templates.load(f"instances_random_{typ}.txt", tdir)
                n = getattr(inst.demos, typ)
                longest = sorted(seeds[typ], key=lambda t: -len(templates.demo_block(t, typ == "A")))[:n]
                prefix, demos = 0, count(templates.instance_prompt(tpl, longest, "", typ == "A"))
            # + an instruction; the stage refuses to start without demos + max_tokens + 64 (check_fits)
            needs.append(Need("instances", demos + ins.max_tokens + chat, inst.max_tokens, prefix,
                              demos + chat + inst.max_tokens + 64))
    else:
        tpl = templates.load(card.output_template or "output.txt", tdir, templates.FIELDS["output"])
        prompt = count(templates.output_prompt(tpl, "", "")) + ins.max_tokens + inst.max_tokens + chat
        needs.append(Need("outputs", prompt, cfg.outputs.max_tokens))
    return needs


def layout(card: ModelCard, shape: Shape, prefix: int) -> str:
    """The KV layout the engine picks, without a loaded model."""
    return kvcache.layout(card.kv, shape.sliding_window > 0, bool(prefix), card.prompt_format == "chat")


def cells_for(card: ModelCard, shape: Shape, need: Need, parallel: int) -> tuple[str, int, int, int]:
    """(layout, cells, sequences, cells one sequence's attention scans) for a stage, as the engine
    sizes them: kv_cells with per-sequence cells capped at the card's context."""
    lay = layout(card, shape, need.prefix)
    total = min(need.prompt + need.new, card.context)
    prefix = min(need.prefix, total - 1) if need.prefix else 0
    per_seq = total - (prefix if lay == "unified" else 0)
    cells, n_seq = kv_cells(lay, parallel, prefix, per_seq)
    return lay, cells, n_seq, (cells if lay == "unified" else cells // n_seq)


# ---------------------------------------------------------------------------------------- memory

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


def check_memory(card: ModelCard, path: Path, parallel: int | None = None, context: int | None = None,
                 on_gpu: bool = False, shape: Shape | None = None) -> Memory | None:
    """What `models check` holds: `parallel` sequences of `context` cells each, no shared prefix
    (backend.reserve(context): the card's worst case). None for a server card."""
    if card.backend == "openai":
        return None
    upd = {"context": context or card.context}
    if card.backend == "llama_cpp":
        upd["parallel"] = parallel or (card.parallel if card.parallel != "auto" else 1)
    card = card.model_copy(update=upd)
    shape = shape or shape_for(card, path)
    need = Need("check", card.context, 0)
    if card.backend == "transformers":
        return hf_memory(card, shape, need, on_gpu)
    g = card.gpu_layers if card.gpu_layers != "auto" else -1
    return llama_memory(card, shape, need, card.parallel, g, on_gpu)


# ---------------------------------------------------------------------------------------- fitting

@dataclass
class Budget:
    vram: float | None  # bytes; None: no GPU (the model runs on the CPU)
    ram: float | None  # bytes; None: not checked
    source: str = ""

    @property
    def gpu(self) -> bool:
        return self.vram is not None


def fits(m: Memory, budget: Budget) -> bool:
    if budget.gpu and sum(m.gpu.values()) > budget.vram:
        return False
    return budget.ram is None or m.host_total <= budget.ram


@dataclass
class ModelPlan:
    card: ModelCard
    path: Path
    role: str
    rows: list[Memory]
    fits: bool
    gpu_layers: int | None = None
    parallel: int | None = None
    lower: str = ""


def plan_model(card: ModelCard, path: Path, role: str, cfg: Config, budget: Budget,
               gpu_layers: int | None = None, parallel: int | None = None, shape: Shape | None = None,
               needs: list[Need] | None = None) -> ModelPlan:
    """The largest gpu_layers (all, then partial offload) and then the largest parallel (1..16)
    with which every stage of the card fits the budget. A given gpu_layers or parallel is kept."""
    shape = shape or shape_for(card, path)
    needs = needs or stage_needs(cfg, card, role)
    if card.backend == "openai":
        rows = [Memory(card.name, n.stage, None, shape.n_layers if shape else 0, None, card.context, None) for n in needs]
        return ModelPlan(card, path, role, rows, True)
    if card.backend == "transformers":
        rows = _worst([hf_memory(card, shape, n, budget.gpu) for n in needs])
        ok = all(fits(r, budget) for r in rows)
        for r in rows:
            r.fits = fits(r, budget)
        lower = ""
        if not ok:
            smaller = [b for b in range(card.batch_size - 1, 0, -1) if all(
                fits(hf_memory(card.model_copy(update={"batch_size": b}), shape, n, budget.gpu), budget) for n in needs)]
            lower = (f"the card's batch_size to {smaller[0]}" if smaller else
                     f"the card's context ({card.context}) or [outputs] max_tokens, "
                     + ("use quantization nf4 " if card.quantization not in ("nf4", "fp4") else "")
                     + "or a smaller model (the weights alone need "
                     + f"{shape.weights_bytes / GIB:.1f} GB)")
        return ModelPlan(card, path, role, rows, ok, lower=lower)

    L = shape.n_layers
    pars = [parallel] if parallel else list(range(MAX_PARALLEL, 0, -1))
    if not budget.gpu:
        layer_opts = [0]
    elif gpu_layers is not None:
        layer_opts = [gpu_layers]
    else:
        layer_opts = [-1] + list(range(L, -1, -1))

    def at(g: int, p: int) -> list[Memory]:
        return _worst([llama_memory(card, shape, n, p, g, budget.gpu) for n in needs])

    def ok(g: int, p: int) -> bool:
        return all(fits(r, budget) for r in at(g, p))

    chosen = None
    for g in layer_opts:  # the most layers that fit at the smallest parallel, then the largest parallel
        if ok(g, pars[-1]):
            chosen = (g, next(p for p in pars if ok(g, p)))
            break
    if chosen is None:
        g, p = layer_opts[-1], pars[-1]
        rows = at(g, p)
        for r in rows:
            r.fits = fits(r, budget)
        return ModelPlan(card, path, role, rows, False, g, p, lower=too_long(card, needs) or _lower(card, cfg, role, budget))
    rows = at(*chosen)
    long = too_long(card, needs)
    for r in rows:  # a stage whose prompts cannot fit the context does not run, whatever the memory
        r.fits = not (long and r.stage == "instances")
    return ModelPlan(card, path, role, rows, not long, *chosen, lower=long)


def _worst(rows: list[Memory]) -> list[Memory]:
    """One row per stage: the type (A or B) that needs the most (the engine's cache only grows)."""
    out: dict[str, Memory] = {}
    for r in rows:
        if r.stage not in out or r.total > out[r.stage].total:
            out[r.stage] = r
    return list(out.values())


def too_long(card: ModelCard, needs: list[Need]) -> str:
    """Why a stage cannot start at this context, whatever the memory ('' when it can)."""
    for n in needs:
        if n.required > card.context:
            return (f"{card.name}: the {n.stage} stage needs about {n.required} tokens (its demonstrations + "
                    f"max_tokens + 64) but the card's context is {card.context}: fewer or fixed demonstrations, "
                    "a smaller [instances] max_tokens, or a longer context")
    return ""


def _lower(card: ModelCard, cfg: Config, role: str, budget: Budget) -> str:
    what = (["[instructions] max_tokens", "[instances] max_tokens"] if role == "generator"
            else ["[outputs] max_tokens"])
    where = "gpu_layers (more on the CPU), " if budget.gpu else ""
    return (f"{card.name} does not fit even at parallel 1{' and gpu_layers 0' if budget.gpu else ''}: "
            f"lower {where}the card's context ({card.context}) or {' / '.join(what)}, "
            "use a smaller quantization, or a machine with more memory")


def plan_config(cfg: Config, budget: Budget) -> list[ModelPlan]:
    from .config import load_card

    out = []
    cards = [(load_card(cfg.path(cfg.generator)), "generator")] + [(load_card(cfg.path(p)), "extra") for p in cfg.extra]
    for (card, path), role in cards:
        out.append(plan_model(card, path, role, cfg, budget, shape=None if card.backend != "openai" else _no_shape()))
    return out


def _no_shape():
    return Shape(0, 1, (0,), 0, 0, 0, 0)


def has_auto(card: ModelCard) -> bool:
    return card.backend == "llama_cpp" and "auto" in (card.gpu_layers, card.parallel)


def resolve_auto(card: ModelCard, path: Path, role: str, cfg: Config | None,
                 budget: Budget | None = None) -> tuple[ModelCard, str]:
    """(the card with gpu_layers / parallel = "auto" as the numbers the plan picks, the budget it
    planned for). For a config's stages (role "generator" or "extra"); without a config, for the
    card's worst case (parallel x context, as `models check`). When nothing fits: the smallest
    settings (the run then fails with its own out-of-memory message, naming the card)."""
    if not has_auto(card):
        return card, ""
    budget = budget or detect_budget()
    needs = None if cfg is not None else [Need("check", card.context, 0)]
    p = plan_model(card, path, role, cfg, budget, needs=needs,
                   gpu_layers=None if card.gpu_layers == "auto" else card.gpu_layers,
                   parallel=None if card.parallel == "auto" else card.parallel)
    gl = p.gpu_layers if budget.gpu else (-1 if card.gpu_layers == "auto" else card.gpu_layers)
    return card.model_copy(update={"gpu_layers": gl if card.gpu_layers == "auto" else card.gpu_layers,
                                   "parallel": p.parallel if card.parallel == "auto" else card.parallel}), budget.source


# ---------------------------------------------------------------------------------------- budget

def gpu_free() -> tuple[float, str] | None:
    """(free bytes, name) of the first GPU, through NVML (the pynvml module of nvidia-ml-py, or,
    where that is not installed, the driver's nvidia-smi); None without one."""
    try:
        import pynvml
    except ImportError:
        return _nvidia_smi_free()
    try:
        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(h)
            return float(pynvml.nvmlDeviceGetMemoryInfo(h).free), name.decode() if isinstance(name, bytes) else name
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no device
        return None


def _nvidia_smi_free() -> tuple[float, str] | None:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.free,name", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        free, name = out.splitlines()[0].split(",", 1)
        return float(free) * MIB, name.strip()
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):  # no driver, no device
        return None


def ram_available() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        import psutil
        return float(psutil.virtual_memory().available)
    except ImportError:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def detect_budget(vram_gb: float | None = None, ram_gb: float | None = None) -> Budget:
    """--vram / --ram in GB (GiB); without --vram the free memory of the GPU NVML finds, else the CPU
    with the available RAM."""
    ram = ram_gb * GIB if ram_gb is not None else None
    if vram_gb is not None:
        return Budget(vram_gb * GIB, ram, f"GPU, {vram_gb:g} GB (--vram)")
    found = gpu_free()
    if found is not None:
        return Budget(found[0], ram, f"GPU {found[1]}, {found[0] / GIB:.1f} GB free")
    ram = ram if ram is not None else ram_available()
    return Budget(None, ram, f"CPU, {ram / GIB:.1f} GB RAM{' (--ram)' if ram_gb is not None else ' available'}")


# ---------------------------------------------------------------------------------------- output

def print_plan(plans: list[ModelPlan], budget: Budget, name: str) -> None:
    """The plan as a table a person reads at a glance, then what to lower where something does not fit."""
    import sys

    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    gpu = budget.gpu
    t = Table(title=f"plan for {name}: {budget.source}", title_justify="left", box=box.SIMPLE_HEAD)
    for col, right in (("model", False), ("stage", False), ("gpu layers", True), ("parallel", True), ("kv", False),
                       ("KV cells", True), ("weights", True), ("KV", True), ("compute", True),
                       ("GPU GB" if gpu else "RAM GB", True), *((("host GB", True),) if gpu else ()), ("fits", False)):
        t.add_column(col, justify="right" if right else "left", no_wrap=True)
    f = lambda b: f"{b / GIB:.2f}"
    for mp in plans:
        for i, r in enumerate(mp.rows):
            first = i == 0
            if mp.card.backend == "openai":
                t.add_row(mp.card.name if first else "", r.stage, "-", "-", "server", "-", "-", "-", "-", "-",
                          *(("-",) if gpu else ()), "yes")
                continue
            layers = "-" if r.gpu_layers is None else ("all" if r.gpu_layers < 0 or r.gpu_layers > r.n_layers
                                                         else f"{r.gpu_layers}/{r.n_layers}")
            t.add_row(mp.card.name if first else "", r.stage, layers if gpu else "-",
                      "-" if r.parallel is None else str(r.parallel), r.kv or "-", str(r.cells or "-"),
                      f(r.part("weights")), f(r.part("kv")), f(r.part("compute")), f(r.total),
                      *((f(r.host_total),) if gpu else ()), "yes" if r.fits else "[bold red]NO[/]")
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(t)
    for mp in plans:
        if not mp.fits:
            console.print(f"[bold red]{mp.card.name} does not fit:[/] lower {escape(mp.lower)}" if not mp.lower.startswith(
                mp.card.name) else f"[bold red]does not fit:[/] {escape(mp.lower)}")
        elif mp.card.backend == "llama_cpp":
            want = (mp.gpu_layers if gpu else mp.card.gpu_layers, mp.parallel)
            have = (mp.card.gpu_layers, mp.card.parallel)
            if gpu and have[0] != "auto" and _layers_norm(have[0], mp.rows[0].n_layers) > _layers_norm(want[0], mp.rows[0].n_layers) \
                    or have[1] != "auto" and have[1] > want[1]:
                console.print(f"{mp.card.name}: the card's gpu_layers {have[0]}, parallel {have[1]} would not fit: "
                              f"set gpu_layers = {want[0]}, parallel = {want[1]} (or \"auto\")")
    console.print("GB = GiB. Rows are each stage's worst case (the longest prompts a config allows); "
                  "a llama.cpp card with gpu_layers / parallel = \"auto\" gets these numbers when a run opens.")


def _layers_norm(g, n_layers: int) -> int:
    return n_layers + 1 if g == -1 else g
