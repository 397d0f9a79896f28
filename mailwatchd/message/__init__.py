"""A message's format: its envelope, and how the daemon completes its addresses."""
