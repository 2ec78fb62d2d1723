"""The api's fan-out of runner tails (workernator_api/fanout.py), against a scripted runner
tail: who shares a runner stream, who is left behind, what each tail gets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import pytest

from shared.errors import InvalidArgument, ResourceExhausted
from shared.model import OutputChunk, Stream
from workernator_api import fanout
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api.limits import ConcurrencyLimit

CHUNK = 1000  # bytes per chunk
PER_BATCH = 4  # chunks per runner batch


def chunk(n: int) -> OutputChunk:
    data = bytes([65 + n % 26]) * (CHUNK - 1) + b"\n"
    return OutputChunk(n * CHUNK, (n + 1) * CHUNK, n, Stream.STDOUT, data)


class Runner:
    """Runner tails of one job with ``chunks`` chunks of output, ``PER_BATCH`` a batch, as
    fast as they are read; ``opened`` records each tail's start offset."""

    def __init__(self, chunks: int, error_at: int | None = None) -> None:
        self.chunks = [chunk(n) for n in range(chunks)]
        self.error_at = error_at
        self.opened: list[int] = []
        self.closed = 0

    async def tail(
        self, user: str, role: str, job_id: str, offset: int
    ) -> AsyncGenerator[list[OutputChunk], None]:
        self.opened.append(offset)
        try:
            if offset % CHUNK:
                raise InvalidArgument(f"offset {offset} is not where a record starts")
            start = offset // CHUNK
            for at in range(start, len(self.chunks), PER_BATCH):
                if self.error_at is not None and at >= self.error_at:
                    raise InvalidArgument("the runner broke")
                await asyncio.sleep(0)
                yield self.chunks[at : at + PER_BATCH]
        finally:
            self.closed += 1

    def output(self, offset: int = 0) -> bytes:
        return b"".join(c.data for c in self.chunks if c.offset >= offset)


def hub(runner: Runner, per_user: int = 8) -> fanout.Hub:
    return fanout.Hub(runner.tail, ConcurrencyLimit("runner streams", per_user=per_user))


async def collect(responses: AsyncGenerator[bytes, None]) -> tuple[bytes, list[int]]:
    """Everything a tail gets, and each response's next_offset."""
    data = bytearray()
    offsets = []
    async with contextlib.aclosing(responses):
        async for raw in responses:
            response = pb.TailJobOutputResponse.FromString(raw)
            data += b"".join(c.data for c in response.chunks)
            offsets.append(response.next_offset)
            await asyncio.sleep(0)
    return bytes(data), offsets


@pytest.fixture(autouse=True)
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 3 batches; no pause for arrivals; a short lag allowed."""
    monkeypatch.setattr(fanout, "MIN_WINDOW_BYTES", 3 * PER_BATCH * CHUNK)
    monkeypatch.setattr(fanout, "MAX_WINDOW_BYTES", 3 * PER_BATCH * CHUNK)
    monkeypatch.setattr(fanout, "QUIET_SECONDS", 0.0)
    monkeypatch.setattr(fanout, "LAG_SECONDS", 0.05)


async def test_tails_at_one_position_share_one_runner_stream_and_get_the_same_output() -> None:
    runner = Runner(200)
    h = hub(runner)
    results = await asyncio.gather(*(collect(h.tail("u", "user", "J", 0)) for _ in range(20)))
    assert {data for data, _ in results} == {runner.output()}
    assert runner.opened == [0]
    assert runner.closed == 1
    assert h.feeds == 0


async def test_a_tail_a_window_behind_goes_on_alone_and_loses_nothing() -> None:
    runner = Runner(200)
    h = hub(runner)
    slow = h.tail("u", "user", "J", 0)
    first = pb.TailJobOutputResponse.FromString(await anext(slow))  # then it stops reading
    fast, _ = await asyncio.wait_for(collect(h.tail("u", "user", "J", 0)), timeout=10)
    assert fast == runner.output()  # the slow one did not hold it back
    rest, _ = await collect(slow)
    assert b"".join(c.data for c in first.chunks) + rest == runner.output()
    assert runner.opened[0] == 0
    assert len(runner.opened) == 2 and runner.opened[1] > 0  # its own stream, from where it was
    assert runner.closed == 2


async def test_a_new_tail_gets_one_chunk_first_then_whole_batches() -> None:
    runner = Runner(12)
    data, offsets = await collect(hub(runner).tail("u", "user", "J", 0))
    assert data == runner.output()
    assert offsets == [1 * CHUNK, 4 * CHUNK, 8 * CHUNK, 12 * CHUNK]


async def test_a_tail_from_a_chunk_inside_a_held_batch_joins_the_feed_there() -> None:
    runner = Runner(40)
    h = hub(runner)
    leader = h.tail("u", "user", "J", 0)
    await anext(leader)  # the feed is open and holds its first batches
    await asyncio.sleep(0.01)
    data, _ = await collect(h.tail("u", "user", "J", 2 * CHUNK))
    assert data == runner.output(2 * CHUNK)
    assert runner.opened == [0]  # no second runner stream
    await leader.aclose()


async def test_an_offset_inside_a_record_is_the_runners_to_refuse() -> None:
    runner = Runner(40)
    h = hub(runner)
    leader = h.tail("u", "user", "J", 0)
    await anext(leader)
    with pytest.raises(InvalidArgument, match="not where a record starts"):
        await collect(h.tail("u", "user", "J", CHUNK + 1))
    assert runner.opened == [0, CHUNK + 1]
    await leader.aclose()


async def test_a_runner_error_reaches_every_tail_of_the_feed() -> None:
    runner = Runner(100, error_at=40)
    h = hub(runner)
    results = await asyncio.gather(
        *(collect(h.tail("u", "user", "J", 0)) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, InvalidArgument) for r in results)
    assert h.feeds == 0
    assert h.streams.open == 0


async def test_the_runner_stream_closes_when_its_last_tail_leaves() -> None:
    runner = Runner(10_000)
    h = hub(runner)
    tails = [h.tail("u", "user", "J", 0) for _ in range(3)]
    for tail in tails:
        await anext(tail)
    assert h.streams.open == 1
    for tail in tails:
        await tail.aclose()
    for _ in range(100):
        if runner.closed:
            break
        await asyncio.sleep(0.001)
    assert runner.closed == 1
    assert h.feeds == 0 and h.streams.open == 0


async def test_runner_streams_are_limited_per_user_and_given_back() -> None:
    runner = Runner(10_000)
    h = hub(runner, per_user=2)
    tails = [h.tail("u", "user", job, 0) for job in ("A", "B")]
    for tail in tails:
        await anext(tail)
    with pytest.raises(ResourceExhausted, match="user 'u' has 2 open"):
        await anext(h.tail("u", "user", "C", 0))
    shared = h.tail("u", "user", "A", 0)  # joins A's stream: no new one needed
    await anext(shared)
    other = h.tail("v", "user", "C", 0)  # another user's share
    await anext(other)
    for tail in [*tails, shared, other]:
        await tail.aclose()
    await asyncio.sleep(0.01)
    assert h.streams.open == 0
