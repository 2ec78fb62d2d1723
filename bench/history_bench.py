"""A long history: runner start, the last page of a list and the runner's memory at 100 and at
10,000 finished jobs (the default retention limit). Not a test; run as root:

    .venv/bin/python bench/history_bench.py [--jobs 10000]

The history is copies of real jobs' directories (tests/history.py); the runner is the real
daemon (``workernator-runner`` on a socket of its own), timed from exec to a listening socket,
and the last page is what the api asks for, through that socket.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import PROBE_MODULE, Daemon, short_tmpdir, write_runner_config
from tests.history import clone_history
from tests.integration.test_history import rss_kib, run_jobs, timed_last_page, timed_starts
from tests.nethosts import JOB_USER, ensure_job_user
from workernator_runner.config import Retention, RunnerConfig


async def main(total: int) -> None:
    ensure_job_user(JOB_USER)
    state_dir = short_tmpdir("wn-bench-")
    try:
        cfg = RunnerConfig(
            socket=state_dir / "runner.sock",
            socket_group="",
            state_dir=state_dir,
            job_modules=(PROBE_MODULE,),
            job_user=JOB_USER,
            egress_bridge="",
            retention=Retention(max_jobs=total),
        )
        write_runner_config(cfg, state_dir / "runner.toml")
        daemon = Daemon(cfg, state_dir / "runner.toml", state_dir / "runner.log")
        daemon.start()
        try:
            models = await run_jobs(cfg, 4, parallel=1)
            clone_history(cfg.jobs_dir, models, 96, oldest_ns=time.time_ns() - 10**13)
            small = timed_starts(daemon, 5), await timed_last_page(cfg, 9), rss_kib(daemon.pid)
            made = time.perf_counter()
            clone_history(cfg.jobs_dir, models, total - 100, oldest_ns=time.time_ns() - 2 * 10**13)
            made = time.perf_counter() - made
            first = timed_starts(daemon, 1)
            large = timed_starts(daemon, 5), await timed_last_page(cfg, 9), rss_kib(daemon.pid)
            ran = time.perf_counter()
            await run_jobs(cfg, 300)
            ran = time.perf_counter() - ran
            steady = rss_kib(daemon.pid)
        finally:
            daemon.stop()
        print(f"history: {total} jobs copied in {made:.1f}s; 300 real jobs ran in {ran:.1f}s")
        print(f"{'':24}{'100 jobs':>12}{f'{total} jobs':>14}{'ratio':>8}")
        for name, a, b in (
            ("runner start (s)", small[0], large[0]),
            ("last page of list (ms)", small[1] * 1000, large[1] * 1000),
            ("runner RSS (MiB)", small[2] / 1024, large[2] / 1024),
        ):
            print(f"{name:24}{a:12.3f}{b:14.3f}{b / a:8.2f}")
        print(f"first start after the copies (reads them all, writes the index): {first:.3f}s")
        print(f"runner RSS after 300 more jobs at the limit: {steady / 1024:.1f} MiB")
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    asyncio.run(main(parser.parse_args().jobs))
