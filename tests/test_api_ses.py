"""Amazon SES API v2 (raw content): the signed request the provider builds, how it reads each reply, and both
over real HTTPS against tests/fake_ses.py, whose own SigV4 verifier is held to AWS's published vectors here."""

from __future__ import annotations

import base64
import calendar
import email
import email.policy
import json
import ssl
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
import trustme

from mailwatchd.message.envelope import OutgoingMessage, parse
from mailwatchd.settings.apirelays import ApiConfig, ApiKind
from mailwatchd.settings.credentials import Secret
from mailwatchd.transports.api import ses
from mailwatchd.transports.api.provider import ApiOutcome, ApiReply, ApiRequest, Unexpressible
from mailwatchd.transports.outcome import HttpProblem
from tests.fake_ses import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, FakeSes, check_signature, error
from tests.https_fake import Request, Response

NOW = float(calendar.timegm((2026, 12, 1, 9, 30, 0)))
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def config(base_url: str = "https://email.us-east-1.amazonaws.com", secret: str = SECRET_ACCESS_KEY,
           region: str = REGION, key_id: str = ACCESS_KEY_ID) -> ApiConfig:
    return ApiConfig(ApiKind.SES, base_url, Secret(secret), key_id=key_id, region=region)


def provider(base_url: str = "https://email.us-east-1.amazonaws.com", *, secret: str = SECRET_ACCESS_KEY,
             region: str = REGION, now: float | None = NOW, key_id: str = ACCESS_KEY_ID) -> ses.Ses:
    return ses.make(config(base_url, secret, region, key_id), (lambda: now) if now is not None else time.time)


def rich_message() -> bytes:
    """Text and HTML alternatives, an inline image by Content-ID, an attachment, Cc, Bcc, Reply-To, custom
    headers, a non-ASCII subject (encoded words) and an 8-bit UTF-8 body."""
    message = EmailMessage()
    message["From"] = "Störung <alerts@example.com>"
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
    message = email.message_from_bytes(raw, policy=email.policy.default)
    return [(part.get_content_type(), part.get("Content-ID"),
             None if part.is_multipart() else part.get_payload(decode=True)) for part in message.walk()]


def outgoing(data: bytes, recipients: tuple[str, ...] = ("ops@example.org",)) -> OutgoingMessage:
    return OutgoingMessage("Q1", "alerts@example.com", recipients, data, len(data))


def reply(status: int, body: object = b"", headers: dict[str, str] | None = None) -> ApiReply:
    raw = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return ApiReply(status, headers or {}, raw)


def aws_error(status: int, code: str, message: str) -> ApiReply:
    return reply(status, {"message": message}, {"x-amzn-errortype": f"{code}:http://internal.amazon.com/coral/x/"})


SIMPLE = b"From: alerts@example.com\r\nTo: ops@example.org\r\nSubject: s\r\n\r\nbody\r\n"


# -- the request -----------------------------------------------------------------------------------------------


def test_the_raw_message_and_the_envelope_go_in_a_signed_json_request() -> None:
    message = parse("Q1", rich_message())
    request = provider().send_request(message)
    assert (request.method, request.url) == ("POST", "https://email.us-east-1.amazonaws.com/v2/email/outbound-emails")
    document = json.loads(request.content)
    assert base64.b64decode(document["Content"]["Raw"]["Data"]) == message.data
    assert document["Destination"] == {"BccAddresses": ["ops@example.org", "zoe@example.org", "audit@example.net"]}
    assert set(document) == {"Content", "Destination"}  # no FromEmailAddress: SES takes From:
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Host"] == "email.us-east-1.amazonaws.com"
    assert request.headers["X-Amz-Date"] == "20261201T093000Z"
    assert request.headers["Authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/20261201/us-east-1/ses/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, Signature=")


def test_the_fakes_own_verifier_accepts_the_providers_signature() -> None:
    request = provider().send_request(outgoing(SIMPLE))
    received = Request(request.method, "/v2/email/outbound-emails", {k.lower(): v for k, v in request.headers.items()},
                       request.content)
    assert check_signature(received, key_id=ACCESS_KEY_ID, secret=SECRET_ACCESS_KEY, region=REGION, service="ses",
                           now=NOW) is None
    tampered = Request(received.method, received.path, received.headers, received.body.replace(b"ops@", b"opz@"))
    refused = check_signature(tampered, key_id=ACCESS_KEY_ID, secret=SECRET_ACCESS_KEY, region=REGION,
                              service="ses", now=NOW)
    assert refused is not None and refused.status == 403 and b"does not match" in refused.body


