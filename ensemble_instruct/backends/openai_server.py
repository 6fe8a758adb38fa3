"""An OpenAI-compatible server (vLLM, llama.cpp server, TGI, Ollama) instead of local weights.

`/v1/completions` for plain prompts, `/v1/chat/completions` for the chat format. Up to
`concurrency` requests are in flight; results come back in prompt order, so the pipeline writes
them in record order exactly as with local backends. Connection errors, 429 and 5xx are retried
with exponential backoff; a server that stays away ends the run with a clear message, and the
next `generate` resumes from what is on disk.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import ModelCard
from ..errors import BadResponse, UserError
from . import Completion, Decoding, too_long

_CONTEXT_WORDS = ("context", "too long", "maximum", "exceed")
_TOKENIZERS = [("/extras/tokenize", "input"),  # llama-cpp-python
               ("/tokenize", "prompt"),  # vLLM
               ("/tokenize", "content")]  # llama.cpp server


def _client(card: ModelCard, timeout: float):
    import httpx

    headers = {}
    if card.api_key_env:
        key = os.environ.get(card.api_key_env)
        if not key:
            raise UserError(f"{card.name}: the environment variable {card.api_key_env} (the API key) is not set")
        headers["Authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=card.base_url.rstrip("/"), headers=headers, timeout=timeout)


def _json(card: ModelCard, r, need: str) -> dict:
    """The body of a 200 answer as a JSON object holding the list `need`; anything else (an HTML error page
    from a proxy, a server that is not OpenAI-compatible) is a one-line error."""
    try:
        data = r.json()
    except ValueError:
        data = None
        what = "a body that is not JSON"
    else:
        what = f"JSON without {need!r}"
    if not (isinstance(data, dict) and isinstance(data.get(need), list) and (data[need] or need != "choices")):
        snippet = " ".join(r.text[:120].split())
        raise BadResponse(f"{card.name}: the server at {card.base_url} answered {r.request.url.path} with HTTP 200 "
                          f"but {what} ({snippet!r}); is base_url an OpenAI-compatible server? Everything "
                          "finished so far is saved") from None
    return data


def preflight(card: ModelCard, card_path: Path) -> None:
    """Before any stage: the server answers, and serves the card's model."""
    import httpx

    with _client(card, timeout=10) as client:
        try:
            r = client.get("/v1/models")
        except httpx.HTTPError as e:
            raise UserError(f"{card_path}: cannot reach the server at {card.base_url} ({type(e).__name__}); "
                            "start it first") from None
        if r.status_code in (401, 403):
            raise UserError(f"{card_path}: the server at {card.base_url} refused the API key (HTTP {r.status_code})")
        if r.status_code == 200:
            served = [m.get("id") for m in _json(card, r, "data")["data"] if isinstance(m, dict)]
            if served and card.model not in served:
                raise UserError(f"{card_path}: the server at {card.base_url} does not serve model {card.model!r} "
                                f"(it serves: {', '.join(map(str, served))})")


class _PromptTooLong(Exception):
    """The server refused the prompt as longer than its context."""


class OpenAIBackend:
    def __init__(self, card: ModelCard, card_path: Path):
        preflight(card, card_path)
        self.card = card
        self.batch_size = card.concurrency  # one batch = the requests in flight together
        self.client = _client(card, card.timeout_s)
        self._tokenize = None  # the server's tokenizer endpoint, found on first use

    def count_tokens(self, text: str) -> int:
        """Through the server's tokenizer; each server family names it differently. Found once: if
        there is none, a conservative estimate is used for the whole run, so prompts stay the same."""
        import httpx

        if self._tokenize is None:
            self._tokenize = ("", "")
            for path, field in _TOKENIZERS:
                try:
                    r = self.client.post(path, json={"model": self.card.model, field: "probe"})
                except httpx.HTTPError:
                    continue
                try:
                    found = r.status_code == 200 and isinstance(r.json().get("tokens"), list)
                except (ValueError, AttributeError):  # not this server's tokenizer
                    found = False
                if found:
                    self._tokenize = (path, field)
                    break
        path, field = self._tokenize
        if not path:
            return len(text) // 3 + 1
        r = self._post(path, {"model": self.card.model, field: text})
        return len(_json(self.card, r, "tokens")["tokens"])

    def generate(self, prompts: list[str], params: Decoding, seeds: list[int],
                 prefix: str | None = None) -> list[Completion]:  # servers cache prefixes themselves
        if len(prompts) == 1:
            return [self._one(prompts[0], params, seeds[0])]
        with ThreadPoolExecutor(min(self.card.concurrency, len(prompts))) as pool:
            return list(pool.map(lambda ps: self._one(ps[0], params, ps[1]), zip(prompts, seeds)))

    def _one(self, prompt: str, params: Decoding, seed: int) -> Completion:
        body = {**self.card.extra_body, "model": self.card.model, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "seed": seed, "stream": False,
                "presence_penalty": 0.0, "frequency_penalty": 0.0}
        if params.top_k:
            body["top_k"] = params.top_k  # not in OpenAI's API; vLLM, llama.cpp and TGI accept it
        if params.stop:
            body["stop"] = list(params.stop)
        chat = self.card.prompt_format == "chat"
        if chat:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
        else:
            path, body["prompt"] = "/v1/completions", prompt
        try:
            data = _json(self.card, self._post(path, body), "choices")
        except _PromptTooLong:
            return too_long()
        choice = data["choices"][0]
        if not isinstance(choice, dict):
            raise BadResponse(f"{self.card.name}: the server at {self.card.base_url} answered with choices "
                              "that are not objects; everything finished so far is saved")
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        usage = data.get("usage") or {}
        if choice.get("finish_reason") == "length":
            finish = "length"
        elif isinstance(choice.get("stop_reason"), str):
            finish = "stop"
        elif "stop_reason" in choice:  # vLLM: None or a token id means the end-of-text token
            finish = "eos"
        else:  # servers that do not say which
            finish = "stop"
        return Completion(text or "", usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), finish)

    def _post(self, path: str, body: dict):
        """POST with retries and backoff on connection errors, 429 and 5xx."""
        import httpx

        last = ""
        for attempt in range(self.card.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 30.0))
            try:
                r = self.client.post(path, json=body)
            except httpx.HTTPError as e:  # connection refused or reset, timeout
                last = type(e).__name__
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}"
                continue
            if r.status_code != 200:
                text = " ".join(r.text[:300].split())
                if r.status_code in (400, 413, 422) and any(w in text.lower() for w in _CONTEXT_WORDS):
                    raise _PromptTooLong(text)
                raise UserError(f"{self.card.name}: the server at {self.card.base_url} answered "
                                f"HTTP {r.status_code}: {text}")
            return r
        raise UserError(f"{self.card.name}: the server at {self.card.base_url} did not answer after "
                        f"{self.card.retries + 1} tries ({last}); everything finished so far is saved, "
                        "run the same command again once the server is back")

    def close(self) -> None:
        self.client.close()


def load(card: ModelCard, card_path: Path) -> OpenAIBackend:
    return OpenAIBackend(card, card_path)
