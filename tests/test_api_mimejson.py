"""mimejson: a stored message read into API fields reproduces its parts, or Unexpressible says what cannot be."""

from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from mailwatchd.message.envelope import OutgoingMessage, parse, with_envelope
from mailwatchd.transports.api.mimejson import Mailbox, MessageFields, read_fields
from mailwatchd.transports.api.provider import Unexpressible

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.7\n" + bytes(range(256)) * 16 + b"\n%%EOF\n"
SUBJECT = "Rapport quotidien — état des disques ✓"
TEXT = "Bonjour,\n\nle disque /var est plein à 97 %.\nRégis\n"
HTML = '<html><body><p>Bonjour,</p><p>le disque <b>/var</b> est plein à 97 %.</p><img src="cid:chart.1@host.example">' \
       "</body></html>\n"


@dataclass(frozen=True)
class Part:
    """An attachment or inline part as a recipient would get it."""

    filename: str | None
    content_type: str
    content: bytes
    content_id: str | None


def rich_message(*, bcc: bool = True) -> EmailMessage:
    """Text and HTML alternatives, an inline image in multipart/related, two attachments, Cc, Bcc, Reply-To,
    custom and trace headers, non-ASCII subject, names and bodies."""
    message = EmailMessage()
    message["From"] = "Régis Système <regis@host.example>"
    message["To"] = "Ops Team <ops@example.org>, alice@example.org"
    message["Cc"] = '"Martin, Bob" <bob@example.net>'
    if bcc:
        message["Bcc"] = "audit@example.com"
    message["Reply-To"] = "Helpdesk <helpdesk@example.org>"
    message["Subject"] = SUBJECT
    message["Date"] = "Tue, 01 Dec 2026 08:00:00 +0000"
    message["Message-ID"] = "<report.2026-12-01@host.example>"
    message["In-Reply-To"] = "<report.2026-11-30@host.example>"
    message["X-Priority"] = "2"
    message["X-Report-Run"] = "nightly 42 — €"
    message["Received"] = "from cron by host.example with local; Tue, 01 Dec 2026 08:00:00 +0000"
    message["Return-Path"] = "<regis@host.example>"
    message.set_content(TEXT)
    message.add_alternative(HTML, subtype="html")
    html_part(message).add_related(PNG, "image", "png", cid="<chart.1@host.example>", filename="chart.png",
                          disposition="inline")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="rapport détaillé.pdf")
    message.add_attachment(b"\x00\x01binary\xff", maintype="application", subtype="octet-stream",
                           filename="dump.bin")
    return message


def html_part(message: EmailMessage) -> EmailMessage:
    """The text/html alternative of a multipart/alternative message, to relate parts to."""
    payload = message.get_payload()
    assert isinstance(payload, list)
    part = payload[-1]
    assert isinstance(part, EmailMessage) and part.get_content_type() == "text/html"
    return part


def outgoing(message: EmailMessage | bytes, queue_id: str = "Q1") -> OutgoingMessage:
    """The message as the daemon hands it to a relay: envelope from its headers, Bcc removed."""
    return parse(queue_id, message if isinstance(message, bytes) else bytes(message))


def original_parts(message: EmailMessage) -> tuple[str | None, str | None, list[Part]]:
    """Text, HTML and the other leaf parts of a message, read with the email package's own API."""
    text_part = message.get_body(("plain",))
    html_part = message.get_body(("html",))
    text = text_part.get_content() if text_part is not None else None
    html = html_part.get_content() if html_part is not None else None
    parts = []
    for part in message.walk():
        if part.is_multipart() or part is text_part or part is html_part:
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        cid = part["content-id"]
        parts.append(Part(part.get_filename(), part.get_content_type(), payload,
                          str(cid).strip("<>") if cid is not None else None))
    return text, html, parts


def field_parts(fields: MessageFields) -> list[Part]:
    return [Part(a.filename, a.content_type, a.content, a.content_id) for a in fields.attachments]


