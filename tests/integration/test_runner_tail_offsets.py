"""Resuming a tail at a byte position, through the real runner socket and the api's client:
every chunk sent is a record the job's monitor wrote, wherever the position points."""

from __future__ import annotations

import msgpack
import pytest

from shared.errors import InvalidArgument
from shared.model import OutputChunk, Stream
from tests.conftest import Daemon
from workernator_api.runner_client import RunnerClient

USER = ("alice", "user")

# Output that holds whole output records of its own making: read from the right place inside
# the genuine record, the first would be a chunk with a negative timestamp (a frame the api
# refuses, dropping its one connection to the runner and every request on it), the second a
# chunk the job never printed on stderr.
FORGED = msgpack.packb([-1, int(Stream.STDOUT), b"x"]) + msgpack.packb(
    [1, int(Stream.STDERR), b"forged"]
)


async def _chunks(client: RunnerClient, job_id: str, offset: int) -> list[OutputChunk]:
    tail = client.tail(*USER, job_id, follow=False, offset=offset)
    return [chunk async for batch in tail for chunk in batch]


async def test_a_tail_from_inside_a_record_is_refused_and_never_misread(daemon: Daemon) -> None:
    payload = b"first " + FORGED
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "bytes", {"hex": payload.hex()})
        genuine = [c async for batch in client.tail(*USER, job.id) for c in batch]
        assert b"".join(c.data for c in genuine) == payload
        size = (daemon.config.jobs_dir / job.id / "output").stat().st_size
        assert genuine[-1].next_offset == size
        starts = {c.offset: i for i, c in enumerate(genuine)} | {size: len(genuine)}
        refused = 0
        for offset in range(1, size + 1):  # every position in the file, on one connection
            if offset in starts:
                assert await _chunks(client, job.id, offset=offset) == genuine[starts[offset] :]
                continue
            with pytest.raises(InvalidArgument, match=f"offset {offset} is not where a record"):
                await _chunks(client, job.id, offset=offset)
            refused += 1
        assert refused >= len(payload)  # the job's bytes are inside records: all refused
        assert (await client.status(*USER, job.id)).id == job.id  # the connection carries on
