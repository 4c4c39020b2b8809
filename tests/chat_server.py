"""A real chat-completions server on loopback for the generate-queries tests (http.server in a thread).

Answers ``POST /v1/chat/completions`` with queries derived deterministically from the
passage in the prompt, and fails on demand:

- ``server.queue(["429", "500", ...])``: the next requests (whichever chunk) get these, in order;
- a passage containing ``FAIL:<kind>`` gets ``<kind>`` on every request (a chunk that never succeeds);

where a kind is ``429``, ``500``, ``400``, ``401``, ``slow`` (sleeps ``slow_s`` before answering),
``malformed`` (a body that is not JSON), ``truncated`` (a body shorter than its Content-Length,
then the connection closes), ``nochoices`` (JSON without choices), ``garbage`` (an answer holding no
queries), ``cutoff`` (a JSON array cut off by max_tokens). Every request is counted, per passage too.
Run as a script (``python -m tests.chat_server --port 8011``) it is the README loop's local stand-in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_WORD = re.compile(r"[A-Za-z][A-Za-z-]{2,}")
_STOP = frozenset(["the", "and", "for", "with", "that", "this", "from", "are", "was", "were", "has", "have", "its", "into", "not", "but", "can"])


def passage_of(messages: list[dict[str, Any]]) -> str:
    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    return user.split("Passage:\n", 1)[-1]


def queries_for(passage: str, n: int) -> list[str]:
    """n queries from the passage's words: deterministic, distinct, short."""
    words = [w.lower() for w in _WORD.findall(passage) if w.lower() not in _STOP] or ["empty"]
    out = []
    for i in range(n):
        start = (i * 3) % max(1, len(words))
        out.append(" ".join(["what", "about", *words[start:start + 4]]) + f" {i}")
    return out


def _n_of(messages: list[dict[str, Any]]) -> int:
    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    m = re.search(r"Write (\d+)", user)
    return int(m.group(1)) if m else 3


class ChatServer:
    def __init__(self, port: int = 0, slow_s: float = 2.0, delay_s: float = 0.0):
        self.slow_s = slow_s
        self.delay_s = delay_s  # every answer waits this long (to kill a job mid-run)
        self.requests = 0
        self.by_passage: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self.require_key: str | None = None
        self._queue: list[str] = []
        self._lock = threading.Lock()
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def queue(self, kinds: list[str]) -> None:
        with self._lock:
            self._queue.extend(kinds)

    def _next_fault(self, passage: str) -> str | None:
        m = re.search(r"FAIL:(\w+)", passage)
        if m:
            return m.group(1)
        with self._lock:
            return self._queue.pop(0) if self._queue else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, *, length: int | None = None,
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = json.loads(raw)
                passage = passage_of(req["messages"])
                with server._lock:
                    server.requests += 1
                    server.by_passage[hashlib.sha256(passage.encode()).hexdigest()] += 1
                    server.auth.append(self.headers.get("Authorization"))
                if server.require_key and self.headers.get("Authorization") != f"Bearer {server.require_key}":
                    return self._send(401, b'{"error": {"message": "invalid api key"}}')
                if server.delay_s:
                    time.sleep(server.delay_s)
                fault = server._next_fault(passage)
                if fault in ("429", "500", "400", "401"):
                    headers = {"Retry-After": "0"} if fault == "429" else None
                    return self._send(int(fault), b'{"error": {"message": "fault on demand"}}', headers=headers)
                if fault == "slow":
                    time.sleep(server.slow_s)
                if fault == "malformed":
                    return self._send(200, b'{"choices": [{"message": ')
                if fault == "truncated":
                    self.close_connection = True
                    return self._send(200, b'{"choices": [', length=500)
                if fault == "nochoices":
                    return self._send(200, b'{"object": "chat.completion"}')
                n = _n_of(req["messages"])
                content = json.dumps(queries_for(passage, n))
                finish = "stop"
                if fault == "garbage":
                    content = "   "
                elif fault == "cutoff":
                    content, finish = content[: len(content) // 2], "length"
                body = {"id": "chatcmpl-test", "object": "chat.completion", "model": req.get("model"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                     "finish_reason": finish}],
                        "usage": {"prompt_tokens": len(passage.split()), "completion_tokens": len(content.split())}}
                return self._send(200, json.dumps(body).encode())

        return Handler


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="a local chat-completions stand-in (deterministic queries)")
    p.add_argument("--port", type=int, default=8011)
    args = p.parse_args()
    with ChatServer(args.port) as srv:
        print(f"serving {srv.url}/chat/completions", flush=True)
        srv.thread.join()
