"""A full disk, through the real runner: its jobs directory is a small tmpfs of the test's own.

Below the reserve (``min_free_bytes``, or too few free inodes) a Start is refused with
RESOURCE_EXHAUSTED and a message naming the free space and the reserve, leaving nothing behind;
a running job whose output can no longer be written is stopped and says why in its status;
status and tails keep working meanwhile; and starts resume by themselves once space is freed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import ErrorCode, ResourceExhausted
from shared.model import JobState
from tests.conftest import Daemon, daemon_on_tmpfs_jobs
from tests.nethosts import wait_for
from workernator_api.runner_client import RunnerClient
from workernator_runner import store
from workernator_runner.config import RunnerConfig
from workernator_runner.manager import MIN_FREE_INODES

pytestmark = pytest.mark.privileged

USER = ("alice", "user")
DISK = 2 * 1024 * 1024
RESERVE = 512 * 1024
FILLER = "filler"  # not a job id: the runner leaves it alone


@pytest.fixture
def small_disk(runner_config: RunnerConfig, state_dir: Path) -> Iterator[Daemon]:
    """A runner whose jobs directory is a 2 MiB tmpfs, with a reserve of 512 KiB."""
    cfg = dataclasses.replace(runner_config, min_free_bytes=RESERVE)
    with daemon_on_tmpfs_jobs(cfg, str(DISK), "wn-test-full") as d:
        yield d


def _free(path: Path) -> int:
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


def _fill(jobs: Path, leave: int) -> Path:
    """A file taking all the free space of ``jobs``'s filesystem but ``leave`` bytes."""
    filler = jobs / FILLER
    with filler.open("ab") as f:
        block = b"\0" * 4096
        while _free(jobs) > leave:
            try:
                f.write(block)
                f.flush()
            except OSError:  # full: nothing more fits
                break
    return filler


async def _noop_completes(client: RunnerClient) -> None:
    """A noop job starts and runs to its end (so starts work again)."""
    job = await client.start(*USER, "noop", {})
    async for _ in client.tail(*USER, job.id):
        pass
    assert (await client.status(*USER, job.id)).state is JobState.COMPLETED


def _job_dirs(jobs: Path) -> list[str]:
    return sorted(p.name for p in jobs.iterdir() if p.name != FILLER)


async def test_start_is_refused_below_the_reserve_and_resumes_when_space_is_freed(
    small_disk: Daemon,
) -> None:
    jobs = small_disk.config.jobs_dir
    async with RunnerClient(small_disk.config.socket) as client:
        running = await client.start(*USER, "drip", {"count": 10_000, "interval": 0.2})
        before = _job_dirs(jobs)
        filler = _fill(jobs, RESERVE // 2)
        with pytest.raises(ResourceExhausted) as refused:
            await client.start(*USER, "noop", {})
        assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED
        message = refused.value.message
        assert "free" in message and "below the reserve of 512 KiB" in message, message
        assert "min_free_bytes" in message and str(jobs) in message, message
        assert _job_dirs(jobs) == before  # nothing left of the refused start
        # The runner keeps serving the jobs it has.
        status = await client.status(*USER, running.id)
        assert status.state is JobState.RUNNING
        assert [j.id for j in await client.list_jobs(*USER)] == [running.id]

        filler.unlink()  # space is back: the next start runs, with no restart
        await _noop_completes(client)


async def test_a_running_job_whose_output_cannot_be_written_is_stopped_and_says_why(
    small_disk: Daemon,
) -> None:
    jobs = small_disk.config.jobs_dir
    async with RunnerClient(small_disk.config.socket) as client:
        job = await client.start(*USER, "drip", {"count": 100_000, "interval": 0.01})
        output = jobs / job.id / store.OUTPUT_FILE
        wait_for(lambda: output.stat().st_size > 0, 10, "the job's first output")
        filler = _fill(jobs, 0)  # the disk is full now: the job's next line does not fit
        tailed = b""
        async for batch in client.tail(*USER, job.id):  # the tail ends with the job
            tailed += b"".join(c.data for c in batch)
        status = await client.status(*USER, job.id)
        assert status.state is JobState.FAILED
        assert "output could not be saved after byte" in status.error, status.error
        assert "No space left on device" in status.error, status.error
        assert "so its monitor stopped it" in status.error, status.error
        # What was saved is whole, numbered from 0 with no gap, and the tail had all of it.
        saved = b"".join(c.data for c in store.iter_records(output))
        assert tailed == saved
        lines = saved.decode().splitlines()
        assert lines == [f"line {i}" for i in range(len(lines))]
        recorded = store.read_state(jobs / job.id)  # on disk too, through the monitor's reserve
        assert recorded is not None and recorded.state is JobState.FAILED

        with pytest.raises(ResourceExhausted):  # full: no start
            await client.start(*USER, "noop", {})
        filler.unlink()
        await _noop_completes(client)


@pytest.fixture
def few_inodes(runner_config: RunnerConfig) -> Iterator[Daemon]:
    """A runner whose jobs directory is a tmpfs with room for bytes but few files."""
    cfg = dataclasses.replace(runner_config, min_free_bytes=RESERVE)
    with daemon_on_tmpfs_jobs(cfg, "64m", "wn-test-inodes", inodes=MIN_FREE_INODES + 200) as d:
        yield d


async def test_start_is_refused_out_of_inodes_and_resumes_when_files_are_removed(
    few_inodes: Daemon,
) -> None:
    """Room for bytes but not for files: a start is refused too, naming the inodes."""
    jobs = few_inodes.config.jobs_dir
    async with RunnerClient(few_inodes.config.socket) as client:
        job = await client.start(*USER, "noop", {})  # well above the reserve: it runs
        async for _ in client.tail(*USER, job.id):
            pass
        fillers = jobs / FILLER
        fillers.mkdir()
        count = 0
        while os.statvfs(jobs).f_favail >= MIN_FREE_INODES - 10:
            (fillers / str(count)).touch()
            count += 1
        assert _free(jobs) > RESERVE  # bytes to spare: only the inodes ran out
        before = _job_dirs(jobs)
        with pytest.raises(ResourceExhausted) as refused:
            await client.start(*USER, "noop", {})
        message = refused.value.message
        assert message.startswith("the runner's disk is out of inodes: "), message
        assert f"below the reserve of {MIN_FREE_INODES}" in message, message
        assert str(jobs) in message, message
        assert _job_dirs(jobs) == before  # nothing left of the refused start
        assert (await client.status(*USER, job.id)).state is JobState.COMPLETED

        shutil.rmtree(fillers)  # files removed: the next start runs, with no restart
        await _noop_completes(client)
