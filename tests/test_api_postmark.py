"""Postmark: requests built from real messages, sent over HTTPS to a fake Postmark, and its replies read."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
import trustme

from mailwatchd.settings.apirelays import ApiConfig, ApiKind
from mailwatchd.settings.credentials import Secret
from mailwatchd.transports.api import postmark
from mailwatchd.transports.api.provider import ApiOutcome, ApiReply, ApiRequest, Provider, Unexpressible
from mailwatchd.transports.outcome import HttpProblem
from tests.fake_postmark import TOKEN, FakePostmark, parse_addresses
from tests.https_fake import Response
from tests.test_api_mimejson import (
    HTML,
    PDF,
    PNG,
    SUBJECT,
    TEXT,
    html_part,
    original_parts,
    outgoing,
    reparse,
    rich_message,
)


@pytest.fixture
def fake(ca: trustme.CA) -> Iterator[FakePostmark]:
    with FakePostmark(ca) as server:
        assert isinstance(server, FakePostmark)
        yield server
        assert server.handler_errors == []


@pytest.fixture
def client(ca_file: Path) -> Iterator[httpx.Client]:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file)), trust_env=False, timeout=10) as c:
        yield c


def provider_for(base_url: str, token: str = TOKEN, stream: str | None = None) -> Provider:
    return postmark.make(ApiConfig(ApiKind.POSTMARK, base_url, Secret(token), message_stream=stream), time.time)


def exchange(client: httpx.Client, provider: Provider, request: ApiRequest, *, probing: bool = False) -> ApiOutcome:
    response = client.request(request.method, request.url, headers=request.headers, content=request.content)
    reply = ApiReply(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)
    return provider.interpret(reply, probing=probing)


def send(client: httpx.Client, fake: FakePostmark, message: EmailMessage | bytes) -> ApiOutcome:
    provider = provider_for(fake.base_url)
    return exchange(client, provider, provider.send_request(outgoing(message)))


def simple(**headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = headers.pop("From", "sender@example.org")
    message["To"] = headers.pop("To", "rcpt@example.org")
    message["Subject"] = headers.pop("Subject", "hello")
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("hello\n")
    return message


# -- the request ----------------------------------------------------------------------------------------------


def test_send_request_is_a_json_post_with_the_token_only_in_its_header() -> None:
    provider = provider_for("https://api.postmarkapp.com")
    request = provider.send_request(outgoing(rich_message()))
    assert (request.method, request.url) == ("POST", "https://api.postmarkapp.com/email")
    assert request.headers["X-Postmark-Server-Token"] == TOKEN
    assert request.headers["Accept"] == request.headers["Content-Type"] == "application/json"
    assert TOKEN not in request.url and TOKEN.encode() not in request.content
    assert [k for k, v in request.headers.items() if TOKEN in v] == ["X-Postmark-Server-Token"]
    assert TOKEN not in repr(provider) and TOKEN not in str(provider)
    body = json.loads(request.content)
    assert (body["MessageStream"], body["TrackOpens"], body["TrackLinks"]) == ("outbound", False, "None")


def test_message_stream_comes_from_the_relay() -> None:
    request = provider_for("https://api.postmarkapp.com", stream="broadcast").send_request(outgoing(simple()))
    assert json.loads(request.content)["MessageStream"] == "broadcast"


def test_probe_request_reads_the_server() -> None:
    request = provider_for("https://api.postmarkapp.com").probe_request()
    assert (request.method, request.url, request.content) == ("GET", "https://api.postmarkapp.com/server", b"")
    assert request.headers["X-Postmark-Server-Token"] == TOKEN


# -- over HTTPS: accepted, and the parts are the message's ---------------------------------------------------


def test_accepted_message_keeps_every_part(client: httpx.Client, fake: FakePostmark) -> None:
    message = rich_message()
    outcome = send(client, fake, message)

    assert (outcome.problem, outcome.detail) == (HttpProblem.NONE, "OK")
    [accepted] = fake.accepted
    assert outcome.message_id == accepted.message_id
    body = accepted.payload
    text, html, parts = original_parts(reparse(message))
    assert (body["TextBody"], body["HtmlBody"]) == (text, html) == (TEXT, HTML)
    assert body["Subject"] == SUBJECT
    assert body["From"] == "Régis Système <regis@host.example>"
    assert body["Cc"] == '"Martin, Bob" <bob@example.net>'  # quoted, as Postmark asks for punctuation
    assert accepted.addresses("To") == ["ops@example.org", "alice@example.org"]
    assert accepted.addresses("Cc") == ["bob@example.net"]
    assert accepted.addresses("Bcc") == ["audit@example.com"]
    assert parse_addresses("Reply-To", body["ReplyTo"]) == ["helpdesk@example.org"]
    sent = [(a["Name"], a["ContentType"], accepted.attachment_bytes(i), a.get("ContentID"))
            for i, a in enumerate(body["Attachments"])]
    assert sent == [(p.filename, p.content_type, p.content, p.content_id and f"cid:{p.content_id}") for p in parts]
    assert sent[0][2] == PNG and sent[1][2] == PDF
    headers = [(h["Name"], h["Value"]) for h in body["Headers"]]
    assert [name for name, _ in headers] == ["Date", "Message-ID", "In-Reply-To", "X-Priority", "X-Report-Run"]
    assert ("Message-ID", "<report.2026-12-01@host.example>") in headers
    assert "audit@example.com" not in json.dumps(body["Headers"])


# -- over HTTPS: every error class ------------------------------------------------------------------------------


def test_revoked_token_is_auth_and_the_token_never_shows(client: httpx.Client, fake: FakePostmark) -> None:
    fake.revoke_token()
    outcome = send(client, fake, simple())
    assert outcome.problem is HttpProblem.AUTH
    assert "ErrorCode 10" in outcome.detail
    assert TOKEN not in outcome.detail and TOKEN not in repr(outcome) and TOKEN not in str(outcome)
    assert fake.accepted == []


def test_echoed_token_is_scrubbed(client: httpx.Client, fake: FakePostmark) -> None:
    fake.fail_with(Response.of_json(401, {"ErrorCode": 10, "Message": f"Bad token {TOKEN}."}))
    outcome = send(client, fake, simple())
    assert outcome.problem is HttpProblem.AUTH
    assert TOKEN not in outcome.detail and "***" in outcome.detail


def test_sender_without_signature_is_this_messages_sender(client: httpx.Client, fake: FakePostmark) -> None:
    fake.sender_signatures("noreply@example.org")
    outcome = send(client, fake, simple())
    assert outcome.problem is HttpProblem.SENDER and "ErrorCode 400" in outcome.detail
    fake.sender_signatures("sender@example.org")
    fake.unconfirmed("sender@example.org")
    assert send(client, fake, simple()).problem is HttpProblem.SENDER


def test_invalid_and_inactive_recipients_are_the_recipients(client: httpx.Client, fake: FakePostmark) -> None:
    fake.refuse_recipient("rcpt@example.org")
    outcome = send(client, fake, simple())
    assert outcome.problem is HttpProblem.RECIPIENT and "Invalid 'To' address" in outcome.detail
    assert send(client, fake, simple(To="gone@example.org")).problem is HttpProblem.NONE
    fake.inactive("gone@example.org")
    outcome = send(client, fake, simple(To="gone@example.org"))
    assert outcome.problem is HttpProblem.RECIPIENT and "ErrorCode 406" in outcome.detail


@pytest.mark.parametrize("code", [405, 412, 413])
def test_account_that_cannot_send_is_the_accounts(client: httpx.Client, fake: FakePostmark, code: int) -> None:
    fake.account(code)
    outcome = send(client, fake, simple())
    assert outcome.problem is HttpProblem.ACCOUNT and f"ErrorCode {code}" in outcome.detail


def test_too_large_is_the_messages(client: httpx.Client, fake: FakePostmark) -> None:
    fake.max_bytes = 2000
    outcome = send(client, fake, rich_message())
    assert outcome.problem is HttpProblem.MESSAGE


def test_rate_limit_is_a_quota(client: httpx.Client, fake: FakePostmark) -> None:
    fake.rate_limit(retry_after=30, times=1)
    outcome = send(client, fake, simple())
    assert (outcome.problem, outcome.retry_after) == (HttpProblem.QUOTA, 30.0)
    assert send(client, fake, simple()).problem is HttpProblem.NONE


def test_server_error_is_unavailable(client: httpx.Client, fake: FakePostmark) -> None:
    fake.server_error()
    assert send(client, fake, simple()).problem is HttpProblem.UNAVAILABLE


def test_network_filter_is_unavailable_not_the_token(client: httpx.Client, fake: FakePostmark) -> None:
    fake.fail_with(Response(403, b"<html>Request blocked</html>", content_type="text/html"))
    assert send(client, fake, simple()).problem is HttpProblem.UNAVAILABLE


def test_wrong_base_url_is_misconfigured(client: httpx.Client, fake: FakePostmark) -> None:
    provider = provider_for(fake.base_url + "/v9")
    outcome = exchange(client, provider, provider.send_request(outgoing(simple())))
    assert outcome.problem is HttpProblem.MISCONFIGURED and "not Postmark's" in outcome.detail


def test_probe_reads_the_servers_delivery_type(client: httpx.Client, fake: FakePostmark) -> None:
    provider = provider_for(fake.base_url)
    outcome = exchange(client, provider, provider.probe_request(), probing=True)
    assert outcome == ApiOutcome(HttpProblem.NONE, "token valid; server 'mailwatchd' delivers (Live)")
    fake.sandbox = True
    outcome = exchange(client, provider, provider.probe_request(), probing=True)
    assert outcome.problem is HttpProblem.ACCOUNT and "Sandbox" in outcome.detail
    assert TOKEN not in outcome.detail  # the reply lists the server's tokens
    fake.revoke_token()
    outcome = exchange(client, provider, provider.probe_request(), probing=True)
    assert outcome.problem is HttpProblem.AUTH and TOKEN not in outcome.detail
    assert fake.accepted == []


# -- reading replies ------------------------------------------------------------------------------------------


def read(status: int, body: bytes | dict[str, object] = b"", headers: dict[str, str] | None = None, *,
         probing: bool = False, now: float = 1_000_000.0) -> ApiOutcome:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    provider = postmark.make(ApiConfig(ApiKind.POSTMARK, "https://api.postmarkapp.com", Secret(TOKEN)), lambda: now)
    return provider.interpret(ApiReply(status, headers or {}, content), probing=probing)


def test_reading_replies() -> None:
    ok = {"To": "a@example.org", "SubmittedAt": "2026-12-01T12:00:00Z", "MessageID": "b7bc2f4a", "ErrorCode": 0,
          "Message": "OK"}
    assert read(200, ok) == ApiOutcome(HttpProblem.NONE, "OK", message_id="b7bc2f4a")
    assert read(422, {"ErrorCode": 300, "Message": "Provide either email TextBody or HtmlBody or both."}).problem \
        is HttpProblem.MESSAGE
    assert read(422, {"ErrorCode": 300, "Message": "Error parsing 'Cc': Illegal email address 'x'."}).problem \
        is HttpProblem.RECIPIENT
    assert read(422, {"ErrorCode": 411, "Message": "Forbidden attachment type."}).problem \
        is HttpProblem.UNEXPRESSIBLE
    assert read(422, {"ErrorCode": 402, "Message": "Received invalid JSON input."}).problem is HttpProblem.MESSAGE
    assert read(500, {"ErrorCode": 100, "Message": "Maintenance"}).problem is HttpProblem.UNAVAILABLE
    assert read(503, b"<html>down</html>").problem is HttpProblem.UNAVAILABLE
    assert read(413, b"<html>too large</html>").problem is HttpProblem.MESSAGE
    assert read(200, b"<html>welcome</html>").problem is HttpProblem.MISCONFIGURED
    assert read(200, {"Servers": []}, probing=True).problem is HttpProblem.MISCONFIGURED
    assert read(429, b"", {"retry-after": "Mon, 12 Jan 1970 13:47:30 GMT"}).retry_after == 50.0
    assert read(429, b"").retry_after is None


def test_detail_is_one_line_and_bounded() -> None:
    outcome = read(422, {"ErrorCode": 300, "Message": "first\r\nsecond " + "x" * 1000})
    assert "\n" not in outcome.detail and len(outcome.detail) <= 300


# -- what Postmark cannot carry -------------------------------------------------------------------------------


def with_attachment(content: bytes | str, filename: str | None = None, subtype: str = "octet-stream",
                    cid: str | None = None) -> EmailMessage:
    message = simple()
    if isinstance(content, str):
        message.add_attachment(content, subtype=subtype, filename=filename, cid=cid)
    else:
        message.add_attachment(content, maintype="application", subtype=subtype, filename=filename, cid=cid)
    return message


UNEXPRESSIBLE: dict[str, tuple[EmailMessage | bytes, str]] = {
    "no to": (b"From: a@example.org\nCc: b@example.org\nSubject: s\n\nbody\n", "no To"),
    "51 recipients": (simple(To=", ".join(f"r{n}@example.org" for n in range(40)),
                             Cc=", ".join(f"c{n}@example.org" for n in range(11))), "at most 50"),
    "non-ascii address": ("From: a@example.org\nTo: josé@exämple.org\nSubject: s\n\nbody\n".encode(), "non-ASCII"),
    "long from": (simple(From=f"{'N' * 250} <a@example.org>"), "at most 255"),
    "long subject": (simple(Subject="s" * 2001), "longer than 2000"),
    "no filename": (with_attachment(b"data"), "no filename"),
    "charset parameter": (with_attachment("é,1\n", "t.csv", "csv"), "parameter charset"),
    "attachment with content-id": (with_attachment(b"data", "d.bin", cid="<d@x>"), "would show it inline"),
}


@pytest.mark.parametrize("case", sorted(UNEXPRESSIBLE))
def test_what_postmark_cannot_carry(case: str) -> None:
    message, reason = UNEXPRESSIBLE[case]
    with pytest.raises(Unexpressible, match=reason):
        provider_for("https://api.postmarkapp.com").send_request(outgoing(message))


def test_fifty_recipients_pass(client: httpx.Client, fake: FakePostmark) -> None:
    message = simple(To=", ".join(f"r{n}@example.org" for n in range(40)),
                     Cc=", ".join(f"c{n}@example.org" for n in range(10)))
    assert send(client, fake, message).problem is HttpProblem.NONE


def test_the_size_limit_counts_the_whole_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 10 MB limit, scaled down: a request over the limit is refused, one at the limit passes."""
    message = outgoing(with_attachment(b"\0" * 3000, "big.bin"))
    size = len(provider_for("https://api.postmarkapp.com").send_request(message).content)
    monkeypatch.setattr(postmark, "MAX_REQUEST_BYTES", size)
    provider_for("https://api.postmarkapp.com").send_request(message)
    monkeypatch.setattr(postmark, "MAX_REQUEST_BYTES", size - 1)
    with pytest.raises(Unexpressible, match="at most 10 MB"):
        provider_for("https://api.postmarkapp.com").send_request(message)


def test_inline_image_reaches_the_fake_with_its_content_id(client: httpx.Client, fake: FakePostmark) -> None:
    message = simple()
    message.add_alternative('<img src="cid:logo@x">', subtype="html")
    html_part(message).add_related(PNG, "image", "png", cid="<logo@x>", filename="logo.png", disposition="inline")
    assert send(client, fake, message).problem is HttpProblem.NONE
    [attachment] = fake.accepted[0].payload["Attachments"]
    assert (attachment["ContentID"], attachment["Name"], attachment["ContentType"]) == ("cid:logo@x", "logo.png",
                                                                                       "image/png")
    assert fake.accepted[0].attachment_bytes(0) == PNG
