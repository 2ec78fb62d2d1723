"""A runner with nothing to do uses no CPU, however many jobs it ran (issue 10).

An earlier runner burned a whole core after short jobs: a job found finished when its start
returned left a pidfd registered in the event loop, and a pidfd of an exited process stays
readable, so its callback ran forever. These tests run a real runner daemon (and its launcher
and spare sandboxes), give it work of every kind, and then watch its processes sit still.
``test_the_measure_catches_a_spinning_pidfd_callback`` shows the measure fails on exactly that
bug, in a process made to have it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

from shared.model import JobState
from tests.conftest import Daemon
from workernator_api.runner_client import RunnerClient

USER = ("alice", "user")
SHORT_JOBS = 100
IDLE_SECONDS = 3.0
MAX_IDLE_CPU_SECONDS = 0.02  # per process, over IDLE_SECONDS: two clock ticks
MAX_IDLE_WAKEUPS = 10  # context switches per process over IDLE_SECONDS
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Activity:
    """What a process had used so far: CPU seconds (all its threads, living or ended) and
    context switches (its living threads: each is a wake-up)."""

    cpu_seconds: float
    wakeups: int


def activity(pid: int) -> Activity:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return Activity((utime + stime) / TICKS, switches)


def idle_use(pids: dict[str, int], seconds: float) -> dict[str, Activity]:
    """How much each process used over ``seconds`` of doing nothing."""
    before = {name: activity(pid) for name, pid in pids.items()}
    time.sleep(seconds)  # the measured interval itself, not a wait for a condition
    after = {name: activity(pid) for name, pid in pids.items()}
    return {
        name: Activity(
            after[name].cpu_seconds - before[name].cpu_seconds,
            after[name].wakeups - before[name].wakeups,
        )
        for name in pids
    }


def children(pid: int) -> list[int]:
    found: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
            found += [int(child) for child in f.read().split()]
    return found


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def runner_processes(daemon: Daemon) -> dict[str, int]:
    """The runner, its launcher and the launcher's children (spares: every job has ended)."""
    launchers = [p for p in children(daemon.pid) if "workernator_runner.launcher" in cmdline(p)]
    assert len(launchers) == 1, launchers
    pids = {"runner": daemon.pid, "launcher": launchers[0]}
    for n, spare in enumerate(children(launchers[0])):
        pids[f"spare {n}"] = spare
    return pids


def assert_idle(use: dict[str, Activity]) -> None:
    busy = {
        name: a
        for name, a in use.items()
        if a.cpu_seconds > MAX_IDLE_CPU_SECONDS or a.wakeups > MAX_IDLE_WAKEUPS
    }
    assert not busy, f"busy while idle over {IDLE_SECONDS:g} s: {busy}"


async def _until_ended(client: RunnerClient, job_id: str) -> JobState:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = await client.status(*USER, job_id)
        if status.state.finished:
            return status.state
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} did not end")


@dataclass(frozen=True)
class Held:
    """What a runner holds for jobs: pidfds, inotify watches, open files of the state directory
    (sockets are left out: clients come and go)."""

    pidfds: int
    watches: int
    files: int


def held(daemon: Daemon) -> Held:
    pid, state_dir = daemon.pid, str(daemon.config.state_dir)
    pidfds = watches = files = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target == "anon_inode:[pidfd]":
                pidfds += 1
            elif target == "anon_inode:inotify":
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
                    watches += sum(line.startswith("inotify wd:") for line in f)
            elif target.startswith(state_dir + "/"):
                files += 1
        except FileNotFoundError:  # closed meanwhile
            continue
    return Held(pidfds, watches, files)


async def test_runner_uses_no_cpu_while_idle_after_100_short_jobs(daemon: Daemon) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        before = held(daemon)
        ids = []
        for n in range(SHORT_JOBS):
            # noop ends before its start returns (the path of the old bug); fib prints first;
            # every fourth is tailed to its end while it runs.
            job_type, args = ("noop", {}) if n % 2 else ("fib", {"position": 30})
            job = await client.start(*USER, job_type, args)
            ids.append(job.id)
            if n % 4 == 0:
                async for _ in client.tail(*USER, job.id):
                    pass
        waiting = await client.start(*USER, "wait", {"seconds": 600, "url": "http://192.0.2.1/"})
        stopped = await client.stop(*USER, waiting.id)  # ended by a stop, not on its own
        assert stopped.state is JobState.STOPPED
        for job_id in ids:
            assert await _until_ended(client, job_id) is JobState.COMPLETED
        assert len(await client.list_jobs(*USER)) == SHORT_JOBS + 1
        assert held(daemon) == before  # nothing of an ended job stays open in the runner
    pids = runner_processes(daemon)
    assert len(pids) >= 3  # the runner, the launcher, and at least a spare
    assert_idle(idle_use(pids, IDLE_SECONDS))


SPINNING = textwrap.dedent(
    """
    import asyncio, os, subprocess, sys

    async def main() -> None:
        child = subprocess.Popen(["true"])
        pidfd = os.pidfd_open(child.pid)
        child.wait()
        # The bug: a pidfd of an exited process stays readable; a reader never removed from
        # the loop (or re-added, as a finished state once did) fires on every iteration.
        asyncio.get_running_loop().add_reader(pidfd, lambda: None)
        print("ready", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def test_the_measure_catches_a_spinning_pidfd_callback() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SPINNING], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        use = idle_use({"spinning": proc.pid}, IDLE_SECONDS)
        try:
            assert_idle(use)
        except AssertionError as exc:
            assert "spinning" in str(exc)
        else:
            raise AssertionError("assert_idle let a spinning process pass")
    finally:
        proc.kill()
        proc.wait()


IDLE_JOBS = 20


async def test_each_running_job_costs_the_runner_one_pidfd_and_one_watch(daemon: Daemon) -> None:
    """What a running job holds in the runner is the same for the first and the twentieth (a
    start does not grow with the jobs that run), and all of it goes with the job."""
    async with RunnerClient(daemon.config.socket) as client:
        before = held(daemon)
        running = []
        for n in range(1, IDLE_JOBS + 1):
            job = await client.start(*USER, "wait", {"seconds": 600, "url": "http://192.0.2.1/"})
            running.append(job.id)
            # Its monitor's pidfd and a watch on its directory; no file stays open.
            assert held(daemon) == Held(before.pidfds + n, before.watches + n, before.files)
        for job_id in running:
            assert (await client.stop(*USER, job_id)).state is JobState.STOPPED
        assert held(daemon) == before
