"""Fault injection on 127.0.0.1: servers that fail the way networks and cloud APIs fail.

- ``Forwarder``: a TCP relay in front of a real server (MLflow, the GCS emulator) that can be
  cut: established connections are reset and new ones refused, as when a server or its
  network goes away in the middle of a step;
- ``FaultProxy``: an HTTP proxy that answers a seeded share of requests with 429 or 503,
  resets the connection, delays, or forwards the request and loses the answer (the server
  acted, the client never hears), plus targeted faults on chosen requests (also answers cut
  off in the middle of their body). It rewrites the
  GCS emulator's upload-session URLs so that uploads go through it too.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import free_port


class Forwarder:
    """``127.0.0.1:<port>`` -> ``127.0.0.1:<target>``, until :meth:`cut`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut = threading.Event()
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Forwarder:
        threading.Thread(target=self._accept, daemon=True, name="kvx-forwarder").start()
        return self

    def cut(self) -> None:
        """Reset every open connection and refuse new ones."""
        self._cut.set()
        with self._lock:
            for sock in list(self._open):
                with suppress(OSError):
                    # Linger 0: close() sends a reset, as a dropped connection does.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
            self._open.clear()

    def stop(self) -> None:
        self._closed = True
        self.cut()
        with suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._cut.is_set():
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(source)


# --- HTTP faults ----------------------------------------------------------------------------

#: What a fault does. "lost": the server acts, the answer never arrives (the hardest case).
#: "truncate" (targeted only): the answer's headers and half its body, then a reset.
FAULT_KINDS = ("429", "503", "reset", "lost", "delay")
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class FaultPlan:
    """Which requests fail, and how: a seeded ``rate`` over ``kinds``, plus targeted ``rules``
    (method, path) -> kind that fire once each (then the request passes) and ``always``."""

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    delay: float = 0.5
    rules: list[tuple[Callable[[str, str], bool], str]] = field(default_factory=list)
    #: Like ``rules``, but firing on every matching request.
    always: list[tuple[Callable[[str, str], bool], str]] = field(default_factory=list)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``target_port`` that injects faults.

    Responses that name the target (the GCS emulator's resumable-upload ``Location``) are
    rewritten to name the proxy, so upload sessions go through it too.
    """

    def __init__(self, target_port: int, plan: FaultPlan | None = None) -> None:
        self.target_port = target_port
        self.plan = plan or FaultPlan()
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self._rng = random.Random(self.plan.seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True, name="kvx-fault-proxy").start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _choose(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            for index, (matches, kind) in enumerate(self.plan.rules):
                if matches(method, path):
                    del self.plan.rules[index]
                    self.injected[kind] += 1
                    return kind
            for matches, kind in self.plan.always:
                if matches(method, path):
                    self.injected[kind] += 1
                    return kind
            if self.plan.rate and self._rng.random() < self.plan.rate:
                kind = self._rng.choice(self.plan.kinds)
                self.injected[kind] += 1
                return kind
        return None

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        fault = self._choose(handler.command, handler.path)
        if fault in {"429", "503"}:
            message = b'{"error": {"code": %s, "message": "injected fault"}}' % fault.encode()
            handler.send_response(int(fault))
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(message)))
            handler.end_headers()
            handler.wfile.write(message)
            return
        if fault == "reset":
            _reset(handler)
            return
        if fault == "delay":
            time.sleep(self.plan.delay)
        status, headers, content = self._forward(handler, body)
        if fault == "lost":
            _reset(handler)  # the server acted; its answer is lost
            return
        if fault == "truncate":  # the connection drops in the middle of the body
            handler.send_response(status)
            for name, value in headers:
                if name.lower() not in _HOP_HEADERS:
                    handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(content[: len(content) // 2])
            handler.wfile.flush()
            _reset(handler)
            return
        handler.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                handler.send_header(name, self._rewrite(value))
        content = self._rewrite_bytes(content)
        # A HEAD answer has no body: its Content-Length is the object's size (S3's HEAD Object).
        length = dict((k.lower(), v) for k, v in headers).get("content-length", "0") \
            if handler.command == "HEAD" else str(len(content))
        handler.send_header("Content-Length", length)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(content)

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=120)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_HEADERS}
        headers["Host"] = f"127.0.0.1:{self.target_port}"
        try:
            connection.request(handler.command, handler.path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _rewrite(self, text: str) -> str:
        return text.replace(f"127.0.0.1:{self.target_port}", f"127.0.0.1:{self.port}").replace(
            f"localhost:{self.target_port}", f"127.0.0.1:{self.port}")

    def _rewrite_bytes(self, content: bytes) -> bytes:
        old = f"127.0.0.1:{self.target_port}".encode()
        return content.replace(old, f"127.0.0.1:{self.port}".encode()) if old in content else content


def _reset(handler: BaseHTTPRequestHandler) -> None:
    """Drop the connection with a TCP reset, no answer."""
    with suppress(OSError):
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.close_connection = True
    with suppress(OSError):
        handler.connection.close()
