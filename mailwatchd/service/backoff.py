"""Retry delays: exponential from the minimum, capped at the maximum, with jitter."""

from __future__ import annotations

import random

JITTER = 0.2
_MAX_EXPONENT = 64  # 2**64 times any sensible minimum is far past any maximum; avoids float overflow
_default_rng = random.Random()


def retry_delay(attempt: int, minimum: float, maximum: float, rng: random.Random | None = None,
                *, jitter: float = JITTER) -> float:
    """Seconds to wait before attempt `attempt + 1`: minimum·2^(attempt-1) ± jitter, within [minimum, maximum]."""
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, not {attempt}")
    if not 0 <= minimum <= maximum:
        raise ValueError(f"need 0 <= minimum <= maximum, got {minimum} and {maximum}")
    base = min(maximum, minimum * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    if jitter:
        base *= 1.0 + (rng or _default_rng).uniform(-jitter, jitter)
    return min(maximum, max(minimum, base))