def reparse(message: EmailMessage) -> EmailMessage:
    parsed = BytesParser(policy=policy.default).parsebytes(bytes(message))
    assert isinstance(parsed, EmailMessage)
    return parsed


# -- round trips ------------------------------------------------------------------------------------------------


def test_rich_message_round_trips_into_fields() -> None:
    message = rich_message()
    fields = read_fields(outgoing(message))
    text, html, parts = original_parts(reparse(message))

    assert fields.sender == Mailbox("regis@host.example", "Régis Système")
    assert fields.to == (Mailbox("ops@example.org", "Ops Team"), Mailbox("alice@example.org"))
    assert fields.cc == (Mailbox("bob@example.net", "Martin, Bob"),)
    assert fields.bcc == (Mailbox("audit@example.com"),)
    assert fields.reply_to == (Mailbox("helpdesk@example.org", "Helpdesk"),)
    assert fields.subject == SUBJECT
    assert (fields.text, fields.html) == (text, html) == (TEXT, HTML)
    assert field_parts(fields) == parts
    assert [(a.filename, a.inline) for a in fields.attachments] == [
        ("chart.png", True), ("rapport détaillé.pdf", False), ("dump.bin", False)]
    assert fields.attachments[0].content == PNG and fields.attachments[1].content == PDF


def test_custom_headers_are_kept_as_written_and_trace_and_structure_fields_are_not() -> None:
    message = rich_message()
    fields = read_fields(outgoing(message))
    names = [name for name, _ in fields.headers]

    assert names == ["Date", "Message-ID", "In-Reply-To", "X-Priority", "X-Report-Run"]
    written = dict(reparse(message).raw_items())
    assert dict(fields.headers)["X-Report-Run"] == written["X-Report-Run"]  # still RFC 2047-encoded
    assert "=?utf-8?" in dict(fields.headers)["X-Report-Run"]
    assert dict(fields.headers)["Message-ID"] == "<report.2026-12-01@host.example>"


def test_bcc_comes_only_from_the_envelope() -> None:
    message = rich_message()
    stored = bytes(message)
    assert b"audit@example.com" in stored
    sent = outgoing(message)
    assert b"audit@example.com" not in sent.data  # the spool's Bcc never reaches a relay
    fields = read_fields(sent)
    assert "audit@example.com" not in str(fields.headers)
    assert [box.address for box in fields.bcc] == ["audit@example.com"]
    assert {box.address for box in fields.to + fields.cc}.isdisjoint({"audit@example.com"})


def test_an_explicit_envelope_adds_recipients_as_bcc() -> None:
    message = rich_message(bcc=False)
    raw = with_envelope(bytes(message), "regis@host.example",
                        ["ops@example.org", "alice@example.org", "bob@example.net", "archive@example.com"])
    fields = read_fields(outgoing(raw))
    assert [box.address for box in fields.bcc] == ["archive@example.com"]


def test_crlf_and_lf_spool_files_give_the_same_fields() -> None:
    lf = bytes(rich_message())
    crlf = lf.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert read_fields(outgoing(crlf)) == read_fields(outgoing(lf))


def test_nesting_the_fields_can_express() -> None:
    fields = read_fields(outgoing(nested(4)))
    assert (fields.text, fields.html) == (None, "<p>secret body</p>")  # the last newline is the boundary's


def test_plain_text_message() -> None:
    raw = (b"From: root@host.example (Cron Daemon)\nTo: root@host.example\nSubject: backup done\n"
           b"Content-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\nX-Cron-Env: <SHELL=/bin/sh>\n\n"
           + "sauvegarde terminée\n".encode())
    fields = read_fields(outgoing(raw))
    assert fields.sender == Mailbox("root@host.example")
    assert (fields.text, fields.html, fields.attachments) == ("sauvegarde terminée\n", None, ())
    assert fields.headers == (("X-Cron-Env", "<SHELL=/bin/sh>"),)


