"""llama.cpp through llama-cpp-python's low-level API: GGUF files on CPU, GPU, or split between them.

What the high-level `Llama` class cannot do, and what makes generation several times faster:
- **Prefix reuse.** A prompt that starts with a fixed few-shot prefix starts from that prefix's KV
  state (computed once per model load, kept in its own sequence) instead of evaluating it again.
- **Continuous batching in windows.** Requests come in windows of `window` (card setting; the
  caller keeps window boundaries fixed). A window's requests are decoded with `parallel` slots; when a sequence ends, the
  next request of the window takes its slot at once, and its prompt is evaluated in the same
  `llama_decode` call as the other slots' next tokens. So slots stay busy until the window's last
  requests, and the schedule (which tokens share a call) is a pure function of the window's
  requests: a rerun, or a resume that redoes the window, gives the same bytes. `schedule.py` is that
  schedule (which request takes which slot, what each step decodes), without llama.cpp; this module
  is its executor: the KV copies, the llama_decode calls, sampling, and when a request ends.

Two KV layouts (card setting `kv`; "auto" picks unified for requests that share a prefix, split
for the others, and recreates the context when a stage needs the other one):
- "unified": one KV stream for all sequences; the prefix is stored once and shared by every slot
  (`llama_memory_seq_cp` adds the slot to the prefix cells), and a call may mix any slots' tokens in
  one pass over the weights. Attention scans every used cell, all slots' included.
- "split": one stream per sequence (the prefix is copied into each); attention scans only a
  sequence's own cells, but llama.cpp puts only consecutive sequence ids with equal token counts
  into one pass, so a slot's prompt is a pass of its own, and in a window's tail the live slots are
  moved together (`Scheduler.compact`).

Sampling reads the logits in place with numpy (`_sample`) and leaves top-p, temperature and the
seeded draw to llama.cpp's own sampler chain.

Determinism (see the project's measured notes): weights are loaded without llama.cpp's CPU
"repack" kernels and flash attention is off. Which tokens share a call and which KV cells a
sequence uses can change results in the last bits, so every window starts from the same cache
state (only the prefix, in the cells a fresh load puts it in) and runs the same schedule.
"""
from __future__ import annotations

import ctypes
import gc
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np  # llama-cpp-python's own dependency

from .. import weights
from ..config import ModelCard
from ..errors import OutOfMemory, UserError
from .. import kvcache
from ..kvcache import N_BATCH, N_UBATCH, kv_cells
from . import LOOP_EVERY, LOOP_MIN, Backend, Completion, Decoding, stop_at, too_long
from .schedule import Entry, Scheduler, Slot, Step

PIECE_BYTES = 64  # first guess of a token's text length; a longer one is asked for again
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


def _silence(llama_cpp) -> None:
    """llama.cpp logs every load to stderr; our progress bars say what matters."""
    @llama_cpp.llama_log_callback
    def quiet(level, text, user_data):
        pass
    _silence.callback = quiet  # keep a reference: C holds the pointer
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))


