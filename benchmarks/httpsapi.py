#!/usr/bin/env python3
"""HTTPS API relay benchmark: the same spool drained to an SMTP sink and to a fake HTTPS API per provider.

For each path the daemon (`python -m mailwatchd run`) drains a fresh spool of N messages with that path as
its only relay: Postfix's `smtp-sink` (or the aiosmtpd sink, as in throughput.py), then a fake of each
provider's HTTPS API on 127.0.0.1: an asyncio HTTP/1.1 keep-alive server in its own process with a trustme
certificate, answering the send and probe paths as the provider does when all is well and checking the
key (SES: the whole SigV4 signature). See benchmarks/README.md.

    python benchmarks/httpsapi.py [--messages 2000] [--size 4096] [--concurrency 2]
                                  [--providers sendgrid mailgun ses postmark] [--sink auto|smtp-sink|aiosmtpd]
                                  [--no-smtp] [--latency MS] [--json]

Exit status: 0 when every path delivered each message exactly once with nothing in failed/ and no request
refused, 1 when one did not, 2 when a sink or a fake could not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import importlib.metadata
import json
import os
import resource
import secrets
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import Any, TextIO

from throughput import (
    DEFAULT_CACHE,
    HOST,
    POLL,
    REPO_ROOT,
    BenchError,
    NotifyListener,
    Postfix,
    Sink,
    cpu_seconds,
    daemon_environment,
    failures,
    fetch_postfix,
    filesystem_of,
    has_exited,
    kill_group,
    note,
    open_sink,
    prefill,
    reap,
    stop,
    tail,
    vm_hwm_kib,
    watch_daemon,
    work_directory,
)

PROVIDERS = ("sendgrid", "mailgun", "ses", "postmark")
MAILGUN_DOMAIN = "mg.bench.example"
SES_REGION = "us-east-1"
SES_KEY_ID = "AKIABENCHMARKEXAMPLE"
MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024
_PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")

# Documented sending rates (benchmarks/README.md has the sources): messages per second, or None where no
# number is published. SES counts recipients, not messages.
RATE_LIMITS: dict[str, tuple[float | None, str]] = {
    "ses": (14.0, "sandbox 1/s; out of it the account's MaxSendRate (AWS publishes no default now; 14/s is the "
                  "often quoted first production rate), counted per recipient"),
    "sendgrid": (10.0, "no number for mail/send (600 requests/min is the other endpoints' default and is shown "
                       "on /v3/scopes; 10/s used here)"),
    "mailgun": (None, "not documented here (429 'request|recipient|bytes limit exceeded' per domain)"),
    "postmark": (None, "not documented here (429 and ErrorCode 429 exist, no number)"),
    "resend": (5.0, "2/s per team by default (5/s on one docs page); not a mailwatchd relay"),
}


# -- the fake HTTPS API (the --serve-https child) ---------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
            415: "Unsupported Media Type", 431: "Request Header Fields Too Large"}


def _json(status: int, value: Any, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    return Answer(status, json.dumps(value, separators=(",", ":")).encode(), headers)


@dataclass
class FakeApi:
    """One provider's send and probe endpoints, answering as the provider does when the request is right."""

    provider: str
    key: str
    counter_fd: int
    latency: float = 0.0  # seconds each answer waits, as a distant API's round trip and processing would
    messages: int = 0
    recipients: int = 0
    probes: int = 0
    requests: int = 0
    connections: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    first_refusal: str = ""
    _check_signature: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        self._basic = "Basic " + base64.b64encode(f"api:{self.key}".encode()).decode("ascii")
        if self.provider == "ses":
            sys.path.insert(0, str(REPO_ROOT))
            from tests.fake_ses import check_signature  # SigV4 checked by the tests' separate implementation

            self._check_signature = check_signature

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        self.requests += 1
        try:
            reply = getattr(self, f"_{self.provider}")(method, target, headers, body)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, binascii.Error) as exc:
            reply = self._refuse(400, f"malformed request ({type(exc).__name__})")
        assert isinstance(reply, Answer)
        return reply

    def _refuse(self, status: int, why: str) -> Answer:
        self.refused[f"{status} {why}"] += 1
        self.first_refusal = self.first_refusal or f"{status} {why}"
        if self.provider == "sendgrid":
            return _json(status, {"errors": [{"message": why, "field": None, "help": None}]})
        if self.provider == "postmark":
            return _json(status, {"ErrorCode": 10 if status == 401 else 300, "Message": why})
        return _json(status, {"message": why})

    def _accepted(self, recipients: int) -> None:
        self.messages += 1
        self.recipients += recipients
        os.write(self.counter_fd, b"mesg=%d\r" % self.messages)  # what Sink.count() reads, as smtp-sink -c writes

    def _sendgrid(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        if headers.get("authorization") != f"Bearer {self.key}":
            return self._refuse(401, "The provided authorization grant is invalid, expired, or revoked")
        if method == "GET" and target == "/v3/scopes":
            self.probes += 1
            return _json(200, {"scopes": ["mail.send"]})
        if (method, target) != ("POST", "/v3/mail/send"):
            return self._refuse(404, f"no {method} {target}")
        if not headers.get("content-type", "").startswith("application/json"):
            return self._refuse(415, "Content-Type must be application/json")
        payload = json.loads(body)
        personalizations = payload["personalizations"]
        count = sum(len(p.get(kind, [])) for p in personalizations for kind in ("to", "cc", "bcc"))
        content = payload["content"]
        if not (personalizations[0]["to"] and payload["from"]["email"] and payload["subject"] and content
                and content[0]["type"] == "text/plain" and content[0]["value"]):
            return self._refuse(400, "to, from, subject and text/plain content first are required")
        self._accepted(count)
        return Answer(202, headers=(("X-Message-Id", f"bench{self.messages:08d}{secrets.token_hex(4)}"),))

    def _mailgun(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        if headers.get("authorization") != self._basic:
            return self._refuse(401, "Forbidden")
        if method == "GET" and target == f"/v4/domains/{MAILGUN_DOMAIN}":
            self.probes += 1
            return _json(200, {"domain": {"name": MAILGUN_DOMAIN, "state": "active", "type": "custom",
                                          "is_disabled": False}, "sending_dns_records": []})
        if (method, target) != ("POST", f"/v3/{MAILGUN_DOMAIN}/messages.mime"):
            return self._refuse(404, f"Domain not found: {target}")
        kind, _, boundary = headers.get("content-type", "").partition("; boundary=")
        if kind != "multipart/form-data" or not boundary:
            return self._refuse(400, "'message' parameter is not a file")
        to, message = 0, b""
        for part in body.split(b"--" + boundary.strip('"').encode())[1:-1]:
            head, _, value = part.partition(b"\r\n\r\n")
            if b'name="to"' in head:
                to += 1
            elif b'name="message"; filename=' in head:
                message = value
        if not to:
            return self._refuse(400, "to parameter is missing")
        if b"\nSubject:" not in message:
            return self._refuse(400, "'message' parameter is not a file")
        self._accepted(to)
        return _json(200, {"id": f"<bench.{self.messages}.{secrets.token_hex(4)}@{MAILGUN_DOMAIN}>",
                           "message": "Queued. Thank you."})

    def _ses(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        from tests.https_fake import Request

        assert self._check_signature is not None
        refusal = self._check_signature(Request(method, target, headers, body), key_id=SES_KEY_ID, secret=self.key,
                                        region=SES_REGION, service="ses", now=time.time())
        if refusal is not None:
            return self._refuse(refusal.status, refusal.body.decode(errors="replace")[:200])
        if method == "GET" and target == "/v2/email/account":
            self.probes += 1
            return _json(200, {"SendingEnabled": True, "ProductionAccessEnabled": True, "EnforcementStatus": "HEALTHY",
                               "SendQuota": {"Max24HourSend": 1e7, "MaxSendRate": 14.0, "SentLast24Hours": 0.0}})
        if (method, target) != ("POST", "/v2/email/outbound-emails"):
            return self._refuse(404, f"no {method} {target}")
        payload = json.loads(body)
        recipients = payload["Destination"]["BccAddresses"]
        raw = base64.b64decode(payload["Content"]["Raw"]["Data"], validate=True)
        if not recipients or b"\nSubject:" not in raw or b"\nBcc:" in raw.partition(b"\n\n")[0]:
            return self._refuse(400, "MessageRejected: no recipients, no Subject, or a Bcc field in the content")
        self._accepted(len(recipients))
        return _json(200, {"MessageId": f"0100bench{self.messages:08d}-{secrets.token_hex(8)}-000000"})

    def _postmark(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        if headers.get("x-postmark-server-token") != self.key:
            return self._refuse(401, "Request does not contain a valid Server token.")
        if method == "GET" and target == "/server":
            self.probes += 1
            return _json(200, {"ID": 1, "Name": "bench", "DeliveryType": "Live", "SmtpApiActivated": True})
        if (method, target) != ("POST", "/email"):
            return self._refuse(404, f"no {method} {target}")
        payload = json.loads(body)
        addresses = getaddresses([payload.get(kind) or "" for kind in ("To", "Cc", "Bcc")])
        if not (payload["From"] and payload["Subject"] and payload.get("TextBody") and addresses
                and payload.get("MessageStream") == "outbound"):
            return self._refuse(422, "From, To, Subject, TextBody and MessageStream are required")
        self._accepted(sum(1 for _, address in addresses if address))
        return _json(200, {"To": payload["To"], "SubmittedAt": "2026-12-01T00:00:00Z",
                           "MessageID": f"bench-{self.messages:08d}-{secrets.token_hex(8)}", "ErrorCode": 0,
                           "Message": "OK"})

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HTTP/1.1 requests on one connection until the client closes it (keep-alive)."""
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    writer.write(_response(self._refuse(431, "request head too large"), close=True))
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                if "transfer-encoding" in headers:
                    writer.write(_response(self._refuse(411, "send Content-Length"), close=True))
                    break
                length = int(headers.get("content-length") or 0)
                if length > MAX_BODY:
                    writer.write(_response(self._refuse(413, "request too large"), close=True))
                    break
                body = await reader.readexactly(length) if length else b""
                close = headers.get("connection", "").lower() == "close"
                answer = self.answer(method, target, headers, body)
                if self.latency:
                    await asyncio.sleep(self.latency)
                writer.write(_response(answer, close=close))
                if close:
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ValueError):
            pass  # the client went away (the probe's bare TLS check does), or sent no HTTP
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
                await writer.wait_closed()


def _response(answer: Answer, *, close: bool) -> bytes:
    head = [f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Status')}",
            f"Content-Length: {len(answer.body)}"]
    if answer.body:
        head.append("Content-Type: application/json")
    head.extend(f"{name}: {value}" for name, value in answer.headers)
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + answer.body


def serve_https(directory: Path) -> int:
    """The --serve-https child: serve one provider's fake on 127.0.0.1 until SIGTERM, then write summary.json."""
    config = json.loads((directory / "serve.json").read_text(encoding="utf-8"))
    key = Path(config["key_file"]).read_text(encoding="utf-8").strip()
    fake = FakeApi(config["provider"], key, counter_fd=1, latency=config["latency_ms"] / 1000)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config["cert_chain"])

    def quiet(loop: asyncio.AbstractEventLoop, problem: dict[str, Any]) -> None:
        if not isinstance(problem.get("exception"), ConnectionError | ssl.SSLError | OSError):
            loop.default_exception_handler(problem)

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(quiet)
        server = await asyncio.start_server(fake.serve_connection, HOST, 0, ssl=context, limit=MAX_HEAD,
                                            backlog=128)
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        started = resource.getrusage(resource.RUSAGE_SELF)
        port = server.sockets[0].getsockname()[1]
        (directory / "port.tmp").write_text(str(port), encoding="ascii")
        os.rename(directory / "port.tmp", directory / "port")
        await done.wait()
        ended = resource.getrusage(resource.RUSAGE_SELF)
        server.close()
        return {"messages": fake.messages, "recipients": fake.recipients, "probes": fake.probes,
                "requests": fake.requests, "connections": fake.connections,
                "refused": dict(fake.refused), "first_refusal": fake.first_refusal,
                "cpu_s_serving": round(ended.ru_utime + ended.ru_stime - started.ru_utime - started.ru_stime, 3)}

    summary = asyncio.run(main())
    (directory / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return 0


# -- starting a fake ------------------------------------------------------------------------------------------


@dataclass
class Credentials:
    """The trustme CA and server certificate for 127.0.0.1, and one key file per provider (bench values)."""

    ca_file: Path
    cert_chain: Path
    key_files: dict[str, Path]

    @classmethod
    def create(cls, directory: Path) -> Credentials:
        try:
            import trustme
        except ImportError:
            raise BenchError("trustme is not installed for this Python (pip install trustme)") from None
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = trustme.CA()
        ca_file, cert_chain = directory / "ca.pem", directory / "server.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        ca.issue_cert(HOST).private_key_and_cert_chain_pem.write_to_path(str(cert_chain))
        keys = {"sendgrid": f"SG.bench.{secrets.token_urlsafe(24)}", "mailgun": f"key-{secrets.token_hex(16)}",
                "ses": secrets.token_urlsafe(30), "postmark": secrets.token_hex(16)}
        key_files = {}
        for provider, value in keys.items():
            path = directory / f"{provider}-key"
            path.touch(mode=0o600)
            path.write_text(value + "\n", encoding="ascii")
            key_files[provider] = path
        return cls(ca_file, cert_chain, key_files)

    def relay_url(self, provider: str, port: int) -> str:
        user = f"{SES_KEY_ID}@" if provider == "ses" else ""
        option = {"mailgun": f"&domain={MAILGUN_DOMAIN}", "ses": f"&region={SES_REGION}"}.get(provider, "")
        return (f"{provider}://{user}{HOST}:{port}?name={provider}{option}&password_file={self.key_files[provider]}"
                f"&cafile={self.ca_file}")


def start_fake(provider: str, credentials: Credentials, workdir: Path, latency_ms: float,
               timeout: float = 10.0) -> Sink:
    """The fake in its own process (its CPU is not the daemon's), up and answering TLS with the CA's certificate."""
    directory = workdir / f"fake-{provider}"
    directory.mkdir()
    (directory / "serve.json").write_text(json.dumps({
        "provider": provider, "key_file": str(credentials.key_files[provider]),
        "cert_chain": str(credentials.cert_chain), "latency_ms": latency_ms}), encoding="utf-8")
    counter_path, stderr_path = directory / "count", directory / "stderr"
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-https", str(directory)]
    with open(counter_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not (directory / "port").exists():
            if has_exited(proc):
                raise BenchError(f"the {provider} fake exited at start-up: {tail(stderr_path) or 'no message'}")
            if time.monotonic() > deadline:
                raise BenchError(f"the {provider} fake did not listen within {timeout:g}s")
            time.sleep(POLL)
        port = int((directory / "port").read_text(encoding="ascii"))
        client = ssl.create_default_context(cafile=str(credentials.ca_file))
        with socket.create_connection((HOST, port), timeout=5) as raw, \
                client.wrap_socket(raw, server_hostname=HOST) as tls:
            version = tls.version() or "?"
    except (BenchError, OSError, ValueError):
        stop(proc)
        raise
    return Sink("https-fake", f"{provider} fake (asyncio, {ssl.OPENSSL_VERSION}, {version})", port, proc,
                counter_path, stderr_path, note=f"https://{HOST}:{port}, {version}")


def stop_server(server: Sink) -> tuple[float | None, dict[str, Any]]:
    """SIGTERM the sink or fake, reap it: its whole CPU (wait4), and the fake's own summary if it wrote one."""
    kill_group(server.proc, signal.SIGTERM)
    _, usage = reap(server.proc, 10.0)
    server.close()
    summary: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((server.counter_path.parent / "summary.json").read_text(encoding="utf-8"))
    return (usage.ru_utime + usage.ru_stime if usage is not None else None), summary


# -- one path ---------------------------------------------------------------------------------------------------


def phase_environment(spool: Path, server: Sink, args: argparse.Namespace, notify_socket: str,
                      relays: str | None) -> dict[str, str]:
    """throughput.py's environment; for an HTTPS path no EMAIL_* relay, the API relay the only one, no proxy."""
    env = daemon_environment(spool, server, args, notify_socket)
    if relays is not None:
        for name in ("EMAIL_HOST", "EMAIL_PORT", "EMAIL_USE_TLS", "EMAIL_USE_SSL"):
            env.pop(name, None)
        for name in _PROXY_ENV:
            env.pop(name, None)
            env.pop(name.lower(), None)
        env["MAILWATCHD_RELAYS"] = relays
    return env


def log_events(log_path: Path) -> Counter[str]:
    """How many of each event the daemon logged (warning and above: deferrals, relay_down...)."""
    events: Counter[str] = Counter()
    with contextlib.suppress(OSError), open(log_path, "rb") as log:
        for line in log:
            try:
                events[str(json.loads(line).get("event", "?"))] += 1
            except (ValueError, AttributeError):
                events["(not JSON)"] += 1
    return events


def run_phase(server: Sink, workdir: Path, args: argparse.Namespace, relays: str | None) -> dict[str, Any]:
    """The daemon on a pre-filled spool with `server` its only relay, timed until the spool is drained."""
    spool = workdir / "spool"
    prefill(spool, args.messages, args.size)
    command = shlex.split(args.daemon_cmd) if args.daemon_cmd else [sys.executable, "-m", "mailwatchd", "run"]
    log_path = workdir / "mailwatchd.log"
    result: dict[str, Any] = {"ok": False}
    notify = NotifyListener()
    proc: subprocess.Popen[bytes] | None = None
    try:
        env = phase_environment(spool, server, args, notify.address, relays)
        before = server.count()
        with open(log_path, "wb") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        outcome = watch_daemon(proc, spool, server, before, started, notify, log_path, args)
        cpu_at_ready = outcome.pop("_cpu_at_ready", None)
        result.update(outcome)
        if has_exited(proc):
            status, _ = reap(proc, 1.0)
            result["error"] = f"mailwatchd exited early with status {status}: {tail(log_path, 5) or 'no output'}"
            return result
        cpu_before_term = cpu_seconds(proc.pid)
        peak_rss_kib = vm_hwm_kib(proc.pid)
        kill_group(proc, signal.SIGTERM)
        status, usage = reap(proc, args.shutdown_timeout)
        result["exit_status"] = status
        if usage is not None:
            cpu_total = usage.ru_utime + usage.ru_stime
            result["cpu_s_total"] = round(cpu_total, 3)
            result["cpu_ms_per_msg"] = round(cpu_total * 1000 / args.messages, 3)
        if cpu_before_term is not None and cpu_at_ready is not None:
            result["cpu_ms_per_msg_after_ready"] = round((cpu_before_term - cpu_at_ready) * 1000 / args.messages, 3)
        if peak_rss_kib is not None:
            result["peak_rss_mib"] = round(peak_rss_kib / 1024, 1)
        delivered = server.count() - before  # after the daemon is gone: duplicates show here
        result["delivered"] = delivered
        failed, reasons = failures(spool)
        result["failed"] = failed
        events = log_events(log_path)
        result["log_events"] = dict(events.most_common(8))
        problems = []
        if outcome.get("timed_out"):
            problems.append(outcome["timed_out"])
        if failed:
            problems.append(f"{failed} message(s) in failed/: " + "; ".join(reasons))
        if delivered != args.messages:
            word = "duplicates: " if delivered > args.messages else ""
            problems.append(f"{word}the server counted {delivered} of {args.messages} messages")
        if status != 0:
            problems.append(f"mailwatchd exited with status {status} after SIGTERM: {tail(log_path, 3)}")
        result["ok"] = not problems
        if problems:
            result["error"] = "; ".join(problems)
        return result
    finally:
        stop(proc, grace=args.shutdown_timeout)
        notify.close()


def finish_phase(result: dict[str, Any], server_cpu: float | None, summary: dict[str, Any],
                 args: argparse.Namespace) -> None:
    """Add the server's CPU (and for a fake, what it counted and refused) to a path's result."""
    if server_cpu is not None:
        result["server_cpu_s_total"] = round(server_cpu, 3)
    serving = summary.get("cpu_s_serving", server_cpu)
    if serving is not None:
        result["server_cpu_ms_per_msg"] = round(serving * 1000 / args.messages, 3)
        if result.get("wall_s"):
            result["server_busy"] = round(serving / result["wall_s"], 2)
    if result.get("cpu_s_total") is not None and result.get("wall_s"):
        result["daemon_busy"] = round(result["cpu_s_total"] / result["wall_s"], 2)
    if summary:
        result["fake"] = summary
        if summary.get("refused"):
            result["ok"] = False
            refused = sum(summary["refused"].values())
            result["error"] = "; ".join(filter(None, [result.get("error"), f"the fake refused {refused} request(s), "
                                                      f"first: {summary.get('first_refusal')}"]))


def smtp_path(postfix: Postfix | None, postfix_error: str, workdir: Path, args: argparse.Namespace,
              *, quiet: bool) -> dict[str, Any]:
    directory = workdir / "smtp"
    directory.mkdir()
    try:
        sink = open_sink(args.sink, postfix, postfix_error, directory, quiet=quiet)
    except BenchError as exc:
        return {"ok": False, "setup_error": str(exc), "error": f"no sink: {exc}"}
    server_info = {"kind": sink.kind, "version": sink.version, "port": sink.port}
    try:
        result = run_phase(sink, directory, args, relays=None)
    finally:
        cpu, _ = stop_server(sink)
    result["server"] = server_info
    finish_phase(result, cpu, {}, args)
    return result


def https_path(provider: str, credentials: Credentials, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    directory = workdir / provider
    directory.mkdir()
    try:
        fake = start_fake(provider, credentials, directory, args.latency)
    except (BenchError, OSError, ValueError) as exc:
        return {"ok": False, "setup_error": str(exc), "error": f"no {provider} fake: {exc}"}
    server_info = {"kind": fake.kind, "version": fake.version, "port": fake.port}
    try:
        result = run_phase(fake, directory, args, relays=credentials.relay_url(provider, fake.port))
    finally:
        cpu, summary = stop_server(fake)
    result["server"] = server_info
    finish_phase(result, cpu, summary, args)
    return result


# -- report -----------------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def headroom(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each provider's documented rate beside the slowest measured HTTPS rate (from READY) of this run."""
    measured = [report["paths"][name].get("msg_per_s_from_ready") for name in report["providers"]
                if report["paths"].get(name, {}).get("ok")]
    slowest = min((value for value in measured if value), default=None)
    rows = []
    for provider, (limit, words) in RATE_LIMITS.items():
        path = report["paths"].get(provider, {})
        own = path.get("msg_per_s_from_ready") if path.get("ok") else None
        figure = own or slowest
        rows.append({"provider": provider, "documented_msg_per_s": limit, "documented": words,
                     "measured_msg_per_s": own,
                     "headroom": round(figure / limit, 1) if figure and limit else None})
    return rows


def print_table(report: dict[str, Any], out: TextIO) -> None:
    print(f"command   {report['command']}", file=out)
    latency = f", fakes answer after {report['latency_ms']:g} ms" if report["latency_ms"] else ""
    print(f"load      {report['messages']} messages x {report['size']} bytes, concurrency {report['concurrency']}"
          f"{latency}, spool on {report['spool_filesystem']}, {report['cpus']} CPUs, load average "
          f"{report['loadavg_before']} before, {report['loadavg_after']} after", file=out)
    print(f"versions  Python {report['python']}, httpx {report['httpx']}, {report['openssl']}", file=out)
    print(file=out)
    print(f"{'path':22} {'msg/s':>7} {'after READY':>11} {'READY s':>7} {'CPU ms/msg':>10} {'after READY':>11} "
          f"{'daemon busy':>11} {'server ms/msg':>13} {'server busy':>11} {'conns/reqs':>10} {'RSS MiB':>7}",
          file=out)
    for name, row in report["paths"].items():
        label = f"{name} ({row['server']['kind']})" if row.get("server") else name
        if row.get("setup_error"):
            print(f"{label:22} {'not set up':>7}   ({row['setup_error']})", file=out)
            continue
        if not row.get("msg_per_s"):
            print(f"{label:22} {'FAILED':>7}", file=out)
            continue
        fake = row.get("fake") or {}
        conns = f"{fake['connections']}/{fake['requests']}" if fake else ""
        print(f"{label:22} {fmt(row.get('msg_per_s')):>7} {fmt(row.get('msg_per_s_from_ready')):>11} "
              f"{fmt(row.get('ready_s'), '.2f'):>7} {fmt(row.get('cpu_ms_per_msg'), '.3f'):>10} "
              f"{fmt(row.get('cpu_ms_per_msg_after_ready'), '.3f'):>11} {fmt(row.get('daemon_busy'), '.2f'):>11} "
              f"{fmt(row.get('server_cpu_ms_per_msg'), '.3f'):>13} {fmt(row.get('server_busy'), '.2f'):>11} "
              f"{conns:>10} {fmt(row.get('peak_rss_mib')):>7}", file=out)
    smtp = report["paths"].get("smtp") or {}
    if smtp.get("msg_per_s_from_ready"):
        for name in report["providers"]:
            row = report["paths"].get(name) or {}
            if row.get("msg_per_s_from_ready") and row.get("cpu_ms_per_msg_after_ready") and \
                    smtp.get("cpu_ms_per_msg_after_ready"):
                print(f"{name:22} {row['msg_per_s_from_ready'] / smtp['msg_per_s_from_ready']:.2f}x SMTP's rate "
                      f"from READY, {row['cpu_ms_per_msg_after_ready'] / smtp['cpu_ms_per_msg_after_ready']:.2f}x "
                      "its CPU per message", file=out)
    print(file=out)
    print(f"{'provider':10} {'documented msg/s':>16} {'measured':>9} {'headroom':>9}  source", file=out)
    for row in report["rate_limits"]:
        print(f"{row['provider']:10} {fmt(row['documented_msg_per_s'], 'g'):>16} "
              f"{fmt(row['measured_msg_per_s']):>9} {fmt(row['headroom'], '.0f') + 'x' if row['headroom'] else '—':>9}"
              f"  {row['documented']}", file=out)
    for name, row in report["paths"].items():
        if row.get("error") and not row.get("setup_error"):
            print(f"\n{name}: ERROR: {row['error']}", file=out)


# -- main -------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="messages per path (default 2000)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per message (default 4096)")
    parser.add_argument("--concurrency", type=int, default=2, help="MAILWATCHD_CONCURRENCY (default 2)")
    parser.add_argument("--providers", nargs="*", choices=PROVIDERS, default=list(PROVIDERS),
                        help="the HTTPS APIs to drain to, in this order (default: all four)")
    parser.add_argument("--no-smtp", action="store_true", help="skip the SMTP path")
    parser.add_argument("--latency", type=float, default=0.0, metavar="MS",
                        help="milliseconds the fakes wait before each answer, as a real API's round trip (default 0)")
    parser.add_argument("--sink", choices=("auto", "smtp-sink", "aiosmtpd"), default="auto",
                        help="the SMTP sink, as for throughput.py (default auto: smtp-sink, else aiosmtpd)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a path may take (default 30 + messages/50)")
    parser.add_argument("--stall", type=float, default=15.0,
                        help="give up on a path after this many seconds without progress (default 15)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds mailwatchd gets to exit after SIGTERM before SIGKILL (default 30)")
    parser.add_argument("--daemon-cmd", default=None,
                        help="command that starts the daemon (default: this Python -m mailwatchd run)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the spools go (default: a new temporary directory; its filesystem matters)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (spools, logs)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"where the postfix package is kept (default {DEFAULT_CACHE})")
    parser.add_argument("--serve-https", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.messages < 1 or args.size < 256 or args.concurrency < 1 or args.latency < 0:
        parser.error("--messages must be >= 1, --size >= 256, --concurrency >= 1, --latency >= 0")
    if args.timeout is None:
        args.timeout = 30.0 + args.messages / 50
    return args


def loadavg() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_https is not None:
        return serve_https(args.serve_https)
    quiet = args.json
    report: dict[str, Any] = {
        "command": " ".join(shlex.quote(part) for part in [Path(sys.executable).name, *sys.argv]),
        "messages": args.messages, "size": args.size, "concurrency": args.concurrency, "providers": args.providers,
        "latency_ms": args.latency,
        "cpus": os.cpu_count(), "loadavg_before": loadavg(), "python": sys.version.split()[0],
        "httpx": importlib.metadata.version("httpx"), "openssl": ssl.OPENSSL_VERSION, "paths": {}}
    postfix: Postfix | None = None
    postfix_error = ""
    if not args.no_smtp and args.sink != "aiosmtpd":
        try:
            postfix = fetch_postfix(args.cache_dir, quiet=quiet)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            postfix_error = f"the postfix package is not available: {exc}"
    with work_directory(args) as workdir:
        report["spool_filesystem"] = filesystem_of(workdir)
        try:
            credentials = Credentials.create(workdir / "credentials")
        except BenchError as exc:
            print(f"[bench] ERROR: {exc}", file=sys.stderr)
            return 2
        if not args.no_smtp:
            note(f"smtp: {args.messages} messages to the SMTP sink, concurrency {args.concurrency}", quiet=quiet)
            report["paths"]["smtp"] = smtp_path(postfix, postfix_error, workdir, args, quiet=quiet)
        for provider in args.providers:
            note(f"{provider}: {args.messages} messages to its fake HTTPS API, concurrency {args.concurrency}",
                 quiet=quiet)
            report["paths"][provider] = https_path(provider, credentials, workdir, args)
    report["loadavg_after"] = loadavg()
    report["rate_limits"] = headroom(report)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report, sys.stdout)
    paths = report["paths"].values()
    if any(not path.get("ok") and not path.get("setup_error") for path in paths):
        return 1
    return 2 if any(path.get("setup_error") for path in paths) else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
