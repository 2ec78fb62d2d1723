"""Job output: from the first byte, for many readers, exact bytes, resume and last lines."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.errors import InvalidArgument, NotFound
from shared.model import JobState, Stream
from tests.helpers import collect, joined
from workernator_runner.manager import JobManager


async def test_late_reader_gets_output_from_the_first_byte(manager: JobManager) -> None:
    job = await manager.start("drip", {"count": 6, "interval": 0.05}, "alice")
    await asyncio.sleep(0.2)  # attach while the job runs, after it printed some lines
    out = joined(await collect(manager, job.id))
    assert out == b"line 0\nline 1\nline 2\nline 3\nline 4\nline 5"
    # and again once it has ended
    assert joined(await collect(manager, job.id)) == out


async def test_output_arrives_while_the_job_runs_not_only_at_exit(manager: JobManager) -> None:
    job = await manager.start("drip", {"count": 3, "interval": 1.0}, "alice")
    t0 = time.monotonic()
    reader = manager.read_output(job.id)
    first = await anext(reader)
    assert first.data == b"line 0\n"
    assert time.monotonic() - t0 < 0.9
    assert manager.status(job.id).state is JobState.RUNNING
    await reader.aclose()
    await manager.stop(job.id)


async def test_partial_line_is_flushed_after_a_short_delay(manager: JobManager) -> None:
    job = await manager.start("drip", {"count": 1, "interval": 2.0}, "alice")
    t0 = time.monotonic()
    reader = manager.read_output(job.id)
    first = await anext(reader)
    assert first.data == b"line 0"  # no newline yet, and the job is still sleeping
    assert time.monotonic() - t0 < 1.5
    await reader.aclose()
    await manager.stop(job.id)


async def test_fifty_concurrent_readers_get_identical_complete_output(
    manager: JobManager,
) -> None:
    job = await manager.start("drip", {"count": 40, "interval": 0.01}, "alice")
    results = await asyncio.gather(*(collect(manager, job.id) for _ in range(50)))
    expected = b"\n".join(b"line %d" % i for i in range(40))
    for chunks in results:
        assert joined(chunks) == expected
    assert len({tuple((c.offset, c.data) for c in chunks) for chunks in results}) == 1


async def test_non_utf8_bytes_and_final_line_without_newline_round_trip(
    manager: JobManager,
) -> None:
    raw = bytes(range(256)) + b"\n\xff\xfe half a line \xc3"
    err = b"\x00stderr\x80 too\n\xe2\x82"
    job = await manager.start("bytes", {"hex": raw.hex(), "err_hex": err.hex()}, "alice")
    chunks = await collect(manager, job.id)
    assert joined(chunks, Stream.STDOUT) == raw
    assert joined(chunks, Stream.STDERR) == err
    assert manager.status(job.id).state is JobState.COMPLETED


async def test_resume_from_an_offset_and_last_lines(manager: JobManager) -> None:
    job = await manager.start("drip", {"count": 10, "interval": 0.0}, "alice")
    chunks = await collect(manager, job.id)
    everything = joined(chunks)
    middle = chunks[len(chunks) // 2]
    resumed = await collect(manager, job.id, from_=middle.offset)
    assert joined(chunks[len(chunks) // 2 :]) == joined(resumed)
    assert joined(await collect(manager, job.id, from_=chunks[-1].next_offset)) == b""

    last3 = joined(await collect(manager, job.id, last=3))
    assert last3 == b"\n".join(everything.split(b"\n")[-3:])
    assert last3 == b"line 7\nline 8\nline 9"
    assert joined(await collect(manager, job.id, last=0)) == b""
    assert joined(await collect(manager, job.id, last=1000)) == everything


async def test_bad_read_requests_are_rejected(manager: JobManager) -> None:
    job = await manager.start("drip", {"count": 2, "interval": 0.0}, "alice")
    await collect(manager, job.id)
    with pytest.raises(NotFound):
        await collect(manager, "ZZZZZZ")
    with pytest.raises(NotFound):
        await collect(manager, "../etc")
    with pytest.raises(InvalidArgument, match="past the end"):
        await collect(manager, job.id, from_=10**9)
    with pytest.raises(InvalidArgument, match="not both"):
        await collect(manager, job.id, from_=0, last=1)
    with pytest.raises(InvalidArgument, match="offset 1 is not where a record starts"):
        await collect(manager, job.id, from_=1)  # not a record boundary


async def test_not_following_returns_what_is_there_now(manager: JobManager) -> None:
    job = await manager.start("drip", {"count": 3, "interval": 0.5}, "alice")
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    now = joined(await collect(manager, job.id, follow=False))
    assert time.monotonic() - t0 < 0.3
    assert now == b"line 0\n"
    await manager.stop(job.id)


async def test_large_output_is_complete_and_in_order(manager: JobManager) -> None:
    size = 20 * 1024 * 1024
    job = await manager.start("spew", {"size": size}, "alice")
    total = 0
    offset = 0
    async for chunk in manager.read_output(job.id):
        assert chunk.offset == offset
        offset = chunk.next_offset
        assert chunk.stream is Stream.STDOUT
        assert len(chunk.data) <= 64 * 1024
        total += len(chunk.data)
    assert manager.status(job.id).state is JobState.COMPLETED
    assert total == size


async def test_job_ids_are_unique_even_when_a_drawn_id_is_taken(
    manager: JobManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared import ids

    first = await manager.start("noop", {}, "alice")
    draws = iter([first.id, first.id, "SECOND"])
    monkeypatch.setattr(ids, "new_job_id", lambda: next(draws))
    second = await manager.start("noop", {}, "alice")
    assert second.id == "SECOND"
    assert {j.id for j in manager.list()} == {first.id, "SECOND"}


async def test_list_is_oldest_first_and_resumes_after_a_job(manager: JobManager) -> None:
    started = [await manager.start("noop", {}, owner) for owner in ("alice", "bob", "alice")]
    everyone = manager.list()
    assert [j.id for j in everyone] == [j.id for j in started]
    assert [j.id for j in manager.list(owner="alice")] == [started[0].id, started[2].id]
    after_first = (everyone[0].created_ns, everyone[0].id)
    assert [j.id for j in manager.list(after=after_first)] == [started[1].id, started[2].id]
    assert [j.id for j in manager.list(owner="alice", after=after_first)] == [started[2].id]
    last = (everyone[-1].created_ns, everyone[-1].id)
    assert manager.list(after=last) == []