@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
def test_bcc_with_its_folded_lines_is_removed_and_every_other_byte_kept(newline: bytes) -> None:
    lines = [b"From: alerts@example.com", b"Bcc: audit@example.net,", b" boss@example.net", b"To: ops@example.org",
             b"", b"body"]
    data = newline.join(lines) + newline
    document = json.loads(provider().send_request(outgoing(data, ("ops@example.org", "audit@example.net"))).content)
    assert base64.b64decode(document["Content"]["Raw"]["Data"]) == newline.join(lines[:1] + lines[3:]) + newline


def test_a_message_without_bcc_goes_as_the_same_bytes() -> None:
    data = "From: alerts@example.com\nTo: ops@example.org\nSubject: 8-bit body\n\nÜberall 8 bit.\n".encode()
    document = json.loads(provider().send_request(outgoing(data)).content)
    assert base64.b64decode(document["Content"]["Raw"]["Data"]) == data


@pytest.mark.parametrize(("message", "reason"), [
    (outgoing(SIMPLE, tuple(f"r{n}@example.org" for n in range(51))), "51 recipients"),
    (outgoing(SIMPLE, ("ops@example.org", "zoë@example.org")), "not ASCII"),
    (outgoing("From: a@example.com\r\nSubject: Störung\r\n\r\nsecret body\r\n".encode()), "its subject field"),
    (outgoing(b"From: a@example.com\r\n\r\n" + b"x" * 999 + b"\r\nsecret body\r\n"), "999 octets"),
    (outgoing(b"From: a@example.com\nSubject: no body"), "no blank line"),
    (outgoing(b"secret body without a header\n\nx\n"), "header cannot be read"),
    (outgoing(b"From: a@example.com\n\n" + b"x\n" * 15_000_001), "in base64 and SES takes up to 40 MB"),
])
def test_what_ses_cannot_carry_goes_to_the_next_relay(message: OutgoingMessage, reason: str) -> None:
    with pytest.raises(Unexpressible, match=reason) as raised:
        provider().send_request(message)
    assert "secret body" not in str(raised.value)


@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
def test_a_line_of_998_octets_is_carried(newline: bytes) -> None:
    data = b"From: a@example.com" + newline + newline + b"x" * 998 + newline
    assert json.loads(provider().send_request(outgoing(data)).content)["Content"]["Raw"]["Data"]


def test_fifty_recipients_fit() -> None:
    recipients = tuple(f"r{n}@example.org" for n in range(50))
    document = json.loads(provider().send_request(outgoing(SIMPLE, recipients)).content)
    assert document["Destination"]["BccAddresses"] == list(recipients)


def test_the_probe_is_a_signed_get_of_the_account() -> None:
    request = provider("https://email.eu-west-1.amazonaws.com", region="eu-west-1").probe_request()
    assert (request.method, request.url, request.content) == (
        "GET", "https://email.eu-west-1.amazonaws.com/v2/email/account", b"")
    assert "/20261201/eu-west-1/ses/aws4_request, SignedHeaders=accept;host;x-amz-date," in \
        request.headers["Authorization"]


def test_the_secret_never_leaves_the_provider() -> None:
    the_provider = provider()
    request = the_provider.send_request(outgoing(SIMPLE))
    for text in (repr(request.headers), request.content.decode(), repr(the_provider), str(the_provider),
                 repr(config())):
        assert SECRET_ACCESS_KEY not in text


# -- reading replies -------------------------------------------------------------------------------------------

