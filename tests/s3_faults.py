"""A fault-injecting HTTP proxy in front of a real S3 endpoint (the moto server), for tests.

boto3 talks to it as to any S3-compatible endpoint on loopback; it forwards each request
to the upstream server unless a rule says otherwise. Rules make it answer like a throttled
or failing endpoint (503 SlowDown, 500 InternalError), drop the connection after the
upstream already applied the request (a lost response), or strip the conditional headers
(an endpoint that silently ignores If-None-Match / If-Match, as some S3-compatible stores
do). Nothing is patched into boto3: the requests really cross a socket twice.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Fault:
    """Answer the next ``times`` requests matching ``method`` and ``path_re`` with ``action``.

    action: ``"error"`` (reply ``status``/``code`` without forwarding), ``"drop"`` (forward
    to the upstream, then close the connection without replying) or ``"corrupt"`` (flip one
    byte of the body and drop its checksum headers before forwarding: a store that keeps
    damaged bytes and says nothing).
    """

    method: str | None = None
    path_re: str | None = None
    action: str = "error"
    status: int = 503
    code: str = "SlowDown"
    times: int = 1

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.path_re is None or
                                                                   re.search(self.path_re, path) is not None)


class S3FaultProxy:
    def __init__(self, upstream: str):
        parsed = urlparse(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.faults: list[Fault] = []
        self.strip_conditionals = False
        self.log: list[tuple[str, str, int]] = []  # (method, path, status or -1 for a drop)
        self.injected = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._take_fault(self.command, self.path)
                if fault is not None and fault.action == "error":
                    payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                               f"<Message>injected by the test proxy</Message></Error>").encode()
                    proxy._record(self.command, self.path, fault.status)  # before the reply (see below)
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if proxy.strip_conditionals:
                    headers = {k: v for k, v in headers.items() if k.lower() not in ("if-match", "if-none-match")}
                if fault is not None and fault.action == "corrupt" and body:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                    headers = {k: v for k, v in headers.items()
                               if not k.lower().startswith(("x-amz-checksum", "x-amz-sdk-checksum", "content-md5"))}
                if "Content-Length" not in headers and body:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST")
                                 else None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, resp_headers = resp.status, resp.getheaders()
                finally:
                    conn.close()
                if fault is not None and fault.action == "drop":
                    # The upstream applied the request; the client never hears about it.
                    proxy._record(self.command, self.path, -1)
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                # logged before the reply goes out: a client that has its answer must find it in the log
                proxy._record(self.command, self.path, status)
                self.send_response(status)
                for k, v in resp_headers:
                    if k.lower() not in HOP_BY_HOP and k.lower() not in ("content-length", "date", "server"):
                        self.send_header(k, v)
                # A HEAD reply carries the object's length with no body.
                length = dict((k.lower(), v) for k, v in resp_headers).get("content-length", "0") \
                    if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.matches(method, path):
                    fault.times -= 1
                    self.injected += 1
                    return fault
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append((method, path, status))

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def __enter__(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
