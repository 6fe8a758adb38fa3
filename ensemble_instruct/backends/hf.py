"""transformers: causal and seq2seq models in fp32/fp16/bf16 or bitsandbytes 8-bit / 4-bit.

Greedy requests are batched with left padding (causal), prompts sorted by length inside a batch;
a sampled request is generated alone with its own seed. A GGUF
source is loaded once through transformers (slow: it dequantizes in pure Python) and cached as
safetensors next to the other cached models.
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
from pathlib import Path

from .. import weights
from ..config import CACHE, ModelCard
from ..errors import UserError
from . import Backend, Completion, Decoding, bnb, stop_at, too_long, trim_at_stop


def _gguf_to_safetensors(card: ModelCard, gguf: Path) -> Path:
    """Convert a GGUF to a transformers checkpoint once; reloads then take < 1 s."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = CACHE / "hf" / f"{card.name}-{key}"
    if not (out / "config.json").exists():
        export_hf(gguf, out)
    return out


def export_hf(gguf: Path, out: Path) -> None:
    """A GGUF dequantized to a float32 Hugging Face folder (model + tokenizer), written whole or not at all."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its gguf quantizer is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        out.rmdir()  # an empty folder the user named
    tmp.rename(out)  # only a complete conversion is ever found
    del model
    gc.collect()


def _stop_strings(tok, stops, start: int):
    """Stop a row once its generated text holds a stop string after its leading white space
    (transformers' own stop_strings also match a new line that an answer opens with)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tok.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([stop_at(t, stops) >= 0 for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])


class HFBackend(Backend):
    def __init__(self, card: ModelCard, path: Path):
        import logging

        import torch
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        # Our own progress bars report the work; silence per-tensor bars and kernel hints.
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        self.card, self.torch = card, torch
        self.window = card.batch_size  # one generate() call per window: static batches
        if path.is_file():
            if path.suffix != ".gguf":
                raise UserError(f"{path}: transformers needs a model directory or a .gguf file")
            path = _gguf_to_safetensors(card, path)
        cuda = torch.cuda.is_available()
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "auto": torch.bfloat16 if cuda else torch.float32}[card.dtype]
        kwargs: dict = {"dtype": dtype}
        if card.quantization != "none":
            try:
                bnb.load()
            except Exception as e:
                raise UserError(f"{card.name}: {card.quantization} needs bitsandbytes, which cannot be "
                                f"loaded here ({type(e).__name__}: {e}); pip install -e '.[hf]'") from None
            if card.quantization == "8bit":
                q = transformers.BitsAndBytesConfig(load_in_8bit=True)
            else:
                q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=card.quantization,
                                                    bnb_4bit_compute_dtype=dtype)
            kwargs["quantization_config"] = q
        kwargs["device_map"] = "auto" if cuda else "cpu"
        try:
            config = AutoConfig.from_pretrained(path)
            self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
            auto = transformers.AutoModelForSeq2SeqLM if self.seq2seq else transformers.AutoModelForCausalLM
            self.tok = AutoTokenizer.from_pretrained(path)
            self.model = auto.from_pretrained(path, **kwargs)
        except (OSError, ValueError, ImportError, RuntimeError) as e:  # incl. bitsandbytes that cannot run here
            if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
                raise  # the runner names the card and what to lower
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{path}: transformers could not load the model ({first})") from None
        self.model.eval()
        self.tok.padding_side = "right" if self.seq2seq else "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text).input_ids)

    def _format(self, prompt: str) -> str:
        if self.card.prompt_format == "chat":
            return self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        return prompt

    def stream(self, prompts: list[str], params: Decoding, seeds: list[int],
               prefix: str | None = None):
        for i in range(0, len(prompts), self.window):
            yield from self._batch(prompts[i:i + self.window], params, seeds[i:i + self.window])

    def _batch(self, prompts: list[str], params: Decoding, seeds: list[int]) -> list[Completion]:
        """One window. Greedy prompts are sorted by length so padding stays small, and results come
        back in the callers' order. A fixed prefix is not reused here."""
        texts = [self._format(p) for p in prompts]
        special = self.card.prompt_format != "chat"
        n_prompt = [len(ids) for ids in self.tok(texts, add_special_tokens=special)["input_ids"]]
        results: list[Completion | None] = [None] * len(texts)
        fits = []
        for i, n in enumerate(n_prompt):
            if n >= self.card.context and not self.seq2seq:
                results[i] = too_long(n)
            else:
                fits.append(i)
        if fits and params.temperature > 0:
            # Sampling draws from one random stream for the whole batch, and padding shifts the
            # logits a little: batched, a request's text would depend on its neighbours. Alone,
            # with its own seed, it depends on its prompt and seed only.
            for i in fits:
                results[i] = self._generate([texts[i]], params, seeds[i])[0]
        elif fits:
            order = sorted(fits, key=lambda i: -len(texts[i]))
            for i, c in zip(order, self._generate([texts[i] for i in order], params)):
                results[i] = c
        return results  # type: ignore[return-value]

    def _generate(self, texts: list[str], params: Decoding, seed: int | None = None) -> list[Completion]:
        torch = self.torch
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=self.card.prompt_format != "chat")
        n_prompt = enc["attention_mask"].sum(dim=1).tolist()
        enc = enc.to(self.model.device)
        gen = dict(max_new_tokens=params.max_tokens, pad_token_id=self.tok.pad_token_id)
        if params.temperature > 0:
            gen.update(do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        else:
            gen.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if params.stop:
            start = 0 if self.seq2seq else enc["input_ids"].shape[1]
            gen["stopping_criteria"] = _stop_strings(self.tok, params.stop, start)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**enc, **gen)
        if not self.seq2seq:
            out = out[:, enc["input_ids"].shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        results = []
        for row, ids in enumerate(out.tolist()):
            if self.seq2seq:
                ids = ids[1:]  # the decoder start token
            # Padding after the end: the generated part is everything up to the first pad/eos.
            n_gen = next((k + 1 for k, t in enumerate(ids) if t in eos), None)
            ended = n_gen is not None
            if n_gen is None:
                n_gen = sum(t != self.tok.pad_token_id for t in ids)
            text = self.tok.decode(ids[:n_gen], skip_special_tokens=True)
            trimmed = trim_at_stop(text, params.stop)
            finish = "stop" if trimmed != text else "eos" if ended or n_gen < params.max_tokens else "length"
            results.append(Completion(trimmed, int(n_prompt[row]), n_gen, finish))
        return results

    def close(self) -> None:
        del self.model
        gc.collect()
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()
        try:  # give freed heap back to the OS, or RSS stays at the model's size
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def load(card: ModelCard, card_path: Path) -> HFBackend:
    return HFBackend(card, weights.resolve(card, card_path))