class LlamaCppBackend(Backend):
    def __init__(self, card: ModelCard, path: Path, reuse_prefix: bool = True, even_rows: bool = True):
        import llama_cpp

        self.L, self.card, self.reuse_prefix = llama_cpp, card, reuse_prefix
        self.even_rows = even_rows  # pad a step's odd count of logit rows (schedule.Scheduler._even_rows)
        weights.check_gguf(path)
        _silence(llama_cpp)
        llama_cpp.llama_backend_init()
        self.parallel = card.parallel
        self.window = card.window or 8 * card.parallel
        threads = int(os.environ.get("ENSEMBLE_INSTRUCT_THREADS", 0)) or card.threads or os.cpu_count() or 1

        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0x7FFFFFFF if card.gpu_layers == -1 else card.gpu_layers
        mp.use_extra_bufts = False  # no weight repacking: results independent of evaluation size
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:  # a broken file, or no room for the layers sent to the GPU
            raise UserError(f"{path}: llama.cpp could not load the model (if the GPU is full: "
                            f"fewer gpu_layers than {card.gpu_layers} on the card)")
        self.threads = threads
        # the KV cache, made by _reserve when the first window says how much it needs
        self.ctx = self.batch = self.mem = self.layout = None
        self.n_ctx = self.n_seq = 0
        self.prefix_seq = self.parallel  # the sequence that holds the cached prefix
        self.prefix_tokens: list[int] = []  # what the prefix sequence holds
        self.prefix_seconds = 0.0  # spent evaluating shared prefixes since the load
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._eog: list[int] | None = None  # end-of-generation token ids, listed when a benchmark first bans them
        self.add_bos = llama_cpp.llama_vocab_get_add_bos(self.vocab)
        self._piece = ctypes.create_string_buffer(PIECE_BYTES)
        self._chat_template = llama_cpp.llama_model_chat_template(self.model, None) if card.prompt_format == "chat" else None
        self.swa = llama_cpp.llama_model_n_swa(self.model) > 0
        try:
            if card.prompt_format == "chat" and not self._chat_template:
                raise UserError(f"{path}: the card asks for the chat format, but the GGUF has no chat template")
        except BaseException:
            self.close()
            raise

    def layout_for(self, prefix: str | None) -> str:
        """The KV layout for requests with (or without) a shared prefix (kvcache.layout)."""
        return kvcache.layout(self.card.kv, self.swa, bool(prefix), self.card.prompt_format == "chat")

    def reserve(self, per_seq: int) -> None:
        """A cache for `parallel` sequences of `per_seq` cells each, without a shared prefix (what
        `models check` measures: the card's worst case). The cache only grows after this."""
        layout = self.layout_for(None)
        self._reserve(layout, *kv_cells(layout, self.parallel, 0, per_seq))

    def _reserve(self, layout: str, cells: int, n_seq: int) -> None:
        """A context in this KV layout with room for `cells` cells over `n_seq` sequences (see
        `kv_cells`): sized to what the requests need, not parallel x context. The context is
        recreated when the layout or the sequence count changes, or when it is too small; it never
        shrinks. Results do not depend on the cache size (tested), only on its layout and on the
        window, so a rerun and a resume, whose caches may have grown differently, agree."""
        if layout == self.layout and n_seq == self.n_seq and cells <= self.n_ctx:
            return
        L, card = self.L, self.card
        if self.ctx:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            self.ctx = self.batch = None
        self.layout, self.n_seq, self.n_ctx = layout, n_seq, 0
        cp = L.llama_context_default_params()
        cp.n_ctx = cells  # split: n_seq streams of cells / n_seq each
        cp.n_batch, cp.n_ubatch = N_BATCH, N_UBATCH
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.kv_unified = layout == "unified"
        cp.swa_full = True  # sliding-window models: keep every position, so a prefix can be copied
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED  # bitwise-equal reuse needs it off
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise OutOfMemory(f"{card.name}: out of memory: llama.cpp could not create a context of {cells} "
                              f"tokens ({self.parallel} parallel sequences); lower parallel, context or gpu_layers "
                              "on the card (python run.py plan shows what fits)")
        self.n_ctx = cells
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(N_BATCH, 0, 1)
        self.prefix_tokens = []  # a new context holds no prefix

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
        # Only the length llama.cpp returns is the piece; a negative length is the size it needs.
        n = self.L.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
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

    def _decode(self, entries: list[Entry]) -> None:
        """Evaluate entries (token, position, sequence, want logits) in one llama_decode call."""
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

    def _use_prefix(self, prefix_tokens: list[int]) -> None:
        """Make the prefix sequence hold exactly prefix_tokens, reusing what it already holds."""
        seq, have = self.prefix_seq, self.prefix_tokens
        common = _common_length(have, prefix_tokens)
        self.L.llama_memory_seq_rm(self.mem, seq, common, -1)
        self.prefix_tokens = have[:common]
        t0 = time.perf_counter()
        for i in range(common, len(prefix_tokens), N_UBATCH):
            end = min(i + N_UBATCH, len(prefix_tokens))
            self._decode([Entry(prefix_tokens[p], p, seq, False) for p in range(i, end)])
        self.prefix_seconds += time.perf_counter() - t0  # a fixed cost per load: `forecast` separates it
        self.prefix_tokens = list(prefix_tokens)

    def _sampler(self, params: Decoding, seed: int):
        """llama.cpp's sampler chain for one request (None for greedy decoding: see `_sample`)."""
        L = self.L
        if params.temperature <= 0:
            return None
        # llama.cpp's order: top-k, top-p, temperature, then draw with this request's seed
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if params.top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _sample(self, slot: Slot, params: Decoding, k: int) -> int:
        """The next token of `slot` from output row k of the last call.

        `llama_sampler_sample` copies every logit into a fresh candidate array per call: 1-2.5 ms
        for Gemma 3's 262,144-token vocabulary, half of a 16-sequence step (measured). Here numpy
        reads the logits in place: greedy is the first highest logit (llama.cpp's greedy rule);
        with top-k, the k best (ties: the lower token id first) go to llama.cpp's own chain sorted,
        where its top-k is then a no-op and top-p, temperature and the seeded draw run as usual."""
        L = self.L
        logits = self._logits(k, params.ignore_eos)
        if slot.sampler is None:
            return int(logits.argmax())
        top = 0 < params.top_k < len(logits)
        if top:
            ids = np.argpartition(-logits, params.top_k - 1)[:params.top_k]
            ids = ids[np.lexsort((ids, -logits[ids]))]  # logit descending, then token id
        else:  # no cut: every token, in id order, as llama_sampler_sample passes them
            ids = np.arange(len(logits), dtype=np.int32)
        cand = np.empty(len(ids), _TOKEN_DATA)
        cand["id"], cand["logit"], cand["p"] = ids, logits[ids], 0.0
        cur = L.llama_token_data_array(cand.ctypes.data_as(L.llama_token_data_p), len(cand), -1, top)
        L.llama_sampler_apply(slot.sampler, ctypes.byref(cur))
        token = cur.data[cur.selected].id
        L.llama_sampler_accept(slot.sampler, token)
        return token

    def _logits(self, k: int, ban_eog: bool) -> np.ndarray:
        """Output row k of the last call, read in place; `ban_eog` (benchmarks, so that every
        sequence runs to max_tokens): a copy in which no end-of-generation token can win."""
        row = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, k), shape=(self.n_vocab,))
        if not ban_eog:
            return row
        if self._eog is None:
            self._eog = [t for t in range(self.n_vocab) if self.L.llama_vocab_is_eog(self.vocab, t)]
        row = row.copy()
        row[self._eog] = -np.inf
        return row

    def _common_prefix(self, prefix: str | None, prompts: list[list[int]]) -> list[int]:
        """The common *token* prefix of `prefix` and every prompt: what the prefix sequence will
        hold. (A prefix tokenized alone can end differently than inside a prompt: its trailing
        spaces and new lines merge with what follows.) Empty without a prefix, for a chat model,
        and without reuse in split streams (every sequence then evaluates its whole prompt; in a
        unified cache the prefix cells are shared by construction, so each window computes them anew)."""
        if not (prefix and self._chat_template is None and prompts):
            return []
        if not self.reuse_prefix and self.layout_for(prefix) == "split":
            return []
        want = self.tokenize(prefix)
        for t in prompts:
            want = want[:_common_length(want, t[:-1])]  # leave one token to evaluate for logits
        return want

    # ------------------------------------------------------------ generation

    def stream(self, prompts: list[str], params: Decoding, seeds: list[int],
               prefix: str | None = None) -> Iterator[Completion]:
        for i in range(0, len(prompts), self.window):
            yield from self._window(prompts[i:i + self.window], params, seeds[i:i + self.window], prefix)

    def _window(self, prompts: list[str], params: Decoding, seeds: list[int],
                prefix: str | None) -> Iterator[Completion]:
        """One window: the scheduler says which request takes which slot and what each step
        decodes; this executor makes the llama.cpp calls and samples."""
        L, chat = self.L, self._chat_template is not None
        toks = [self.tokenize(self._format(p), special=chat) for p in prompts]
        results: list[Completion | None] = [too_long(len(t)) if len(t) >= self.card.context else None for t in toks]
        requests = [(i, t, min(params.max_tokens, self.card.context - len(t)))  # (index, prompt, new-token limit)
                    for i, (t, r) in enumerate(zip(toks, results)) if r is None]
        shared = self._prepare(prefix, requests)
        sched = Scheduler(requests, self.parallel, self.layout, shared, self.even_rows)
        stops = [x.encode("utf-8") for x in params.stop]
        done = 0  # results before this index have been yielded
        try:
            while sched.busy:
                for slot in sched.admit():
                    L.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                    if shared:
                        L.llama_memory_seq_cp(self.mem, self.prefix_seq, slot.seq, -1, -1)
                    slot.sampler = self._sampler(params, seeds[slot.index])
                for src, dst in sched.compact():
                    L.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
                    L.llama_memory_seq_rm(self.mem, src, -1, -1)
                for slot in self._execute(sched.step(), params):
                    finish = self._finish(slot, params, stops)
                    if finish:
                        results[slot.index] = Completion(slot.text.decode("utf-8", errors="replace"),
                                                         len(slot.tokens), slot.n_gen, finish)
                        L.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                        self._free_sampler(slot)
                        sched.release(slot)
                while done < len(results) and results[done] is not None:
                    yield results[done]
                    done += 1
        finally:
            for slot in sched.slots.values():  # a stop or an error mid-window
                self._free_sampler(slot)
                L.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        while done < len(results):  # prompts too long at the window's end
            yield results[done]
            done += 1

    def _prepare(self, prefix: str | None, requests: list[tuple[int, list[int], int]]) -> int:
        """A cache with room for the window's requests (index, prompt, new-token limit), its prefix
        sequence holding their common prefix; returns that prefix's length in tokens."""
        want = self._common_prefix(prefix, [t for _, t, _ in requests])
        shared = len(want)
        layout = self.layout_for(prefix)
        per_seq = max((len(t) + limit - (shared if layout == "unified" else 0) for _, t, limit in requests), default=1)
        self._reserve(layout, *kv_cells(layout, self.parallel, shared, per_seq))
        if not self.reuse_prefix and self.n_seq > self.parallel:  # reuse off: no cached prefix survives a window
            self._use_prefix([])
        if shared:
            self._use_prefix(want)
        return shared

    def _execute(self, step: Step, params: Decoding) -> list[Slot]:
        """Decode a step in calls of at most N_BATCH tokens; a slot samples its next token right
        after the call that holds its row. Returns the slots that sampled, in step order."""
        samples, sampled, n = step.samples, [], 0
        try:
            for start in range(0, len(step.entries), N_BATCH):
                self._decode(step.entries[start:start + N_BATCH])
                while n < len(samples) and samples[n][0] < start + N_BATCH:
                    k, slot = samples[n]
                    slot.token = self._sample(slot, params, k - start)
                    sampled.append(slot)
                    n += 1
        finally:
            if step.spare is not None:
                self.L.llama_memory_seq_rm(self.mem, step.spare, -1, -1)
        return sampled

    def _free_sampler(self, slot: Slot) -> None:
        if slot.sampler is not None:
            self.L.llama_sampler_free(slot.sampler)

    def _finish(self, slot: Slot, params: Decoding, stops: list[bytes]) -> str | None:
        """Take the token the slot just sampled; why the sequence ends with it, or None."""
        slot.n_gen += 1
        if self.L.llama_vocab_is_eog(self.vocab, slot.token):
            return "eos"
        slot.text += self.piece(slot.token)
        cut = stop_at(slot.text, stops)
        if cut >= 0:
            del slot.text[cut:]
            return "stop"
        if slot.n_gen >= slot.limit:
            return "length"
        if params.loop_test and slot.n_gen >= LOOP_MIN and slot.n_gen % LOOP_EVERY == 0 \
                and params.loop_test(slot.text.decode("utf-8", errors="replace")):
            return "loop"
        return None

    def close(self) -> None:
        L = self.L
        if self.batch is not None:
            L.llama_batch_free(self.batch)
        if self.ctx:
            L.llama_free(self.ctx)
        if self.model:
            L.llama_model_free(self.model)
        self.batch = self.ctx = self.model = None
        gc.collect()


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def load(card: ModelCard, card_path: Path) -> LlamaCppBackend:
    return LlamaCppBackend(card, weights.resolve(card, card_path))
