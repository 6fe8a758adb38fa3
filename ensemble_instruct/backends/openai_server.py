"""An OpenAI-compatible server (vLLM, llama.cpp server, TGI, Ollama) instead of local weights.

`/v1/completions` for plain prompts, `/v1/chat/completions` for the chat format. A window of
`concurrency` requests is in flight: the next is sent as soon as any returns, and `stream` yields
the completions in prompt order, so the pipeline writes records in order as they complete. With
`base_urls` the requests are spread over several servers of the same model; a server that refuses
connections (its engine died) is dropped at once and its requests go to the others; when none is
left the run ends with one line, and the next `generate` resumes from what is on disk. Timeouts,
429 and 5xx are retried with exponential backoff.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from ..config import ModelCard
from ..errors import BadResponse, UserError
from . import Backend, Completion, Decoding, stop_at, too_long

_CONTEXT_WORDS = ("context", "too long", "maximum", "exceed")
_TOKENIZERS = [("/extras/tokenize", "input"),  # llama-cpp-python
               ("/tokenize", "prompt"),  # vLLM
               ("/tokenize", "content")]  # llama.cpp server


def _client(card: ModelCard, base_url: str, timeout: float):
    import httpx

    headers = {}
    if card.api_key_env:
        key = os.environ.get(card.api_key_env)
        if not key:
            raise UserError(f"{card.name}: the environment variable {card.api_key_env} (the API key) is not set")
        headers["Authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=base_url, headers=headers, timeout=timeout)


def preflight(card: ModelCard, card_path: Path) -> None:
    """Before any stage: every server answers, serves the card's model, and (when it says so, as
    vLLM does) has room for the card's context: vLLM would otherwise shorten outputs silently."""
    import httpx

    for url in card.endpoints:
        with _client(card, url, timeout=10) as client:
            try:
                r = client.get("/v1/models")
            except httpx.HTTPError as e:
                raise UserError(f"{card_path}: cannot reach the server at {url} ({type(e).__name__}); "
                                "start it first") from None
            if r.status_code in (401, 403):
                raise UserError(f"{card_path}: the server at {url} refused the API key (HTTP {r.status_code})")
            if r.status_code != 200:
                continue  # some servers have no model list; the first request will tell
            try:
                models = {m.get("id"): m for m in r.json().get("data", [])}
            except (ValueError, AttributeError):
                raise BadResponse(f"{card_path}: the server at {url} answered /v1/models with something "
                                "that is not an OpenAI model list") from None
            if models and card.model not in models:
                raise UserError(f"{card_path}: the server at {url} does not serve model {card.model!r} "
                                f"(it serves: {', '.join(map(str, models))})")
            limit = (models.get(card.model) or {}).get("max_model_len")
            if isinstance(limit, int) and card.context > limit:
                raise UserError(f"{card_path}: context = {card.context}, but the server at {url} serves "
                                f"{card.model!r} with max_model_len {limit}; set context = {limit} on the card "
                                "or start the server with a larger --max-model-len")


class _PromptTooLong(Exception):
    """The server refused the prompt as longer than its context."""


class _ServerGone(Exception):
    """A server refused the connection: its engine is not running."""


