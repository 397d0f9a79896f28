"""Completing addresses in the daemon, as null clients do (Postfix `myorigin`, nullmailer
`defaulthost`/`adminaddr`): a bare local name (cron's `root`) gets the host's mail domain in
the envelope and in the headers a recipient sees, and mail for a local user goes through the
aliases to a full address, else to the admin address.

The submitter stores what it was given; only the daemon can read the settings. One Addressing
is built per configuration (live.py rebuilds it on a reload).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mailwatchd.errors import MalformedMessage
from mailwatchd.message.envelope import (
    OutgoingMessage,
    check_address,
    header_fields,
    is_local_name,
    split_header,
)
from mailwatchd.message.maildomain import MAILNAME, local_domain

if TYPE_CHECKING:
    from mailwatchd.settings.config import Settings

DOMAIN_FIX = "set MAILWATCHD_DEFAULT_DOMAIN or /etc/mailname"
# sendmail stops alias expansion after 10 levels (MAXRCRSN); a deeper chain is taken as a loop.
MAX_ALIAS_DEPTH = 10
# The fields a recipient sees addresses in (RFC 5322 §3.6.2, §3.6.3); Bcc never leaves the spool.
_ADDRESS_FIELDS = frozenset({b"from", b"sender", b"reply-to", b"to", b"cc"})
_WSP = frozenset(b" \t\r\n")
_WORD_ENDS = frozenset(b' \t\r\n()<>,;:"')
_LINE_END = re.compile(rb"\r\n|\r|\n")


# -- aliases(5) ---------------------------------------------------------------------------------------


def _split_values(value: str) -> list[str]:
    """The comma-separated items of an alias value; commas inside double quotes do not split."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]


def _unsupported(item: str) -> str | None:
    """What kind of local delivery an alias item asks for, or None for an address."""
    bare = item[1:-1] if len(item) >= 2 and item[0] == item[-1] == '"' else item
    if bare.startswith("|"):
        return "a command"
    if bare.startswith("/"):
        return "a file"
    if bare.lower().startswith(":include:"):
        return "an :include: list"
    return None


def parse_aliases(text: str, source: str) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """aliases(5) entries (`name: address, address`, `#` comments, continuation lines that start
    with white space), keyed by lower-cased name; and what was skipped, as warnings.

    mailwatchd delivers nothing locally: commands, files and :include: lists are skipped, never run.
    A target written `\\name` is a local name that is not looked up again.
    """
    logical: list[tuple[int, str]] = []
    warnings: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[:1] in (" ", "\t"):
            if logical:
                logical[-1] = (logical[-1][0], f"{logical[-1][1]} {line.strip()}")
            else:
                warnings.append(f"{source}:{number}: a continuation line with no entry before it; skipped")
            continue
        logical.append((number, line))

    entries: dict[str, tuple[str, ...]] = {}
    for number, line in logical:
        where = f"{source}:{number}"
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not is_local_name(name):
            warnings.append(f"{where}: not a `name: address, ...` line; skipped")
            continue
        if name in entries:
            warnings.append(f"{where}: {name} is defined again; the first definition is kept")
            continue
        targets: list[str] = []
        for item in _split_values(value):
            kind = _unsupported(item)
            if kind is not None:
                warnings.append(f"{where}: {name}: {kind} ({item}) is not supported (mailwatchd delivers "
                                "no mail locally); skipped")
                continue
            # `Name <address>` or `<address>`: the address inside the angle brackets.
            address = item[item.rfind("<") + 1 : -1].strip() if item.endswith(">") and "<" in item else item
            try:
                check_address(address.removeprefix("\\"), "alias", local=True)
            except MalformedMessage as exc:
                warnings.append(f"{where}: {name}: {exc}; skipped")
                continue
            targets.append(address)
        if targets:
            entries[name] = tuple(targets)
    return entries, warnings