def test_quoted_printable_and_base64_bodies_are_decoded() -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.org", "b@example.org", "x"
    message.set_content("ligne très longue " * 20 + "\n", cte="quoted-printable")
    message.add_alternative("<p>é</p>\n", subtype="html", cte="base64")
    fields = read_fields(outgoing(message))
    assert fields.text == "ligne très longue " * 20 + "\n"
    assert fields.html == "<p>é</p>\n"


def test_related_outside_the_alternative() -> None:
    """Outlook's order: related(alternative(text, html), image)."""
    bodies = EmailMessage()
    bodies.set_content(TEXT)
    bodies.add_alternative(HTML, subtype="html")
    image = EmailMessage()
    image.set_content(PNG, "image", "png", cid="<chart.1@host.example>", filename="chart.png")
    related = EmailMessage()
    related["From"], related["To"], related["Subject"] = "a@example.org", "b@example.org", "x"
    related["Content-Type"] = "multipart/related"
    related.attach(bodies)
    related.attach(image)
    fields = read_fields(outgoing(related))
    assert (fields.text, fields.html) == (TEXT, HTML)
    assert field_parts(fields) == [Part("chart.png", "image/png", PNG, "chart.1@host.example")]
    assert fields.attachments[0].inline  # a related resource is inline whatever its Content-Disposition says


def test_attachment_charset_is_dropped_only_when_the_bytes_read_the_same_without_it() -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.org", "b@example.org", "x"
    message.set_content("see attached\n")
    message.add_attachment("a,b\n1,2\n", subtype="csv", filename="ascii.csv")
    message.add_attachment("nom,ville\nRégis,Genève\n", subtype="csv", filename="utf8.csv")
    ascii_csv, utf8_csv = read_fields(outgoing(message)).attachments
    assert (ascii_csv.content_type, ascii_csv.params) == ("text/csv", ())
    assert (utf8_csv.content_type, utf8_csv.params) == ("text/csv", (("charset", "utf-8"),))
    assert utf8_csv.content == "nom,ville\nRégis,Genève\n".encode()


# -- what the fields cannot carry --------------------------------------------------------------------------------

HEAD = b"From: a@example.org\nTo: b@example.org\nSubject: secret subject\nMIME-Version: 1.0\n"


def mixed(*parts: bytes, head: bytes = HEAD) -> bytes:
    body = b"".join(b"--B\n" + part + b"\n" for part in parts)
    return head + b'Content-Type: multipart/mixed; boundary="B"\n\n' + body + b"--B--\n"


TEXT_PART = b"Content-Type: text/plain; charset=us-ascii\n\nsecret body\n"
HTML_PART = b"Content-Type: text/html; charset=us-ascii\n\n<p>secret body</p>\n"


def alternative(*parts: bytes) -> bytes:
    body = b"".join(b"--A\n" + part + b"\n" for part in parts)
    return b'Content-Type: multipart/alternative; boundary="A"\n\n' + body + b"--A--"


