"""Per-job cgroup limits, measured: throttled, killed, refused; never read back the value.

These run on whatever this host has: cgroup v1 with the v2 membership mount here (hybrid), v2
with controllers in the system-test VM. One test forces the v1 way of killing (the freezer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from shared.errors import FailedPrecondition, InvalidArgument
from shared.model import JobState, ResourceLimits
from tests.helpers import collect, job_namespace, joined, namespace_members, run_job
from workernator_runner import cgroups, store
from workernator_runner.config import RunnerConfig
from workernator_runner.limits import Policy
from workernator_runner.manager import JobManager

MiB = 1 << 20


def _procs(cgroup: str) -> set[int]:
    with open(f"{cgroup}/cgroup.procs") as f:
        return {int(pid) for pid in f.read().split()}


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _mount_tmpfs(path: Path) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "none", str(path)], check=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True)


def _cgroup_dirs(m: JobManager, job_id: str) -> list[str]:
    state = store.read_state(m.config.jobs_dir / job_id)
    assert state is not None and state.cgroup
    assert m.cgroups is not None
    return list(m.cgroups.job(state.cgroup).dirs.values())


async def test_a_job_runs_in_its_own_cgroup_in_every_hierarchy(manager: JobManager) -> None:
    job = await manager.start("drip", {"count": 1, "interval": 60}, "alice")
    try:
        dirs = _cgroup_dirs(manager, job.id)
        namespace = job_namespace(manager, job.id)
        members = namespace_members(namespace)
        for path in dirs:
            assert _procs(path) == set(members), path  # its init and its process, only
    finally:
        await manager.stop(job.id)
    assert not any(map(_exists, dirs))  # removed with the job


async def test_cpu_is_throttled_to_the_limit(manager: JobManager) -> None:
    """A job limited to 20% of a core needs at least five times its CPU time in wall time, and
    never gets more than its quota in any stretch of time, read while it runs. (Bounds that a
    busy host cannot break: load only makes a job slower.)"""
    cpu = 0.4
    limit = ResourceLimits(cpu_millis=200)
    job = await manager.start("spin", {"cpu_seconds": cpu}, "alice", limit)
    started = time.monotonic()
    await asyncio.sleep(1.0)
    midway = manager.status(job.id)  # a running job's usage, read now
    elapsed = time.monotonic() - started
    assert midway.state is JobState.RUNNING
    # At most 20 ms of each 100 ms period, plus one period's quota of slack.
    assert 0 < midway.usage.cpu_ns / 1e9 <= 0.2 * elapsed + 0.03, (midway.usage, elapsed)
    out = joined(await collect(manager, job.id))
    status = manager.status(job.id)
    assert status.state is JobState.COMPLETED and status.limits.cpu_millis == 200
    wall = json.loads(out.splitlines()[1])["wall"]
    assert wall >= 0.9 * cpu / 0.2, f"{cpu} s of CPU took {wall:.2f} s at 20% of a core"
    assert status.usage.cpu_ns / 1e9 >= cpu  # the cgroup's own count saw it all
    # Unthrottled, the same work is not stretched that way (on an idle core about 0.4 s).
    free = ResourceLimits(cpu_millis=1000)
    status, out, _ = await run_job(manager, "spin", {"cpu_seconds": cpu}, limits=free)
    assert status.state is JobState.COMPLETED
    assert json.loads(out.splitlines()[1])["wall"] < wall


async def test_a_job_over_its_memory_limit_is_killed_and_says_so(manager: JobManager) -> None:
    bystander = await manager.start("drip", {"count": 2, "interval": 1}, "bob")
    status, out, _ = await run_job(
        manager, "hog", {"megabytes": 256}, limits=ResourceLimits(memory_bytes=64 * MiB)
    )
    assert status.state is JobState.FAILED
    assert status.oom_killed
    assert "out of memory (its limit is 64 MiB)" in status.error
    assert b"allocated all" not in out
    assert 32 * MiB <= status.usage.peak_memory_bytes <= 64 * MiB
    # The runner and other jobs go on.
    assert joined(await collect(manager, bystander.id)) == b"line 0\nline 1"
    assert manager.status(bystander.id).state is JobState.COMPLETED
    status, _, _ = await run_job(manager, "hog", {"megabytes": 16})
    assert status.state is JobState.COMPLETED and not status.oom_killed


async def test_a_fork_bomb_stops_at_the_process_limit(manager: JobManager) -> None:
    bomb = await manager.start(
        "forkbomb", {"most": 10_000, "seconds": 30}, "alice", ResourceLimits(pids=16)
    )
    try:
        first = b""
        async for chunk in manager.read_output(bomb.id):
            first += chunk.data
            if first.endswith(b"\n"):
                break
        report = json.loads(first)
        assert report["error"] == "EAGAIN"
        assert report["children"] <= 16 - 2  # the init and the bomb itself count too
        # Meanwhile the host starts other jobs.
        status, out, _ = await run_job(manager, "fib", {"position": 10})
        assert status.state is JobState.COMPLETED and b"[RESULT] 34\n" in out
    finally:
        stopped = await manager.stop(bomb.id)
    assert stopped.state is JobState.STOPPED


@pytest.mark.parametrize("direct", [1, 0], ids=["O_DIRECT", "buffered+fsync"])
async def test_disk_writes_are_throttled_to_the_limit(manager: JobManager, direct: int) -> None:
    assert manager.cgroups is not None
    if not manager.cgroups.io_devices:
        pytest.fail(f"no IO limits here: {manager.cgroups.io_problem}")
    megabytes = 10
    limited = ResourceLimits(io_write_bps=5 * MiB)
    status, out, _ = await run_job(
        manager, "write", {"megabytes": megabytes, "direct": direct}, limits=limited
    )
    assert status.state is JobState.COMPLETED, status.error
    took = json.loads(out)["seconds"]
    assert took >= 0.8 * (megabytes - 5) / 5  # the first 5 MB may go at once (a burst)
    status, out, _ = await run_job(manager, "write", {"megabytes": megabytes, "direct": direct})
    assert status.state is JobState.COMPLETED, status.error
    assert json.loads(out)["seconds"] < took / 3


async def test_limits_over_the_maximum_or_under_the_minimum_are_refused(
    runner_config: RunnerConfig,
) -> None:
    policy = Policy(
        defaults=ResourceLimits(cpu_millis=500, memory_bytes=128 * MiB, pids=64),
        maxima=ResourceLimits(cpu_millis=1000, memory_bytes=256 * MiB, pids=128),
    )
    config = dataclasses.replace(runner_config, limits=policy)
    async with JobManager(config) as m:
        with pytest.raises(
            InvalidArgument,
            match=r"limit 'memory': 512 MiB is over the runner's maximum of 256 MiB",
        ):
            await m.start("noop", {}, "alice", ResourceLimits(memory_bytes=512 * MiB))
        with pytest.raises(InvalidArgument, match=r"limit 'cpu': 2 CPU is over"):
            await m.start("noop", {}, "alice", ResourceLimits(cpu_millis=2000))
        with pytest.raises(InvalidArgument, match=r"limit 'pids': 4 is under the minimum of 8"):
            await m.start("noop", {}, "alice", ResourceLimits(pids=4))
        assert m.list() == []
        status, _, _ = await run_job(m, "noop", {})  # what it gets without asking: the defaults
        assert status.limits == ResourceLimits(cpu_millis=500, memory_bytes=128 * MiB, pids=64)


async def test_io_limits_without_a_disk_are_refused_clearly(
    runner_config: RunnerConfig, tmp_path: Path
) -> None:
    """Workspaces on tmpfs: no block device, so IO limits cannot apply, and the runner says so
    instead of pretending."""
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    _mount_tmpfs(tmpfs)
    try:
        # A 16 MiB disk: below the default reserve, which is not what this test is about.
        config = dataclasses.replace(runner_config, state_dir=tmpfs / "state", min_free_bytes=0)
        async with JobManager(config) as m:
            assert m.cgroups is not None and m.cgroups.io_devices == ()
            with pytest.raises(FailedPrecondition, match=r"IO limits cannot apply: .*tmpfs"):
                await m.start("noop", {}, "alice", ResourceLimits(io_write_bps=MiB))
            status, _, _ = await run_job(m, "noop", {})  # other limits still apply
            assert status.state is JobState.COMPLETED
    finally:
        _umount(tmpfs)


async def test_the_freezer_kills_everything_on_a_v1_host(runner_config: RunnerConfig) -> None:
    """Without cgroup.kill (cgroup v1 only), a stop's kill goes through the freezer."""
    async with JobManager(runner_config, use_freezer=True) as m:
        assert m.cgroups is not None and m.cgroups.version == "v1"
        assert "freezer" in m.cgroups.jobs
        job = await m.start("daemonize", {"seconds": 3600}, "alice")
        namespace = job_namespace(m, job.id)
        async for _ in m.read_output(job.id):
            break
        dirs = _cgroup_dirs(m, job.id)
        cgroup = m.cgroups.job(Path(dirs[0]).name)
        t0 = time.monotonic()
        cgroup.kill()  # what a stop does after the grace period
        assert cgroup.wait_empty(5)
        assert time.monotonic() - t0 < 5
        # A process leaves its cgroup a moment before it is a zombie (cgroup_exit comes before
        # exit_notify in the kernel's do_exit), so the namespace is looked at once the job is
        # recorded as ended: the monitor records that only when every process of it is gone.
        await collect(m, job.id)
        assert namespace_members(namespace) == []
        assert m.status(job.id).signal == 9
        assert not any(map(_exists, dirs))


async def test_no_cgroup_is_left_after_jobs(manager: JobManager) -> None:
    assert manager.cgroups is not None
    used: list[str] = []  # every directory of every cgroup this test's jobs ran in
    for _ in range(10):
        job = await manager.start("drip", {"count": 1, "interval": 60}, "alice")
        used += _cgroup_dirs(manager, job.id)
        await manager.stop(job.id)
        status, _, _ = await run_job(manager, "noop", {})
        used += _cgroup_dirs(manager, status.id)
        assert status.state is JobState.COMPLETED

    def nothing_left() -> bool:
        # None of the jobs' cgroups, and no cgroup of a sandbox whose monitor is gone (another
        # runner on this host, a developer's, may have live ones of its own).
        assert manager.cgroups is not None
        dead = [
            n
            for n in manager.cgroups.names()
            if not os.path.exists(f"/proc/{n.removeprefix(cgroups.NAME_PREFIX)}")
        ]
        return not dead and not any(map(_exists, used))

    deadline = time.monotonic() + 10
    while not nothing_left():
        assert time.monotonic() < deadline, (manager.cgroups.names(), list(filter(_exists, used)))
        await asyncio.sleep(0.05)
