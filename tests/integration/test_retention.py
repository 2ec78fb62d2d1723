"""Retention, ``delete`` and the per-job output cap, through the real job manager: jobs that
really ran in their sandboxes, and what is left of them on disk."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from shared.errors import FailedPrecondition, NotFound
from shared.model import JobState, JobStatus, Stream
from tests.conftest import Daemon, manager_with
from tests.helpers import collect, joined, run_job
from workernator_api.runner_client import RunnerClient
from workernator_runner import store
from workernator_runner.config import Retention, RunnerConfig
from workernator_runner.manager import JobManager

pytestmark = pytest.mark.privileged


async def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def on_disk(cfg: RunnerConfig) -> set[str]:
    """The job directories (no index here). Retention renames a job's directory to
    ``.deleting-ID`` at once and removes its files in a worker thread: such a job is gone (the
    manager's close waits for the files; the tests look at what is left then too)."""
    return {p.name for p in cfg.jobs_dir.iterdir() if not p.name.startswith(".")}


def gone(m: JobManager, job_id: str) -> bool:
    try:
        m.status(job_id)
    except NotFound:
        return True
    return False


async def noop(m: JobManager) -> JobStatus:
    status, _, _ = await run_job(m, "noop")
    assert status.state is JobState.COMPLETED
    return status


async def test_retention_deletes_the_jobs_that_ended_first_never_a_running_one(
    runner_config: RunnerConfig,
) -> None:
    async with manager_with(runner_config, retention=Retention(max_jobs=3)) as m:
        running = await m.start("drip", {"count": 10_000, "interval": 0.1}, "alice")
        done = [(await noop(m)).id for _ in range(5)]
        kept = [j.id for j in m.list()]
        assert kept == [running.id, *done[2:]]  # the first two to end went
        assert on_disk(runner_config) == set(kept)
        assert m.status(running.id).state is JobState.RUNNING
        for job_id in done[:2]:
            with pytest.raises(NotFound):
                m.status(job_id)
            assert not (runner_config.workspaces_dir / job_id).exists()
    assert being_deleted(runner_config) == []  # the close waited for the files to go


def being_deleted(cfg: RunnerConfig) -> list[str]:
    return [p.name for p in cfg.jobs_dir.iterdir() if p.name.startswith(".deleting-")]


async def test_retention_applies_at_start_to_what_an_earlier_runner_kept(
    runner_config: RunnerConfig,
) -> None:
    async with manager_with(runner_config) as m:
        done = [(await noop(m)).id for _ in range(4)]
    async with manager_with(runner_config, retention=Retention(max_jobs=2)) as m:
        assert [j.id for j in m.list()] == done[2:]
        assert on_disk(runner_config) == set(done[2:])
    assert being_deleted(runner_config) == []


async def test_a_finished_job_expires_by_age_on_a_timer(runner_config: RunnerConfig) -> None:
    """No job ends after it: only the timer set for its expiry can delete it."""
    async with manager_with(runner_config, retention=Retention(max_age_seconds=1.0)) as m:
        job = await noop(m)
        assert job.id in on_disk(runner_config)
        await wait_for(lambda: gone(m, job.id), 10.0)
        assert job.ended_ns is not None
        assert time.time_ns() - job.ended_ns >= 1_000_000_000
        assert job.id not in on_disk(runner_config)


async def test_retention_bounds_the_output_of_all_finished_jobs(
    runner_config: RunnerConfig,
) -> None:
    retention = Retention(max_output_bytes=250_000)
    async with manager_with(runner_config, retention=retention) as m:
        ids = []
        for _ in range(4):
            status, out, _ = await run_job(m, "spew", {"size": 100_000})
            assert len(out) == 100_000
            ids.append(status.id)
        # about 100 kB of records each: two fit in 250 kB, three do not
        assert [j.id for j in m.list()] == ids[2:]
        assert on_disk(runner_config) == set(ids[2:])


async def test_delete_refuses_a_running_job_and_removes_a_finished_one(
    runner_config: RunnerConfig,
) -> None:
    async with manager_with(runner_config) as m:
        running = await m.start("drip", {"count": 10_000, "interval": 0.1}, "alice")
        with pytest.raises(FailedPrecondition, match=f"job {running.id} is still running"):
            m.delete(running.id)
        assert m.status(running.id).state is JobState.RUNNING
        assert (runner_config.jobs_dir / running.id / "output").exists()
        await m.stop(running.id)
        deleted = m.delete(running.id)
        assert deleted.state is JobState.STOPPED
        assert not (runner_config.jobs_dir / running.id).exists()
        assert not (runner_config.workspaces_dir / running.id).exists()
        assert on_disk(runner_config) == set()
        with pytest.raises(NotFound):
            m.status(running.id)
        with pytest.raises(NotFound):
            m.delete(running.id)
    async with manager_with(runner_config) as m:  # and it stays deleted
        assert m.list() == []


async def test_a_job_that_prints_without_end_is_stopped_at_the_output_cap(
    runner_config: RunnerConfig,
) -> None:
    cap = 256 * 1024
    async with manager_with(runner_config, max_job_output=cap) as m:
        started = time.monotonic()
        job = await m.start("spew", {"size": 1 << 40}, "alice")  # a terabyte: without end
        chunks = await collect(m, job.id)
        status = m.status(job.id)
        assert time.monotonic() - started < 30
        assert status.state is JobState.FAILED
        assert "its output reached the limit of 256 KiB (max_job_output)" in status.error
        assert "stopped" in status.failure_reason
        size = (runner_config.jobs_dir / job.id / "output").stat().st_size
        assert size <= cap + 1024  # the job's output up to the cap, and the line saying so
        assert len(joined(chunks)) > cap - 70 * 1024  # all but the record that did not fit
        last = chunks[-1]
        assert last.stream is Stream.STDERR
        assert last.data.startswith(b"[workernator] its output reached the limit of 256 KiB")


async def test_delete_over_the_runner_socket(daemon: Daemon) -> None:
    """What the api sends: refused while the job runs, done once it has ended."""
    cfg = daemon.config
    async with RunnerClient(cfg.socket) as client:
        job = await client.start("alice", "user", "drip", {"count": 10_000, "interval": 0.1})
        try:
            with pytest.raises(FailedPrecondition, match="stop it first, then delete it"):
                await client.delete("root", "admin", job.id)
            assert (await client.status("root", "admin", job.id)).state is JobState.RUNNING
        finally:
            await client.stop("root", "admin", job.id)
        deleted = await client.delete("root", "admin", job.id)
        assert deleted.id == job.id and deleted.state is JobState.STOPPED
        assert not (cfg.jobs_dir / job.id).exists()
        with pytest.raises(NotFound):
            await client.delete("root", "admin", job.id)
        with pytest.raises(NotFound):
            await client.status("root", "admin", job.id)
    daemon.stop()
    daemon.start()  # nothing of it comes back
    async with RunnerClient(cfg.socket) as client:
        assert [j.id for j in await client.list_jobs("root", "admin")] == []


async def test_the_index_of_ended_jobs_is_only_a_cache_of_their_directories(
    runner_config: RunnerConfig,
) -> None:
    """A missing index, a line a crash cut short, an entry for a directory that is gone, a
    deletion a crash interrupted: a restart lists exactly the jobs on disk."""
    index = runner_config.state_dir / store.INDEX_FILE
    async with manager_with(runner_config) as m:
        done = [(await noop(m)).id for _ in range(3)]
    assert [e.id for e in store.read_index(runner_config.state_dir).values()] == done

    index.unlink()
    async with manager_with(runner_config) as m:
        assert [j.id for j in m.list()] == done
    assert index.exists()

    with index.open("ab") as f:
        f.write(b'["E", "ZZZZZZ", 1, 2, "mallory", 3')  # cut short: no end, no newline
    (runner_config.jobs_dir / done[0]).rename(runner_config.jobs_dir / f".deleting-{done[0]}")
    async with manager_with(runner_config) as m:
        assert [j.id for j in m.list()] == done[1:]
        with pytest.raises(NotFound):
            m.status(done[0])
        assert (await noop(m)).id in {j.id for j in m.list()}
    assert on_disk(runner_config) == set(store.read_index(runner_config.state_dir))
    assert not any(p.name.startswith(".") for p in runner_config.jobs_dir.iterdir())
