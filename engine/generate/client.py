"""The chat-completions client: one request per chunk, retried with backoff, paced, and its answer parsed.

Speaks the OpenAI-compatible ``POST {endpoint}/chat/completions`` that vLLM, llama.cpp's
server, Ollama and hosted providers serve, through httpx. What happens to each failure:

==========================  =================================================================
429                         retried after Retry-After (else the backoff); counted ``rate_limited``
5xx                         retried with backoff; ``server_error``
timeout                     retried with backoff; ``timeout``
connection reset / a body   retried with backoff; ``connection`` (httpx raises for a body
shorter than its length     shorter than its Content-Length)
body not JSON / no choices  retried with backoff; ``malformed_response``
answer without queries      retried with backoff; ``unparseable_output``
401 / 403 / 404             the whole job stops: ``EndpointError`` (a wrong key, URL or model
                            fails every chunk alike)
other 4xx (e.g. 400)        the chunk fails at once, ``rejected_<status>`` (asking again would
                            get the same answer)
==========================  =================================================================

A chunk whose retries run out fails with its last reason; nothing is dropped unseen. The
API key is sent in the ``Authorization`` header only: never logged, and scrubbed from any
response text that goes into an error.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from engine.core.errors import ConfigError, EmbedctlError
from engine.generate.config import LLMConfig

log = logging.getLogger(__name__)

RETRYABLE = ("rate_limited", "server_error", "timeout", "connection", "malformed_response", "unparseable_output")


class EndpointError(ConfigError):
    """The endpoint refuses every request alike (bad key, URL or model): the job stops."""


class GenerationIncomplete(EmbedctlError):
    """Some chunks failed after their retries; the output holds the others and a rerun retries only the failed."""

    exit_code = 9

    def __init__(self, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.summary = summary or {}  # what `--json` still prints


class ChunkFailed(Exception):
    """One chunk could not be answered (reason is one of RETRYABLE or ``rejected_<status>``)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Retry(Exception):
    def __init__(self, reason: str, detail: str, wait: float | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.wait = wait


@dataclass
class Answer:
    queries: list[str]
    raw: str
    finish_reason: str | None
    response_model: str | None
    usage: dict[str, Any] | None
    attempts: int
    retries: dict[str, int] = field(default_factory=dict)


class RateLimiter:
    """At most ``per_minute`` acquisitions a minute, evenly spaced (thread-safe). None = no limit."""

    def __init__(self, per_minute: float | None):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


def build_messages(cfg: LLMConfig, passage: str) -> list[dict[str, str]]:
    user = cfg.template().format(n=cfg.queries_per_chunk, passage=passage)
    system = cfg.system()
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\(?\d{1,2}[.):])\s*")


def parse_queries(content: str) -> list[str] | None:
    """Queries from a model's answer: a JSON array of strings (or ``{"queries": [...]}``), else one per line
    (numbers, bullets and quotes stripped). None when the answer looks like JSON but does not parse
    (e.g. cut off by max_tokens): that is a failed answer, not a list of fragments."""
    text = _FENCE.sub("", (content or "").strip()).strip()
    if not text:
        return None
    if text[0] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            return None
        return [str(q) if not isinstance(q, dict) else str(q.get("query", "")) for q in data]
    lines = [_BULLET.sub("", ln).strip().strip('"').strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln] or None


class ChatClient:
    """One httpx client (thread-safe, pooled) for one endpoint; ``ask`` answers one passage."""

    def __init__(self, cfg: LLMConfig, api_key: str | None, limiter: RateLimiter | None = None,
                 sleep: Any = time.sleep):
        import httpx

        self.cfg = cfg
        self._key = api_key or ""
        self.url = cfg.endpoint.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(cfg.request_timeout_s))
        self.limiter = limiter or RateLimiter(None)
        self.sleep = sleep

    def close(self) -> None:
        self.http.close()

    def _scrub(self, text: str) -> str:
        text = text[:300]
        return text.replace(self._key, "***") if self._key else text

    def ask(self, passage: str) -> Answer:
        """Queries for one passage, retrying what can be retried; raises ChunkFailed or EndpointError."""
        body = {"model": self.cfg.model, "messages": build_messages(self.cfg, passage),
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        retries: dict[str, int] = {}
        for attempt in range(self.cfg.max_retries + 1):
            try:
                answer = self._once(body)
                answer.attempts, answer.retries = attempt + 1, retries
                return answer
            except _Retry as r:
                retries[r.reason] = retries.get(r.reason, 0) + 1
                if attempt == self.cfg.max_retries:
                    raise ChunkFailed(r.reason, f"{r.detail} (after {attempt + 1} attempts)") from None
                delay = r.wait if r.wait is not None else self._backoff(attempt)
                log.debug("retrying after %s (%s) in %.2f s", r.reason, r.detail, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        base = min(self.cfg.max_backoff_s, self.cfg.backoff_s * (2 ** attempt))
        return base * (0.5 + random.random() / 2)  # jitter: tasks that failed together do not retry together

    def _once(self, body: dict[str, Any]) -> Answer:
        import httpx

        self.limiter.acquire()
        try:
            resp = self.http.post(self.url, json=body)
        except httpx.TimeoutException as err:
            raise _Retry("timeout", f"no answer within {self.cfg.request_timeout_s:g} s ({type(err).__name__})") from None
        except httpx.TransportError as err:  # refused, reset, or a body cut short of its Content-Length
            raise _Retry("connection", f"{type(err).__name__}: {self._scrub(str(err))}") from None
        status = resp.status_code
        if status == 429:
            raise _Retry("rate_limited", "429 Too Many Requests", _retry_after(resp.headers.get("retry-after"),
                                                                                self.cfg.max_backoff_s))
        if status >= 500:
            raise _Retry("server_error", f"HTTP {status}: {self._scrub(resp.text)}")
        if status in (401, 403):
            raise EndpointError(f"{self.url} refused the request (HTTP {status}): check the key in "
                                f"${self.cfg.api_key_env} and that it may use model {self.cfg.model!r}")
        if status == 404:
            raise EndpointError(f"{self.url} answered 404: check --endpoint (the base URL, usually ending in /v1) "
                                f"and --model {self.cfg.model!r}: {self._scrub(resp.text)}")
        if status >= 400:
            raise ChunkFailed(f"rejected_{status}", self._scrub(resp.text))
        return self._answer(resp.content)

    def _answer(self, content: bytes) -> Answer:
        try:
            data = json.loads(content)
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message content is {type(text).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise _Retry("malformed_response", f"not a chat-completions body ({type(err).__name__}: "
                         f"{self._scrub(str(err))})") from None
        finish = choice.get("finish_reason")
        queries = parse_queries(text)
        if queries is None:
            why = "cut off at max_tokens" if finish == "length" else "no queries found"
            raise _Retry("unparseable_output", f"{why}: {self._scrub(text)!r}")
        return Answer(queries, text, finish, data.get("model"), data.get("usage"), 1)


def _retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, min(cap, float(value)))
    except ValueError:
        return None  # an HTTP date: fall back to the backoff