class OpenAIBackend(Backend):
    def __init__(self, card: ModelCard, card_path: Path):
        preflight(card, card_path)
        self.card = card
        # Answers do not depend on each other; records are written a window at a time, while
        # `concurrency` requests stay in flight across windows.
        self.window = card.concurrency
        self.clients = {url: _client(card, url, card.timeout_s) for url in card.endpoints}
        self.client = self.clients[card.endpoints[0]]
        self.gone: set[str] = set()  # servers that refused a connection
        self._lock = threading.Lock()
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
                if r.status_code == 200 and isinstance((_json(r) or {}).get("tokens"), list):
                    self._tokenize = (path, field)
                    break
        path, field = self._tokenize
        if not path:
            return len(text) // 3 + 1
        return len(self._request(0, path, {"model": self.card.model, field: text}, need="tokens")["tokens"])

    def stream(self, prompts: list[str], params: Decoding, seeds: list[int],
               prefix: str | None = None) -> Iterator[Completion]:  # servers cache prefixes themselves
        """Completions in prompt order, `concurrency` requests in flight: the next is sent as soon
        as any returns. Closing the iterator cancels what has not been sent."""
        if len(prompts) == 1:
            yield self._one(0, prompts[0], params, seeds[0])
            return
        pool = ThreadPoolExecutor(min(self.card.concurrency, len(prompts)))
        try:
            futures = [pool.submit(self._one, i, p, params, s) for i, (p, s) in enumerate(zip(prompts, seeds))]
            for f in futures:
                yield f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _one(self, index: int, prompt: str, params: Decoding, seed: int) -> Completion:
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
        comp = self._complete(index, path, body, chat)
        if comp.finish == "stop" and not comp.text.strip() and any(not x.strip() for x in params.stop):
            # The server stopped at a blank line before the answer began; our rule (as the local
            # backends) ignores leading white space. Ask again without the blank-line stops (same
            # seed: the same tokens) and cut where the local backends would.
            body["stop"] = [x for x in params.stop if x.strip()]
            comp = self._complete(index, path, body, chat)
            cut = stop_at(comp.text, params.stop)
            if cut >= 0:
                comp = Completion(comp.text[:cut], comp.prompt_tokens, comp.completion_tokens, "stop")
        return comp

    def _complete(self, index: int, path: str, body: dict, chat: bool) -> Completion:
        try:
            data = self._request(index, path, body, need="choices")
        except _PromptTooLong:
            return too_long()
        choice = data["choices"][0]
        if not isinstance(choice, dict):
            raise BadResponse(f"{self.card.name}: the server answered {path} with choices that are not objects; "
                              "everything finished so far is saved")
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

    def _request(self, index: int, path: str, body: dict, need: str) -> dict:
        """Request `index` goes to server index % n; if that server is gone, to the next one that is
        not (the same model and seed: the same answer)."""
        urls = self.card.endpoints
        for k in range(len(urls)):
            url = urls[(index + k) % len(urls)]
            if url in self.gone:
                continue
            try:
                return self._post(url, path, body, need)
            except _ServerGone:
                with self._lock:
                    self.gone.add(url)
        raise UserError(f"{self.card.name}: the server at {', '.join(urls)} stopped accepting connections "
                        "(its engine exited?); everything finished so far is saved: restart the server "
                        "and run the same command again")

    def _post(self, url: str, path: str, body: dict, need: str) -> dict:
        """POST with retries and backoff on timeouts, 429 and 5xx; a refused connection is final.
        A 200 answer must be a JSON object with a non-empty list `need` (an HTML page from a proxy, a
        server that is not OpenAI-compatible: one line, its own exit code)."""
        import httpx

        last = ""
        for attempt in range(self.card.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 30.0))
            if url in self.gone:
                raise _ServerGone(url)
            try:
                r = self.clients[url].post(path, json=body)
            except httpx.ConnectError:
                raise _ServerGone(url) from None
            except httpx.HTTPError as e:  # reset, timeout
                last = type(e).__name__
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}"
                continue
            if r.status_code != 200:
                text = " ".join(r.text[:300].split())
                if r.status_code in (400, 413, 422) and any(w in text.lower() for w in _CONTEXT_WORDS):
                    raise _PromptTooLong(text)
                raise UserError(f"{self.card.name}: the server at {url} answered HTTP {r.status_code}: {text}")
            try:
                data = r.json()
                what = f"JSON without {need!r}"
            except ValueError:
                data, what = None, "a body that is not JSON"
            if not (isinstance(data, dict) and isinstance(data.get(need), list) and data[need]):
                raise BadResponse(f"{self.card.name}: the server at {url} answered {path} with HTTP 200 but {what} "
                                  f"({' '.join(r.text[:120].split())!r}); is base_url an OpenAI-compatible server? "
                                  "Everything finished so far is saved")
            return data
        raise UserError(f"{self.card.name}: the server at {url} did not answer after "
                        f"{self.card.retries + 1} tries ({last}); everything finished so far is saved, "
                        "run the same command again once the server is back")

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def _json(r) -> dict | None:
    try:
        data = r.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def load(card: ModelCard, card_path: Path) -> OpenAIBackend:
    return OpenAIBackend(card, card_path)
