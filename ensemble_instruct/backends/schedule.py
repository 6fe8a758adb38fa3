"""The llama.cpp engine's scheduler: which request takes which slot, and what each step decodes.

Pure Python and no llama.cpp, so it is tested without weights; `llamacpp.py` is the executor that
makes the calls. As in llama.cpp's server loop (build a batch, decode, sample, process each token)
and vLLM's Scheduler.schedule() -> model runner split, one step is:

    admit()   free slots take the window's next requests, lowest slot first (the executor clears
              the slot's KV sequence and copies the shared prefix into it)
    compact() split streams only: the highest live slots move into gaps, so the live slots are
              0..n-1 (llama.cpp passes only consecutive sequence ids together; the executor copies
              the KV stream)
    step()    every live slot's pending tokens in slot order, with an even count of logit rows
              (llama.cpp's CPU output matmul is much slower for odd counts), as a `Step`
    release() a slot whose request ended

Everything a step holds follows from the window's requests and from which of them have ended: the
schedule is a pure function of the window, so a rerun or a resume that redoes a window gives the
same bytes.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ..kvcache import N_UBATCH


class Entry(NamedTuple):
    """One token of a llama_decode call."""
    token: int
    pos: int
    seq: int
    logits: bool  # an output row: llama.cpp computes this token's logits


@dataclass
class Slot:
    """One request being decoded in one sequence slot."""
    seq: int  # llama.cpp sequence id (with split streams, also its KV stream)
    index: int  # the request's place in the window
    tokens: list[int]  # the prompt
    limit: int  # new tokens allowed
    n_past: int = 0  # positions already in the KV cache (or in the step being decoded)
    sampler: object = None  # the executor's sampler for this request (None: greedy)
    text: bytearray = field(default_factory=bytearray)
    n_gen: int = 0
    token: int = -1  # sampled, not yet evaluated

    def pending(self) -> list[Entry]:
        """What this slot adds to the next call: the rest of its prompt (logits for the last token
        only), or the token it sampled last."""
        if self.n_past < len(self.tokens):
            last = len(self.tokens) - 1
            return [Entry(self.tokens[p], p, self.seq, p == last) for p in range(self.n_past, len(self.tokens))]
        return [Entry(self.token, self.n_past, self.seq, True)]


@dataclass
class Step:
    entries: list[Entry]  # in call order; the executor cuts them into calls of at most N_BATCH
    samples: list[tuple[int, Slot]]  # (entry index, slot): the slot samples from that entry's row
    spare: int | None = None  # a sequence that held a padding row, to clear after the step


class Scheduler:
    def __init__(self, requests: list[tuple[int, list[int], int]], parallel: int, layout: str, shared: int = 0,
                 even_rows: bool = True):
        """requests: (index in the window, prompt tokens, new-token limit), in window order; `shared`
        prompt tokens are already in every admitted slot's cache (the prefix)."""
        self.queue = deque(requests)
        self.parallel, self.layout, self.shared, self.even_rows = parallel, layout, shared, even_rows
        self.slots: dict[int, Slot] = {}

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.slots)

    def admit(self) -> list[Slot]:
        new = []
        for seq in range(self.parallel):
            if self.queue and seq not in self.slots:
                index, tokens, limit = self.queue.popleft()
                self.slots[seq] = Slot(seq, index, tokens, limit, n_past=self.shared)
                new.append(self.slots[seq])
        return new

    def compact(self) -> list[tuple[int, int]]:
        """(from, to) sequence moves, split streams only. Refills take the lowest free slots first,
        so only a window's tail has gaps."""
        if self.layout != "split":
            return []
        moves = []
        for dst in [s for s in range(len(self.slots)) if s not in self.slots]:
            src = max(self.slots)
            slot = self.slots.pop(src)
            slot.seq = dst
            self.slots[dst] = slot
            moves.append((src, dst))
        return moves

    def step(self) -> Step:
        live = [self.slots[s] for s in sorted(self.slots)]
        entries, owner = [], []
        for slot in live:
            new = slot.pending()
            entries += new
            owner += [slot] * len(new)
            slot.n_past = new[-1].pos + 1
        padding, spare = self._even_rows(live, entries, owner) if self.even_rows else (None, None)
        samples = [(k, slot) for k, (e, slot) in enumerate(zip(entries, owner))
                   if slot is not None and e.logits and k != padding]
        return Step(entries, samples, spare)

    def release(self, slot: Slot) -> None:
        del self.slots[slot.seq]

    def _even_rows(self, live: list[Slot], entries: list[Entry], owner: list) -> tuple[int | None, int | None]:
        """The step's first pass over the weights holds each live slot's first pending token (split
        streams) or the whole step (unified); its tokens that want logits are rows of the output
        matmul. llama.cpp's CPU kernel for it (llamafile's tinyBLAS, Q8_0 here) is much slower for
        an odd row count: Gemma 3's 262,144-token output, 3 rows 43 ms vs 4 rows 33, 15 rows 80 vs
        16 rows 70 (measured; SmolLM2's 49,152 tokens: 15 and 16 rows cost the same). So an odd
        count of 3 or more gets one row more: the logits of a refilled slot's first prompt token,
        which is in that pass anyway, else a one-token dummy in the next free sequence. Returns
        (the index of the padding entry, the spare sequence to clear after the step). The row is
        never sampled; what the slots sample does not change (tested)."""
        firsts = {}  # a slot's sequence -> the index of its first entry
        for k, slot in enumerate(owner):
            firsts.setdefault(slot.seq, k)
        if self.layout == "unified":  # one pass holds the whole step
            rows = sum(e.logits for e in entries) if len(entries) <= N_UBATCH else 0
        else:
            rows = sum(entries[k].logits for k in firsts.values())
        if rows < 3 or rows % 2 == 0:
            return None, None
        for k in firsts.values():
            if not entries[k].logits:
                entries[k] = entries[k]._replace(logits=True)
                return k, None
        # Every live slot is decoding one token: a spare sequence right after them (split streams
        # take only consecutive sequence ids into one pass), unused when fewer than `parallel` are live.
        spare = max(s.seq for s in live) + 1
        if spare >= self.parallel:
            return None, None
        entries.insert(len(firsts), Entry(entries[0].token, 0, spare, True))
        owner.insert(len(firsts), None)
        return len(firsts), spare
