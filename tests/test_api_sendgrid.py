"""SendGrid: requests built from real messages, sent over HTTPS to a fake SendGrid, and its replies read."""

from __future__ import annotations

import base64
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
from mailwatchd.transports.api import sendgrid
from mailwatchd.transports.api.provider import ApiOutcome, ApiReply, ApiRequest, Provider, Unexpressible
from mailwatchd.transports.outcome import HttpProblem
from tests.fake_sendgrid import KEY, FakeSendGrid, error_body
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
def fake(ca: trustme.CA) -> Iterator[FakeSendGrid]:
    with FakeSendGrid(ca) as server:
        assert isinstance(server, FakeSendGrid)
        yield server
        assert server.handler_errors == []


@pytest.fixture
def client(ca_file: Path) -> Iterator[httpx.Client]:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file)), trust_env=False, timeout=10) as c:
        yield c


def provider_for(base_url: str, key: str = KEY) -> Provider:
    return sendgrid.make(ApiConfig(ApiKind.SENDGRID, base_url, Secret(key)), time.time)


def exchange(client: httpx.Client, provider: Provider, request: ApiRequest, *, probing: bool = False) -> ApiOutcome:
    response = client.request(request.method, request.url, headers=request.headers, content=request.content)
    reply = ApiReply(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)
    return provider.interpret(reply, probing=probing)


def send(client: httpx.Client, fake: FakeSendGrid, message: EmailMessage | bytes) -> ApiOutcome:
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


def ascii_rich_message() -> EmailMessage:
    """rich_message with an ASCII From and no comma in the Cc name, which SendGrid requires."""
    message = rich_message()
    message.replace_header("From", "Regis Systeme <regis@host.example>")
    message.replace_header("Cc", "Bob Martin <bob@example.net>")
    return message


def test_send_request_is_a_json_post_with_the_key_only_in_the_bearer_header() -> None:
    provider = provider_for("https://api.sendgrid.com")
    request = provider.send_request(outgoing(ascii_rich_message()))
    assert (request.method, request.url) == ("POST", "https://api.sendgrid.com/v3/mail/send")
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert KEY not in request.url and KEY.encode() not in request.content
    assert [k for k, v in request.headers.items() if KEY in v] == ["Authorization"]
    assert KEY not in repr(provider) and KEY not in str(provider)


def test_probe_request_lists_the_keys_scopes() -> None:
    request = provider_for("https://api.eu.sendgrid.com").probe_request()
    assert (request.method, request.url, request.content) == ("GET", "https://api.eu.sendgrid.com/v3/scopes", b"")
    assert request.headers["Authorization"] == f"Bearer {KEY}"


def test_body_fields_order_and_tracking() -> None:
    body = json.loads(provider_for("https://x.example").send_request(outgoing(ascii_rich_message())).content)
    assert [block["type"] for block in body["content"]] == ["text/plain", "text/html"]
    assert body["tracking_settings"]["click_tracking"]["enable"] is False
    assert body["tracking_settings"]["open_tracking"]["enable"] is False
    assert set(body["personalizations"][0]) == {"to", "cc", "bcc"}


# -- over HTTPS: accepted, and the parts are the message's ---------------------------------------------------


def test_accepted_message_keeps_every_part(client: httpx.Client, fake: FakeSendGrid) -> None:
    message = ascii_rich_message()
    outcome = send(client, fake, message)

    assert outcome.problem is HttpProblem.NONE
    [accepted] = fake.accepted
    assert outcome.message_id == accepted.message_id
    body = accepted.payload
    text, html, parts = original_parts(reparse(message))
    assert [block["value"] for block in body["content"]] == [text, html] == [TEXT, HTML]
    assert body["subject"] == SUBJECT
    assert body["from"] == {"email": "regis@host.example", "name": "Regis Systeme"}
    personalization = body["personalizations"][0]
    assert personalization["to"] == [{"email": "ops@example.org", "name": "Ops Team"}, {"email": "alice@example.org"}]
    assert personalization["cc"] == [{"email": "bob@example.net", "name": "Bob Martin"}]
    assert personalization["bcc"] == [{"email": "audit@example.com"}]
    assert body["reply_to"] == {"email": "helpdesk@example.org", "name": "Helpdesk"}
    sent = [(a["filename"], a["type"], accepted.attachment_bytes(i), a.get("content_id"))
            for i, a in enumerate(body["attachments"])]
    assert sent == [(p.filename, p.content_type, p.content, p.content_id) for p in parts]
    assert sent[0][2] == PNG and sent[1][2] == PDF
    assert [a["disposition"] for a in body["attachments"]] == ["inline", "attachment", "attachment"]
    assert body["headers"]["Message-ID"] == "<report.2026-12-01@host.example>"
    assert body["headers"]["Date"] == "Tue, 01 Dec 2026 08:00:00 +0000"
    assert set(body["headers"]) == {"Date", "Message-ID", "In-Reply-To", "X-Priority", "X-Report-Run"}
    assert "audit@example.com" not in json.dumps(body["headers"])


