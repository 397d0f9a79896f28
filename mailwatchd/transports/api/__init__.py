"""HTTPS API relays: one module per provider, the session that sends their requests."""
