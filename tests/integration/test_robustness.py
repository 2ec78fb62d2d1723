"""The runner under failure: cancelled starts, dying monitors, corrupt files, odd output."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from shared.model import JobState
from tests.helpers import alive_pids, collect, joined, process_gone
from workernator_runner import linux, store
from workernator_runner import manager as manager_mod
from workernator_runner.manager import JobManager


async def _wait_for(predicate: object, seconds: float = 5.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_cancelled_start_leaves_nothing_behind(
    manager: JobManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(fd: int) -> bytes:  # the runner never hears back from the monitor
        try:
            await asyncio.Event().wait()
        finally:
            os.close(fd)
        return b""

    monkeypatch.setattr(manager_mod, "_read_pipe", never)
    task = asyncio.create_task(manager.start("forker", {"children": 2}, "alice"))
    jobs_dir = manager.config.jobs_dir

    def children_started() -> bool:
        dirs = list(jobs_dir.iterdir())
        return bool(dirs) and joined(list(store.iter_records(dirs[0] / "output"))).count(b"\n") >= 4

    await _wait_for(children_started)
    job_dir = next(jobs_dir.iterdir())
    state = store.read_state(job_dir)
    assert state is not None
    out = joined(list(store.iter_records(job_dir / "output"))).decode()
    pids = [state.job_pid, state.monitor_pid] + [int(line.split()[1]) for line in out.splitlines()]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(jobs_dir.iterdir()) == []
    assert manager.list() == []
    await _wait_for(lambda: alive_pids(pids) == [])


async def test_a_dying_monitor_is_noticed_without_a_stop(manager: JobManager) -> None:
    job = await manager.start("drip", {"count": 1, "interval": 60}, "alice")
    state = store.read_state(manager.config.jobs_dir / job.id)
    assert state is not None
    reader = asyncio.create_task(collect(manager, job.id))
    await asyncio.sleep(0.2)
    os.kill(state.monitor_pid, signal.SIGKILL)
    chunks = await asyncio.wait_for(reader, 5)  # the tail ends instead of hanging
    assert joined(chunks) == b"line 0"
    status = manager.status(job.id)
    assert status.state is JobState.FAILED
    assert "monitor ended unexpectedly" in status.error
    await _wait_for(lambda: process_gone(state.job_pid))


async def test_a_corrupt_state_file_does_not_stop_the_runner(manager: JobManager) -> None:
    good = await manager.start("noop", {}, "alice")
    bad = await manager.start("noop", {}, "alice")
    await collect(manager, good.id)
    await collect(manager, bad.id)
    (manager.config.jobs_dir / bad.id / store.STATE_FILE).write_text('{"state": "COMPL')
    await manager.close()
    await manager.open()
    assert manager.status(good.id).state is JobState.COMPLETED
    assert manager.status(bad.id).state is JobState.FAILED
    assert "state was lost" in manager.status(bad.id).error


async def test_last_lines_counts_lines_not_record_pieces(manager: JobManager) -> None:
    job = await manager.start("pieces", {"text": "first\n|second |half\n", "interval": 0.2}, "x")
    chunks = await collect(manager, job.id)
    assert [c.data for c in chunks] == [b"first\n", b"second ", b"half\n"]  # three records
    assert joined(await collect(manager, job.id, last=1)) == b"second half\n"
    assert joined(await collect(manager, job.id, last=2)) == b"first\nsecond half\n"


async def test_last_lines_of_output_without_newlines(manager: JobManager) -> None:
    blob = os.urandom(2000).replace(b"\n", b"x")
    job = await manager.start("bytes", {"hex": blob.hex()}, "alice")
    await collect(manager, job.id)
    assert joined(await collect(manager, job.id, last=1)) == blob
    assert joined(await collect(manager, job.id, last=0)) == b""


async def test_state_files_are_json_whole(manager: JobManager) -> None:
    job = await manager.start("noop", {}, "alice")
    await collect(manager, job.id)
    data = json.loads((manager.config.jobs_dir / job.id / store.STATE_FILE).read_text())
    assert data["state"] == "COMPLETED"
    assert data["boot_id"] == linux.boot_id()
