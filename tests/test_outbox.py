"""OutboxSession: messages land complete in a Maildir's new/, with the envelope on top."""

from __future__ import annotations

import asyncio
import errno
import mailbox
import os
import stat
from pathlib import Path

from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.settings.config import Settings
from mailwatchd.transports.outbox import OutboxSession
from mailwatchd.transports.outcome import Cause, DeliveryResult, Outcome, Phase
from tests.test_spool import tmpfs


def settings_for(outbox: Path, tmp_path: Path) -> Settings:
    return Settings(spool=tmp_path / "spool", outbox=outbox, helo_name="client.test")


def message(data: bytes, sender: str = "a@example.test",
            recipients: tuple[str, ...] = ("b@example.test", "c@example.test")) -> OutgoingMessage:
    return OutgoingMessage("q1", sender, recipients, data, len(data))


def deliver_all(session: OutboxSession, *messages: OutgoingMessage) -> list[DeliveryResult]:
    async def run() -> list[DeliveryResult]:
        results = [await session.deliver(item) for item in messages]
        await session.close()
        return results
    return asyncio.run(run())


def test_message_is_stored_in_new_with_the_envelope(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    data = b"From: a@example.test\nTo: b@example.test\nSubject: hi\n\nbody\n"
    session = OutboxSession(settings_for(outbox, tmp_path))
    [result] = deliver_all(session, message(data))
    assert (result.outcome, result.cause, result.phase) == (Outcome.DELIVERED, Cause.OK, Phase.LOCAL)
    assert (result.relay, result.endpoint) == ("outbox", str(outbox))
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((outbox / sub).stat().st_mode) == 0o700
    assert list((outbox / "tmp").iterdir()) == []
    [stored] = list((outbox / "new").iterdir())
    assert stored.read_bytes() == (b"Return-Path: <a@example.test>\nX-Original-To: b@example.test, c@example.test\n"
                                   + data)
    assert stored.name in result.detail
    [parsed] = list(mailbox.Maildir(outbox, create=False))
    assert parsed["Subject"] == "hi" and parsed["X-Original-To"] == "b@example.test, c@example.test"


def test_crlf_message_keeps_crlf_and_null_sender(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    data = b"From: a@example.test\r\nSubject: x\r\n\r\nbody\r\n"
    [result] = deliver_all(OutboxSession(settings_for(outbox, tmp_path)), message(data, sender=""))
    assert result.outcome is Outcome.DELIVERED
    [stored] = list((outbox / "new").iterdir())
    assert stored.read_bytes().startswith(b"Return-Path: <>\r\nX-Original-To: b@example.test, c@example.test\r\nFrom:")


def test_each_message_gets_its_own_file(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    session = OutboxSession(settings_for(outbox, tmp_path))
    results = deliver_all(session, *(message(b"Subject: %d\n\nbody\n" % n) for n in range(20)))
    assert all(result.outcome is Outcome.DELIVERED for result in results)
    stored = sorted(path.read_bytes().split(b"Subject: ")[1][:2] for path in (outbox / "new").iterdir())
    assert len(stored) == 20 and len(set(stored)) == 20
    assert not session.connected and 0 <= session.idle_for < 5


def test_unwritable_outbox_is_a_temporary_local_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"a file where the outbox's parent should be")
    outbox = blocker / "outbox"
    [result] = deliver_all(OutboxSession(settings_for(outbox, tmp_path)), message(b"Subject: x\n\nbody\n"))
    assert (result.outcome, result.cause, result.phase) == (Outcome.TEMPORARY, Cause.LOCAL_ERROR, Phase.LOCAL)
    assert "\n" not in result.detail and str(outbox) in result.detail


def test_failed_rename_is_a_temporary_local_error_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    session = OutboxSession(settings_for(outbox, tmp_path))

    async def run() -> tuple[DeliveryResult, DeliveryResult, DeliveryResult]:
        first = await session.deliver(message(b"Subject: first\n\nbody\n"))
        (outbox / "new").rename(tmp_path / "new-moved")
        (outbox / "new").symlink_to("/dev/null/new")  # the rename into new/ fails with ENOTDIR
        second = await session.deliver(message(b"Subject: second\n\nbody\n"))
        assert list((outbox / "tmp").iterdir()) == []
        (outbox / "new").unlink()
        third = await session.deliver(message(b"Subject: third\n\nbody\n"))  # new/ is made again
        return first, second, third

    first, second, third = asyncio.run(run())
    assert first.outcome is Outcome.DELIVERED and third.outcome is Outcome.DELIVERED
    assert (second.outcome, second.cause, second.phase) == (Outcome.TEMPORARY, Cause.LOCAL_ERROR, Phase.LOCAL)
    assert len(list((outbox / "new").iterdir())) == 1 and list((outbox / "tmp").iterdir()) == []


def test_full_outbox_disk_is_a_temporary_local_error_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=64k,mode=0700") as outbox:
        session = OutboxSession(settings_for(outbox, tmp_path))
        [result] = deliver_all(session, message(b"Subject: big\n\n" + b"x" * 256 * 1024))
        assert (result.outcome, result.cause, result.phase) == (Outcome.TEMPORARY, Cause.LOCAL_ERROR, Phase.LOCAL)
        assert result.detail == (f"cannot write to the outbox {outbox}: "
                                 f"the filesystem is full ({os.strerror(errno.ENOSPC)})")
        assert list((outbox / "tmp").iterdir()) == [] and list((outbox / "new").iterdir()) == []