def load_aliases(path: Path) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """The aliases file's entries and warnings; an unreadable file gives none, and says so."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {}, [f"cannot read {path}: {exc.strerror or exc}; no aliases apply"]
    # surrogateescape: an invalid byte stays distinct, and check_address refuses the address it is in.
    return parse_aliases(data.decode("utf-8", errors="surrogateescape"), str(path))


# -- header rewriting -----------------------------------------------------------------------------------


def _skip_quoted(value: bytes, index: int) -> int:
    """The index after the quoted string starting at `index` (RFC 5322 §3.2.4)."""
    index += 1
    while index < len(value):
        if value[index] == ord("\\"):
            index += 2
        elif value[index] == ord('"'):
            return index + 1
        else:
            index += 1
    return len(value)


def _skip_comment(value: bytes, index: int) -> int:
    """The index after the (possibly nested) comment starting at `index` (RFC 5322 §3.2.2)."""
    depth = 0
    while index < len(value):
        char = value[index]
        if char == ord("\\"):
            index += 2
            continue
        if char == ord("("):
            depth += 1
        elif char == ord(")"):
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return len(value)


def _angle_end(value: bytes, index: int) -> int:
    """The index of the `>` closing the angle address at `index`, or -1."""
    index += 1
    while index < len(value):
        if value[index] == ord('"'):
            index = _skip_quoted(value, index)
        elif value[index] == ord(">"):
            return index
        else:
            index += 1
    return -1


def _is_local(token: bytes) -> bool:
    try:
        return is_local_name(token.decode("utf-8"))
    except UnicodeDecodeError:
        return False


def _bare_name_ends(value: bytes) -> list[int]:
    """Offsets in an address-list value (RFC 5322 §3.4) right after each bare local name: a mailbox
    that is one plain word (`root (Cron Daemon)`), or an angle address with no @ (`Cron <root>`)."""
    ends: list[int] = []
    words: list[tuple[int, int, bool]] = []  # (start, end, plain word?) of the mailbox being read
    angled = False
    index = 0

    def end_mailbox() -> None:
        if not angled and len(words) == 1:
            start, end, plain = words[0]
            if plain and _is_local(value[start:end]):
                ends.append(end)
        words.clear()

    while index < len(value):
        char = value[index]
        if char in _WSP:
            index += 1
        elif char == ord('"'):
            end = _skip_quoted(value, index)
            words.append((index, end, False))
            index = end
        elif char == ord("("):
            index = _skip_comment(value, index)
        elif char == ord("<"):
            end = _angle_end(value, index)
            if end == -1:
                return ends  # an unclosed angle address: leave the rest alone
            inner = value[index + 1 : end]
            if _is_local(inner.strip()):
                ends.append(index + 1 + len(inner.rstrip()))
            angled = True
            index = end + 1
        elif char in b",;":
            end_mailbox()
            angled = False
            index += 1
        elif char == ord(":"):
            words.clear()  # what came before was a group's display name
            angled = False
            index += 1
        elif char in b">)":
            words.append((index, index + 1, False))  # stray: the mailbox is not one plain word
            index += 1
        else:
            end = index
            while end < len(value) and value[end] not in _WORD_ENDS:
                end += 1
            words.append((index, end, True))
            index = end
    end_mailbox()
    return ends


def _may_have_bare_name(raw: bytes) -> bool:
    """False only when the field's value surely has no bare local name for _bare_name_ends to find: no quoted
    string, comment, escape or group, and each comma-separated mailbox has an @ in its one angle address or,
    without one, anywhere (a plain mailbox with an @ is no bare name, and nor is one of several words)."""
    value = raw[raw.find(b":") + 1 :]
    if b'"' in value or b"(" in value or b"\\" in value or b":" in value or b";" in value:
        return True
    for part in value.split(b","):
        start = part.find(b"<")
        if start == -1:
            if b"@" not in part and part.strip():
                return True
            continue
        end = part.find(b">", start)
        if end == -1 or part.find(b"<", start + 1) != -1 or b"@" not in part[start:end]:
            return True
    return False


def _qualify_field(raw: bytes, suffix: bytes) -> bytes:
    """The field with `suffix` (b"@domain") after each bare local name; all else byte for byte."""
    value_start = raw.index(b":") + 1
    ends = _bare_name_ends(raw[value_start:])
    if not ends:
        return raw
    pieces: list[bytes] = []
    last = 0
    for end in ends:
        pieces += [raw[last : value_start + end], suffix]
        last = value_start + end
    pieces.append(raw[last:])
    return b"".join(pieces)


# -- the daemon's view -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Addressing:
    """How the daemon completes a message's addresses: the local domain, the admin address and
    the aliases of one configuration, and what the aliases file could not give (`warnings`)."""

    domain: str | None = None
    admin_address: str | None = None
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings, *, mailname: Path = MAILNAME,
                      fqdn: Callable[[], str] = socket.getfqdn) -> Addressing:
        """Built once per configuration: reads /etc/mailname and the aliases file now, not per message."""
        domain = local_domain(settings.default_domain, mailname=mailname, fqdn=fqdn)
        aliases, warnings = load_aliases(settings.aliases) if settings.aliases is not None else ({}, [])
        return cls(domain, settings.admin_address, aliases, tuple(warnings))

    def sender(self, address: str) -> str:
        """A bare local name qualified with the local domain; anything else (and <>) unchanged."""
        if not address or not is_local_name(address):
            return address
        if self.domain is None:
            raise MalformedMessage(f"sender address {address!r} is a bare local name and no mail domain is "
                                   f"known for this host: {DOMAIN_FIX}")
        return f"{address}@{self.domain}"

    def recipients(self, addresses: Iterable[str]) -> tuple[str, ...]:
        """Full addresses unchanged; a bare local name through the aliases, then to the admin address
        or qualified. Duplicates removed (case-insensitively), first spelling and order kept."""
        found: list[str] = []
        expanded: set[str] = set()
        for address in addresses:
            if is_local_name(address):
                self._expand(address, found, chain=(), expanded=expanded)
            else:
                found.append(address)
        unique: dict[str, str] = {}
        for address in found:
            unique.setdefault(address.lower(), address)
        return tuple(unique.values())

    def _expand(self, name: str, found: list[str], *, chain: tuple[str, ...], expanded: set[str]) -> None:
        # `\name` is not looked up again; a name already on the chain (a loop) or past the depth limit is
        # delivered as it stands, like sendmail's `root: \root` and loop breaking.
        final = name.startswith("\\")
        name = name.removeprefix("\\")
        key = name.lower()
        targets = None if final or key in chain or len(chain) >= MAX_ALIAS_DEPTH else self.aliases.get(key)
        if targets is None:
            found.append(self._local(name))
            return
        if key in expanded:
            return  # reached again through another alias: its addresses are in `found` already
        expanded.add(key)
        for target in targets:
            if is_local_name(target.removeprefix("\\")):
                self._expand(target, found, chain=(*chain, key), expanded=expanded)
            else:
                found.append(target)

    def _local(self, name: str) -> str:
        """Where mail for a local user with no alias to a full address goes."""
        if self.admin_address is not None:
            return self.admin_address
        if self.domain is None:
            raise MalformedMessage(f"recipient address {name!r} is a local user and neither an admin address nor "
                                   "a mail domain is known for this host: set MAILWATCHD_ADMIN_ADDRESS, "
                                   "MAILWATCHD_DEFAULT_DOMAIN or /etc/mailname")
        return f"{name}@{self.domain}"

    def rewrite_headers(self, data: bytes, named: list[tuple[bytes, bytes]] | None = None) -> bytes:
        """Bare local names in From, Sender, Reply-To, To and Cc qualified with the local domain; display
        names, comments, folding, line endings, other fields and the body left byte for byte.

        `named`: the header fields of `data` (header_fields), or of the spool file it was parsed from
        (envelope.parse_with_fields: the same address fields), when the caller has them."""
        if self.domain is None:
            return data
        try:
            if named is None:
                named, _ = header_fields(data)
            if not any(name in _ADDRESS_FIELDS and _may_have_bare_name(raw) for name, raw in named):
                return data  # the common case, a message with full addresses: found without a byte-wise scan
            fields, _ = split_header(data)
        except MalformedMessage:
            return data
        suffix = f"@{self.domain}".encode()
        pieces: list[bytes] = []
        copied = cursor = 0
        for header_field in fields:
            # split_header drops whole lines only (an mbox "From " line, blank lines): find the field's line.
            while not data.startswith(header_field.raw, cursor):
                line_end = _LINE_END.search(data, cursor)
                if line_end is None:
                    return data
                cursor = line_end.end()
            if header_field.name in _ADDRESS_FIELDS:
                rewritten = _qualify_field(header_field.raw, suffix)
                if rewritten != header_field.raw:
                    pieces += [data[copied:cursor], rewritten]
                    copied = cursor + len(header_field.raw)
            cursor += len(header_field.raw)
        if not pieces:
            return data
        pieces.append(data[copied:])
        return b"".join(pieces)

    def complete(self, message: OutgoingMessage, fields: list[tuple[bytes, bytes]] | None = None) -> OutgoingMessage:
        """The message as it goes out: sender qualified, recipients resolved, headers qualified (`fields`:
        from envelope.parse_with_fields, saves parsing the header again).

        MalformedMessage names the settings when a bare local name cannot be completed.
        """
        return message._replace(sender=self.sender(message.sender),
                                recipients=self.recipients(message.recipients),
                                data=self.rewrite_headers(message.data, fields))
