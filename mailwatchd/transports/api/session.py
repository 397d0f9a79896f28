"""One HTTPS API relay session: an httpx client kept alive between messages (HTTP/1.1 keep-alive), each
request under connect, read and total deadlines. The provider module builds the request and reads the
reply; outcome.py's `classify_http` turns the reading into the closed set, so an API relay fails over,
pauses on a quota and is probed like an SMTP relay.

httpx, not aiohttp: its timeouts are per phase (connect, read, write, pool), it takes an ssl.SSLContext
as is (the relay's CA file, verification always on), and Authlib already builds the OAuth2 token client
on it. HTTP/2 would need the h2 package for one request per message on one connection: not worth it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.settings.apirelays import ApiConfig
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig
from mailwatchd.transports.api.provider import ApiOutcome, ApiReply, ApiRequest, Provider, Unexpressible
from mailwatchd.transports.outcome import (
    Cause,
    DeliveryResult,
    HttpProblem,
    Outcome,
    Phase,
    Verdict,
    classify_exception,
    classify_http,
)
from mailwatchd.transports.smtpwire import describe, scrub

UPLOAD_FLOOR_BYTES_PER_S = 16 * 1024  # as SMTP: a request may take as long as its body needs at this rate
MAX_REPLY_BYTES = 1024 * 1024  # an API's reply is a small JSON object; more is not read


def make_provider(config: ApiConfig, clock: Callable[[], float] = time.time) -> Provider:
    """The provider module for `config.kind` (mailwatchd/transports/api/<kind>.py), imported on first use."""
    module = importlib.import_module(f"mailwatchd.transports.api.{config.kind.value}")
    provider: Provider = module.make(config, clock)
    return provider


def request_deadline(settings: Settings, size: int) -> float:
    """Seconds one request may take: connect, then MAILWATCHD_TRANSACTION_TIMEOUT (more for a large body)."""
    return settings.connect_timeout + max(settings.transaction_timeout, size / UPLOAD_FLOOR_BYTES_PER_S)


class ApiSession:
    """A session to one HTTPS API relay (a RelaySession): `open` makes the client, `deliver` sends one message."""

    def __init__(self, relay: RelayConfig, endpoint: Endpoint, settings: Settings,
                 tls_context: ssl.SSLContext | None = None, *, provider: Provider | None = None) -> None:
        assert relay.api is not None, "an ApiSession needs an HTTPS API relay"
        self.relay = relay
        self.endpoint = endpoint
        self._settings = settings
        self._config = relay.api
        self._tls_context = tls_context
        self._provider = provider
        self._client: Any = None  # httpx.AsyncClient, imported with the first session
        self._last_used = time.monotonic()
        self._secrets = (relay.api.key.reveal(),)

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def greeted(self) -> bool:
        return self._client is not None

    @property
    def idle_for(self) -> float:
        return time.monotonic() - self._last_used

    @property
    def provider(self) -> Provider:
        if self._provider is None:
            self._provider = make_provider(self._config)
        return self._provider

    def bound(self, message: OutgoingMessage) -> float:
        return request_deadline(self._settings, message.size) + self._settings.connect_timeout

    async def open(self) -> DeliveryResult | None:
        """Make the HTTP client; its connection opens with the first request (a failure then is a relay fault)."""
        if self._client is not None:
            return None
        try:
            if self._tls_context is None:
                from mailwatchd.transports.tlsconfig import client_context

                self._tls_context = client_context(self.relay)
            self.provider  # noqa: B018 - a missing provider module is a local error now, not mid-send
        except (OSError, ValueError, ImportError) as exc:
            return self._result(Verdict(Outcome.RELAY_FAULT, Cause.LOCAL_ERROR), Phase.TLS,
                                f"cannot prepare the HTTPS client: {describe(exc)}")
        import httpx

        settings = self._settings
        self._client = httpx.AsyncClient(
            verify=self._tls_context, http1=True, http2=False, follow_redirects=False,
            timeout=httpx.Timeout(connect=settings.connect_timeout, read=settings.command_timeout,
                                  write=settings.command_timeout, pool=settings.connect_timeout),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                keepalive_expiry=settings.idle_timeout or 5.0))
        return None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # the connection is going away either way
                await client.aclose()

    async def deliver(self, message: OutgoingMessage) -> DeliveryResult:
        """Send one message; every failure is a DeliveryResult, never an exception."""
        try:
            failure = await self.open()
            if failure is not None:
                return failure
            try:
                request = self.provider.send_request(message)
            except Unexpressible as exc:
                return self._result(Verdict(Outcome.RELAY_FAULT, Cause.UNEXPRESSIBLE), Phase.LOCAL,
                                    f"{self.provider.name} cannot carry this message as written: {exc}")
            reply = await self.send(request, request_deadline(self._settings, message.size))
            if isinstance(reply, DeliveryResult):
                return reply
            return self.interpret(reply, self.provider.interpret(reply))
        except Exception as exc:  # a last guard, as SmtpSession has: "never raises" (the type only: no content)
            await self.close()
            return self._result(Verdict(Outcome.TEMPORARY, Cause.LOCAL_ERROR), Phase.LOCAL,
                                f"the {self.relay.name} request could not be made: {type(exc).__name__}")
        finally:
            self._last_used = time.monotonic()

    async def probe(self) -> tuple[ApiReply | DeliveryResult, ApiOutcome | None]:
        """The provider's read-only authenticated call: the reply and its reading, or the failure."""
        failure = await self.open()
        if failure is not None:
            return failure, None
        reply = await self.send(self.provider.probe_request(), request_deadline(self._settings, 0))
        if isinstance(reply, DeliveryResult):
            return reply, None
        return reply, self.provider.interpret(reply, probing=True)

    async def send(self, request: ApiRequest, deadline: float) -> ApiReply | DeliveryResult:
        """One request and its reply, or the failure on the way as a DeliveryResult."""
        client = self._client
        assert client is not None
        import httpx

        try:
            async with asyncio.timeout(deadline):
                async with client.stream(request.method, request.url, headers=request.headers,
                                         content=request.content or None) as response:
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_REPLY_BYTES:
                            break
                    return ApiReply(response.status_code, {k.lower(): v for k, v in response.headers.items()},
                                    body[:MAX_REPLY_BYTES])
        except TimeoutError as exc:  # the whole request outlived its deadline
            await self.close()
            return self._failure(Phase.HTTP, exc, deadline)
        except httpx.ConnectTimeout as exc:
            await self.close()
            return self._failure(Phase.CONNECT, TimeoutError(str(exc)), self._settings.connect_timeout)
        except httpx.TimeoutException as exc:
            await self.close()
            return self._failure(Phase.HTTP, TimeoutError(str(exc)), self._settings.command_timeout)
        except httpx.ConnectError as exc:
            await self.close()
            cause = _root(exc)
            phase = (Phase.TLS if isinstance(cause, ssl.SSLError) else Phase.DNS if isinstance(cause, socket.gaierror)
                     else Phase.CONNECT)
            return self._failure(phase, cause, self._settings.connect_timeout)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            await self.close()
            cause = _root(exc)
            return self._failure(Phase.HTTP, cause if isinstance(cause, OSError) else ConnectionError(str(exc)),
                                 None)

    def interpret(self, reply: ApiReply, reading: ApiOutcome) -> DeliveryResult:
        verdict = classify_http(reading.problem)
        detail = reading.detail
        if reading.problem is HttpProblem.NONE and reading.message_id:
            detail = f"{detail} (id {reading.message_id})" if detail else f"id {reading.message_id}"
        return self._result(verdict, Phase.HTTP, f"HTTP {reply.status}: {detail}" if detail else f"HTTP {reply.status}",
                            code=reply.status, retry_after=reading.retry_after)

    def _failure(self, phase: Phase, exc: BaseException, timeout: float | None) -> DeliveryResult:
        step = {Phase.CONNECT: "connect", Phase.TLS: "tls", Phase.DNS: "dns"}.get(phase, "")
        detail = describe(exc, host=self.endpoint.host, port=self.endpoint.port, timeout=timeout, step=step)
        # After the request went out (Phase.HTTP) a lost reply is temporary: the provider may have accepted the
        # message, so it is retried later rather than failed over to another relay within seconds.
        return self._result(classify_exception(phase, exc), phase, detail)

    def _result(self, verdict: Verdict, phase: Phase, detail: str, *, code: int | None = None,
                retry_after: float | None = None) -> DeliveryResult:
        return DeliveryResult(verdict.outcome, verdict.cause, phase, code, scrub(detail, self._secrets),
                              relay=self.relay.name, endpoint=str(self.endpoint), retry_after=retry_after)


def _root(exc: BaseException) -> BaseException:
    """The OSError or ssl error under httpx's wrapping (httpcore's ConnectError, anyio's), else `exc`."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc
