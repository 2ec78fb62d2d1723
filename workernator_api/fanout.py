"""Tails of one job share one runner stream (docs/architecture.md section 9, "Fan-out").

Without this, every ``TailJobOutput`` had a runner connection of its own: 100 tails of one job
made the runner read, check and send the job's output 100 times, and the api decode and convert
it 100 times. Now a :class:`Feed` is one runner tail of a job from one position, following it;
every following tail of that job whose position the feed still holds reads from it. The feed
serializes each batch's response once and hands the same bytes to every tail.

Memory is bounded: a feed reads ahead of its tails by at most its window (the api's
:data:`WINDOW_BYTES` in all, shared between the feeds open, between :data:`MIN_WINDOW_BYTES`
and :data:`MAX_WINDOW_BYTES` each). When the window is full, the oldest batch is dropped as soon
as no tail still needs it. A tail that still needs it while another tail waits for new output
is a whole window behind: after :data:`LAG_SECONDS` of that it leaves the feed and goes on from
where it was on a feed of its own (or on one at its position), so a slow client holds back the
others once, briefly, and then nobody but itself; its own feed stops reading once its window is
full, and the runner then stops reading the job's file for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from shared.model import OutputChunk
from workernator_api import convert
from workernator_api.limits import ConcurrencyLimit

WINDOW_BYTES = 16 << 20
"""Output all feeds together keep for their tails (the api's part of a tail's memory)."""
MAX_WINDOW_BYTES = 2 << 20
"""The most one feed keeps: 8 batches of 256 KiB, room for tails a little apart."""
MIN_WINDOW_BYTES = 256 << 10
"""The least one feed keeps, however many feeds are open: one batch."""

LAG_SECONDS = 0.5
"""How long tails waiting for output wait for one a whole window behind before it must go on
without them: a client that falls behind for a moment (a busy machine) stays on the shared
stream, a stalled one costs the others this once."""
QUIET_SECONDS = 0.01
"""Tails hold back their next batch until no tail call has arrived for this long..."""
MAX_PAUSE_SECONDS = 0.25
"""... for at most this long in a burst of arrivals: a steady stream of new tails slows the
others' output, never stops it."""

Batches = Callable[[str, str, str, int], AsyncGenerator[list[OutputChunk], None]]
"""Opens a runner tail: (user, role, job id, offset) -> batches of chunks, following the job."""


@dataclass(frozen=True, slots=True)
class Batch:
    """One runner batch and the response made of it, serialized once for every tail."""

    chunks: tuple[OutputChunk, ...]
    response: bytes  # a serialized TailJobOutputResponse
    size: int  # bytes of output

    @property
    def offset(self) -> int:
        return self.chunks[0].offset

    @property
    def next_offset(self) -> int:
        return self.chunks[-1].next_offset


class Behind(Exception):
    """This tail fell a whole window behind the others and must go on without them."""