# -- over HTTPS: every error class ------------------------------------------------------------------------------


def test_revoked_key_is_auth_and_the_key_never_shows(client: httpx.Client, fake: FakeSendGrid) -> None:
    fake.revoke_key()
    outcome = send(client, fake, simple())
    assert outcome.problem is HttpProblem.AUTH
    assert "revoked" in outcome.detail
    assert KEY not in outcome.detail and KEY not in repr(outcome) and KEY not in str(outcome)
    assert fake.accepted == []


def test_echoed_key_is_scrubbed(client: httpx.Client, fake: FakeSendGrid) -> None:
    fake.fail_with(Response.of_json(401, error_body(f"bad key {KEY} given")))
    outcome = send(client, fake, simple())
    assert outcome.problem is HttpProblem.AUTH
    assert KEY not in outcome.detail and "***" in outcome.detail


def test_wrong_key_is_auth(client: httpx.Client, fake: FakeSendGrid) -> None:
    provider = provider_for(fake.base_url, key="SG.other")
    outcome = exchange(client, provider, provider.send_request(outgoing(simple())))
    assert outcome.problem is HttpProblem.AUTH


def test_key_without_mail_send_is_auth(client: httpx.Client, fake: FakeSendGrid) -> None:
    fake.scopes = ["alerts.read"]
    assert send(client, fake, simple()).problem is HttpProblem.AUTH


def test_unverified_sender_is_this_messages_sender(client: httpx.Client, fake: FakeSendGrid) -> None:
    fake.verify_senders("noreply@example.org")
    outcome = send(client, fake, simple())
    assert outcome.problem is HttpProblem.SENDER
    assert "verified Sender Identity" in outcome.detail and "field from" in outcome.detail


def test_invalid_recipient_is_the_recipients(client: httpx.Client, fake: FakeSendGrid) -> None:
    fake.refuse_recipient("rcpt@example.org")
    outcome = send(client, fake, simple())
    assert outcome.problem is HttpProblem.RECIPIENT
    assert "personalizations.0.to.0.email" in outcome.detail


def test_too_large_is_the_messages(client: httpx.Client, fake: FakeSendGrid) -> None:
    fake.max_bytes = 2000
    outcome = send(client, fake, ascii_rich_message())
    assert (outcome.problem, outcome.detail) == (HttpProblem.MESSAGE, "content too large")


def test_rate_limit_is_a_quota_until_the_reset(client: httpx.Client, fake: FakeSendGrid) -> None:
    fake.rate_limit(reset_in=120)
    outcome = send(client, fake, simple())
    assert outcome.problem is HttpProblem.QUOTA
    assert outcome.retry_after is not None and 118 <= outcome.retry_after <= 120


def test_server_error_is_unavailable(client: httpx.Client, fake: FakeSendGrid) -> None:
    fake.server_error(times=1)
    assert send(client, fake, simple()).problem is HttpProblem.UNAVAILABLE
    assert send(client, fake, simple()).problem is HttpProblem.NONE


def test_wrong_base_url_is_misconfigured(client: httpx.Client, fake: FakeSendGrid) -> None:
    provider = provider_for(fake.base_url + "/nothing-here")
    outcome = exchange(client, provider, provider.send_request(outgoing(simple())))
    assert outcome.problem is HttpProblem.MISCONFIGURED
    assert "not SendGrid's" in outcome.detail


def test_probe_says_the_key_can_send(client: httpx.Client, fake: FakeSendGrid) -> None:
    provider = provider_for(fake.base_url)
    outcome = exchange(client, provider, provider.probe_request(), probing=True)
    assert (outcome.problem, outcome.detail) == (HttpProblem.NONE, "key valid with mail.send")
    fake.scopes = ["alerts.read"]
    outcome = exchange(client, provider, provider.probe_request(), probing=True)
    assert outcome.problem is HttpProblem.AUTH and "lacks the mail.send scope" in outcome.detail
    fake.revoke_key()
    outcome = exchange(client, provider, provider.probe_request(), probing=True)
    assert outcome.problem is HttpProblem.AUTH and KEY not in outcome.detail
    assert fake.accepted == []


# -- reading replies ------------------------------------------------------------------------------------------


def read(status: int, body: bytes | dict[str, object] = b"", headers: dict[str, str] | None = None, *,
         probing: bool = False, now: float = 1_000_000.0) -> ApiOutcome:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    provider = sendgrid.make(ApiConfig(ApiKind.SENDGRID, "https://api.sendgrid.com", Secret(KEY)), lambda: now)
    return provider.interpret(ApiReply(status, headers or {}, content), probing=probing)


