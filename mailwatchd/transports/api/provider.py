"""What every HTTPS API provider module offers: build the send request for a message (or say the API cannot
carry it), build a read-only request that proves the key works, and read a reply into an `ApiOutcome`.

Provider modules are pure: no network, no clock of their own (SES's signing takes `now`). The session
(session.py) sends what they build and turns their reading into a DeliveryResult with outcome.py's
`classify_http`, the one classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.settings.apirelays import ApiConfig
from mailwatchd.transports.outcome import HttpProblem


@dataclass(frozen=True)
class ApiRequest:
    """One HTTPS request, complete: the session adds nothing but Content-Length and Host."""

    method: str
    url: str  # absolute: the relay's base URL and the provider's path
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # holds the key: never printed
    content: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class ApiReply:
    """What came back: the status, the headers (names in lower case), the body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class ApiOutcome:
    """A provider's reading of a reply. `detail`: the provider's own words, one line, never a key."""

    problem: HttpProblem
    detail: str
    message_id: str | None = None  # the provider's id of an accepted message (logged as the relay's queue id)
    retry_after: float | None = None  # seconds, from Retry-After, a rate-limit reset or the reply's text


class Unexpressible(Exception):
    """The API cannot carry this message as written (a header it refuses, a MIME structure it has no field
    for): the message goes to the next relay rather than be altered. The text says what, for the log."""


class Provider(Protocol):
    """One provider's API. `send_request` may raise Unexpressible; nothing here raises for a reply."""

    @property
    def name(self) -> str:
        """The provider's name for logs and `check`: mailgun, ses, sendgrid, postmark."""
        ...

    def send_request(self, message: OutgoingMessage) -> ApiRequest: ...

    def probe_request(self) -> ApiRequest:
        """A read-only, authenticated request that sends no mail (Mailgun's domain, SES's account...)."""
        ...

    def interpret(self, reply: ApiReply, *, probing: bool = False) -> ApiOutcome:
        """What the reply to send_request (or probe_request, with `probing`) means."""
        ...


ProviderFactory = Callable[[ApiConfig, Callable[[], float]], Provider]  # (config, wall clock) → provider
