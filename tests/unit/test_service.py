"""shared.service: how both daemons start and stop."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

SIGNALLED_WHILE_STARTING = """
import asyncio, os, signal
from shared import service

class Service:
    def __init__(self, cfg):
        pass
    async def start(self):
        os.kill(os.getpid(), signal.SIGTERM)  # as a supervisor might, as soon as it saw a socket
        await asyncio.sleep(0.2)
        print("started", flush=True)
    async def stop(self):
        print("stopped cleanly", flush=True)

asyncio.run(service._serve(Service, None))
"""

FAILING = """
import asyncio
from shared import service

class Service:
    def __init__(self, cfg):
        self.failed = asyncio.get_running_loop().create_future()
    async def start(self):
        asyncio.get_running_loop().call_later(0.1, self.failed.set_result, "its helper died")
    async def stop(self):
        print("stopped", flush=True)

try:
    asyncio.run(service._serve(Service, None))
except service.ServiceFailed as exc:
    print(f"failed: {exc}", flush=True)
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


def test_a_signal_while_the_service_starts_stops_it_cleanly() -> None:
    result = _run(SIGNALLED_WHILE_STARTING)
    assert result.returncode == 0, result  # not killed by the signal
    assert result.stdout == "started\nstopped cleanly\n"


def test_a_service_that_fails_is_stopped_and_says_why() -> None:
    result = _run(FAILING)
    assert result.returncode == 0, result
    assert result.stdout == "stopped\nfailed: its helper died\n"
