"""Retry delays: exponential backoff with full jitter, so boxes that lost the same link together do
not come back in lockstep (thousands of gateways reconnecting at once is its own outage)."""

from __future__ import annotations

import random


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """A delay drawn uniformly from [0, min(cap, base * 2**attempt)]."""
    r = rng or random
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 30)))
    return r.uniform(0, ceiling)


class OutageBackoff:
    """Full-jitter backoff whose cap stays short early in an outage and grows only once it is long.

    A short blip (a broker restart, a 4G hand-over) is then bridged within ``short_cap_s`` of the
    broker's return, while a long outage backs off to ``long_cap_s`` and still spreads reconnects.
    """

    def __init__(self, *, first_max_s: float = 1.0, short_cap_s: float = 4.0, long_cap_s: float = 60.0,
                 short_window_s: float = 60.0, rng: random.Random | None = None) -> None:
        self.first_max_s = first_max_s
        self.short_cap_s = short_cap_s
        self.long_cap_s = long_cap_s
        self.short_window_s = short_window_s
        self._rng = rng or random.Random()
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next_delay(self, outage_age_s: float) -> float:
        attempt = self.attempt
        self.attempt += 1
        if attempt == 0:
            # A random pause right after a drop spreads the first reconnect of many boxes.
            return self._rng.uniform(0, self.first_max_s)
        cap = self.short_cap_s if outage_age_s < self.short_window_s else self.long_cap_s
        return full_jitter(attempt, self.first_max_s, cap, self._rng)
