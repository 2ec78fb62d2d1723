"""Limits on what one caller, and all callers together, may hold open in the api at once.

The api is shared: without these, one user could hold every runner connection the runner
allows, fill the shared connection's request budget, or pin the api's memory with stalled
streams, and everyone else would be refused. A call over a limit fails at once with
``RESOURCE_EXHAUSTED`` and a message saying which limit; it never waits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from shared.errors import ResourceExhausted


class ConcurrencyLimit:
    """At most ``per_user`` open ``what`` per user, and ``total`` in all when given (fail fast,
    no queue).

    Single-threaded (asyncio): the counters need no lock.
    """

    def __init__(self, what: str, *, per_user: int, total: int | None = None) -> None:
        self.what = what
        self.per_user = per_user
        self.total = total
        self._by_user: dict[str, int] = {}
        self._open = 0

    @property
    def open(self) -> int:
        return self._open

    def open_for(self, user: str) -> int:
        return self._by_user.get(user, 0)

    @contextlib.contextmanager
    def hold(self, user: str) -> Iterator[None]:
        """One slot for ``user`` for the duration of the block, or :class:`ResourceExhausted`."""
        release = self.take(user)
        try:
            yield
        finally:
            release()

    def take(self, user: str) -> Callable[[], None]:
        """One slot for ``user`` until the returned function is called (once), or
        :class:`ResourceExhausted`: for a slot that outlives the block that took it."""
        held = self._by_user.get(user, 0)
        if held >= self.per_user:
            raise ResourceExhausted(
                f"too many {self.what} at once: user {user!r} has {held} open, the most one "
                "user may have; wait for one to finish"
            )
        if self.total is not None and self._open >= self.total:
            raise ResourceExhausted(
                f"too many {self.what} at once: the server has {self._open} open, its limit; "
                "try again later"
            )
        self._by_user[user] = held + 1
        self._open += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._open -= 1
            remaining = self._by_user[user] - 1
            if remaining:
                self._by_user[user] = remaining
            else:
                del self._by_user[user]

        return release


MAX_REQUEST_BYTES = 64 << 10
"""The largest request the api reads, serialized. The largest real one, a StartJob with a
4096-character expression and 64 variables, is about 22 KiB. The api refuses a larger one with
RESOURCE_EXHAUSTED "request too large: N bytes, the api accepts at most 65536", and the CLI
says the same before it sends one. (grpc itself refuses messages over
:data:`MAX_TRANSPORT_BYTES` before the api sees them, in its own words.)"""

MAX_TRANSPORT_BYTES = 1 << 20
"""grpc's limit on a received message (``grpc.max_receive_message_length``): what a message may
cost the api in memory before it can check it."""


def request_too_large(size: int) -> str | None:
    """The message refusing a request of ``size`` bytes, or None when it is small enough."""
    if size <= MAX_REQUEST_BYTES:
        return None
    return f"request too large: {size} bytes, the api accepts at most {MAX_REQUEST_BYTES}"