UNEXPRESSIBLE = {
    "two senders": (b"From: a@example.org, c@example.org\nTo: b@example.org\nSubject: secret subject\n\nsecret body\n",
                    "more than one address"),
    "no sender": (b"Sender: a@example.org\nTo: b@example.org\nSubject: secret subject\n\nsecret body\n",
                  "From holds no address"),
    "dkim": (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; b=secret\n" + HEAD + b"\nsecret body\n",
             "DKIM-Signature"),
    "signed": (HEAD + b'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary="S"\n\n'
               b"--S\n" + TEXT_PART + b"\n--S\nContent-Type: application/pgp-signature\n\nsig\n--S--\n",
               "multipart/signed"),
    "smime": (HEAD + b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\n"
              b"Content-Transfer-Encoding: base64\n\nAAAA\n", "application/pkcs7-mime"),
    "two text bodies": (mixed(TEXT_PART, TEXT_PART), "several text or HTML bodies"),
    "html before text": (mixed(alternative(HTML_PART, TEXT_PART)), "HTML before text"),
    "calendar alternative": (mixed(alternative(TEXT_PART, b"Content-Type: text/calendar; method=REQUEST\n\nBEGIN")),
                             "text/calendar"),
    "attached message": (mixed(TEXT_PART, b"Content-Type: message/rfc822\n\nFrom: x@example.org\nSubject: s\n\nb\n"),
                         "message/rfc822"),
    "inline without content-id": (mixed(TEXT_PART, b"Content-Type: image/png\nContent-Disposition: inline; "
                                                   b"filename=a.png\nContent-Transfer-Encoding: base64\n\niVBO\n"),
                                  "no Content-ID"),
    "related without content-id": (
        HEAD + b'Content-Type: multipart/related; boundary="R"\n\n--R\n' + HTML_PART
        + b"\n--R\nContent-Type: image/png\nContent-Location: chart.png\nContent-Transfer-Encoding: base64\n\niVBO\n"
        b"--R--\n", "Content-Location"),
    "part description": (mixed(TEXT_PART, b"Content-Type: application/pdf\nContent-Description: the report\n"
                                          b"Content-Disposition: attachment; filename=r.pdf\n\n%PDF\n"),
                         "Content-Description"),
    "flowed": (HEAD + b"Content-Type: text/plain; charset=us-ascii; format=flowed\n\nsecret \nbody\n", "format"),
    "8-bit without charset": (HEAD + "\nsecret bödy\n".encode(), "not valid us-ascii"),
    "unknown charset": (HEAD + b"Content-Type: text/plain; charset=x-no-such-charset\n\nsecret body\n",
                        "unknown charset"),
    "group syntax": (b"From: a@example.org\nTo: team: b@example.org;\nSubject: secret subject\n\nsecret body\n",
                     "group syntax"),
    "no body": (HEAD + b"Content-Type: text/plain\n\n", "empty"),
    "only an attachment": (mixed(b"Content-Type: application/pdf\nContent-Disposition: attachment; filename=r.pdf\n\n"
                                 b"%PDF\n"), "no text or HTML body"),
    "raw 8-bit header": (b"From: a@example.org\nTo: b@example.org\nSubject: secret subject\n"
                         + "X-Note: secret ünïcode\n\nsecret body\n".encode(), "8-bit"),
    "subject twice": (b"From: a@example.org\nTo: b@example.org\nSubject: secret subject\nSubject: again\n\nbody\n",
                      "Subject occurs 2 times"),
    "multipart report": (HEAD + b'Content-Type: multipart/report; report-type=delivery-status; boundary="D"\n\n'
                         b"--D\n" + TEXT_PART + b"\n--D--\n", "multipart/report"),
}


def nested(levels: int) -> bytes:
    """alternative > related > alternative > ... around one HTML body."""
    kinds = [b"alternative" if level % 2 == 0 else b"related" for level in range(levels)]
    opening = b"".join(b'Content-Type: multipart/%s; boundary="N%d"\n\n--N%d\n' % (kind, level, level)
                       for level, kind in enumerate(kinds))
    return HEAD + opening + HTML_PART + b"".join(b"--N%d--\n" % level for level in reversed(range(levels)))


UNEXPRESSIBLE["nested too deep"] = (nested(12), "nested deeper")


@pytest.mark.parametrize("case", sorted(UNEXPRESSIBLE))
def test_what_the_fields_cannot_carry_is_unexpressible(case: str) -> None:
    raw, reason = UNEXPRESSIBLE[case]
    with pytest.raises(Unexpressible) as caught:
        read_fields(outgoing(raw))
    assert reason in str(caught.value)
    assert "secret" not in str(caught.value)  # header names and MIME types, never the message's content


def test_a_shown_address_that_is_not_an_envelope_recipient_is_unexpressible() -> None:
    """An alias (root -> admin) or an explicit envelope: the JSON APIs deliver to every address they show."""
    raw = with_envelope(b"From: a@example.org\nTo: root@host.example\nSubject: s\n\nbody\n", "a@example.org",
                        ["admin@example.org"])
    with pytest.raises(Unexpressible, match="not an envelope recipient") as caught:
        read_fields(outgoing(raw))
    assert "root@host.example" not in str(caught.value)
