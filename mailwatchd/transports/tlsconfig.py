"""Client TLS settings for relays: verify by default, TLS 1.2 or newer."""

from __future__ import annotations

import ssl

from mailwatchd.settings.relays import RelayConfig


def client_context(relay: RelayConfig) -> ssl.SSLContext:
    """A client context for `relay`: system CAs plus `relay.cafile`, verification unless `verify=False`."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if relay.cafile is not None:
        context.load_verify_locations(cafile=str(relay.cafile))
    if not relay.verify:
        # The operator's explicit choice (EMAIL_SSL_VERIFY=false / ?verify=false); never a default.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if relay.certfile is not None:
        keyfile = str(relay.keyfile) if relay.keyfile is not None else None
        context.load_cert_chain(str(relay.certfile), keyfile)
    return context
