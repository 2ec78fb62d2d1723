"""What running many jobs leaves behind: nothing, and a runner that sleeps when idle."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.model import JobState
from tests.conftest import Daemon
from tests.helpers import job_workspaces
from tests.nethosts import EgressLab, wait_for
from workernator_api.runner_client import RunnerClient
from workernator_runner import cgroups
from workernator_runner.manager import JobManager

USER = ("alice", "user")


@dataclass(frozen=True)
class Footprint:
    """What the host has that jobs could leave behind."""

    host_mounts: int  # this (the host's) mount namespace
    launcher_mounts: int  # the launcher's mount namespace, where sandboxes are made
    net_namespaces: int
    job_veths: tuple[str, ...]
    nft_rules: int  # in the runner's table
    launcher_descendants: int  # the spare sandboxes' processes, once they are all ready
    open_fds: int  # of the runner (this test process)
    workspaces: tuple[str, ...]
    cgroups: int  # the spare sandboxes' only, once they are all ready


def _descendants(pid: int) -> list[int]:
    found = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except FileNotFoundError:  # it has just exited
            continue
        for task in tasks:
            try:
                with open(task / "children") as f:
                    children = [int(c) for c in f.read().split()]
            except FileNotFoundError:
                continue
            found.extend(children)
            todo.extend(children)
    return found


def _net_namespaces(pids: list[int]) -> int:
    names = set()
    for pid in pids:
        try:
            names.add(os.readlink(f"/proc/{pid}/ns/net"))
        except OSError:
            continue
    return len(names)


def _cgroups(m: JobManager, ours: set[int]) -> int:
    """Sandbox cgroups of this runner's processes, and of processes that are gone (leaked by
    anyone). Another runner on this host (a developer's) has live ones of its own."""
    if m.cgroups is None:
        return -1
    pids = [int(n.removeprefix(cgroups.NAME_PREFIX)) for n in m.cgroups.names()]
    return sum(1 for pid in pids if pid in ours or not os.path.exists(f"/proc/{pid}"))


def footprint(m: JobManager, lab: EgressLab) -> Footprint:
    launcher = m._launcher
    assert launcher is not None
    rules = subprocess.run(
        ["nft", "list", "table", "inet", f"workernator_{lab.bridge}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # This runner's processes: the launcher and everything it forked (spares, monitors, jobs).
    descendants = [launcher.process.pid, *_descendants(launcher.process.pid)]
    return Footprint(
        host_mounts=len(Path("/proc/self/mountinfo").read_text().splitlines()),
        launcher_mounts=len(
            Path(f"/proc/{launcher.process.pid}/mountinfo").read_text().splitlines()
        ),
        net_namespaces=_net_namespaces([os.getpid(), *descendants]),
        job_veths=tuple(lab.job_veths()),
        nft_rules=sum(1 for line in rules.splitlines() if "drop" in line or "accept" in line),
        launcher_descendants=len(descendants),
        open_fds=len(os.listdir("/proc/self/fd")),
        workspaces=tuple(job_workspaces(m)),
        cgroups=_cgroups(m, set(descendants)),
    )


@pytest.mark.slow
async def test_200_jobs_started_and_stopped_leave_nothing_behind(
    manager: JobManager, egress_lab: EgressLab
) -> None:
    await asyncio.sleep(0.5)  # the spares are ready
    before = footprint(manager, egress_lab)
    assert before.job_veths == () and before.workspaces == ()
    for i in range(200):
        if i % 2:  # egress: it waits, and would POST to a test address after an hour
            job = await manager.start(
                "wait", {"seconds": 3600, "url": "http://192.0.2.1/"}, "alice"
            )
        else:
            job = await manager.start("drip", {"count": 1, "interval": 3600}, "alice")
        stopped = await manager.stop(job.id)
        assert stopped.state is JobState.STOPPED
    deadline = time.monotonic() + 60  # spares are prepared at the lowest priority
    while (after := footprint(manager, egress_lab)) != before:
        assert time.monotonic() < deadline, f"left behind: {before} -> {after}"
        await asyncio.sleep(0.1)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _zombies(pid: int) -> list[int]:
    zombies = []
    for child in _descendants(pid):
        try:
            with open(f"/proc/{child}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state == b"Z":
            zombies.append(child)
    return zombies


@pytest.mark.slow
async def test_after_100_short_jobs_the_runner_has_no_zombies_and_sleeps(
    daemon: Daemon,
) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        for _ in range(100):
            job = await client.start(*USER, "noop", {})
            async for _ in client.tail(*USER, job.id):
                pass
        assert (await client.status(*USER, job.id)).state is JobState.COMPLETED
    # Its children: the launcher only; every monitor was reaped (none is a zombie).
    children = _children(daemon.pid)
    assert len(children) == 1
    wait_for(lambda: _zombies(daemon.pid) == [], seconds=5, what="no zombies")
    launcher = int(children[0])
    await asyncio.sleep(1)  # the last spare gets ready
    runner_before, launcher_before = _cpu_ticks(daemon.pid), _cpu_ticks(launcher)
    await asyncio.sleep(3)
    # Idle: under 1% of a core each (a tick is 10 ms).
    assert _cpu_ticks(daemon.pid) - runner_before <= 3
    assert _cpu_ticks(launcher) - launcher_before <= 3
    assert _zombies(daemon.pid) == []
