"""Stopping jobs: SIGTERM, grace, then kill the whole process group."""

from __future__ import annotations

import asyncio
import os
import time

from shared.model import JobState
from tests.helpers import collect, job_namespace, joined, namespace_members
from workernator_runner import store
from workernator_runner.manager import JobManager


async def _first_lines(m: JobManager, job_id: str, count: int) -> list[str]:
    lines: list[str] = []
    buf = b""
    async for chunk in m.read_output(job_id):
        buf += chunk.data
        lines = buf.decode().splitlines()
        if len(lines) >= count and buf.endswith(b"\n"):
            break
    return lines


async def test_stop_a_job_that_ignores_sigterm_kills_it_after_the_grace_period(
    manager: JobManager,
) -> None:
    job = await manager.start("stubborn", {}, "alice")
    await _first_lines(manager, job.id, 1)  # it has set SIG_IGN by now
    namespace = job_namespace(manager, job.id)
    assert len(namespace_members(namespace)) == 2  # its init and itself
    t0 = time.monotonic()
    stopped = await manager.stop(job.id)
    took = time.monotonic() - t0
    assert stopped.state is JobState.STOPPED
    assert stopped.signal == 9  # SIGTERM was ignored; the kill after the grace period did it
    assert manager.config.stop_grace_seconds <= took < manager.config.stop_grace_seconds + 2
    assert namespace_members(namespace) == []


async def test_stop_kills_children_and_grandchildren(manager: JobManager) -> None:
    job = await manager.start("forker", {"children": 3}, "alice")
    await _first_lines(manager, job.id, 6)
    namespace = job_namespace(manager, job.id)
    assert len(namespace_members(namespace)) == 8  # init, the job, 3 children, 3 grandchildren
    stopped = await manager.stop(job.id)
    assert stopped.state is JobState.STOPPED
    assert stopped.signal == 15
    assert namespace_members(namespace) == []  # grandchildren ignoring SIGTERM were killed too


async def test_leftover_children_die_when_the_main_process_ends(manager: JobManager) -> None:
    job = await manager.start("forker", {"children": 2, "seconds": 0.5}, "alice")
    namespace = job_namespace(manager, job.id)
    out = joined(await collect(manager, job.id))
    assert len(out.decode().splitlines()) == 4
    status = manager.status(job.id)
    assert status.state is JobState.COMPLETED
    # Recorded as ended only once every process of it is gone: no waiting here.
    assert namespace_members(namespace) == []


async def test_daemons_that_escaped_the_session_die_with_the_job(manager: JobManager) -> None:
    job = await manager.start("daemonize", {"seconds": 0.5}, "alice")
    namespace = job_namespace(manager, job.id)
    lines = await _first_lines(manager, job.id, 1)
    assert lines[0].startswith("daemon ")  # a double-forked, setsid'd process ignoring SIGTERM
    assert len(namespace_members(namespace)) == 3
    out = joined(await collect(manager, job.id))
    assert out.startswith(b"daemon ")
    assert manager.status(job.id).state is JobState.COMPLETED
    assert namespace_members(namespace) == []


async def test_stop_kills_daemons_that_escaped_the_session(manager: JobManager) -> None:
    job = await manager.start("daemonize", {"seconds": 3600}, "alice")
    namespace = job_namespace(manager, job.id)
    await _first_lines(manager, job.id, 1)
    state = store.read_state(manager.config.jobs_dir / job.id)
    assert state is not None and manager.cgroups is not None
    cgroup = manager.cgroups.job(state.cgroup)
    assert len(cgroup.pids()) == 3  # init, job, daemon
    stopped = await manager.stop(job.id)
    assert stopped.state is JobState.STOPPED
    assert stopped.signal == 15  # the main process took the SIGTERM; the daemon ignored it
    assert namespace_members(namespace) == []
    assert not any(map(_exists, cgroup.dirs.values()))  # gone with it


async def test_stop_twice_and_stop_of_a_finished_job_are_not_errors(
    manager: JobManager,
) -> None:
    job = await manager.start("drip", {"count": 1, "interval": 60}, "alice")
    first = await manager.stop(job.id)
    second = await manager.stop(job.id)
    assert first == second
    assert first.state is JobState.STOPPED

    done = await manager.start("noop", {}, "alice")
    await collect(manager, done.id)
    assert (await manager.stop(done.id)).state is JobState.COMPLETED


async def test_concurrent_stops_all_return_the_final_status(manager: JobManager) -> None:
    job = await manager.start("stubborn", {}, "alice")
    await _first_lines(manager, job.id, 1)
    results = await asyncio.gather(*(manager.stop(job.id) for _ in range(5)))
    assert all(r.state is JobState.STOPPED for r in results)
    assert len({r.ended_ns for r in results}) == 1


async def test_readers_end_when_the_job_is_stopped(manager: JobManager) -> None:
    job = await manager.start("drip", {"count": 1, "interval": 60}, "alice")
    readers = [asyncio.create_task(collect(manager, job.id)) for _ in range(5)]
    await asyncio.sleep(0.2)
    await manager.stop(job.id)
    results = await asyncio.wait_for(asyncio.gather(*readers), 5)
    assert all(joined(r) == b"line 0" for r in results)


async def test_a_lost_job_is_failed_without_killing_a_process_that_reused_its_pid(
    manager: JobManager,
) -> None:
    import json
    import subprocess

    from workernator_runner import linux, store

    job = await manager.start("drip", {"count": 1, "interval": 60}, "alice")
    await manager.stop(job.id)
    # Pretend an earlier runner's monitor died while the job ran, and the job's pid now
    # belongs to an unrelated process (here: a sleep of ours in its own process group).
    bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)  # noqa: ASYNC220
    try:
        state_file = manager.config.jobs_dir / job.id / store.STATE_FILE
        state = json.loads(state_file.read_text())
        state.update(
            state="RUNNING",
            ended_ns=None,
            job_pid=bystander.pid,
            job_start=linux.process_start_time(bystander.pid) - 1,  # not the same process
            monitor_pid=bystander.pid,
            monitor_start=1,
        )
        state_file.write_text(json.dumps(state))
        await manager.close()
        # A job that ran when its runner stopped is not in the index of ended jobs.
        (manager.config.state_dir / store.INDEX_FILE).unlink()
        await manager.open()  # a new runner finds the job and its monitor gone
        lost = manager.status(job.id)
        assert lost.state is JobState.FAILED
        assert "monitor ended unexpectedly" in lost.error
        assert bystander.poll() is None  # still alive
    finally:
        bystander.kill()
        bystander.wait()


def _exists(path: str) -> bool:
    return os.path.exists(path)
