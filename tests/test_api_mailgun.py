"""Mailgun's raw-MIME provider: the request it builds, how it reads each reply, and both over real HTTPS against
tests/fake_mailgun.py (loopback, trustme certificate, httpx ignoring any proxy settings)."""

from __future__ import annotations

import base64
import calendar
import email
import email.policy
import ssl
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest
import trustme

from mailwatchd.message.envelope import OutgoingMessage, parse
from mailwatchd.settings.apirelays import ApiConfig, ApiKind
from mailwatchd.settings.credentials import Secret
from mailwatchd.transports.api import mailgun
from mailwatchd.transports.api.provider import ApiOutcome, ApiReply, ApiRequest, Unexpressible
from mailwatchd.transports.outcome import HttpProblem
from tests.fake_mailgun import API_KEY, FakeMailgun, parse_form
from tests.https_fake import Response

DOMAIN = "mg.example.com"
NOW = float(calendar.timegm((2021, 12, 20, 20, 30, 0)))
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def config(base_url: str = "https://api.mailgun.net", key: str = API_KEY, domain: str = DOMAIN) -> ApiConfig:
    return ApiConfig(ApiKind.MAILGUN, base_url, Secret(key), domain=domain)


def provider(base_url: str = "https://api.mailgun.net", key: str = API_KEY, domain: str = DOMAIN,
             now: float = NOW) -> mailgun.Mailgun:
    return mailgun.make(config(base_url, key, domain), lambda: now)


def rich_message() -> bytes:
    """Text and HTML alternatives, an inline image by Content-ID, an attachment, Cc, Bcc, Reply-To, custom
    headers, a non-ASCII subject and body."""
    message = EmailMessage()
    message["From"] = "Störung <alerts@mg.example.com>"
    message["To"] = "ops@example.org"
    message["Cc"] = "Zoë <zoe@example.org>"
    message["Bcc"] = "audit@example.net"
    message["Reply-To"] = "noc@example.com"
    message["Subject"] = "Sauvegarde échouée — 3 fichiers"
    message["X-Job-Id"] = "backup-42"
    message.set_content("La sauvegarde a échoué.\n")
    message.add_alternative('<p>La sauvegarde a <b>échoué</b>.</p><img src="cid:graph@mailwatchd">\n', subtype="html")
    html = message.get_body(("html",))
    assert isinstance(html, EmailMessage)
    html.add_related(PNG, "image", "png", cid="<graph@mailwatchd>")
    message.add_attachment(b"line 1\nline 2\n" * 100, "text", "plain", filename="backup.log")
    return message.as_bytes(policy=email.policy.SMTP)


