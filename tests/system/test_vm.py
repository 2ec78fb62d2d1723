"""Workernator on a real systemd host: a fresh Debian 12 VM (systemd as PID 1, cgroup v2),
installed as docs/operations.md says, driven from this host through the CLI over mTLS.

The tests run in this order on one VM (module fixture ``system``); the last one stops both
units. Each can also run alone (``-k``). ``-m 'not vm'`` leaves them out.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from tests.system.conftest import TEST_HOST_URL, UNITS, System

pytestmark = [pytest.mark.vm, pytest.mark.privileged, pytest.mark.slow]

COMPLETED = "JOB_STATE_COMPLETED"
RUNNING = "JOB_STATE_RUNNING"


def _seconds(duration: str) -> float:
    """A protobuf Duration in JSON ("1.500s")."""
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def _wall(job: dict[str, object]) -> float:
    started = datetime.fromisoformat(str(job["started_at"]).replace("Z", "+00:00"))
    ended = datetime.fromisoformat(str(job["ended_at"]).replace("Z", "+00:00"))
    return (ended - started).total_seconds()


def test_every_job_type_runs(system: System) -> None:
    began = time.monotonic()
    noop = system.start("noop")
    fib = system.start("fib", "10")
    evaluated = system.start("eval", "2x * 3y", "--var", "x=2", "--var", "y=1.5")
    wait = system.start("wait", "1", f"{TEST_HOST_URL}/hook")
    for job_id in (noop, fib, evaluated, wait):
        job = system.wait_ended(job_id)
        assert job["state"] == COMPLETED, (job, system.output(job_id))
    assert system.output(noop) == ""
    assert "[RESULT] 34" in system.output(fib)
    assert "[RESULT] 18" in system.output(evaluated)
    assert "[WAIT] Response status: 200 OK" in system.output(wait)
    system.timings["every job type"] = time.monotonic() - began


def test_a_job_over_its_memory_limit_is_oom_killed(system: System) -> None:
    began = time.monotonic()
    job_id = system.start("fib", "1000000", "--memory", "32M")
    job = system.wait_ended(job_id, timeout=300)
    assert job["oom_killed"] is True, (job, system.output(job_id))
    assert job["state"] != COMPLETED
    system.timings["memory limit"] = time.monotonic() - began


def test_a_cpu_bound_job_is_throttled(system: System) -> None:
    """With --cpu 0.2 a CPU-bound job gets a fifth of a CPU: its CPU time over its wall time
    is about 0.2. The same job unthrottled shows the measurement can tell the difference."""
    began = time.monotonic()
    free = system.wait_ended(system.start("fib", "300000", "--cpu", "2"), timeout=300)
    throttled = system.wait_ended(system.start("fib", "300000", "--cpu", "0.2"), timeout=300)
    for job in (free, throttled):
        assert job["state"] == COMPLETED, job
    free_ratio = _seconds(free["usage"]["cpu_time"]) / _wall(free)
    throttled_ratio = _seconds(throttled["usage"]["cpu_time"]) / _wall(throttled)
    system.timings["cpu limit"] = time.monotonic() - began
    system.timings["cpu/wall at --cpu 0.2"] = throttled_ratio
    system.timings["cpu/wall at --cpu 2"] = free_ratio
    assert _seconds(throttled["usage"]["cpu_time"]) >= 1.0, throttled  # long enough to measure
    assert throttled_ratio <= 0.25, (throttled_ratio, throttled)
    assert free_ratio >= 0.5, (free_ratio, free)


def test_the_api_runs_as_its_own_user(system: System) -> None:
    users = {}
    for unit in ("workernator-api", "workernator-runner"):
        pid = system.guest(f"systemctl show -P MainPID {unit}").strip()
        assert pid not in ("", "0"), f"{unit} has no main process"
        users[unit] = system.guest(f"ps -o user=,group= -p {pid}").split()
    assert users["workernator-api"] == ["workernator-api", "workernator-api"]
    assert users["workernator-runner"] == ["root", "root"]


def test_a_runner_restart_keeps_jobs_and_their_output(system: System) -> None:
    done = system.start("fib", "20")
    assert system.wait_ended(done)["state"] == COMPLETED
    before = system.output(done)
    running = system.start("wait", "20", f"{TEST_HOST_URL}/survivor")
    assert system.status(running)["state"] == RUNNING
    began = time.monotonic()
    system.guest("systemctl restart workernator-runner")
    system.timings["runner restart"] = time.monotonic() - began
    assert system.output(done) == before
    assert system.status(done)["state"] == COMPLETED
    assert system.status(running)["state"] == RUNNING
    job = system.wait_ended(running)
    assert job["state"] == COMPLETED, (job, system.output(running))
    assert "[WAIT] Response status: 200 OK" in system.output(running)


def test_both_units_come_back_after_a_reboot(system: System) -> None:
    done = system.start("eval", "6 * 7")
    assert system.wait_ended(done)["state"] == COMPLETED
    system.vm.reboot()
    system.timings["reboot"] = system.vm.timings["reboot"]
    began = time.monotonic()
    system.wait_active()
    system.timings["units active after reboot"] = time.monotonic() - began
    assert "[RESULT] 42" in system.output(done)
    again = system.start("noop")
    assert system.wait_ended(again)["state"] == COMPLETED


def test_a_clean_stop_leaves_nothing_running(system: System) -> None:
    system.start("wait", "300", f"{TEST_HOST_URL}/never")
    began = time.monotonic()
    system.guest("systemctl stop workernator-api workernator-runner")
    system.timings["systemctl stop"] = time.monotonic() - began
    states = system.vm.run(f"systemctl is-active {UNITS}", check=False).out.split()
    assert states == ["inactive", "inactive"], states
    processes = [
        line
        for line in system.guest("ps -eo pid=,user=,args=").splitlines()
        if ("workernator" in line or "/opt/" in line) and "ps -eo" not in line
    ]
    assert processes == [], processes
    cgroups = system.guest("find /sys/fs/cgroup -type d -name 'sb-*'").split()
    assert cgroups == [], cgroups
    links = re.findall(r"wn0-\S+", system.guest("ip -o link"))
    assert links == [], links
