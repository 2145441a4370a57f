"""A small chat client for `label.py`: an OpenAI-compatible HTTP endpoint or a local transformers model.

Backends answer one chat (a list of `{"role", "content"}` messages) with text:

- `OpenAICompatible(api_base, model, api_key)` POSTs `{api_base}/chat/completions` with `temperature = 0` and
  `max_tokens` (the protocol of OpenAI's API, also served by vLLM, llama.cpp's server, Ollama and most hosted
  APIs). Standard library only (urllib). `probe()` asks `{api_base}/models` once before any work, so an
  unreachable endpoint or a rejected key is an `InputError` (one line, exit 2) instead of hours of failed requests.
- `LocalModel(path)` runs a local causal LM with greedy decoding (its chat template when it has one).

`ChatClient` adds what a batch of prompts needs: answers cached on disk by a SHA-256 of (backend, model, messages,
generation settings), so re-running costs nothing; requests run concurrently up to a limit; 429, 5xx, timeouts and
dropped connections are retried with exponential backoff (honouring a numeric `Retry-After`); any other failure is
returned as an error in the `Reply`, never raised, so one bad request does not end a run.

Nothing here imports torch or transformers at module level; only `LocalModel` does, when built.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from common.errors import InputError

Messages = Sequence[dict[str, str]]
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})  # worth another try; other HTTP errors are final
MAX_RETRY_AFTER = 60.0  # seconds: a server asking for a longer pause gets this long at most


class RequestError(Exception):
    """One request failed for good (recorded in its `Reply`, the run goes on)."""


class TransientError(RequestError):
    """One request failed in a way worth retrying; `retry_after` is the server's requested pause, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Backend(Protocol):
    identity: dict[str, str]  # what makes answers differ (part of the cache key)
    concurrency_limit: int | None  # None: as many parallel requests as the client allows

    def complete(self, messages: Messages, max_tokens: int) -> tuple[str, str | None]:
        """(reply text, a note for the record or None); raises RequestError / TransientError."""
        ...


# ------------------------------------------------------------------------------------------------ HTTP


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value))) if value is not None else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


class OpenAICompatible:
    """Chat completions from an OpenAI-compatible server. `api_key` None sends no Authorization header."""

    concurrency_limit = None

    def __init__(self, api_base: str, model: str, api_key: str | None, timeout: float = 120.0) -> None:
        self.api_base = api_base.rstrip("/")
        self.url = f"{self.api_base}/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.identity = {"backend": "openai-compatible", "model": model}

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def probe(self, timeout: float = 10.0) -> list[str] | None:
        """GET {api_base}/models: the model ids it lists (None if it lists none); `InputError` when the endpoint
        cannot be reached or rejects the key. Servers without a model list (404/405) pass."""
        request = urllib.request.Request(f"{self.api_base}/models", headers=self._headers(), method="GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            if err.code in (401, 403) and self.api_key is None:  # e.g. a local vLLM started with --api-key
                raise InputError(f"--api-base {self.api_base} asks for an API key (HTTP {err.code}) and none was "
                                 "sent; put it in the variable --api-key-env names (default OPENAI_API_KEY)") from None
            if err.code in (401, 403):
                raise InputError(f"--api-base {self.api_base} rejected the API key (HTTP {err.code}); check "
                                 "--api-key-env") from None
            return None  # reachable; 404/405 (no model list) or a server error the retries will meet
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise InputError(f"--api-base {self.api_base} cannot be reached ({reason}); nothing was sent") from None
        try:
            listed = json.loads(body)["data"]
            return [str(item["id"]) for item in listed]
        except (ValueError, KeyError, TypeError):
            return None

    def complete(self, messages: Messages, max_tokens: int) -> tuple[str, str | None]:
        payload = {"model": self.model, "messages": list(messages), "temperature": 0, "max_tokens": max_tokens}
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=self._headers(),
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:200].decode(errors="replace").strip()
            message = f"HTTP {err.code}" + (f": {detail}" if detail else "")
            if err.code in RETRY_STATUS or err.code >= 500:
                raise TransientError(message, _retry_after(err.headers)) from None
            raise RequestError(message) from None
        except TimeoutError:
            raise TransientError(f"timed out after {self.timeout:g} s") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, cut short
            raise TransientError(f"connection failed: {getattr(err, 'reason', err) or type(err).__name__}") from None
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RequestError(f"not a chat completion: {body[:200].decode(errors='replace')!r}") from None
        if not isinstance(content, str):
            raise RequestError(f"no text in the reply: {body[:200].decode(errors='replace')!r}")
        return content, None


# ------------------------------------------------------------------------------------------------ local


