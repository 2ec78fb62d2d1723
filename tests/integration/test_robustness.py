"""The runner under failure: cancelled starts, dying monitors, corrupt files, odd output."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import pytest

from shared.errors import Internal
from shared.model import JobState
from tests.helpers import (
    collect,
    job_workspaces,
    joined,
    namespace_members,
    pid_namespace,
    process_gone,
)
from workernator_runner import launch, linux, store
from workernator_runner import manager as manager_mod
from workernator_runner.manager import JobManager


async def _wait_for(predicate: object, seconds: float = 5.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _drop_start_reports(manager: JobManager) -> None:
    """From now on the runner never hears that a job started: monitors' reports are dropped."""
    launcher = manager._launcher
    assert launcher is not None

    def deaf() -> None:
        message = launcher.sock.recv(launch.MAX_MESSAGE, socket.MSG_PEEK)
        if message[:1] == launch.STARTED:
            launcher.sock.recv(launch.MAX_MESSAGE)
            return
        launcher._on_message()

    loop = asyncio.get_running_loop()
    loop.remove_reader(launcher.sock.fileno())
    loop.add_reader(launcher.sock.fileno(), deaf)


async def test_a_start_that_times_out_leaves_nothing_behind(
    manager: JobManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_mod, "START_TIMEOUT_SECONDS", 1.0)
    _drop_start_reports(manager)
    with pytest.raises(Internal, match="the job did not start within 1 s"):
        await manager.start("drip", {"count": 1, "interval": 60}, "alice")
    assert manager.list() == []
    await _wait_for(lambda: list(manager.config.jobs_dir.iterdir()) == [])
    await _wait_for(lambda: job_workspaces(manager) == [])


async def test_a_cancelled_start_leaves_nothing_behind(manager: JobManager) -> None:
    _drop_start_reports(manager)
    task = asyncio.create_task(manager.start("forker", {"children": 2}, "alice"))
    cfg = manager.config

    def children_started() -> bool:
        dirs = list(cfg.jobs_dir.iterdir())
        return bool(dirs) and joined(list(store.iter_records(dirs[0] / "output"))).count(b"\n") >= 4

    await _wait_for(children_started)
    job_dir = next(cfg.jobs_dir.iterdir())
    state = store.read_state(job_dir)
    assert state is not None
    namespace = pid_namespace(state.job_pid)
    assert len(namespace_members(namespace)) == 6  # init, job, 2 children, 2 grandchildren
    assert job_workspaces(manager) != []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert manager.list() == []
    await _wait_for(lambda: namespace_members(namespace) == [])
    await _wait_for(lambda: process_gone(state.monitor_pid))
    await _wait_for(lambda: list(cfg.jobs_dir.iterdir()) == [])
    await _wait_for(lambda: job_workspaces(manager) == [])


async def test_a_dying_monitor_is_noticed_without_a_stop(manager: JobManager) -> None:
    job = await manager.start("drip", {"count": 1, "interval": 60}, "alice")
    state = store.read_state(manager.config.jobs_dir / job.id)
    assert state is not None
    reader = asyncio.create_task(collect(manager, job.id))
    await asyncio.sleep(0.2)
    namespace = pid_namespace(state.job_pid)
    os.kill(state.monitor_pid, signal.SIGKILL)
    chunks = await asyncio.wait_for(reader, 5)  # the tail ends instead of hanging
    assert joined(chunks) == b"line 0"
    status = manager.status(job.id)
    assert status.state is JobState.FAILED
    assert "monitor ended unexpectedly" in status.error
    await _wait_for(lambda: namespace_members(namespace) == [])
    assert job_workspaces(manager) == []


async def test_killing_a_monitor_kills_every_process_of_its_job(manager: JobManager) -> None:
    job = await manager.start("daemonize", {"seconds": 3600}, "alice")
    await _first_line(manager, job.id)
    state = store.read_state(manager.config.jobs_dir / job.id)
    assert state is not None
    namespace = pid_namespace(state.job_pid)
    assert len(namespace_members(namespace)) == 3  # init, job, and a setsid'd daemon
    os.kill(state.monitor_pid, signal.SIGKILL)
    await _wait_for(lambda: namespace_members(namespace) == [])
    await _wait_for(lambda: manager.status(job.id).state is JobState.FAILED)


async def _first_line(m: JobManager, job_id: str) -> bytes:
    async for chunk in m.read_output(job_id):
        return chunk.data
    raise AssertionError("no output")


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
    assert "state was unreadable" in manager.status(bad.id).error
    await manager.close()  # the unreadable state was replaced: the next start reads it
    await manager.open()
    assert manager.status(bad.id).state is JobState.FAILED
    assert "state was unreadable" in manager.status(bad.id).error


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


async def test_the_sandbox_checks_the_arguments_again(manager: JobManager) -> None:
    """Arguments that reach the launch path without the runner's checks do not run."""
    launcher = manager._launcher
    assert launcher is not None
    (manager.config.jobs_dir / "BADARG").mkdir()
    header = launch.LaunchHeader("BADARG", "fib", 1.0, "")
    with pytest.raises(Internal, match="bad arguments: argument 'position': must be an integer"):
        await launcher.launch(header, {"position": "3"}, 10)
    with pytest.raises(Internal, match="unknown job type 'rm'"):
        await launcher.launch(launch.LaunchHeader("BADARG", "rm", 1.0, ""), {}, 10)
    assert job_workspaces(manager) == []
    assert not (manager.config.jobs_dir / "BADARG" / "output").read_bytes()
