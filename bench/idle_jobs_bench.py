"""Many idle jobs: what each costs in memory, whether starts slow down, whether the runner idles.

    .venv/bin/python bench/idle_jobs_bench.py [--levels 0,100,500] [--samples 20]

A benchmark, not a test: run it as root. It runs the runner library in this process (as
``sandbox_bench.py`` does), on a state directory, bridge and subnet of its own, and:

1. at each level of running idle jobs (``wait`` jobs: network mode egress, so each has its veth
   on the bridge, and it sleeps), times ``--samples`` starts, from ``start`` to the first output
   line, of a ``wait`` job and of a ``fib`` job (network mode none), interleaved; each sampled
   job is stopped again outside the timed part, so the level stays what it says;
2. at the top level, reads the proportional set size (``Pss`` of ``/proc/PID/smaps_rollup``) of
   every process of every idle job: its monitor, its init and its job process; and of the
   launcher and of this process (the runner);
3. measures the CPU time the runner (this process) and the launcher use over a few idle seconds
   with every job running, and again once they were all stopped.

Prints the figures side by side with the targets (PSS per job <= 4 MB, start p50 at the top
level <= 1.5x the p50 at 0, no runner CPU while idle). Everything it made (jobs, state
directory, bridge, nftables table) is removed at the end, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import remove_egress_network, runner_config

from workernator_runner import store
from workernator_runner.jobs import load_registry
from workernator_runner.launcher import SPARES
from workernator_runner.manager import JobManager

BRIDGE = "wnidle"
SUBNET = ipaddress.IPv4Network("10.254.0.0/21")  # room for 2000 jobs
IDLE_ARGS: Mapping[str, Any] = {"seconds": 86_400, "url": "http://192.0.2.1/"}  # never reached
SAMPLES: dict[str, tuple[str, Mapping[str, Any]]] = {
    "wait (egress)": ("wait", IDLE_ARGS),
    "fib (none)": ("fib", {"position": 1}),
}
FIRST_LINE_TIMEOUT_SECONDS = 30.0
IDLE_SECONDS = 3.0
STOP_BATCH = 50
AGAIN = -1  # the level 0 sampled again once every idle job was stopped
TARGET_PSS_PER_JOB_MB = 4.0
TARGET_SLOWDOWN = 1.5
MB = 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")


# --- processes --------------------------------------------------------------------------------


def pss_bytes(pid: int) -> int:
    """The process's proportional set size: its private pages plus its share of shared ones."""
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no Pss for {pid}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    found: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
            found += [int(child) for child in f.read().split()]
    return found


def launcher_pid() -> int:
    for pid in children(os.getpid()):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"workernator_runner.launcher" in f.read():
                return pid
    raise RuntimeError("no launcher among this process's children")


def job_processes(m: JobManager, job_id: str) -> dict[str, int]:
    """A running job's monitor, init and job process (the init's only child)."""
    state = store.read_state(m.config.jobs_dir / job_id)
    assert state is not None
    kids = children(state.job_pid)
    if len(kids) != 1:
        raise RuntimeError(f"job {job_id}: its init has children {kids}")
    return {"monitor": state.monitor_pid, "init": state.job_pid, "job process": kids[0]}


# --- measuring --------------------------------------------------------------------------------


async def first_line(m: JobManager, job_type: str, args: Mapping[str, Any]) -> tuple[float, str]:
    """Seconds from start to the job's first output line, and the job's id."""
    t0 = time.perf_counter()
    job = await m.start(job_type, args, "bench")
    async with (
        asyncio.timeout(FIRST_LINE_TIMEOUT_SECONDS),
        contextlib.aclosing(m.read_output(job.id)) as chunks,
    ):
        async for chunk in chunks:
            if b"\n" in chunk.data:
                return time.perf_counter() - t0, job.id
    raise RuntimeError(f"job {job.id} ended without a line")


async def sample_starts(m: JobManager, samples: int) -> dict[str, list[float]]:
    """Start times in ms per sampled kind, interleaved; each sampled job is stopped after."""
    times: dict[str, list[float]] = {name: [] for name in SAMPLES}
    for n in range(samples + 1):  # the first round warms up and is not counted
        for name, (job_type, args) in SAMPLES.items():
            seconds, job_id = await first_line(m, job_type, args)
            await m.stop(job_id)
            if n:
                times[name].append(seconds * 1000)
    return times


async def start_idle(m: JobManager, count: int, running: list[str]) -> None:
    for _ in range(count):
        _, job_id = await first_line(m, *SAMPLES["wait (egress)"])
        running.append(job_id)


async def stop_all(m: JobManager, running: list[str]) -> None:
    while running:
        batch, running[:] = running[:STOP_BATCH], running[STOP_BATCH:]
        await asyncio.gather(*(m.stop(job_id) for job_id in batch))


async def monitors_gone(launcher: int) -> None:
    """Wait until the launcher's only children are its spares: every monitor has recorded its
    job's end and exited (the runner hears of each; that is work, not idling)."""
    deadline = time.monotonic() + 60
    while len(children(launcher)) > SPARES:
        if time.monotonic() > deadline:
            raise RuntimeError("monitors still running a minute after their jobs were stopped")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the runner's last callbacks for them


