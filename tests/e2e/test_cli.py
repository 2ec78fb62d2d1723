"""The ``workernator`` CLI end to end: a subprocess against the real api and runner, over mTLS.

Each test runs ``python -m workernator_api.cli`` with the environment of one user of the
``stack`` fixture (admin, alice and bob (role user), carol (viewer)), piped, so never on a
terminal: the output checked here is exactly what a script reading the CLI gets.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Stack
from tests.nethosts import EgressLab, bridge_host
from workernator_api import certs

ID = r"[A-Z0-9]{6}"
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def wn(
    stack: Stack, user: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI as ``user``; never from a terminal."""
    # os.devnull is an empty config file: nothing from the home directory of whoever runs this.
    run_env = stack.env(user) | {"WORKERNATOR_CONFIG": os.devnull} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "workernator_api.cli", *args],
        env=run_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def ok(stack: Stack, user: str, *args: str) -> str:
    proc = wn(stack, user, *args)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout.decode()


def one_line_error(proc: subprocess.CompletedProcess[bytes], *fragments: str) -> str:
    """The error line of a failed command, after checking it is one line and no traceback."""
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, (proc.stdout, stderr)
    assert stderr.count("\n") == 1 and stderr.startswith("Error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, stderr
    return stderr


def start(stack: Stack, user: str, *args: str) -> str:
    out = ok(stack, user, "jobs", "start", *args)
    match = re.match(rf"Started '[^']+' job, ID: ({ID})\n", out)
    assert match, out
    return match.group(1)


def status(stack: Stack, user: str, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok(stack, user, "jobs", "status", job_id, "-o", "json"))
    return data


def wait_until_ended(stack: Stack, user: str, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = status(stack, user, job_id)
        if job["state"] != "JOB_STATE_RUNNING":
            return job
        assert time.monotonic() < deadline, f"job {job_id} still running"
        time.sleep(0.1)


@pytest.fixture
def http_server(egress_lab: EgressLab) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A tiny HTTP server on a test host on the jobs' bridge (jobs cannot reach this host);
    it prints one JSON line per request."""
    with bridge_host(egress_lab) as host:
        port, process = host.http_server()
        yield f"http://{host.address}:{port}/hook", process


def test_follow_a_running_job_to_its_end(
    stack: Stack, http_server: tuple[str, subprocess.Popen[str]]
) -> None:
    url, server = http_server
    job_id = start(stack, "alice", "wait", "1500ms", url)
    running = ok(stack, "alice", "jobs", "status", job_id).splitlines()
    assert "Status:     Running" in running
    assert "Finished:   -" in running
    assert "  Seconds:  1.5 seconds" in running
    assert f"  URL:      {url}" in running
    begun = time.monotonic()
    proc = wn(stack, "alice", "jobs", "tail", job_id)  # follows by default
    assert proc.returncode == 0
    assert time.monotonic() - begun > 0.5  # it waited for the job
    assert b"[RESULT] 404\n" in proc.stdout, proc.stdout  # the test host knows only /ok
    assert server.stdout is not None
    assert json.loads(server.stdout.readline())["path"] == "/hook"
    assert status(stack, "alice", job_id)["state"] == "JOB_STATE_COMPLETED"


# --- each job type ----------------------------------------------------------------------------


def test_each_job_type(stack: Stack) -> None:
    noop = start(stack, "alice", "noop")
    assert wait_until_ended(stack, "alice", noop)["state"] == "JOB_STATE_COMPLETED"
    assert wn(stack, "alice", "jobs", "tail", noop).stdout == b""

    ev = start(stack, "alice", "eval", "2x * 3y", "--var", "x=2", "--var", "y=1.5")
    wait_until_ended(stack, "alice", ev)
    assert b"[RESULT] 18\n" in wn(stack, "alice", "jobs", "tail", ev).stdout
    text = ok(stack, "alice", "jobs", "status", ev)
    assert "  Expression: 2x * 3y\n  Variables:  x=2, y=1.5\n" in text

    wait = start(stack, "alice", "wait", "1m30s", "http://127.0.0.1:9/")
    assert status(stack, "alice", wait)["wait"]["seconds"] == "90s"
    stopped = ok(stack, "alice", "jobs", "stop", wait)
    assert stopped == f"Stopped job {wait}.\n"
    after = ok(stack, "alice", "jobs", "status", wait)
    assert "Status:     Stopped\n" in after
    assert re.search(rf"Finished:   {TIME}\n", after)
    again = ok(stack, "alice", "jobs", "stop", wait)  # stopping an ended job is no error
    assert "Stopped" in again or "already ended" in again


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (["fib", "0"], "'position'"),
        (["fib", "100000000000"], "'position'"),
        (["eval", "2 +"], "'expression'"),
        (["eval", "2x"], "'variables'"),
        (["wait", "5", "ftp://example.com/"], "'url'"),
    ],
)
def test_invalid_arguments_are_rejected_naming_them(
    stack: Stack, args: list[str], argument: str
) -> None:
    one_line_error(wn(stack, "alice", "jobs", "start", *args), argument)


def test_start_with_limits_and_status_shows_them(stack: Stack) -> None:
    job_id = start(stack, "alice", "fib", "3", "--cpu", "0.5", "--memory", "256M", "--pids", "64")
    wait_until_ended(stack, "alice", job_id)
    data = status(stack, "alice", job_id)
    assert (data["limits"]["cpu_millis"], data["limits"]["memory_bytes"]) == (500, str(256 << 20))
    assert data["limits"]["pids"] == 64
    assert data["oom_killed"] is False and "peak_memory_bytes" in data["usage"]
    lines = ok(stack, "alice", "jobs", "status", job_id, "-v").splitlines()
    limits = lines[lines.index("Limits:") + 1 : lines.index("Usage:")]
    assert [line.split(":")[0] for line in limits][:3] == ["  CPU", "  Memory", "  Processes"]
    assert [line.split()[-1] for line in limits][:3] == ["0.5", "MiB", "64"]
    assert "256 MiB" in limits[1]
    assert "Out of memory" not in lines[-1]


def test_limits_over_the_runners_maximum_are_refused_naming_them(stack: Stack) -> None:
    one_line_error(
        wn(stack, "alice", "jobs", "start", "noop", "--pids", "5000"),
        "limit 'pids': 5000 is over the runner's maximum of 4096",
    )
    one_line_error(
        wn(stack, "alice", "jobs", "start", "noop", "--memory", "1M"),
        "limit 'memory': 1 MiB is under the minimum of 32 MiB a job needs",
    )


def test_usage_error_is_clicks(stack: Stack) -> None:
    proc = wn(stack, "alice", "jobs", "start", "fib")
    assert proc.returncode == 2
    assert b"Missing argument 'POSITION'" in proc.stderr
    # a wait longer than any job may wait is refused before anything is sent
    for seconds in ("200000", "99999999999999999999d"):
        proc = wn(stack, "alice", "jobs", "start", "wait", seconds, "http://example.com/")
        assert proc.returncode == 2
        assert b"Invalid value for 'SECONDS'" in proc.stderr
        assert b"is too long: at most 1 day (86400 seconds)" in proc.stderr
        assert b"Traceback" not in proc.stderr


# --- who sees what ----------------------------------------------------------------------------


def test_list_shows_own_jobs_to_a_user_and_all_to_admin(stack: Stack) -> None:
    mine = start(stack, "alice", "noop")
    theirs = start(stack, "bob", "noop")

    def ids(user: str, *args: str) -> set[str]:
        lines = ok(stack, user, "jobs", "list", *args).splitlines()
        assert lines[0].split() == ["ID", "TYPE", "STATE", "OWNER", "STARTED", "DURATION"]
        return {line.split()[0] for line in lines[1:]}

    assert mine in ids("alice") and theirs not in ids("alice")
    assert theirs in ids("bob") and mine not in ids("bob")
    assert {mine, theirs} <= ids("admin")
    assert {mine, theirs} <= ids("carol")
    assert ids("admin", "--owner", "bob") >= {theirs}
    assert mine not in ids("admin", "--owner", "bob")
    data = json.loads(ok(stack, "alice", "jobs", "list", "-o", "json"))
    assert {job["owner"] for job in data["jobs"]} == {"alice"}


def test_another_users_job_is_not_found(stack: Stack) -> None:
    job_id = start(stack, "bob", "wait", "30", "http://127.0.0.1:9/")
    try:
        for command in ("status", "stop", "tail"):
            one_line_error(wn(stack, "alice", "jobs", command, job_id), f"job {job_id} not found")
        assert status(stack, "carol", job_id)["owner"] == "bob"  # a viewer reads every job
        assert status(stack, "admin", job_id)["state"] == "JOB_STATE_RUNNING"
    finally:
        ok(stack, "admin", "jobs", "stop", job_id)


def test_viewer_cannot_start_or_stop(stack: Stack) -> None:
    one_line_error(wn(stack, "carol", "jobs", "start", "noop"), "permission denied")
    job_id = start(stack, "alice", "noop")
    one_line_error(wn(stack, "carol", "jobs", "stop", job_id), "permission denied")


def test_types(stack: Stack) -> None:
    out = ok(stack, "carol", "jobs", "types")
    for line in (
        "noop - No-op",
        "fib - Fibonacci",
        "eval - Evaluate",
        "wait - Wait",
        "  Usage: workernator jobs start fib POSITION",
        "    position (int, required, from 1 to 1000000)",
    ):
        assert line in out.splitlines(), out
    data = json.loads(ok(stack, "carol", "jobs", "types", "-o", "json"))
    assert [t["name"] for t in data["types"]] == ["noop", "fib", "eval", "wait"]


# --- connection errors ------------------------------------------------------------------------


def test_certificate_from_another_ca_is_refused(stack: Stack, tmp_path: Path) -> None:
    other = certs.create_deployment(tmp_path / "other", ["localhost"], [("alice", "admin")])
    cert, key = other.users["alice"]
    proc = wn(
        stack,
        "alice",
        "jobs",
        "list",
        env={"WORKERNATOR_CERT": str(cert), "WORKERNATOR_KEY": str(key)},
    )
    one_line_error(proc, f"cannot reach the API at {stack.address}")


def test_server_not_trusted_by_our_ca(stack: Stack, tmp_path: Path) -> None:
    other = certs.create_deployment(tmp_path / "other", ["localhost"], [])
    proc = wn(stack, "alice", "jobs", "list", "--ca", str(other.server_ca_cert))
    one_line_error(proc, "TLS handshake failed", "check --ca")


def test_unreachable_api(stack: Stack) -> None:
    proc = wn(stack, "alice", "jobs", "list", "--host", "127.0.0.1:1")
    one_line_error(proc, "cannot reach the API at 127.0.0.1:1")


def test_missing_certificate_setting(stack: Stack) -> None:
    env = stack.env("alice") | {"WORKERNATOR_CONFIG": os.devnull}
    del env["WORKERNATOR_KEY"]
    proc = subprocess.run(
        [sys.executable, "-m", "workernator_api.cli", "jobs", "list"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    one_line_error(proc, "set --key or WORKERNATOR_KEY")


def test_admin_deletes_an_ended_job_and_nothing_of_it_is_left(stack: Stack) -> None:
    jobs_dir = stack.runner.config.jobs_dir
    job_id = start(stack, "alice", "wait", "600s", "http://127.0.0.1:9/")
    try:
        one_line_error(
            wn(stack, "admin", "jobs", "delete", job_id), f"job {job_id} is still running"
        )
        assert status(stack, "admin", job_id)["state"] == "JOB_STATE_RUNNING"
        one_line_error(wn(stack, "alice", "jobs", "delete", job_id), "permission denied")
        one_line_error(wn(stack, "carol", "jobs", "delete", job_id), "permission denied")
    finally:
        ok(stack, "admin", "jobs", "stop", job_id)
    assert (jobs_dir / job_id / "output").exists()
    assert ok(stack, "admin", "jobs", "delete", job_id) == f"Deleted job {job_id}.\n"
    assert not (jobs_dir / job_id).exists()
    assert not (stack.runner.config.workspaces_dir / job_id).exists()
    assert not [p for p in jobs_dir.iterdir() if job_id in p.name]
    one_line_error(wn(stack, "admin", "jobs", "status", job_id), f"job {job_id} not found")
    one_line_error(wn(stack, "admin", "jobs", "delete", job_id), f"job {job_id} not found")
    assert job_id not in ok(stack, "admin", "jobs", "list")