def test_reading_replies() -> None:
    assert read(202, headers={"x-message-id": "abc"}) == ApiOutcome(HttpProblem.NONE, "accepted", message_id="abc")
    assert read(401, error_body("Maximum credits exceeded")).problem is HttpProblem.QUOTA
    assert read(403, error_body("access forbidden")).problem is HttpProblem.AUTH
    assert read(400, error_body("The subject is required.", "subject")).problem is HttpProblem.MESSAGE
    assert read(400, error_body("The to array is required", "personalizations.0.to")).problem is HttpProblem.MESSAGE
    assert read(400, error_body("Does not contain a valid address.", "from.email")).problem is HttpProblem.SENDER
    assert read(400, b"<html>bad</html>").problem is HttpProblem.UNAVAILABLE
    assert read(200, b"ok").problem is HttpProblem.MISCONFIGURED  # a 200 is not Mail Send's 202
    assert read(200, b"<html>", probing=True).problem is HttpProblem.MISCONFIGURED
    assert read(503, b"").problem is HttpProblem.UNAVAILABLE
    assert read(429, error_body("too many requests"), {"retry-after": "7"}).retry_after == 7.0
    assert read(429, error_body("too many requests"), {"x-ratelimit-reset": "1000060"}).retry_after == 60.0
    assert read(429, error_body("too many requests"), {"x-ratelimit-reset": "999000"}).retry_after == 0.0
    assert read(429, error_body("x"), {"retry-after": "Mon, 12 Jan 1970 13:47:30 GMT"}).retry_after == 50.0


def test_detail_is_one_line_and_bounded() -> None:
    outcome = read(400, error_body("line one\nline two " + "x" * 1000, "content.0.value"))
    assert "\n" not in outcome.detail and len(outcome.detail) <= 300


# -- what SendGrid cannot carry -------------------------------------------------------------------------------


def with_attachment(content: bytes | str, filename: str | None = None, subtype: str = "octet-stream") -> EmailMessage:
    message = simple()
    if isinstance(content, str):
        message.add_attachment(content, subtype=subtype, filename=filename)
    else:
        message.add_attachment(content, maintype="application", subtype=subtype, filename=filename)
    return message


def to_many(count: int) -> EmailMessage:
    return simple(To=", ".join(f"r{number}@example.org" for number in range(count)))


UNEXPRESSIBLE: dict[str, tuple[EmailMessage | bytes, str]] = {
    "unicode from": (simple(From="José <jose@example.org>"), "non-ASCII"),
    "comma in a name": (simple(To='"Doe, Jane" <jane@example.org>'), "';' or ','"),
    "address twice": (simple(To="a@example.org", Cc="A@example.org"), "appears twice"),
    "no subject": (b"From: a@example.org\nTo: b@example.org\n\nbody\n", "no Subject"),
    "no to": (b"From: a@example.org\nCc: b@example.org\nSubject: s\n\nbody\n", "no To"),
    "no filename": (with_attachment(b"data"), "no filename"),
    "empty attachment": (with_attachment(b"", filename="empty.bin"), "empty"),
    "charset parameter": (with_attachment("é,1\n", subtype="csv", filename="t.csv"), "parameter charset"),
    "refused header": (simple(X_SG_ID="abc"), "X-SG-ID"),
    "header twice": (b"From: a@example.org\nTo: b@example.org\nSubject: s\nComments: one\nComments: two\n\nbody\n",
                     "Comments occurs twice"),
    "too many recipients": (to_many(1001), "at most 1000"),
}


@pytest.mark.parametrize("case", sorted(UNEXPRESSIBLE))
def test_what_sendgrid_cannot_carry(case: str) -> None:
    message, reason = UNEXPRESSIBLE[case]
    with pytest.raises(Unexpressible, match=reason):
        provider_for("https://api.sendgrid.com").send_request(outgoing(message))


def test_the_size_limit_counts_the_whole_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 30 MB limit, scaled down: a request of the limit or more is refused, one byte less passes."""
    message = outgoing(with_attachment(b"\0" * 3000, filename="big.bin"))
    size = len(provider_for("https://api.sendgrid.com").send_request(message).content)
    monkeypatch.setattr(sendgrid, "MAX_REQUEST_BYTES", size + 1)
    provider_for("https://api.sendgrid.com").send_request(message)
    monkeypatch.setattr(sendgrid, "MAX_REQUEST_BYTES", size)
    with pytest.raises(Unexpressible, match="less than 30 MB"):
        provider_for("https://api.sendgrid.com").send_request(message)


def test_a_thousand_recipients_pass(client: httpx.Client, fake: FakeSendGrid) -> None:
    assert send(client, fake, to_many(1000)).problem is HttpProblem.NONE
    assert len(fake.accepted[0].payload["personalizations"][0]["to"]) == 1000


def test_inline_image_reaches_the_fake_with_its_content_id(client: httpx.Client, fake: FakeSendGrid) -> None:
    message = simple()
    message.add_alternative('<img src="cid:logo@x">', subtype="html")
    html_part(message).add_related(PNG, "image", "png", cid="<logo@x>", filename="logo.png",
                                         disposition="inline")
    assert send(client, fake, message).problem is HttpProblem.NONE
    [attachment] = fake.accepted[0].payload["attachments"]
    assert (attachment["content_id"], attachment["disposition"], attachment["filename"]) == ("logo@x", "inline",
                                                                                            "logo.png")
    assert base64.b64decode(attachment["content"]) == PNG
