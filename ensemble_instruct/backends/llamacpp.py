"""llama.cpp through llama-cpp-python's low-level API: GGUF files on CPU, GPU, or split between them.

Two things the high-level `Llama` class cannot do, and that make generation several times faster:
- **Prefix reuse.** A prompt that starts with a fixed few-shot prefix copies that prefix's KV state
  (computed once per model load, kept in its own sequence slot) instead of evaluating it again.
- **Batched decoding.** Up to `parallel` sequences (card setting) are decoded together, each with
  its own seeded sampler.

Determinism (see the project's measured notes): weights are loaded without llama.cpp's CPU
"repack" kernels and flash attention is off, so a token's KV values do not depend on how many
tokens an evaluation holds: reuse on and off give the same bytes. Which sequences share a decoding
step can change results, so the caller fixes batch boundaries; prompts are evaluated one sequence
at a time and every step decodes all unfinished sequences of the batch.
"""
from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

from ..config import ModelCard, check_gguf, resolve_weights
from ..errors import OutOfMemory, UserError
from ..parsing import repetitive
from . import LOOP_EVERY, LOOP_MIN, Completion, Decoding, stop_at, too_long


def _silence(llama_cpp) -> None:
    """llama.cpp logs every load to stderr; our progress bars say what matters."""
    @llama_cpp.llama_log_callback
    def quiet(level, text, user_data):
        pass
    _silence.callback = quiet  # keep a reference: C holds the pointer
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))