def structure(raw: bytes) -> list[tuple[str, object, object]]:
    """Every part's content type, Content-ID and decoded payload, in order."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    return [(part.get_content_type(), part.get("Content-ID"),
             None if part.is_multipart() else part.get_payload(decode=True)) for part in message.walk()]


def outgoing(data: bytes, recipients: tuple[str, ...] = ("ops@example.org",), sender: str = "a@mg.example.com"
             ) -> OutgoingMessage:
    return OutgoingMessage("Q1", sender, recipients, data, len(data))


def reply(status: int, body: bytes | str = b"", headers: dict[str, str] | None = None) -> ApiReply:
    return ApiReply(status, headers or {}, body.encode() if isinstance(body, str) else body)


# -- the request -----------------------------------------------------------------------------------------------


def test_the_message_goes_as_a_file_with_one_to_field_per_envelope_recipient() -> None:
    message = parse("Q1", rich_message())
    request = provider().send_request(message)
    assert (request.method, request.url) == ("POST", "https://api.mailgun.net/v3/mg.example.com/messages.mime")
    scheme, _, token = request.headers["Authorization"].partition(" ")
    assert (scheme, base64.b64decode(token).decode()) == ("Basic", f"api:{API_KEY}")
    parts = parse_form(request.headers["Content-Type"], request.content)
    assert parts is not None
    assert [(part.name, part.content.decode()) for part in parts if part.name == "to"] == [
        ("to", "ops@example.org"), ("to", "zoe@example.org"), ("to", "audit@example.net")]
    [upload] = [part for part in parts if part.name == "message"]
    assert upload.filename and upload.content == message.data


@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
def test_bcc_with_its_folded_lines_is_removed_and_every_other_byte_kept(newline: bytes) -> None:
    lines = [b"From: a@mg.example.com", b"To: ops@example.org", b"Bcc: audit@example.net,", b"\t boss@example.net",
             b"Subject: s", b"", b"body line", b"Bcc: in the body stays"]
    data = newline.join(lines) + newline
    request = provider().send_request(outgoing(data, ("ops@example.org", "audit@example.net", "boss@example.net")))
    parts = parse_form(request.headers["Content-Type"], request.content)
    assert parts is not None
    [upload] = [part.content for part in parts if part.name == "message"]
    assert upload == newline.join(lines[:2] + lines[4:]) + newline


def test_a_message_without_bcc_is_uploaded_as_the_same_bytes() -> None:
    data = b"From: a@mg.example.com\nTo: b@example.org\nSubject: lf only\n\nbody\n"
    request = provider().send_request(outgoing(data))
    assert request.content.count(data) == 1


def test_the_domain_is_one_path_segment() -> None:
    request = provider(domain="mg/../x.example.com").send_request(outgoing(b"From: a@b.example\n\nx\n"))
    assert request.url == "https://api.mailgun.net/v3/mg%2F..%2Fx.example.com/messages.mime"


@pytest.mark.parametrize(("message", "reason"), [
    (outgoing(b"From: a@b.example\n\nx\n", tuple(f"r{n}@example.org" for n in range(1001))), "1001 recipients"),
    (outgoing(b"From: a@b.example\n\n" + b"x" * 25_000_000), "up to 25 MB"),
    (outgoing(b"From: a@b.example\n\nx\n", ("a,b@example.org",)), "comma"),
    (outgoing(b"no header here\n\nsecret body\n"), "header cannot be read"),
])
def test_what_mailgun_cannot_carry_goes_to_the_next_relay(message: OutgoingMessage, reason: str) -> None:
    with pytest.raises(Unexpressible, match=reason) as raised:
        provider().send_request(message)
    assert b"secret body" not in str(raised.value).encode()


def test_a_thousand_recipients_still_fit() -> None:
    recipients = tuple(f"r{n}@example.org" for n in range(1000))
    request = provider().send_request(outgoing(b"From: a@b.example\n\nx\n", recipients))
    assert request.content.count(b'name="to"') == 1000


def test_the_key_is_only_in_the_authorization_header() -> None:
    the_provider = provider()
    request = the_provider.send_request(outgoing(b"From: a@b.example\n\nx\n"))
    token = request.headers["Authorization"].split()[1]
    for text in (request.url, request.content.decode("latin-1"), repr(the_provider), str(the_provider),
                 repr(config())):
        assert API_KEY not in text and token not in text


# -- reading replies -------------------------------------------------------------------------------------------

READINGS = [
    (reply(200, '{"id": "<20111114174239.25659.5817@samples.mailgun.org>", "message": "Queued. Thank you."}'),
     HttpProblem.NONE, "Queued. Thank you."),
    (reply(200, "Mailgun Magnificent API"), HttpProblem.MISCONFIGURED, "Magnificent"),
    (reply(200, "<html>proxy login</html>"), HttpProblem.UNAVAILABLE, "no message id"),
    (reply(401, "Forbidden"), HttpProblem.AUTH, "Forbidden"),
    (reply(401, ""), HttpProblem.AUTH, "API key was refused"),
    (reply(403, '{"message": "Domain example is not allowed to send large batches yet"}'), HttpProblem.ACCOUNT,
     "large batches"),
    (reply(403, '{"message": "Rejected: IP 10.0.0.1 can\'t be used to send the message"}'), HttpProblem.ACCOUNT,
     "Rejected"),
    (reply(403, '{"message": "Invalid private key"}'), HttpProblem.AUTH, "Invalid private key"),
    (reply(400, '{"message": "Domain mg.example.com is not allowed to send: Sandbox subdomains are for test '
                'purposes only."}'), HttpProblem.ACCOUNT, "Sandbox"),
    (reply(400, '{"message": "to parameter is not a valid address. please check documentation"}'),
     HttpProblem.RECIPIENT, "to parameter"),
    (reply(400, '{"message": "bcc parameter is not a valid address. please check documentation"}'),
     HttpProblem.RECIPIENT, "bcc parameter"),
    (reply(400, '{"message": "from parameter is not a valid address. please check documentation"}'),
     HttpProblem.SENDER, "from parameter"),
    (reply(400, '{"message": "Header name must be pure ASCII: X-Ä"}'), HttpProblem.MESSAGE, "pure ASCII"),
    (reply(402, '{"message": "Request Failed"}'), HttpProblem.ACCOUNT, "Request Failed"),
    (reply(404, '{"message": "Domain not found: mg.example.com"}'), HttpProblem.MISCONFIGURED, "Domain not found"),
    (reply(413, '{"message": "request size exceeds 52.4MiB limit"}'), HttpProblem.MESSAGE, "52.4MiB"),
    (reply(500, "Internal Server Error"), HttpProblem.UNAVAILABLE, "Internal Server Error"),
    (reply(502, "<html>\n<h1>502 Bad Gateway</h1>\n</html>"), HttpProblem.UNAVAILABLE, "<html> <h1>502"),
    (reply(301, "", {"location": "https://elsewhere.example"}), HttpProblem.MISCONFIGURED, "nothing at"),
]


@pytest.mark.parametrize(("the_reply", "problem", "words"), READINGS)
def test_each_reply_is_read_into_its_problem(the_reply: ApiReply, problem: HttpProblem, words: str) -> None:
    outcome = provider().interpret(the_reply)
    assert outcome.problem is problem
    assert words in outcome.detail and "\n" not in outcome.detail
    assert (outcome.message_id is not None) == (problem is HttpProblem.NONE)


def test_an_accepted_message_keeps_mailguns_id() -> None:
    outcome = provider().interpret(READINGS[0][0])
    assert outcome.message_id == "<20111114174239.25659.5817@samples.mailgun.org>"


@pytest.mark.parametrize(("the_reply", "seconds"), [
    (reply(429, '{"message": "Domain mg.example.com is not allowed to send: request limit exceeded, try again after '
                'Mon, 20 Dec 2021 20:33:21 UTC"}'), 201.0),
    (reply(429, '{"message": "Domain x is not allowed to send: bytes limit exceeded, try again after Mon, 20 Dec '
                '2021 20:29:00 UTC"}'), 0.0),
    (reply(429, '{"message": "slow down"}', {"retry-after": "30"}), 30.0),
    (reply(429, '{"message": "slow down"}', {"retry-after": formatdate(NOW + 90, usegmt=True)}), 90.0),
    (reply(429, '{"retry-seconds": 60}'), 60.0),
    (reply(429, '{"message": "try again after someday"}'), None),
    (reply(503, "busy", {"retry-after": "5"}), 5.0),
])
def test_a_rate_limit_says_when_to_come_back(the_reply: ApiReply, seconds: float | None) -> None:
    outcome = provider().interpret(the_reply)
    assert outcome.problem is (HttpProblem.QUOTA if the_reply.status == 429 else HttpProblem.UNAVAILABLE)
    assert outcome.retry_after == seconds


def test_the_detail_is_one_short_line_without_the_key() -> None:
    token = base64.b64encode(f"api:{API_KEY}".encode()).decode()
    echoed = reply(400, f'{{"message": "bad request\\nkey {API_KEY} auth Basic {token} {"x" * 500}"}}')
    outcome = provider().interpret(echoed)
    assert outcome.problem is HttpProblem.MESSAGE
    assert len(outcome.detail) <= mailgun.DETAIL_CHARS and "\n" not in outcome.detail
    for text in (outcome.detail, str(outcome), repr(outcome)):
        assert API_KEY not in text and token not in text


@pytest.mark.parametrize(("state", "kind", "disabled", "problem", "detail"), [
    ("active", "custom", False, HttpProblem.NONE, "domain mg.example.com active"),
    ("active", "sandbox", False, HttpProblem.NONE, "domain mg.example.com active; sandbox: authorized recipients only"),
    ("unverified", "custom", False, HttpProblem.ACCOUNT, "domain mg.example.com unverified"),
    ("disabled", "custom", True, HttpProblem.ACCOUNT, "domain mg.example.com disabled"),
    ("active", "custom", True, HttpProblem.ACCOUNT, "domain mg.example.com disabled"),
])
def test_the_probe_reads_the_domain(state: str, kind: str, disabled: bool, problem: HttpProblem, detail: str) -> None:
    body = f'{{"domain": {{"name": "{DOMAIN}", "state": "{state}", "type": "{kind}", "is_disabled": ' \
           f'{"true" if disabled else "false"}}}, "sending_dns_records": []}}'
    outcome = provider().interpret(reply(200, body), probing=True)
    assert (outcome.problem, outcome.detail[:len(detail)]) == (problem, detail)
    request = provider().probe_request()
    assert (request.method, request.url, request.content) == ("GET", f"https://api.mailgun.net/v4/domains/{DOMAIN}",
                                                              b"")


@pytest.mark.parametrize(("the_reply", "problem"), [
    (reply(401, "Forbidden"), HttpProblem.AUTH), (reply(404, '{"message": "Domain not found"}'),
                                                   HttpProblem.MISCONFIGURED),
    (reply(200, "Mailgun Magnificent API"), HttpProblem.MISCONFIGURED), (reply(200, "[]"), HttpProblem.UNAVAILABLE),
    (reply(400, '{"message": "bad"}'), HttpProblem.MISCONFIGURED), (reply(500, ""), HttpProblem.UNAVAILABLE),
])
def test_a_failed_probe_says_why(the_reply: ApiReply, problem: HttpProblem) -> None:
    outcome = provider().interpret(the_reply, probing=True)
    assert outcome.problem is problem
    if problem is HttpProblem.AUTH:
        assert "domain sending key" in outcome.detail


# -- over HTTPS against the fake -------------------------------------------------------------------------------


@pytest.fixture
def fake(ca: trustme.CA) -> Iterator[FakeMailgun]:
    with FakeMailgun(ca, sending_keys={"sending-key-1": DOMAIN}) as api:
        assert isinstance(api, FakeMailgun)
        yield api
        assert api.handler_errors == []


@pytest.fixture
def client(ca_file: Path) -> Iterator[httpx.Client]:
    context = ssl.create_default_context(cafile=str(ca_file))
    with httpx.Client(verify=context, trust_env=False, timeout=10) as the_client:
        yield the_client


def send(client: httpx.Client, request: ApiRequest) -> ApiReply:
    response = client.request(request.method, request.url, headers=request.headers, content=request.content)
    return ApiReply(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)


def deliver(client: httpx.Client, fake: FakeMailgun, message: OutgoingMessage, key: str = API_KEY) -> ApiOutcome:
    the_provider = provider(fake.base_url, key, now=time.time())
    return the_provider.interpret(send(client, the_provider.send_request(message)))


def test_a_rich_message_arrives_with_the_same_structure_and_bcc_unseen(client: httpx.Client,
                                                                       fake: FakeMailgun) -> None:
    raw = rich_message()
    message = parse("Q1", raw)
    outcome = deliver(client, fake, message)
    assert outcome.problem is HttpProblem.NONE, outcome.detail
    [accepted] = fake.messages
    assert accepted.recipients == ("ops@example.org", "zoe@example.org", "audit@example.net")
    assert accepted.mime == message.data and outcome.message_id == accepted.message_id
    assert structure(accepted.mime) == structure(raw)
    received = email.message_from_bytes(accepted.mime, policy=email.policy.default)
    assert received["Bcc"] is None and b"audit@example.net" not in accepted.mime
    assert (received["Cc"], received["Reply-To"], received["X-Job-Id"]) == ("Zoë <zoe@example.org>",
                                                                             "noc@example.com", "backup-42")
    assert received["Subject"] == "Sauvegarde échouée — 3 fichiers"


def test_bcc_left_in_the_data_is_stripped_before_upload(client: httpx.Client, fake: FakeMailgun) -> None:
    data = b"From: a@mg.example.com\r\nTo: ops@example.org\r\nBcc: audit@example.net\r\nSubject: s\r\n\r\nbody\r\n"
    outcome = deliver(client, fake, outgoing(data, ("ops@example.org", "audit@example.net")))
    assert outcome.problem is HttpProblem.NONE
    [accepted] = fake.messages
    assert accepted.mime == data.replace(b"Bcc: audit@example.net\r\n", b"")
    assert accepted.recipients == ("ops@example.org", "audit@example.net")


def test_a_revoked_key_is_an_auth_failure_and_nothing_is_sent(client: httpx.Client, fake: FakeMailgun) -> None:
    fake.revoke_key()
    outcome = deliver(client, fake, parse("Q1", rich_message()))
    assert (outcome.problem, outcome.detail) == (HttpProblem.AUTH, "Forbidden")
    assert fake.messages == []
    assert provider(fake.base_url).interpret(send(client, provider(fake.base_url).probe_request()),
                                             probing=True).problem is HttpProblem.AUTH


def test_a_rate_limit_is_a_quota_with_the_time_mailgun_names(client: httpx.Client, fake: FakeMailgun) -> None:
    fake.rate_limit(time.time() + 120, "recipient")
    outcome = deliver(client, fake, parse("Q1", rich_message()))
    assert outcome.problem is HttpProblem.QUOTA and "recipient limit exceeded" in outcome.detail
    assert outcome.retry_after is not None and 115 <= outcome.retry_after <= 121
    fake.rate_limit(None)
    assert deliver(client, fake, parse("Q1", rich_message())).problem is HttpProblem.NONE


@pytest.mark.parametrize(("state", "kind"), [("unverified", "custom"), ("disabled", "custom"), ("active", "sandbox")])
def test_a_domain_that_cannot_send_is_an_account_problem(client: httpx.Client, fake: FakeMailgun, state: str,
                                                         kind: str) -> None:
    fake.domains[DOMAIN].state, fake.domains[DOMAIN].type = state, kind
    outcome = deliver(client, fake, parse("Q1", rich_message()))
    assert outcome.problem is HttpProblem.ACCOUNT and "is not allowed to send" in outcome.detail
    probe = provider(fake.base_url).interpret(send(client, provider(fake.base_url).probe_request()), probing=True)
    assert probe.problem is (HttpProblem.NONE if kind == "sandbox" else HttpProblem.ACCOUNT)
    assert state in probe.detail or "sandbox" in probe.detail


def test_the_sandbox_sends_to_authorized_recipients(client: httpx.Client, fake: FakeMailgun) -> None:
    fake.domains[DOMAIN].type = "sandbox"
    fake.domains[DOMAIN].authorized_recipients = {"ops@example.org"}
    assert deliver(client, fake, outgoing(b"From: a@mg.example.com\n\nx\n")).problem is HttpProblem.NONE


def test_an_unknown_domain_is_misconfigured(client: httpx.Client, fake: FakeMailgun) -> None:
    other = provider(fake.base_url, domain="mg.other.example")
    outcome = other.interpret(send(client, other.send_request(outgoing(b"From: a@b.example\n\nx\n"))))
    assert (outcome.problem, outcome.detail) == (HttpProblem.MISCONFIGURED, "Domain not found: mg.other.example")
    assert other.interpret(send(client, other.probe_request()), probing=True).problem is HttpProblem.MISCONFIGURED


def test_a_refused_recipient_is_the_messages_problem(client: httpx.Client, fake: FakeMailgun) -> None:
    fake.refused_recipients.add("nobody@example.org")
    outcome = deliver(client, fake, outgoing(b"From: a@b.example\n\nx\n", ("ops@example.org", "nobody@example.org")))
    assert outcome.problem is HttpProblem.RECIPIENT and fake.messages == []


def test_a_request_over_the_size_limit_is_the_messages_problem(ca: trustme.CA, client: httpx.Client) -> None:
    with FakeMailgun(ca, max_request_bytes=2_000) as small:
        assert isinstance(small, FakeMailgun)
        outcome = deliver(client, small, parse("Q1", rich_message()))
        assert (outcome.problem, outcome.detail) == (HttpProblem.MESSAGE, "request size exceeds 52.4MiB limit")
        assert small.handler_errors == []


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_server_error_is_unavailable(client: httpx.Client, fake: FakeMailgun, status: int) -> None:
    fake.fail_with(Response(status, b"Internal Server Error", content_type="text/plain"), times=1)
    assert deliver(client, fake, parse("Q1", rich_message())).problem is HttpProblem.UNAVAILABLE
    assert deliver(client, fake, parse("Q1", rich_message())).problem is HttpProblem.NONE


def test_a_domain_sending_key_sends_but_cannot_probe(client: httpx.Client, fake: FakeMailgun) -> None:
    assert deliver(client, fake, parse("Q1", rich_message()), key="sending-key-1").problem is HttpProblem.NONE
    limited = provider(fake.base_url, key="sending-key-1")
    probe = limited.interpret(send(client, limited.probe_request()), probing=True)
    assert probe.problem is HttpProblem.AUTH and "domain sending key" in probe.detail


def test_the_probe_of_an_active_domain(client: httpx.Client, fake: FakeMailgun) -> None:
    the_provider = provider(fake.base_url)
    probe = the_provider.interpret(send(client, the_provider.probe_request()), probing=True)
    assert (probe.problem, probe.detail) == (HttpProblem.NONE, f"domain {DOMAIN} active")
    assert fake.messages == []


def test_the_fake_refuses_what_mailgun_refuses(client: httpx.Client, fake: FakeMailgun) -> None:
    auth = {"Authorization": "Basic " + base64.b64encode(f"api:{API_KEY}".encode()).decode()}
    url = f"{fake.base_url}/v3/{DOMAIN}/messages.mime"
    urlencoded = client.post(url, headers=auth, data={"to": "ops@example.org", "message": "From: a@b\n\nx"})
    assert urlencoded.status_code == 400 and urlencoded.json()["message"] == (
        "Invalid request content type. Expecting 'multipart/form-data' but got 'application/x-www-form-urlencoded'")
    not_a_file = client.post(url, headers=auth, files={"to": (None, "ops@example.org"), "message": (None, "x")})
    assert (not_a_file.status_code, not_a_file.json()["message"]) == (400, "'message' parameter is not a file")
    no_to = client.post(url, headers=auth, files={"message": ("m.mime", b"From: a@b\n\nx")})
    assert (no_to.status_code, no_to.json()["message"]) == (400, "to parameter is missing")
    wrong_user = {"Authorization": "Basic " + base64.b64encode(f"user:{API_KEY}".encode()).decode()}
    assert client.post(url, headers=wrong_user, files={"message": ("m", b"x")}).status_code == 401
    assert client.get(fake.base_url + "/").text == "Mailgun Magnificent API"
    assert fake.messages == []