READINGS = [
    (reply(200, {"MessageId": "0100018c-abc-000000"}), HttpProblem.NONE, "queued"),
    (reply(200, {}), HttpProblem.UNAVAILABLE, "no MessageId"),
    (reply(200, "<html>captive portal</html>"), HttpProblem.UNAVAILABLE, "captive portal"),
    (aws_error(403, "UnrecognizedClientException", "The security token included in the request is invalid."),
     HttpProblem.AUTH, "UnrecognizedClientException: The security token"),
    (aws_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match"), HttpProblem.AUTH,
     "SignatureDoesNotMatch"),
    (aws_error(403, "InvalidClientTokenId", "The security token included in the request is invalid"),
     HttpProblem.AUTH, "InvalidClientTokenId"),
    (aws_error(400, "RequestExpired", "Signature expired: 20261201T090000Z is now earlier than ..."),
     HttpProblem.AUTH, "is this host's clock right?"),
    (reply(400, {"__type": "com.amazon.coral.service#InvalidSignatureException",
                 "message": "Signature expired: 20261201T090000Z is now earlier than ..."}),
     HttpProblem.AUTH, "InvalidSignatureException: Signature expired"),
    (aws_error(400, "AccessDeniedException", "User is not authorized to perform: ses:SendEmail"), HttpProblem.AUTH,
     "ses:SendEmail"),
    (reply(403, "Forbidden"), HttpProblem.AUTH, "Forbidden"),
    (aws_error(400, "AccountSuspendedException", "Account suspended."), HttpProblem.ACCOUNT, "suspended"),
    (aws_error(400, "SendingPausedException", "Sending paused."), HttpProblem.ACCOUNT, "paused"),
    (aws_error(429, "TooManyRequestsException", "Maximum sending rate exceeded."), HttpProblem.QUOTA, "rate"),
    (aws_error(400, "ThrottlingException", "Daily message quota exceeded."), HttpProblem.QUOTA, "Daily"),
    (aws_error(400, "LimitExceededException", "Limit exceeded."), HttpProblem.QUOTA, "Limit"),
    (reply(429, ""), HttpProblem.QUOTA, ""),
    (aws_error(400, "MessageRejected", "Email address is not verified. The following identities failed the check "
               "in region US-EAST-1: alerts@example.com"), HttpProblem.SENDER, "alerts@example.com"),
    (aws_error(400, "MailFromDomainNotVerifiedException", "MAIL FROM domain not verified."), HttpProblem.SENDER,
     "MAIL FROM"),
    (aws_error(400, "MessageRejected", "Illegal address"), HttpProblem.RECIPIENT, "Illegal address"),
    (aws_error(400, "MessageRejected", "Message length is more than 41943040 bytes long."), HttpProblem.MESSAGE,
     "Message length"),
    (aws_error(400, "BadRequestException", "1 validation error detected"), HttpProblem.MESSAGE, "validation"),
    (reply(413, "Request Entity Too Large"), HttpProblem.MESSAGE, "Too Large"),
    (aws_error(404, "NotFoundException", "Configuration set <x> does not exist."), HttpProblem.MISCONFIGURED,
     "does not exist"),
    (reply(404, {"message": None}, {"x-amzn-errortype": "UnknownOperationException"}), HttpProblem.MISCONFIGURED,
     "UnknownOperationException"),
    (aws_error(500, "InternalFailure", "Internal failure."), HttpProblem.UNAVAILABLE, "InternalFailure"),
    (aws_error(503, "ServiceUnavailable", "Service unavailable."), HttpProblem.UNAVAILABLE, "ServiceUnavailable"),
    (reply(502, "<html>\r\n<h1>502 Bad Gateway</h1>\r\n</html>"), HttpProblem.UNAVAILABLE, "<html> <h1>502"),
]


@pytest.mark.parametrize(("the_reply", "problem", "words"), READINGS)
def test_each_reply_is_read_into_its_problem(the_reply: ApiReply, problem: HttpProblem, words: str) -> None:
    outcome = provider().interpret(the_reply)
    assert outcome.problem is problem
    assert words in outcome.detail and "\n" not in outcome.detail
    assert (outcome.message_id is not None) == (problem is HttpProblem.NONE)


def test_an_accepted_message_keeps_the_message_id() -> None:
    assert provider().interpret(READINGS[0][0]).message_id == "0100018c-abc-000000"


@pytest.mark.parametrize(("headers", "body", "code"), [
    ({"x-amzn-errortype": "MessageRejected:http://internal.amazon.com/coral/com.amazonaws.sesv2/"}, {},
     "MessageRejected"),
    ({}, {"code": "BadRequestException", "message": "x"}, "BadRequestException"),
    ({}, {"Code": "Throttling"}, "Throttling"),
    ({}, {"__type": "com.amazonaws.sesv2#TooManyRequestsException"}, "TooManyRequestsException"),
    ({}, {"message": "no code"}, ""),
])
def test_the_error_name_is_found_where_botocore_looks(headers: dict[str, str], body: object, code: str) -> None:
    assert ses.error_code(reply(400, body, headers), body) == code


def test_a_retry_after_header_is_honoured() -> None:
    outcome = provider().interpret(reply(429, {"message": "slow"}, {"retry-after": "7"}))
    assert (outcome.problem, outcome.retry_after) == (HttpProblem.QUOTA, 7.0)


