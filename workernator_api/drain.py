"""Draining the api on SIGTERM: no new calls, the open ones get a deadline, then streams are cut.

A following tail lasts as long as its job, so waiting for every stream to end could take
days. At the deadline each open stream ends with ``UNAVAILABLE`` "the api is shutting down",
which the CLI (and any client using its reconnect logic) takes as "reconnect and resume from
the offset I have": a restart of the api loses no output for them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")

CUT_MESSAGE = "the api is shutting down; reconnect to resume"


class Cut(Exception):
    """The stream was cut by the drain: answer UNAVAILABLE."""


class Drain:
    """The api's drain switch: :meth:`until_cut` wraps a stream, :meth:`cut` ends them all."""

    def __init__(self) -> None:
        self._cut = asyncio.Event()

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
