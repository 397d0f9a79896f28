"""Small named exception classes, one per failure the caller must tell apart."""


class MailwatchdError(Exception):
    """Base class of the errors mailwatchd raises on purpose."""


class ConfigError(MailwatchdError):
    """A setting is missing, malformed or contradicts another; names the key and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(f"{key}: {problem}; fix: {fix}")


class MalformedMessage(MailwatchdError):
    """A message cannot be sent as it is (no sender, no recipient, not a message at all)."""


class RefusedSpoolEntry(MailwatchdError):
    """A spool entry is not a plain, single-link regular file within the size limit."""


class SpoolFull(MailwatchdError):
    """The spool cannot take a message now (ENOSPC, EDQUOT); retry later."""


class SpoolLocked(MailwatchdError):
    """Another daemon already holds this spool's lock."""


class NotQueued(MailwatchdError):
    """A submission did not queue the message: exit `status` (sysexits) with `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