class Feed:
    """One runner tail of ``job_id`` from ``offset``, following the job, shared by tails.

    Batches are numbered from 0 as they arrive; ``_batches`` holds numbers ``_first`` onward.
    Each tail reading it is a :class:`_Reader` holding the number of the batch it wants next.
    """

    def __init__(self, hub: Hub, job_id: str, offset: int) -> None:
        self.hub = hub
        self.job_id = job_id
        self.offset = offset  # where the runner tail starts
        self._batches: deque[Batch] = deque()
        self._first = 0
        self._bytes = 0
        self._readers: set[_Reader] = set()
        self.done = False
        self.error: Exception | None = None
        self._grew = _Signal()  # a batch came, or the feed ended
        self._moved = _Signal()  # a reader took a batch or left
        self._task: asyncio.Task[None] | None = None

    @property
    def end(self) -> int:
        """Number of the next batch to arrive."""
        return self._first + len(self._batches)

    @property
    def head_offset(self) -> int:
        return self._batches[-1].next_offset if self._batches else self.offset

    def start(self, user: str, role: str, open_tail: Batches, release: Callable[[], None]) -> None:
        """Open the runner tail; ``release`` gives back the feed's slot once it has ended."""
        self._task = asyncio.create_task(self._run(user, role, open_tail))

        def ended(_: asyncio.Task[None]) -> None:  # however it ended, cancelled before it ran too
            self.done = True
            self.hub._ended(self)
            self._grew.fire()
            release()

        self._task.add_done_callback(ended)

    async def _run(self, user: str, role: str, open_tail: Batches) -> None:
        tail = open_tail(user, role, self.job_id, self.offset)
        try:
            async with contextlib.aclosing(tail):  # cancelled: the runner connection closes now
                async for chunks in tail:
                    if not chunks:
                        continue
                    batch = Batch(
                        tuple(chunks),
                        convert.tail_response(chunks).SerializeToString(),
                        sum(len(c.data) for c in chunks),
                    )
                    await self._make_room(batch.size)
                    self._batches.append(batch)
                    self._bytes += batch.size
                    self._grew.fire()
        except Exception as exc:  # the readers raise it: a bad offset, the runner gone, ...
            self.error = exc

    async def _make_room(self, size: int) -> None:
        """Drop batches no reader needs until ``size`` more fits the window. A reader still on
        the oldest batch while another waits for more is a whole window behind: after
        :data:`LAG_SECONDS` of that it is told to go on alone."""
        loop = asyncio.get_running_loop()
        lagging_since: float | None = None
        while self._batches and self._bytes + size > self.hub.window():
            holding = [r for r in self._readers if r.next == self._first]
            if not holding:
                oldest = self._batches.popleft()
                self._first += 1
                self._bytes -= oldest.size
                lagging_since = None
                continue
            if not any(r.next >= self.end for r in self._readers):
                lagging_since = None  # nobody waits: everyone is busy sending
                await self._moved.wait()
                continue
            now = loop.time()
            if lagging_since is None:
                lagging_since = now
            if now - lagging_since >= LAG_SECONDS:
                for reader in holding:  # it sees it when it asks for its next batch
                    self._drop(reader)
                    reader.behind = True
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(lagging_since + LAG_SECONDS - now):
                    await self._moved.wait()

    def locate(self, offset: int) -> tuple[int, int] | None:
        """(batch number, index of the chunk starting at ``offset`` in it) if this feed can
        serve a tail from ``offset``, else None."""
        if self.done:
            return None
        if offset == self.head_offset:
            return self.end, 0
        for number, batch in enumerate(self._batches, self._first):
            if batch.offset <= offset < batch.next_offset:
                for index, chunk in enumerate(batch.chunks):
                    if chunk.offset == offset:
                        return number, index
                return None  # inside a record: the runner says why
        return None

    def _add(self, reader: _Reader) -> None:
        self._readers.add(reader)

    def _drop(self, reader: _Reader) -> None:
        self._readers.discard(reader)
        self._moved.fire()
        if not self._readers and not self.done and self._task is not None:
            self._task.cancel()  # nobody reads it: stop the runner stream
            self.hub._ended(self)

    async def read(self, reader: _Reader) -> AsyncGenerator[bytes, None]:
        """The responses for ``reader`` from its batch on; :class:`Behind` when it fell behind."""
        while True:
            if reader.behind:
                raise Behind()
            if reader.next < self.end:
                batch = self._batches[reader.next - self._first]
                chunks = batch.chunks[reader.skip :]
                if reader.fresh and len(chunks) > 1:
                    # A new tail gets one chunk first: its first byte goes out sooner, and
                    # the event loop takes in the next call sooner (see Hub._calm).
                    reader.fresh = False
                    reader.skip += 1
                    reader.offset = chunks[0].next_offset
                    yield convert.tail_response(chunks[:1]).SerializeToString()
                    continue
                reader.fresh = False
                reader.next += 1
                reader.offset = batch.next_offset
                self._moved.fire()
                if reader.skip:
                    reader.skip = 0
                    yield convert.tail_response(chunks).SerializeToString()
                else:
                    yield batch.response
            elif self.done:
                if self.error is not None:
                    raise self.error
                return
            else:
                await self._grew.wait()


