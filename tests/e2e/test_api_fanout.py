"""Many tails of one job through the real api (fanout.py): identical complete output, bounded
memory, and a slow client that holds back nobody but itself."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from shared.model import Stream
from tests.e2e.conftest import Stack, channel
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api._proto.workernator.v1 import workernator_pb2_grpc as pb_grpc
from workernator_runner import store

LINE = b"0123456789" * 10 + b"\n"
RECORD = LINE * (64 * 1024 // len(LINE))  # a full record, as a monitor writes them


async def big_job(stack: Stack, megabytes: int) -> tuple[str, bytes]:
    """A finished job of alice's whose output is ``megabytes`` of lines, and that output.

    The api offers no job type that prints megabytes, so this is a noop job whose output file
    gets the records its monitor would have written, as root, once it has ended.
    """
    async with channel(stack, "alice") as ch:
        stub: Any = pb_grpc.JobServiceStub(ch)  # type: ignore[no-untyped-call]
        job = (await stub.StartJob(pb.StartJobRequest())).job
        deadline = time.monotonic() + 30
        while job.state == pb.JOB_STATE_RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            job = (await stub.GetJobStatus(pb.GetJobStatusRequest(job_id=job.id))).job
    assert job.state == pb.JOB_STATE_COMPLETED
    count = megabytes * 1024 * 1024 // len(RECORD)
    with (stack.tmp / "state" / "jobs" / job.id / "output").open("ab") as f:
        for _ in range(count):
            f.write(store.encode_record(time.time_ns(), Stream.STDOUT, RECORD))
    return job.id, RECORD * count


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def read_all(stream: AsyncIterator[pb.TailJobOutputResponse]) -> bytes:
    out = bytearray()
    async for response in stream:
        for chunk in response.chunks:
            out += chunk.data
    return bytes(out)


async def settled_rss(pid: int, near: float, seconds: float = 15.0) -> float:
    """The RSS of ``pid`` once it is within 32 MiB of ``near``, or after ``seconds``."""
    deadline = time.monotonic() + seconds
    rss = rss_mib(pid)
    while rss - near > 32 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        rss = rss_mib(pid)
    return rss


async def test_100_concurrent_tails_get_identical_complete_output_in_bounded_memory(
    stack: Stack,
) -> None:
    job_id, expected = await big_job(stack, 16)
    users = ("alice", "admin", "carol")  # the owner, an admin, a viewer: all may read it
    channels = [channel(stack, users[i % 3]) for i in range(10)]
    async with contextlib.AsyncExitStack() as exits:
        for ch in channels:
            await exits.enter_async_context(ch)
        stubs: list[Any] = [pb_grpc.JobServiceStub(ch) for ch in channels]  # type: ignore[no-untyped-call]
        request = pb.TailJobOutputRequest(job_id=job_id, follow=True)
        assert await read_all(stubs[0].TailJobOutput(request)) == expected  # warms the api up
        idle = await settled_rss(stack.api.pid, near=0, seconds=2)  # after its trim, if any

        peak = idle
        done = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mib(stack.api.pid))
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        outputs = await asyncio.gather(
            *(read_all(stubs[i % 10].TailJobOutput(request)) for i in range(100))
        )
        done.set()
        await watcher

    assert all(output == expected for output in outputs)
    # 1.6 GB sent, and the api holds none of it for long: what it grows by is grpc's buffers for
    # 100 streams (up to the flow-control windows the client grants), 30-135 MiB in 40 runs on
    # a loaded 2-core machine, whatever the output's size. Before the fan-out, 100 tails of a
    # 20 MB job grew it by 230 MiB, and it stayed there (bench/api_bench.py).
    assert peak - idle < 192, f"the api grew from {idle:.0f} to {peak:.0f} MiB"
    after = await settled_rss(stack.api.pid, near=idle)
    assert after - idle <= 32, (
        f"the api stayed at {after:.0f} MiB after the tails (idle {idle:.0f})"
    )


async def test_a_slow_tail_does_not_stall_a_fast_one_of_the_same_job(stack: Stack) -> None:
    job_id, expected = await big_job(stack, 16)
    request = pb.TailJobOutputRequest(job_id=job_id, follow=True)
    # The slow client's stream window stays at 64 KiB: once it stops reading, the api's writes
    # to it stop at once (grpc would otherwise grow the window to megabytes).
    slow_channel = channel(stack, "alice", options=[("grpc.http2.bdp_probe", 0)])
    async with slow_channel, channel(stack, "admin") as fast_channel:
        slow_stub: Any = pb_grpc.JobServiceStub(slow_channel)  # type: ignore[no-untyped-call]
        fast_stub: Any = pb_grpc.JobServiceStub(fast_channel)  # type: ignore[no-untyped-call]
        slow = slow_stub.TailJobOutput(request)
        first = await slow.read()  # then it reads nothing more for now
        fast = await asyncio.wait_for(read_all(fast_stub.TailJobOutput(request)), timeout=120)
        assert fast == expected  # 16 MiB, four times what a shared feed reads ahead of a tail
        assert not slow.done()

        got = bytearray(b"".join(chunk.data for chunk in first.chunks))
        async with asyncio.timeout(120):
            while (response := await slow.read()) is not grpc.aio.EOF:
                got += b"".join(chunk.data for chunk in response.chunks)
        assert got == expected  # it went on, on a stream of its own, losing nothing
