"""When a following tail reconnects: exponential backoff with jitter, bounded in delay and time.

A restart of the api or of the runner ends open streams with ``UNAVAILABLE``; the CLI then
waits and asks again from the offset it has. The delays double from :data:`FIRST_DELAY` up to
:data:`MAX_DELAY`, each drawn at random between half and all of that ("equal jitter"), so that
many tails cut at once do not come back in step. After :data:`GIVE_UP_SECONDS` of failures in a
row it gives up: the service is down, not restarting.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

FIRST_DELAY = 0.25
MAX_DELAY = 5.0
GIVE_UP_SECONDS = 300.0


class Backoff:
    """The delays before each attempt of one series of failures; :meth:`reset` on success."""

    def __init__(
        self,
        *,
        first: float = FIRST_DELAY,
        maximum: float = MAX_DELAY,
        give_up_after: float = GIVE_UP_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.first = first
        self.maximum = maximum
        self.give_up_after = give_up_after
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self.attempt = 0
        self._since: float | None = None  # the first failure of this series

    def reset(self) -> None:
        """The stream works again: the next failure starts a new series."""
        self.attempt = 0
        self._since = None

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None: give up."""
        now = self._clock()
        if self._since is None:
            self._since = now
        elif now - self._since >= self.give_up_after:
            return None
        ceiling = min(self.maximum, self.first * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)