class LocalModel:
    """A local transformers causal LM (a folder written by `save_pretrained`, or a shipped model name such as
    'demo'), greedy decoding. A prompt longer than the model's context keeps its last tokens (said in the note)."""

    concurrency_limit = 1  # one model, one request at a time

    def __init__(self, name: str, device: str = "auto", dtype: str = "auto") -> None:
        import torch

        from common.config import ModelSpec
        from common.model import load_model_and_tokenizer

        self._torch = torch
        self.model, self.tokenizer, source = load_model_and_tokenizer(ModelSpec(model=name, device=device, dtype=dtype))
        self.identity = {"backend": "local-transformers", "model": name, "path": str(Path(source).resolve())}
        config = getattr(self.model.config, "get_text_config", lambda: self.model.config)()
        self.context = getattr(config, "max_position_embeddings", None)
        self._lock = threading.Lock()

    def _prompt_ids(self, messages: Messages) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False, verbose=False)["input_ids"]  # too long: cut below, no warning
        text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant:"
        return tok(text, verbose=False)["input_ids"]

    def complete(self, messages: Messages, max_tokens: int) -> tuple[str, str | None]:
        torch = self._torch
        ids, note = self._prompt_ids(messages), None
        if self.context is not None:
            limit = self.context - max_tokens
            if limit < 1:
                raise RequestError(f"max_tokens {max_tokens} leaves no room in the model's context of {self.context}")
            if len(ids) > limit:
                note = f"prompt of {len(ids)} tokens cut to its last {limit} (the model's context is {self.context})"
                ids = ids[-limit:]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        inputs = torch.tensor([ids], device=device)
        with self._lock, torch.inference_mode():
            out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=pad)
        return self.tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True), note


# ------------------------------------------------------------------------------------------------ cache


class ResponseCache:
    """Answers on disk, one JSON file per prompt hash (`<folder>/<hash[:2]>/<hash>.json`), written atomically."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    @staticmethod
    def key(identity: dict[str, str], messages: Messages, max_tokens: int) -> str:
        text = json.dumps({"llm": identity, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if self.folder is None:
            return None
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, record: dict) -> None:
        if self.folder is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False)
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ client


@dataclass
class Reply:
    """The outcome of one prompt: `text` (None if it failed), `error`, whether the cache answered it, how many
    attempts were made (0 when cached) and a backend note (e.g. a truncated prompt)."""

    text: str | None
    error: str | None = None
    cached: bool = False
    attempts: int = 0
    note: str | None = None


@dataclass
class ClientStats:
    sent: int = 0  # requests made to the backend (retries included)
    cached: int = 0  # prompts answered from the cache
    retried: int = 0  # retries after a 429 / 5xx / timeout / dropped connection
    failed: int = 0  # prompts with no answer after all attempts
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, int]:
        return {"requests_sent": self.sent, "answered_from_cache": self.cached, "retries": self.retried,
                "failed": self.failed}


class ChatClient:
    """Runs many prompts through a backend: cache first, then up to `concurrency` requests at a time, each retried
    up to `retries` times on transient errors with waits of backoff · 2^attempt seconds (±25 % jitter)."""

    def __init__(self, backend: Backend, cache: ResponseCache, *, concurrency: int = 4, retries: int = 4,
                 backoff: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> None:
        limit = backend.concurrency_limit
        self.backend, self.cache = backend, cache
        self.concurrency = max(1, min(concurrency, limit) if limit else concurrency)
        self.retries, self.backoff, self.sleep = retries, backoff, sleep
        self.stats = ClientStats()

    def key(self, messages: Messages, max_tokens: int) -> str:
        return ResponseCache.key(self.backend.identity, messages, max_tokens)

    def is_cached(self, messages: Messages, max_tokens: int) -> bool:
        return self.cache.get(self.key(messages, max_tokens)) is not None

    def complete(self, messages: Messages, max_tokens: int) -> Reply:
        key = self.key(messages, max_tokens)
        hit = self.cache.get(key)
        if hit is not None and isinstance(hit.get("text"), str):
            self.stats.add(cached=1)
            return Reply(hit["text"], cached=True, note=hit.get("note"))
        attempt = 0
        while True:
            attempt += 1
            self.stats.add(sent=1)
            try:
                text, note = self.backend.complete(messages, max_tokens)
            except TransientError as err:
                if attempt > self.retries:
                    self.stats.add(failed=1)
                    return Reply(None, f"{err} (gave up after {attempt} attempts)", attempts=attempt)
                wait = err.retry_after if err.retry_after is not None else self.backoff * 2 ** (attempt - 1)
                self.stats.add(retried=1)
                self.sleep(wait * random.uniform(0.75, 1.25))
                continue
            except RequestError as err:
                self.stats.add(failed=1)
                return Reply(None, str(err), attempts=attempt)
            self.cache.put(key, {"llm": self.backend.identity, "messages": list(messages), "max_tokens": max_tokens,
                                 "text": text, "note": note})
            return Reply(text, attempts=attempt, note=note)

    def complete_all(self, prompts: Sequence[tuple[Messages, int]]) -> list[Reply]:
        """Replies to (messages, max_tokens) prompts, in their order. Identical prompts are asked once."""
        keys = [self.key(m, n) for m, n in prompts]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}
        unique = sorted(first.values())
        if self.concurrency == 1 or len(unique) < 2:
            answered = [self.complete(*prompts[i]) for i in unique]
        else:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency)
            try:
                answered = list(pool.map(lambda i: self.complete(*prompts[i]), unique))
            except BaseException:  # Ctrl-C: send nothing more (requests in flight finish in their threads)
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
        by_key = {keys[i]: reply for i, reply in zip(unique, answered, strict=True)}
        return [by_key[key] for key in keys]