def test_the_detail_is_one_short_line_without_the_secret() -> None:
    outcome = provider().interpret(aws_error(400, "BadRequestException", f"echo {SECRET_ACCESS_KEY}\n" + "y" * 500))
    assert len(outcome.detail) <= 300 and "\n" not in outcome.detail
    for text in (outcome.detail, str(outcome), repr(outcome)):
        assert SECRET_ACCESS_KEY not in text


ACCOUNT = {"SendingEnabled": True, "ProductionAccessEnabled": True, "EnforcementStatus": "HEALTHY",
           "SendQuota": {"Max24HourSend": 50000.0, "MaxSendRate": 14.0, "SentLast24Hours": 12.0}}


@pytest.mark.parametrize(("changes", "problem", "detail"), [
    ({}, HttpProblem.NONE, "SES account in us-east-1: production access; 12 of 50000 sent in 24 h, 14/s"),
    ({"ProductionAccessEnabled": False}, HttpProblem.NONE, "SES account in us-east-1: sandbox: verified recipients"),
    ({"EnforcementStatus": "PROBATION"}, HttpProblem.NONE, "SES account in us-east-1: production access; on probation"),
    ({"SendingEnabled": False, "EnforcementStatus": "SHUTDOWN"}, HttpProblem.ACCOUNT,
     "SES account in us-east-1: sending paused (enforcement status SHUTDOWN)"),
    ({"EnforcementStatus": "SHUTDOWN"}, HttpProblem.ACCOUNT, "SES account in us-east-1: shut down"),
    ({"SendQuota": {"Max24HourSend": 200.0, "MaxSendRate": 1.0, "SentLast24Hours": 200.0}}, HttpProblem.QUOTA,
     "SES account in us-east-1: daily quota used; 200 of 200 sent in 24 h, 1/s"),
    ({"SendQuota": {"Max24HourSend": -1.0, "SentLast24Hours": 5.0}}, HttpProblem.NONE, "production access"),
])
def test_the_probe_reads_the_account(changes: dict[str, object], problem: HttpProblem, detail: str) -> None:
    outcome = provider().interpret(reply(200, {**ACCOUNT, **changes}), probing=True)
    assert outcome.problem is problem and detail in outcome.detail


@pytest.mark.parametrize(("the_reply", "problem", "words"), [
    (reply(200, "[]"), HttpProblem.UNAVAILABLE, "no account"),
    (aws_error(403, "AccessDeniedException", "not authorized to perform ses:GetAccount"), HttpProblem.AUTH,
     "(the probe needs ses:GetAccount)"),
    (aws_error(400, "BadRequestException", "bad"), HttpProblem.MISCONFIGURED, "bad"),
    (aws_error(429, "TooManyRequestsException", "slow"), HttpProblem.QUOTA, "slow"),
])
def test_a_failed_probe_says_why(the_reply: ApiReply, problem: HttpProblem, words: str) -> None:
    outcome = provider().interpret(the_reply, probing=True)
    assert outcome.problem is problem and words in outcome.detail


# -- the fake's verifier against AWS's vectors (aws-sig-v4-test-suite, as in botocore's tests) --------------------

