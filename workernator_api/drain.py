"""Draining the api on SIGTERM: no new calls, the open ones get a deadline, then streams are cut.

From :meth:`Drain.begin` on, a new call is refused ``UNAVAILABLE`` "the api is shutting down"
(clients retry: the CLI's tail reconnects), while the port stays open so that a client is told
so rather than finding nothing there. The open calls get until the deadline to end. A
following tail lasts as long as its job, so waiting for every stream to end could take days:
at the deadline each open stream ends with ``UNAVAILABLE`` "the api is shutting down;
reconnect to resume", which the CLI (and any client using its reconnect logic) takes as
"reconnect and resume from the offset I have": a restart of the api loses no output for them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

T = TypeVar("T")

CUT_MESSAGE = "the api is shutting down; reconnect to resume"
REFUSED_MESSAGE = "the api is shutting down; retry in a moment"


class Cut(Exception):
    """The stream was cut by the drain: answer UNAVAILABLE."""


class Refused(Exception):
    """A new call while the api drains: answer UNAVAILABLE."""


class Drain:
    """The api's drain switch. Every call runs :meth:`admitted`; a stream goes through
    :meth:`until_cut`. :meth:`begin` refuses new calls, :meth:`wait_ended` waits for the open
    ones, :meth:`cut` ends the streams still open."""

    def __init__(self) -> None:
        self._cut = asyncio.Event()
        self._draining = False
        self._open = 0
        self._none_open = asyncio.Event()
        self._none_open.set()

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Count a call as open while it runs; raises :class:`Refused` once draining."""
        if self._draining:
            raise Refused(REFUSED_MESSAGE)
        self._open += 1
        self._none_open.clear()
        try:
            yield
        finally:
            self._open -= 1
            if not self._open:
                self._none_open.set()

    def begin(self) -> None:
        self._draining = True

    async def wait_ended(self, seconds: float) -> bool:
        """Whether every open call ended within ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                await self._none_open.wait()
        except TimeoutError:
            return False
        return True

    def cut(self) -> None:
        self._cut.set()

    async def until_cut(self, source: AsyncIterator[T]) -> AsyncIterator[T]:
        """The items of ``source`` until it ends, or :class:`Cut` once :meth:`cut` is called
        (also while waiting for the next item). ``source`` is closed however this ends: cut,
        or cancelled (the client went away) while it waited."""
        if self._cut.is_set():
            raise Cut(CUT_MESSAGE)
        cut = asyncio.ensure_future(self._cut.wait())
        item: asyncio.Future[T] | None = None
        try:
            while True:
                item = asyncio.ensure_future(anext(source))
                await asyncio.wait((item, cut), return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    raise Cut(CUT_MESSAGE)
                try:
                    value = item.result()
                except StopAsyncIteration:
                    return
                item = None
                yield value
        finally:
            cut.cancel()
            if item is not None and not item.done():  # stop the wait before closing source
                item.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await item
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
