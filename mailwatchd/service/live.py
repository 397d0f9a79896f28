"""The live configuration: what a reload swaps, behind one handle that workers, intake and health
keep. A reload replaces the settings, the router and the addressing here; nobody holds on to the
old ones.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from mailwatchd.message.addressing import Addressing
from mailwatchd.relays.routing import Router, Transition
from mailwatchd.service.logs import get_logger
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.transports.api.session import ApiSession
from mailwatchd.transports.delivery import SmtpSession
from mailwatchd.transports.outbox import OutboxSession
from mailwatchd.transports.tlsconfig import client_context
from mailwatchd.transports.tokens import Tokens
from mailwatchd.transports.transport import RelaySession, Session

SessionFactory = Callable[[Settings, RelayConfig | None, Endpoint | None], Session]
log = get_logger()


def build_addressing(settings: Settings) -> Addressing:
    """The addressing of these settings; an aliases entry it cannot use is logged and skipped, not fatal."""
    addressing = Addressing.from_settings(settings)
    for warning in addressing.warnings:
        log.warning("aliases_entry_skipped", aliases=str(settings.aliases), detail=warning)
    return addressing


class Live:
    """The current settings, router and addressing, the session factory, and a generation bumped by
    each reload."""

    def __init__(self, settings: Settings, session_factory: SessionFactory | None = None,
                 on_transition: Callable[[Transition], None] | None = None) -> None:
        self.settings = settings
        self._on_transition = on_transition
        self.router = Router(settings.relays, on_transition=on_transition)
        self.addressing = build_addressing(settings)
        self.generation = 0
        self._factory = session_factory
        self._tls_contexts: dict[str, ssl.SSLContext] = {}
        self.tokens = Tokens()  # OAuth2 tokens, shared by delivery and the probes; kept across reloads

    def replace(self, settings: Settings) -> None:
        """Swap in new settings, a fresh router and addressing; wakes whoever waits on the old router."""
        old = self.router
        addressing = build_addressing(settings)  # reads files: done before anything is swapped
        self.settings = settings
        self.router = Router(settings.relays, on_transition=self._on_transition)
        self.addressing = addressing
        self._tls_contexts.clear()
        self.generation += 1
        old.changed.set()

    def wakeup(self) -> asyncio.Event:
        """The event a worker waiting for a relay waits on: set when an endpoint may be usable again."""
        return self.router.changed

    def make_session(self, relay: RelayConfig | None, endpoint: Endpoint | None) -> Session:
        """A transport session: SMTP to one relay endpoint, or the local outbox."""
        if self._factory is not None:
            return self._factory(self.settings, relay, endpoint)
        if relay is None or endpoint is None:
            return OutboxSession(self.settings)
        # A TLS context costs tens of ms (the system's CA store is loaded): made only for an endpoint that uses
        # TLS, once per relay and configuration.
        context = None
        if relay.api is not None or endpoint.tls is not TlsMode.NONE:
            context = self._tls_contexts.get(relay.name)
            if context is None:
                try:
                    context = self._tls_contexts[relay.name] = client_context(relay)
                except (OSError, ValueError):
                    context = None  # the session reports the unreadable TLS files as a relay fault
        if relay.api is not None:
            return ApiSession(relay, endpoint, self.settings, context)
        return SmtpSession(relay, endpoint, self.settings, context, tokens=self.tokens)

    def make_relay_session(self, relay: RelayConfig, endpoint: Endpoint) -> RelaySession:
        """An SMTP session to one relay endpoint, whose opening a worker can race with others'."""
        session = self.make_session(relay, endpoint)
        if not isinstance(session, RelaySession):
            raise TypeError(f"the session factory made a {type(session).__name__} for relay {relay.name}: "
                            "a relay needs a session that can be opened before a message (RelaySession)")
        return session