VECTOR_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
VECTOR_NOW = float(calendar.timegm((2015, 8, 30, 12, 36, 0)))
FAKE_VECTORS = [  # (method, path, headers, body, Authorization)
    ("POST", "/", {"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"}, b"",
     "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, "
     "Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    ("GET", "/?Param-3=Value3&Param=Value2&%E1%88%B4=Value1",
     {"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"}, b"",
     "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, "
     "Signature=371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac"),
    ("GET", "/", {"host": "example.amazonaws.com", "my-header1": " value1", "my-header2": ' "a   b   c"',
                  "x-amz-date": "20150830T123600Z"}, b"",
     "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
     "SignedHeaders=host;my-header1;my-header2;x-amz-date, "
     "Signature=acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"),
    ("POST", "/", {"content-type": "application/x-www-form-urlencoded", "host": "example.amazonaws.com",
                   "x-amz-date": "20150830T123600Z"}, b"Param1=value1",
     "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
     "SignedHeaders=content-type;host;x-amz-date, "
     "Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "authorization"), FAKE_VECTORS)
def test_the_fakes_verifier_accepts_the_published_vectors_and_nothing_else(
        method: str, path: str, headers: dict[str, str], body: bytes, authorization: str) -> None:
    def verdict(*, path: str = path, headers: dict[str, str] = headers, body: bytes = body) -> Response | None:
        request = Request(method, path, {**headers, "authorization": authorization}, body)
        return check_signature(request, key_id="AKIDEXAMPLE", secret=VECTOR_SECRET, region="us-east-1",
                               service="service", now=VECTOR_NOW)

    assert verdict() is None
    assert verdict(body=body + b"x") is not None
    assert verdict(path=path.replace("/", "/x", 1)) is not None
    assert verdict(headers={**headers, "host": "example.amazonaws.com:444"}) is not None


# -- over HTTPS against the fake -------------------------------------------------------------------------------


@pytest.fixture
def fake(ca: trustme.CA) -> Iterator[FakeSes]:
    with FakeSes(ca, verified=("example.com", "ops@example.org")) as api:
        assert isinstance(api, FakeSes)
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


def live(fake: FakeSes, *, secret: str = SECRET_ACCESS_KEY, region: str = REGION, key_id: str = ACCESS_KEY_ID,
         now: float | None = None) -> ses.Ses:
    """A provider for the fake, on the wall clock unless `now` is given."""
    return provider(fake.base_url, secret=secret, region=region, key_id=key_id, now=now)


def deliver(client: httpx.Client, the_provider: ses.Ses, message: OutgoingMessage) -> ApiOutcome:
    return the_provider.interpret(send(client, the_provider.send_request(message)))


def probe(client: httpx.Client, the_provider: ses.Ses) -> ApiOutcome:
    return the_provider.interpret(send(client, the_provider.probe_request()), probing=True)


def test_a_rich_message_arrives_with_the_same_structure_and_bcc_unseen(client: httpx.Client, fake: FakeSes) -> None:
    raw = rich_message()
    message = parse("Q1", raw)
    outcome = deliver(client, live(fake), message)
    assert outcome.problem is HttpProblem.NONE, outcome.detail
    [accepted] = fake.messages
    assert accepted.recipients == ("ops@example.org", "zoe@example.org", "audit@example.net")
    assert accepted.mime == message.data and outcome.message_id == accepted.message_id
    assert "FromEmailAddress" not in accepted.request
    assert structure(accepted.mime) == structure(raw)
    received = email.message_from_bytes(accepted.mime, policy=email.policy.default)
    assert received["Bcc"] is None and b"audit@example.net" not in accepted.mime
    assert (received["Subject"], received["Cc"], received["X-Job-Id"]) == (
        "Sauvegarde échouée — 3 fichiers", "Zoë <zoe@example.org>", "backup-42")


def test_a_revoked_key_is_an_auth_failure_and_nothing_is_sent(client: httpx.Client, fake: FakeSes) -> None:
    fake.revoke_key()
    outcome = deliver(client, live(fake), parse("Q1", rich_message()))
    assert outcome.problem is HttpProblem.AUTH and "UnrecognizedClientException" in outcome.detail
    assert probe(client, live(fake)).problem is HttpProblem.AUTH
    assert fake.messages == []


@pytest.mark.parametrize(("secret", "region", "key_id", "words"), [
    ("wrong/secret", REGION, ACCESS_KEY_ID, "SignatureDoesNotMatch: The request signature we calculated"),
    (SECRET_ACCESS_KEY, "eu-west-1", ACCESS_KEY_ID, "Credential should be scoped to a valid region"),
    (SECRET_ACCESS_KEY, REGION, "AKIAOTHER", "UnrecognizedClientException"),
])
def test_a_wrong_secret_region_or_key_id_is_an_auth_failure(client: httpx.Client, fake: FakeSes, secret: str,
                                                            region: str, key_id: str, words: str) -> None:
    outcome = deliver(client, live(fake, secret=secret, region=region, key_id=key_id), outgoing(SIMPLE))
    assert outcome.problem is HttpProblem.AUTH and words in outcome.detail
    assert fake.messages == []


@pytest.mark.parametrize(("offset", "words"), [(-20 * 60, "Signature expired"), (20 * 60, "not yet current")])
def test_a_clock_off_by_more_than_15_minutes_is_named(client: httpx.Client, fake: FakeSes, offset: float,
                                                      words: str) -> None:
    outcome = deliver(client, live(fake, now=time.time() + offset), outgoing(SIMPLE))
    assert outcome.problem is HttpProblem.AUTH and words in outcome.detail and "clock" in outcome.detail
    assert deliver(client, live(fake, now=time.time() - 14 * 60), outgoing(SIMPLE)).problem is HttpProblem.NONE


@pytest.mark.parametrize(("kind", "code"), [("rate", "TooManyRequestsException"), ("daily", "ThrottlingException")])
def test_throttling_is_a_quota(client: httpx.Client, fake: FakeSes, kind: str, code: str) -> None:
    fake.throttle(kind)
    outcome = deliver(client, live(fake), outgoing(SIMPLE))
    assert outcome.problem is HttpProblem.QUOTA and code in outcome.detail
    fake.throttle(None)
    assert deliver(client, live(fake), outgoing(SIMPLE)).problem is HttpProblem.NONE


def test_the_daily_quota_runs_out(client: httpx.Client, fake: FakeSes) -> None:
    fake.account.max_24_hour_send = 2
    two = outgoing(SIMPLE, ("ops@example.org", "b@example.org"))
    assert deliver(client, live(fake), two).problem is HttpProblem.NONE
    assert deliver(client, live(fake), outgoing(SIMPLE)).problem is HttpProblem.QUOTA
    assert probe(client, live(fake)).problem is HttpProblem.QUOTA


def test_a_paused_or_suspended_account_cannot_send(client: httpx.Client, fake: FakeSes) -> None:
    fake.account.sending_enabled = False
    assert deliver(client, live(fake), outgoing(SIMPLE)).problem is HttpProblem.ACCOUNT
    assert "sending paused" in probe(client, live(fake)).detail
    fake.account.sending_enabled, fake.account.suspended = True, True
    assert deliver(client, live(fake), outgoing(SIMPLE)).problem is HttpProblem.ACCOUNT


def test_an_unverified_sender_is_the_messages_sender_problem(client: httpx.Client, fake: FakeSes) -> None:
    data = SIMPLE.replace(b"From: alerts@example.com", b"From: root@host.invalid")
    outcome = deliver(client, live(fake), outgoing(data))
    assert outcome.problem is HttpProblem.SENDER and "root@host.invalid" in outcome.detail


def test_the_sandbox_refuses_unverified_recipients(client: httpx.Client, fake: FakeSes) -> None:
    fake.account.production_access = False
    assert deliver(client, live(fake), outgoing(SIMPLE)).problem is HttpProblem.NONE  # ops@example.org is verified
    outcome = deliver(client, live(fake), outgoing(SIMPLE, ("stranger@example.org",)))
    assert outcome.problem is HttpProblem.SENDER and "stranger@example.org" in outcome.detail
    assert "sandbox: verified recipients only" in probe(client, live(fake)).detail


def test_a_message_over_the_size_limit_is_the_messages_problem(ca: trustme.CA, client: httpx.Client) -> None:
    with FakeSes(ca, max_message_bytes=1_000) as small:
        assert isinstance(small, FakeSes)
        outcome = deliver(client, live(small), parse("Q1", rich_message()))
        assert outcome.problem is HttpProblem.MESSAGE and "Message length" in outcome.detail
        assert small.handler_errors == []


@pytest.mark.parametrize(("status", "code"), [(500, "InternalFailure"), (503, "ServiceUnavailable")])
def test_a_server_error_is_unavailable(client: httpx.Client, fake: FakeSes, status: int, code: str) -> None:
    fake.fail_with(error(status, code, "try later"), times=1)
    assert deliver(client, live(fake), outgoing(SIMPLE)).problem is HttpProblem.UNAVAILABLE
    assert deliver(client, live(fake), outgoing(SIMPLE)).problem is HttpProblem.NONE


def test_the_probe_of_a_healthy_account(client: httpx.Client, fake: FakeSes) -> None:
    outcome = probe(client, live(fake))
    assert (outcome.problem, outcome.detail) == (
        HttpProblem.NONE, "SES account in us-east-1: production access; 0 of 50000 sent in 24 h, 14/s")
    assert fake.messages == []


def test_the_fake_refuses_unsigned_and_unknown_requests(client: httpx.Client, fake: FakeSes) -> None:
    unsigned = client.post(f"{fake.base_url}/v2/email/outbound-emails", json={"Content": {}})
    assert unsigned.status_code == 403
    assert unsigned.headers["x-amzn-ErrorType"].startswith("MissingAuthenticationTokenException:")
    signed_elsewhere = live(fake)._signed("GET", "/v2/email/nothing", {}, b"")
    assert send(client, signed_elsewhere).status == 404
    assert fake.messages == []
