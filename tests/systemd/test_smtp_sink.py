"""The in-machine SMTP sink: stores what it accepts where the host can read it, answers DATA as told,
and offers STARTTLS and AUTH when asked."""

from __future__ import annotations

import pytest
import trustme

from .machine import Machine
from .smtp_sink import SmtpSink

pytestmark = pytest.mark.systemd

SEND = """\
import smtplib, ssl, sys
port, tls, login = int(sys.argv[1]), sys.argv[2] == "tls", sys.argv[3]
with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
    if tls:
        smtp.starttls(context=ssl.create_default_context(cafile="/etc/sink/ca.pem"))
    if login != "-":
        smtp.login(*login.split(":"))
    try:
        smtp.sendmail("from@example.com", ["to@example.com"], b"Subject: test\\r\\n\\r\\nhello\\r\\n")
    except smtplib.SMTPDataError as exc:
        print(exc.smtp_code, exc.smtp_error.decode())
"""


def send(machine: Machine, port: int, tls: bool = False, login: str = "-") -> str:
    return machine.run(["/usr/bin/python3", "-c", SEND, str(port), "tls" if tls else "plain", login]).stdout


def test_sink_stores_messages_and_refuses_when_told(mailwatchd_machine: Machine) -> None:
    sink = SmtpSink.start(mailwatchd_machine, "relay", 2525)
    refusing = SmtpSink.start(mailwatchd_machine, "busy", 2526, ["--data-reply", "451 4.3.0 try later"])

    assert send(mailwatchd_machine, 2525) == ""
    assert send(mailwatchd_machine, 2526) == "451 4.3.0 try later\n"

    [message] = sink.wait_for(1)
    assert (message.mail_from, message.rcpt_tos, message.tls, message.login) == (
        "from@example.com", ["to@example.com"], False, None)
    assert message.data.endswith(b"hello\r\n")
    assert refusing.messages() == []
    sink.stop()
    assert mailwatchd_machine.prop("relay.service", "ActiveState") == "inactive"


def test_sink_with_starttls_and_auth(mailwatchd_machine: Machine) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    mailwatchd_machine.write_file("/etc/sink/ca.pem", ca.cert_pem.bytes())
    mailwatchd_machine.write_file("/etc/sink/cert.pem", cert.private_key_and_cert_chain_pem.bytes(), 0o600)
    sink = SmtpSink.start(mailwatchd_machine, "tls", 2587, ["--tls-cert", "/etc/sink/cert.pem",
                                                            "--tls-key", "/etc/sink/cert.pem", "--auth", "app:s3cret"])

    send(mailwatchd_machine, 2587, tls=True, login="app:s3cret")

    [message] = sink.wait_for(1)
    assert (message.tls, message.login) == (True, "app")
