"""Runner micro-benchmarks, measured side by side in one run (not a timed test).

    .venv/bin/python bench/runner_bench.py

Prints medians and ratios:
- job start (JobManager.start of noop until it reports RUNNING) against starting a bare Python
  interpreter (``python -c pass``), the cost a job would pay without the pre-imported fork;
- output throughput: a job printing 100 MB, read to the end by one reader through the manager,
  against ``cat`` of a 100 MB file into /dev/null-like Python reads of the same size.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.probe_jobs import JOBS as PROBES
from workernator_runner.config import RunnerConfig
from workernator_runner.jobs import Registry, load_registry
from workernator_runner.manager import JobManager

RUNS = 30
SIZE = 100 * 1024 * 1024


async def job_starts(m: JobManager) -> list[float]:
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        job = await m.start("noop", {}, "bench")
        times.append(time.perf_counter() - t0)
        async for _ in m.read_output(job.id):
            pass
    return times


def interpreter_starts() -> list[float]:
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return times


async def tail_throughput(m: JobManager) -> float:
    t0 = time.perf_counter()
    job = await m.start("spew", {"size": SIZE}, "bench")
    total = 0
    async for batch in m.read_output_batches(job.id):
        total += sum(len(c.data) for c in batch)
    assert total == SIZE
    return SIZE / (time.perf_counter() - t0)


def file_read_throughput(directory: Path) -> float:
    path = directory / "blob"
    path.write_bytes(b"x" * SIZE)
    t0 = time.perf_counter()
    with path.open("rb") as f:
        while f.read(64 * 1024):
            pass
    return SIZE / (time.perf_counter() - t0)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunnerConfig(state_dir=Path(tmp), socket_group="", egress_bridge="")  # no network
        registry = Registry([*load_registry().values(), *PROBES])
        async with JobManager(cfg, registry) as m:
            ours = statistics.median(await job_starts(m))
            bare = statistics.median(interpreter_starts())
            print(f"job start (noop, to RUNNING): median {ours * 1000:.1f} ms")
            print(f"python -c pass:               median {bare * 1000:.1f} ms")
            print(f"  ratio interpreter/job start: {bare / ours:.1f}x")
            tail = await tail_throughput(m)
            plain = file_read_throughput(Path(tmp))
            print(f"job output, printed and tailed: {tail / 1e6:.0f} MB/s")
            print(f"plain file read, same size:     {plain / 1e6:.0f} MB/s")
            print(f"  ratio tail/plain read: {tail / plain:.2f}")
    print(f"(pid {os.getpid()}, {RUNS} runs each)")


if __name__ == "__main__":
    asyncio.run(main())
