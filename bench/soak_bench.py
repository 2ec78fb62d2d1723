"""A soak: mixed load on a real runner for a long time, with restarts; is anything left over?

    .venv/bin/python bench/soak_bench.py [--minutes 60] [--restart-minutes 10] [--workers 4]
                                         [--max-jobs 10000]

A benchmark, not a test (not in ``make test``): run it as root. It starts a
``workernator-runner`` of its own (state in a temporary directory, its own egress bridge) and
keeps ``--workers`` clients busy with a random mix: short jobs (noop, fib, eval) tailed to
their end and their status read, ``wait`` jobs stopped after a moment, and listings. Every
``--restart-minutes`` it restarts the runner (SIGTERM, then a new one that adopts the running
jobs); clients whose connection broke connect again.

It prints the runner's RSS every minute (a leak shows as a slope, warm-up as a plateau) and, at
the start (after a warm-up) and at the end (once the load has stopped and the runner is idle),
what a leak would show: the runner's RSS and open descriptors, the processes
of the runner's tree, sandbox cgroups, mounts (the host's and the launcher's), network
namespaces and job veths, and the operations done and failed. Everything it made is removed
at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import remove_egress_network, runner_config

from tests.conftest import Daemon, write_runner_config
from workernator_api.runner_client import RunnerClient
from workernator_runner.config import Retention

BRIDGE = "wnsoak"
SUBNET = ipaddress.IPv4Network("10.254.128.0/22")
UNREACHABLE = "http://10.254.131.250:9/"  # in the bench's subnet; nobody answers there
USER, ROLE = "soak", "admin"


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
                found += children
                todo += children
    return found


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _sandbox_cgroups() -> int:
    count = 0
    for root, _dirs, _files in os.walk("/sys/fs/cgroup"):
        if root.endswith("/workernator/jobs"):
            count = max(count, sum(1 for n in os.listdir(root) if n.startswith("sb-")))
    return count


def footprint(daemon: Daemon) -> dict[str, float]:
    tree = [daemon.pid, *_descendants(daemon.pid)]
    launcher_mounts = 0
    if len(tree) > 1:
        with contextlib.suppress(OSError), open(f"/proc/{tree[1]}/mountinfo") as f:
            launcher_mounts = sum(1 for _ in f)
    net = set()
    for pid in tree:
        with contextlib.suppress(OSError):
            net.add(os.readlink(f"/proc/{pid}/ns/net"))
    with open("/proc/self/mountinfo") as f:
        host_mounts = sum(1 for _ in f)
    return {
        "runner RSS (MB)": round(_rss_mb(daemon.pid), 1),
        "runner fds": len(os.listdir(f"/proc/{daemon.pid}/fd")),
        "processes (runner tree)": len(tree),
        "sandbox cgroups": _sandbox_cgroups(),
        "host mounts": host_mounts,
        "launcher mounts": launcher_mounts,
        "network namespaces (runner tree)": len(net),
        "job veths": sum(1 for n in os.listdir("/sys/class/net") if n.startswith(f"{BRIDGE}-")),
    }


async def client_loop(socket_path: Path, stop_at: float, counts: defaultdict[str, int]) -> None:
    client: RunnerClient | None = None
    while time.monotonic() < stop_at:
        try:
            if client is None:
                client = RunnerClient(socket_path)
                await client.connect()
            choice = random.random()
            if choice < 0.6:
                short: list[tuple[str, dict[str, Any]]] = [
                    ("noop", {}),
                    ("fib", {"position": random.randint(1, 3000)}),
                    ("eval", {"expression": "2x+1", "variables": {"x": random.random()}}),
                ]
                job_type, args = random.choice(short)
                job = await client.start(USER, ROLE, job_type, args)
                async for _batch in client.tail(USER, ROLE, job.id):
                    pass
                await client.status(USER, ROLE, job.id)
                counts["short jobs"] += 1
            elif choice < 0.8:
                job = await client.start(USER, ROLE, "wait", {"seconds": 30.0, "url": UNREACHABLE})
                await asyncio.sleep(random.uniform(0.1, 1.0))
                await client.stop(USER, ROLE, job.id)
                counts["stopped wait jobs"] += 1
            else:
                await client.list_jobs(USER, ROLE)
                counts["listings"] += 1
        except Exception as exc:  # a restart in progress, mostly: connect again
            counts["failed operations"] += 1
            counts[f"  {type(exc).__name__}"] += 1
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
            client = None
            await asyncio.sleep(0.5)
    if client is not None:
        await client.close()


async def soak(daemon: Daemon, minutes: float, restart_minutes: float, workers: int) -> None:
    counts: defaultdict[str, int] = defaultdict(int)
    stop_at = time.monotonic() + minutes * 60
    tasks = [
        asyncio.create_task(client_loop(daemon.config.socket, stop_at, counts))
        for _ in range(workers)
    ]
    next_restart = time.monotonic() + restart_minutes * 60
    next_sample = time.monotonic() + 60
    restarts = 0
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1)
        if time.monotonic() >= next_sample:  # a leak shows as a slope, warm-up as a plateau
            next_sample += 60
            with contextlib.suppress(OSError):
                print(f"  runner RSS {_rss_mb(daemon.pid):.1f} MB; {dict(counts)}", flush=True)
        if time.monotonic() >= next_restart and time.monotonic() < stop_at:
            await asyncio.to_thread(daemon.stop)
            await asyncio.to_thread(daemon.start)
            restarts += 1
            next_restart += restart_minutes * 60
            print(f"  runner restarted ({restarts}); {dict(counts)}", flush=True)
    await asyncio.gather(*tasks)
    counts["runner restarts"] = restarts
    print("operations:", ", ".join(f"{k.strip()} {v}" for k, v in sorted(counts.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--restart-minutes", type=float, default=10)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--max-jobs",
        type=int,
        default=Retention.max_jobs,
        help="retention's max_jobs: the runner's memory grows with the history it keeps, "
        "up to this many ended jobs",
    )
    opts = parser.parse_args()
    state_dir = Path(tempfile.mkdtemp(prefix="wn-soak-"))
    cfg = dataclasses.replace(
        runner_config(state_dir, BRIDGE, SUBNET), retention=Retention(max_jobs=opts.max_jobs)
    )
    config_path = state_dir / "runner.toml"
    write_runner_config(cfg, config_path)
    daemon = Daemon(cfg, config_path, state_dir / "runner.log")
    try:
        daemon.start()
        asyncio.run(soak(daemon, 0.25, 1e9, opts.workers))  # warm-up: spares, first jobs
        time.sleep(5)
        before = footprint(daemon)
        asyncio.run(soak(daemon, opts.minutes, opts.restart_minutes, opts.workers))
        time.sleep(5)  # the last jobs' monitors finish, the spares are made again
        after = footprint(daemon)
        print(f"\n{'':34} {'start':>9} {'end':>9}")
        for key, value in before.items():
            flag = "" if after[key] <= value * 1.1 + 1 else "   <- grew"
            print(f"  {key:32} {value:>9} {after[key]:>9}{flag}")
        print(f"({opts.minutes} min, load average {os.getloadavg()[0]:.2f} at the end)")
    finally:
        daemon.stop()
        remove_egress_network(BRIDGE)
        shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