async def idle_cpu(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU ms each process uses over IDLE_SECONDS (this process idles in the event loop)."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    await asyncio.sleep(IDLE_SECONDS)
    return {name: (cpu_seconds(pid) - before[name]) * 1000 for name, pid in pids.items()}


def memory(m: JobManager, running: Sequence[str]) -> dict[str, list[int]]:
    """PSS bytes per process kind, over every running idle job."""
    kinds: dict[str, list[int]] = {"monitor": [], "init": [], "job process": [], "job": []}
    for job_id in running:
        total = 0
        for kind, pid in job_processes(m, job_id).items():
            pss = pss_bytes(pid)
            kinds[kind].append(pss)
            total += pss
        kinds["job"].append(total)
    return kinds


# --- reporting --------------------------------------------------------------------------------


def p50(values: Sequence[float]) -> float:
    return statistics.median(values)


def report_starts(levels: Mapping[int, dict[str, list[float]]]) -> None:
    print("\nstart -> first output line (ms), sampled with N idle jobs running")
    print(f"  {'running':>7}  " + "  ".join(f"{name + ' p50':>20} {'p90':>6}" for name in SAMPLES))
    for level, times in levels.items():
        label = "0 again" if level == AGAIN else str(level)
        cells = []
        for name in SAMPLES:
            ordered = sorted(times[name])
            p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
            cells.append(f"{p50(ordered):20.2f} {p90:6.2f}")
        print(f"  {label:>7}  " + "  ".join(cells))


def report(
    levels: Mapping[int, dict[str, list[float]]],
    kinds: Mapping[str, list[int]],
    others: Mapping[str, int],
    busy: Mapping[str, float],
    after: Mapping[str, float],
) -> None:
    report_starts(levels)
    top = max(levels)
    if kinds["job"]:
        print(f"\nmemory with {top} idle jobs running: PSS (MB)")
        for kind, values in kinds.items():
            print(
                f"  {kind:<12} mean {statistics.mean(values) / MB:6.2f}  "
                f"p50 {p50(values) / MB:6.2f}  max {max(values) / MB:6.2f}"
            )
        for name, value in others.items():
            print(f"  {name:<12} {value / MB:11.2f}")
    print(f"\nidle CPU over {IDLE_SECONDS:g} s (ms)")
    for name in busy:
        print(
            f"  {name:<10} with {top} jobs running {busy[name]:6.1f}   after they all stopped "
            f"{after[name]:6.1f}"
        )

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    print("\ntargets")
    if kinds["job"]:
        per_job = statistics.mean(kinds["job"]) / MB
        print(
            f"  PSS per job {per_job:.2f} MB <= {TARGET_PSS_PER_JOB_MB:g} MB: "
            f"{verdict(per_job <= TARGET_PSS_PER_JOB_MB)}"
        )
    if 0 in levels and top:
        for name in SAMPLES:
            ratio = p50(levels[top][name]) / p50(levels[0][name])
            again = p50(levels[top][name]) / p50(levels[AGAIN][name]) if AGAIN in levels else 0
            print(
                f"  {name}: start p50 at {top} / at 0 = {ratio:.2f}x (/ at 0 again "
                f"{again:.2f}x) <= {TARGET_SLOWDOWN:g}x: {verdict(ratio <= TARGET_SLOWDOWN)}"
            )
    idle = max([*busy.values(), *after.values()])
    print(f"  runner and launcher idle CPU {idle:.0f} ms (0 wanted): {verdict(idle == 0)}")


# --- main -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    levels_wanted = sorted({int(x) for x in args.levels.split(",")} | {0})
    state_dir = Path(tempfile.mkdtemp(prefix="wn-idle-state-"))
    running: list[str] = []
    levels: dict[int, dict[str, list[float]]] = {}
    try:
        async with JobManager(runner_config(state_dir, BRIDGE, SUBNET), load_registry()) as m:
            try:
                pids = {"runner": os.getpid(), "launcher": launcher_pid()}
                for level in levels_wanted:
                    t0 = time.monotonic()
                    await start_idle(m, level - len(running), running)
                    print(
                        f"{len(running)} idle jobs running (started in "
                        f"{time.monotonic() - t0:.1f} s); sampling starts",
                        file=sys.stderr,
                        flush=True,
                    )
                    levels[level] = await sample_starts(m, args.samples)
                kinds = memory(m, running)
                others = {name: pss_bytes(pid) for name, pid in pids.items()}
                busy = await idle_cpu(pids)
                await stop_all(m, running)
                await monitors_gone(pids["launcher"])
                # Again with none running: the load of a shared host drifts meanwhile.
                levels[AGAIN] = await sample_starts(m, args.samples)
                await monitors_gone(pids["launcher"])
                after = await idle_cpu(pids)
            finally:
                await stop_all(m, running)
    finally:
        remove_egress_network(BRIDGE)
        shutil.rmtree(state_dir, ignore_errors=True)
    report(levels, kinds, others, busy, after)
    print(
        f"\n({platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}; "
        f"load average {os.getloadavg()[0]:.2f} at the end)"
    )


def on_sigterm(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="0,100,500", help="running idle jobs to sample at")
    parser.add_argument("--samples", type=int, default=20, help="timed starts per level and kind")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