class LlamaCppBackend:
    def __init__(self, card: ModelCard, path: Path, reuse_prefix: bool = True):
        import llama_cpp

        self.L, self.card, self.reuse_prefix = llama_cpp, card, reuse_prefix
        check_gguf(path)
        _silence(llama_cpp)
        llama_cpp.llama_backend_init()
        self.parallel = card.parallel
        self.batch_size = card.parallel  # the pipeline's batches = the sequences decoded together
        threads = int(os.environ.get("ENSEMBLE_INSTRUCT_THREADS", 0)) or card.threads or os.cpu_count() or 1

        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0x7FFFFFFF if card.gpu_layers == -1 else card.gpu_layers
        mp.use_extra_bufts = False  # no weight repacking: results independent of evaluation size
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:  # a broken file, or no room for the layers sent to the GPU
            raise UserError(f"{path}: llama.cpp could not load the model (if the GPU is full: "
                            f"fewer gpu_layers than {card.gpu_layers} on the card)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

        cp = llama_cpp.llama_context_default_params()
        self.n_seq = self.parallel + 1  # the last slot holds the cached prefix
        cp.n_ctx = card.context * self.n_seq  # split evenly: each sequence gets card.context
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = self.n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = False  # one KV stream per sequence: faster when they share little
        cp.swa_full = True  # sliding-window models (Gemma 3): keep every position, so a prefix can be copied
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # bitwise-equal reuse needs it off
        cp.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise OutOfMemory(f"{card.name}: out of memory while loading: llama.cpp could not create a context of "
                              f"{cp.n_ctx} tokens ({self.parallel} parallel sequences x {card.context}); lower "
                              "parallel, context or gpu_layers on the card")
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(max(512, self.n_seq), 0, 1)
        self.add_bos = llama_cpp.llama_vocab_get_add_bos(self.vocab)
        self.prefix_tokens: list[int] = []  # what the prefix slot holds
        self._piece = ctypes.create_string_buffer(256)
        self._chat_template = llama_cpp.llama_model_chat_template(self.model, None) \
            if card.prompt_format == "chat" else None
        if card.prompt_format == "chat" and not self._chat_template:
            raise UserError(f"{path}: the card asks for the chat format, but the GGUF has no chat template")

    # ------------------------------------------------------------ text <-> tokens

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (self.L.llama_token * n_max)()
        n = self.L.llama_tokenize(self.vocab, data, len(data), buf, n_max, self.add_bos, special)
        if n < 0:
            raise RuntimeError("tokenizer buffer too small")
        return list(buf[:n])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def piece(self, token: int) -> bytes:
        # Only the length llama.cpp returns is the piece; the rest of the buffer is padding.
        n = self.L.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n] if n > 0 else b""

    def _format(self, prompt: str) -> str:
        if not self._chat_template:
            return prompt
        msg = (self.L.llama_chat_message * 1)(self.L.llama_chat_message(b"user", prompt.encode("utf-8")))
        size = len(prompt.encode("utf-8")) * 2 + 512
        buf = ctypes.create_string_buffer(size)
        n = self.L.llama_chat_apply_template(self._chat_template, msg, 1, True, buf, size)
        if n < 0:
            raise UserError(f"{self.card.name}: llama.cpp does not know this model's chat template")
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = self.L.llama_chat_apply_template(self._chat_template, msg, 1, True, buf, n)
        return buf.raw[:n].decode("utf-8")

    # ------------------------------------------------------------ evaluation

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Evaluate (token, position, sequence, want logits) entries in one llama_decode call."""
        b = self.batch
        for k, (tok, pos, seq, logits) in enumerate(entries):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, 1, logits
            b.seq_id[k][0] = seq
        b.n_tokens = len(entries)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:  # 1: no room in the KV cache, < -1: an allocation failed
            error = OutOfMemory if rc == 1 or rc < -1 else UserError
            raise error(f"{self.card.name}: llama.cpp could not evaluate a batch (llama_decode returned {rc}); "
                        "out of memory? lower parallel, context or gpu_layers on the card; everything finished "
                        "so far is saved")

    def _prefill(self, seq: int, tokens: list[int], start: int) -> None:
        """Evaluate tokens[start:] into `seq`, in chunks; logits only for the last token."""
        for i in range(start, len(tokens), 512):
            chunk = range(i, min(i + 512, len(tokens)))
            self._decode([(tokens[p], p, seq, p == len(tokens) - 1) for p in chunk])

    def _use_prefix(self, prefix_tokens: list[int]) -> None:
        """Make the prefix slot hold exactly prefix_tokens, reusing what it already holds."""
        slot, have = self.parallel, self.prefix_tokens
        common = 0
        for a, b in zip(have, prefix_tokens):
            if a != b:
                break
            common += 1
        self.L.llama_memory_seq_rm(self.mem, slot, common, -1)
        self.prefix_tokens = have[:common]
        if common < len(prefix_tokens):
            self._prefill(slot, prefix_tokens, common)
            self.prefix_tokens = list(prefix_tokens)

    def _sampler(self, params: Decoding, seed: int):
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if params.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:  # llama.cpp's order: top-k, top-p, temperature, then draw with this request's seed
            if params.top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    # ------------------------------------------------------------ generation

    def generate(self, prompts: list[str], params: Decoding, seeds: list[int],
                 prefix: str | None = None) -> list[Completion]:
        """Up to `parallel` prompts decoded together (longer lists go in consecutive groups)."""
        out: list[Completion] = []
        for i in range(0, len(prompts), self.parallel):
            out += self._group(prompts[i:i + self.parallel], params, seeds[i:i + self.parallel], prefix)
        return out

    def _group(self, prompts: list[str], params: Decoding, seeds: list[int], prefix: str | None) -> list[Completion]:
        L, chat = self.L, self._chat_template is not None
        toks = [self.tokenize(self._format(p), special=chat) for p in prompts]
        results: list[Completion | None] = [None] * len(prompts)
        live = []  # sequence slots with room to generate
        for s, t in enumerate(toks):
            if len(t) >= self.n_ctx_seq:
                results[s] = too_long(len(t))
            else:
                live.append(s)

        shared = 0
        if prefix and self.reuse_prefix and not chat and live:
            # The common *token* prefix: a prefix tokenized alone can end differently than inside
            # a prompt (its trailing spaces and new lines merge with what follows).
            want = self.tokenize(prefix)
            for s in live:
                n = 0
                for a, b in zip(want, toks[s][:-1]):  # leave one token to evaluate for logits
                    if a != b:
                        break
                    n += 1
                want = want[:n]
            self._use_prefix(want)
            shared = len(want)

        samplers = {s: self._sampler(params, seeds[s]) for s in live}
        try:
            nxt = {}  # each sequence's next token, sampled from its latest logits
            for s in live:  # prompts one at a time: a token's KV never depends on its neighbours
                L.llama_memory_seq_rm(self.mem, s, -1, -1)
                if shared:
                    L.llama_memory_seq_cp(self.mem, self.parallel, s, -1, -1)
                self._prefill(s, toks[s], shared)
                nxt[s] = L.llama_sampler_sample(samplers[s], self.ctx, -1)  # before the next prefill overwrites
            text = {s: bytearray() for s in live}
            n_gen = {s: 0 for s in live}
            limit = {s: min(params.max_tokens, self.n_ctx_seq - len(toks[s])) for s in live}
            stops = [x.encode("utf-8") for x in params.stop]
            while live:
                step = []
                for s in live:
                    tok = nxt[s]
                    n_gen[s] += 1
                    finish = None
                    if L.llama_vocab_is_eog(self.vocab, tok):
                        finish = "eos"
                    else:
                        text[s] += self.piece(tok)
                        cut = stop_at(text[s], stops)
                        if cut >= 0:
                            del text[s][cut:]
                            finish = "stop"
                        elif n_gen[s] >= limit[s]:
                            finish = "length"
                        elif params.stop_loops and n_gen[s] >= LOOP_MIN and n_gen[s] % LOOP_EVERY == 0 \
                                and repetitive(text[s].decode("utf-8", errors="replace")):
                            finish = "loop"
                    if finish:
                        results[s] = Completion(text[s].decode("utf-8", errors="replace"), len(toks[s]),
                                                n_gen[s], finish)
                    else:
                        step.append((tok, len(toks[s]) + n_gen[s] - 1, s, True))
                live = [seq for _, _, seq, _ in step]
                if step:  # every unfinished sequence of the group advances one token together
                    self._decode(step)
                    for k, seq in enumerate(live):
                        nxt[seq] = L.llama_sampler_sample(samplers[seq], self.ctx, k)
        finally:
            for chain in samplers.values():
                L.llama_sampler_free(chain)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
        self.ctx = self.model = None
        gc.collect()


def load(card: ModelCard, card_path: Path) -> LlamaCppBackend:
    return LlamaCppBackend(card, resolve_weights(card, card_path))
