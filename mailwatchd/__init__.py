"""mailwatchd: a crash-safe outbound-mail daemon for Linux servers."""

__version__ = "0.1.0"
