"""Relays: failover order and breakers, the reachability probe, and `mailwatchd check`'s diagnosis."""
