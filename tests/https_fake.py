"""A fake HTTPS API server on 127.0.0.1 (trustme certificate, HTTP/1.1 keep-alive) for provider fakes.

A provider fake subclasses `FakeApi` and implements `handle(request) -> Response`, checking what the real API
checks. The base records every request, can be told to answer every request with a given status (`fail_with`),
to wait before answering (`delay`), and keeps exceptions raised by `handle` (bugs in the fake) in
`handler_errors`, which a test fixture asserts empty.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import trustme

LOOPBACK = "127.0.0.1"
MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class Request:
    """One request as the fake received it (header names in lower case)."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int] = ("", 0)  # the client's address: one per connection

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"

    @classmethod
    def of_json(cls, status: int, value: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
        return cls(status, json.dumps(value).encode(), tuple(headers))


@dataclass
class _Override:
    response: Response | None = None
    remaining: int | None = None  # None: until cleared


class FakeApi:
    """Base of the provider fakes: start/stop, the base URL, request log, failure controls."""

    def __init__(self, ca: trustme.CA) -> None:
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._override = _Override()
        self._delay = 0.0
        self._stopping = threading.Event()
        self.handler_errors: list[BaseException] = []
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(LOOPBACK).configure_cert(self._context)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- for subclasses ------------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> FakeApi:
        server = _Server((LOOPBACK, 0), _Handler)
        server.api = self
        server.socket = self._context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> FakeApi:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    # -- controls ------------------------------------------------------------------------------------------

    def fail_with(self, response: Response | None, times: int | None = None) -> None:
        """Answer the next `times` requests (all, when None) with `response`; None: back to normal."""
        with self._lock:
            self._override = _Override(response, times)

    @property
    def delay(self) -> float:
        with self._lock:
            return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        with self._lock:
            self._delay = seconds

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    # -- the server's side ---------------------------------------------------------------------------------

    def answer(self, request: Request) -> Response:
        with self._lock:
            self._requests.append(request)
            override = self._override
            if override.response is not None and override.remaining is not None:
                override.remaining -= 1
                if override.remaining <= 0:
                    self._override = _Override()
            delay = self._delay
        if delay:
            self._stopping.wait(delay)
        if override.response is not None:
            return override.response
        try:
            return self.handle(request)
        except Exception as exc:  # noqa: BLE001 - a bug in the fake: kept for the test, answered as a 500
            with self._lock:
                self.handler_errors.append(exc)
            return Response(500, b"fake error", content_type="text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: FakeApi

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, ssl.SSLError | ConnectionError | TimeoutError):
            with self.api._lock:
                self.api.handler_errors.append(error)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs
    timeout = 30
    server: _Server

    def do_POST(self) -> None:
        self._serve()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_BODY:
            self.send_error(413)
            self.close_connection = True
            return
        body = self.rfile.read(length)
        headers = {name.lower(): value for name, value in self.headers.items()}
        response = self.server.api.answer(Request(self.command, self.path, headers, body, self.client_address[:2]))
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass

