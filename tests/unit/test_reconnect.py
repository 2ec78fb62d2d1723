"""The tail's reconnect backoff and the api's drain switch, on their own."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from workernator_api import drain, reconnect


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_delays_double_up_to_the_maximum_each_between_half_and_all_of_it() -> None:
    clock = _Clock()
    backoff = reconnect.Backoff(clock=clock, rng=random.Random(1))
    ceilings = [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    for ceiling in ceilings:
        delay = backoff.next_delay()
        assert delay is not None
        assert ceiling / 2 <= delay <= ceiling
        clock.now += delay


def test_delays_are_jittered_so_many_tails_do_not_come_back_in_step() -> None:
    firsts = set()
    for seed in range(20):
        backoff = reconnect.Backoff(clock=_Clock(), rng=random.Random(seed))
        for _ in range(4):
            delay = backoff.next_delay()
        assert delay is not None
        firsts.add(round(delay, 6))
    assert len(firsts) == 20


def test_it_gives_up_after_a_series_of_failures_and_starts_over_after_a_reset() -> None:
    clock = _Clock()
    backoff = reconnect.Backoff(clock=clock, give_up_after=30.0)
    while (delay := backoff.next_delay()) is not None:
        clock.now += delay
    assert 30.0 <= clock.now < 30.0 + reconnect.MAX_DELAY
    backoff.reset()  # the stream worked again: a new series, from the first delay
    delay = backoff.next_delay()
    assert delay is not None and delay <= reconnect.FIRST_DELAY


async def _items(values: list[int], then_wait: asyncio.Event) -> AsyncIterator[int]:
    for value in values:
        yield value
    await then_wait.wait()  # a following tail: nothing more until the job prints


async def test_a_cut_ends_a_stream_waiting_for_its_next_item() -> None:
    switch = drain.Drain()
    received: list[int] = []
    both = asyncio.Event()

    async def follow() -> None:
        async for item in switch.until_cut(_items([1, 2], asyncio.Event())):
            received.append(item)
            if len(received) == 2:
                both.set()

    task = asyncio.create_task(follow())
    await asyncio.wait_for(both.wait(), 5)
    switch.cut()
    with pytest.raises(drain.Cut, match="shutting down; reconnect"):
        await asyncio.wait_for(task, 5)
    assert received == [1, 2]


async def test_a_stream_that_ends_before_the_cut_ends_normally_and_after_it_none_starts() -> None:
    switch = drain.Drain()
    done = asyncio.Event()
    done.set()
    assert [item async for item in switch.until_cut(_items([1, 2, 3], done))] == [1, 2, 3]
    switch.cut()
    with pytest.raises(drain.Cut):
        async for _ in switch.until_cut(_items([1], done)):
            pass


async def test_a_stream_whose_client_goes_away_while_it_waits_is_closed() -> None:
    switch = drain.Drain()
    started, closed = asyncio.Event(), asyncio.Event()

    async def source() -> AsyncIterator[int]:
        try:
            started.set()
            await asyncio.Event().wait()  # nothing comes
            yield 1
        finally:
            closed.set()

    async def follow() -> None:
        async for _ in switch.until_cut(source()):
            pass

    task = asyncio.create_task(follow())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()  # what grpc does when the client cancels the call
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(closed.wait(), 5)  # the runner stream is let go of


async def test_once_draining_new_calls_are_refused_and_the_open_ones_are_waited_for() -> None:
    switch = drain.Drain()
    assert await switch.wait_ended(0)  # nothing open
    release = asyncio.Event()

    async def call() -> None:
        with switch.admitted():
            await release.wait()

    calls = [asyncio.create_task(call()) for _ in range(2)]
    await asyncio.sleep(0)  # both admitted
    switch.begin()
    with pytest.raises(drain.Refused, match="shutting down; retry in a moment"), switch.admitted():
        pass
    assert not await switch.wait_ended(0.05)  # two still open
    release.set()
    assert await switch.wait_ended(5)
    await asyncio.gather(*calls)


async def test_a_call_that_fails_still_counts_as_ended() -> None:
    switch = drain.Drain()
    with pytest.raises(ValueError), switch.admitted():
        raise ValueError("the call's own error")
    switch.begin()
    assert await switch.wait_ended(0)
