"""Transports: the SMTP client (set-up, AUTH, the wire), the local outbox, and what an outcome means."""
