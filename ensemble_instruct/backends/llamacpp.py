"""llama.cpp through llama-cpp-python: GGUF files on CPU, GPU, or split between them."""
from __future__ import annotations

import gc
import os
from pathlib import Path

from ..config import ModelCard, check_gguf, resolve_weights
from ..errors import UserError
from . import Completion, Decoding, PromptTooLong


class LlamaCppBackend:
    batch_size = 1

    def __init__(self, card: ModelCard, path: Path):
        import llama_cpp

        self.card = card
        check_gguf(path)
        threads = card.threads or os.cpu_count() or 1
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=card.context, n_gpu_layers=card.gpu_layers,
                n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
        except ValueError as e:
            raise UserError(f"{path}: llama.cpp could not load the model ({e})") from None

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def generate(self, prompts: list[str], params: Decoding, seeds: list[int]) -> list[Completion]:
        return [self._one(p, params, s) for p, s in zip(prompts, seeds)]

    def _one(self, prompt: str, params: Decoding, seed: int) -> Completion:
        n_prompt = self.count_tokens(prompt)
        if n_prompt >= self.card.context:
            raise PromptTooLong(f"prompt of {n_prompt} tokens does not fit {self.card.name}'s context of {self.card.context}")
        # Without reset() the prompt cache makes a request depend on the one before it.
        self.llm.reset()
        # Every parameter explicitly: create_completion's defaults (min_p 0.05, top_k 40, ...)
        # are not the paper's.
        common = dict(max_tokens=min(params.max_tokens, self.card.context - n_prompt),
                      temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                      min_p=0.0, typical_p=1.0, repeat_penalty=1.0, frequency_penalty=0.0,
                      presence_penalty=0.0, stop=list(params.stop), seed=seed)
        if self.card.prompt_format == "chat":
            out = self.llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], **common)
            text = out["choices"][0]["message"]["content"] or ""
        else:
            out = self.llm.create_completion(prompt, **common)
            text = out["choices"][0]["text"]
        usage = out["usage"]
        return Completion(text, usage["prompt_tokens"], usage["completion_tokens"])

    def close(self) -> None:
        self.llm.close()
        del self.llm
        gc.collect()


def load(card: ModelCard, card_path: Path) -> LlamaCppBackend:
    return LlamaCppBackend(card, resolve_weights(card, card_path))