class _Signal:
    """Wakes every task waiting on it when fired; a later wait waits for the next firing."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


@dataclass(eq=False)
class _Reader:
    next: int  # number of the batch it reads next
    offset: int  # where its output goes on: the next_offset of the last batch it got
    skip: int = 0  # chunks of its next batch it did not ask for or already got
    behind: bool = False
    fresh: bool = True  # it has not been sent anything yet


class Hub:
    """The open feeds, by job; a tail joins one that holds its position or opens one.

    ``streams`` limits the feeds (each holds a runner connection), per user who opened one and
    in all.
    """

    def __init__(self, open_tail: Batches, streams: ConcurrencyLimit) -> None:
        self._open_tail = open_tail
        self.streams = streams
        self._feeds: dict[str, list[Feed]] = {}
        self._last_arrival = -1.0
        self._pause_ends = 0.0

    @property
    def feeds(self) -> int:
        return sum(len(feeds) for feeds in self._feeds.values())

    def window(self) -> int:
        share = WINDOW_BYTES // max(1, self.feeds)
        return max(MIN_WINDOW_BYTES, min(MAX_WINDOW_BYTES, share))

    async def tail(
        self, user: str, role: str, job_id: str, offset: int
    ) -> AsyncGenerator[bytes, None]:
        """The job's output from ``offset``, following it, through feeds shared with other
        tails; the runner's errors (a bad offset, the runner gone) come out as they are."""
        first = True
        while True:
            feed, reader = self._join(user, role, job_id, offset)
            responses = feed.read(reader)
            try:
                async with contextlib.aclosing(responses):
                    async for response in responses:
                        if first:
                            first = False
                            yield response
                            continue
                        await self._calm()
                        yield response
                return
            except Behind:
                offset = reader.offset  # go on from there, on another feed
            finally:
                feed._drop(reader)

    def arrived(self) -> None:
        """A tail call came in (before it is authorized): see :meth:`_calm`."""
        now = asyncio.get_running_loop().time()
        if now > self._last_arrival + QUIET_SECONDS:  # the first of a burst
            self._pause_ends = now + MAX_PAUSE_SECONDS
        self._last_arrival = now

    async def _calm(self) -> None:
        """Wait while tail calls keep arriving, for up to MAX_PAUSE_SECONDS a burst.

        grpc's asyncio server takes in one new call per turn of the event loop, and a turn in
        which 100 tails each write 256 KiB takes many milliseconds: 100 tails arriving at once
        waited seconds for their first byte. Holding back every tail's next batch (not the first)
        while calls arrive keeps the turns short until they are all in.
        """
        loop = asyncio.get_running_loop()
        while (wait := self._last_arrival + QUIET_SECONDS - loop.time()) > 0:
            if loop.time() >= self._pause_ends:
                return
            await asyncio.sleep(wait)

    def _join(self, user: str, role: str, job_id: str, offset: int) -> tuple[Feed, _Reader]:
        for feed in self._feeds.get(job_id, ()):
            found = feed.locate(offset)
            if found is not None:
                number, skip = found
                reader = _Reader(number, offset, skip)
                feed._add(reader)
                return feed, reader
        release = self.streams.take(user)  # refused here, before anything is opened
        feed = Feed(self, job_id, offset)
        self._feeds.setdefault(job_id, []).append(feed)
        reader = _Reader(0, offset)
        feed._add(reader)
        feed.start(user, role, self._open_tail, release)
        return feed, reader

    def _ended(self, feed: Feed) -> None:
        """``feed`` takes no more tails."""
        feeds = self._feeds.get(feed.job_id, [])
        if feed in feeds:
            feeds.remove(feed)
            if not feeds:
                del self._feeds[feed.job_id]
