"""Ten thousand finished jobs: retention holds the count, and a runner start, the last page of
a list and the runner's memory stay about what they are at a hundred.

The history is made of real jobs' directories copied under new ids (see tests/history.py):
10,000 real sandboxed jobs take over ten minutes on a small shared host (about 16 a second,
8 at a time). The jobs that run during the test, and whose ends retention answers, are real.
bench/history_bench.py prints the same figures."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, write_runner_config
from tests.history import clone_history
from workernator_api.runner_client import RunnerClient
from workernator_runner import store
from workernator_runner.config import Retention, RunnerConfig

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

LIMIT = 10_000
PAGE = 100


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def job_dirs(cfg: RunnerConfig) -> int:
    return sum(1 for p in cfg.jobs_dir.iterdir() if not p.name.startswith("."))


def timed_starts(daemon: Daemon, times: int = 3) -> float:
    """The median time from exec to a listening socket, over ``times`` restarts."""
    seconds = []
    for _ in range(times):
        daemon.stop()
        started = time.perf_counter()
        daemon.start()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


async def timed_last_page(cfg: RunnerConfig, times: int = 5) -> float:
    """The median time of a list of the last page (what the api asks for it), through the
    runner's socket."""
    keys = sorted((e.created_ns, e.id) for e in store.read_index(cfg.state_dir).values())
    after = keys[-PAGE - 1] if len(keys) > PAGE else None  # at most a page: all of it
    seconds = []
    async with RunnerClient(cfg.socket) as client:
        for _ in range(times):
            started = time.perf_counter()
            page = [job async for job in client.iter_jobs("root", "admin", after=after)]
            seconds.append(time.perf_counter() - started)
            assert len(page) == min(PAGE, len(keys))
    return statistics.median(seconds)


async def run_jobs(cfg: RunnerConfig, count: int, parallel: int = 8) -> list[str]:
    """``count`` real noop jobs through the runner, ``parallel`` at a time, to their end."""
    done: list[str] = []
    gate = asyncio.Semaphore(parallel)
    async with RunnerClient(cfg.socket) as client:

        async def one() -> None:
            async with gate:
                job = await client.start("alice", "user", "noop", {})
                async for _ in client.tail("alice", "user", job.id):
                    pass
                done.append(job.id)

        await asyncio.gather(*(one() for _ in range(count)))
    return done


async def test_ten_thousand_jobs_keep_start_list_and_memory_flat(
    runner_config: RunnerConfig, state_dir: Path
) -> None:
    cfg = dataclasses.replace(runner_config, retention=Retention(max_jobs=LIMIT))
    config_path = state_dir / "runner.toml"
    write_runner_config(cfg, config_path)
    daemon = Daemon(cfg, config_path, state_dir / "runner.log")
    daemon.start()
    try:
        models = await run_jobs(cfg, 4, parallel=1)
        clone_history(cfg.jobs_dir, models, 2 * PAGE - 4, oldest_ns=time.time_ns() - 10**13)
        start_small = timed_starts(daemon)
        list_small = await timed_last_page(cfg)

        clone_history(cfg.jobs_dir, models, LIMIT - 2 * PAGE, oldest_ns=time.time_ns() - 2 * 10**13)
        timed_starts(daemon, 1)  # the first start reads the new copies and indexes them
        start_large = timed_starts(daemon)
        list_large = await timed_last_page(cfg)
        assert job_dirs(cfg) == LIMIT

        oldest = sorted(store.read_index(cfg.state_dir).values(), key=lambda e: e.ended_ns)
        await run_jobs(cfg, PAGE)  # warm: every path has run, retention has deleted
        before = rss_kib(daemon.pid)
        ran = await run_jobs(cfg, 3 * PAGE)
        after = rss_kib(daemon.pid)
        assert job_dirs(cfg) == LIMIT  # retention holds the count...
        kept = store.read_index(cfg.state_dir)
        assert all(job_id in kept for job_id in ran)  # ...keeping the newest...
        assert not any(e.id in kept for e in oldest[: 4 * PAGE])  # ...deleting the oldest
        print(
            f"\nstart {start_small:.3f}s at {2 * PAGE} jobs, {start_large:.3f}s at {LIMIT};"
            f" last page {list_small * 1000:.1f} ms vs {list_large * 1000:.1f} ms;"
            f" rss {before} KiB -> {after} KiB over {3 * PAGE} more jobs"
        )
        assert start_large < 3 * start_small + 0.5, (start_small, start_large)
        assert list_large < 3 * list_small + 0.05, (list_small, list_large)
        assert after - before < 4096, (before, after)  # KiB: no growth with history
    finally:
        daemon.stop()
