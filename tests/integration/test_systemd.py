"""The runner as its systemd unit runs it: readiness, its stderr (a journal stream), and the
unit's ExecStopPost= helper (``--after-stop``) telling a stop from a restart.

systemd is not PID 1 on the machines the suite runs on, so what systemd would do is done by
hand: NOTIFY_SOCKET is a datagram socket of the test's own, the journal stream is a pipe, and
``systemctl`` is a script on PATH that answers what systemd would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.model import JobState
from tests.conftest import ROOT, Daemon, _stop_leftover_jobs, write_runner_config
from tests.e2e.conftest import _free_port, make_certs, write_api_config
from tests.helpers import process_gone
from workernator_api.runner_client import RunnerClient
from workernator_runner import store
from workernator_runner.config import RunnerConfig

USER = ("alice", "user")
UNIT = "workernator-runner.service"
pytestmark = pytest.mark.privileged


def _read_until_eof(fd: int, seconds: float) -> bool:
    """Read ``fd`` until EOF; False if it is still open after ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready and not os.read(fd, 65536):
            return True
    return False


def _state(cfg: RunnerConfig, job_id: str) -> store.StateFile:
    state = store.read_state(cfg.jobs_dir / job_id)
    assert state is not None
    return state


async def _start(path: Path, job_type: str) -> str:
    async with RunnerClient(path) as client:
        return (await client.start(*USER, job_type, {})).id


def _wait_for(condition: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    assert callable(condition)
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_monitors_do_not_keep_a_stopped_runners_stderr(
    runner_config: RunnerConfig, state_dir: Path
) -> None:
    """Under systemd the runner's stderr is a journal stream of that one invocation. A monitor
    that kept it would hold the dead invocation's stream open (and log under it) for as long as
    its job runs: the stream must close when the runner is gone, while the job goes on."""
    config_path = state_dir / "runner.toml"
    write_runner_config(runner_config, config_path)
    read_end, write_end = os.pipe()
    runner = subprocess.Popen(
        [sys.executable, "-m", "workernator_runner.daemon", "--config", str(config_path)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=write_end,
        stderr=write_end,
    )
    os.close(write_end)
    try:
        _wait_for(lambda: runner_config.socket.exists() or runner.poll() is not None)
        job_id = asyncio.run(_start(runner_config.socket, "stubborn"))
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=20) == 0
        assert _read_until_eof(read_end, 10.0), "a process of the runner still holds its stderr"
        state = _state(runner_config, job_id)
        assert state.state is JobState.RUNNING
        assert not process_gone(state.monitor_pid)
        assert not process_gone(state.job_pid)
    finally:
        os.close(read_end)
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        _stop_leftover_jobs(runner_config)


# --- readiness ------------------------------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, named in the abstract namespace ('@')."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"workernator-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + name)
    sock.settimeout(30)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def test_the_runner_says_ready_once_its_socket_listens_and_hides_the_socket_from_its_children(
    runner_config: RunnerConfig, state_dir: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    config_path = state_dir / "runner.toml"
    write_runner_config(runner_config, config_path)
    with (state_dir / "runner.log").open("wb") as log:
        runner = subprocess.Popen(
            [sys.executable, "-m", "workernator_runner.daemon", "--config", str(config_path)],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT), NOTIFY_SOCKET=address),
            stdout=log,
            stderr=log,
        )
    try:
        message = sock.recv(4096)
        assert b"READY=1\n" in message.splitlines(keepends=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(runner_config.socket))  # listening by the time it said so
        children = Path(f"/proc/{runner.pid}/task/{runner.pid}/children").read_text().split()
        assert children  # the launcher
        for child in children:  # systemd's socket is the runner's business only
            assert b"NOTIFY_SOCKET=" not in Path(f"/proc/{child}/environ").read_bytes()
        runner.send_signal(signal.SIGTERM)
        assert b"STOPPING=1\n" in sock.recv(4096).splitlines(keepends=True)
        assert runner.wait(timeout=20) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def test_a_runner_that_cannot_start_never_says_ready(
    runner_config: RunnerConfig, state_dir: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    config_path = state_dir / "runner.toml"
    write_runner_config(dataclasses.replace(runner_config, job_user="no-such-user-x"), config_path)
    result = subprocess.run(
        [sys.executable, "-m", "workernator_runner.daemon", "--config", str(config_path)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), NOTIFY_SOCKET=address),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "no user named 'no-such-user-x'" in result.stderr
    sock.settimeout(0)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


# --- ExecStopPost: stop or restart ----------------------------------------------------------


def _fake_systemctl(directory: Path, answer: str, status: int = 0) -> dict[str, str]:
    """An environment whose ``systemctl`` answers ``list-jobs`` with ``answer`` (what systemd
    shows for the unit while it carries out a job), recording its arguments."""
    directory.mkdir(exist_ok=True)
    script = directory / "systemctl"
    script.write_text(
        f"#!/bin/sh\necho \"$@\" >> \"{directory}/calls\"\nprintf '%s' '{answer}'\nexit {status}\n"
    )
    script.chmod(0o755)
    return dict(
        os.environ, PYTHONPATH=str(ROOT), PATH=f"{directory}:{os.environ.get('PATH', '/usr/bin')}"
    )


def _after_stop(daemon: Daemon, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """What the unit's ExecStopPost= runs, once the runner has exited (systemd runs it then)."""
    daemon.stop()
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "workernator_runner.daemon",
            "--config",
            str(daemon.config_path),
            "--after-stop",
            UNIT,
        ],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def _start_jobs(daemon: Daemon) -> list[str]:
    """A job that ends on SIGTERM and one that ignores it (killed after the grace)."""
    async with RunnerClient(daemon.config.socket) as client:
        polite = await client.start(*USER, "drip", {"count": 600, "interval": 0.5})
        stubborn = await client.start(*USER, "stubborn", {})
    return [polite.id, stubborn.id]


async def test_a_stop_of_the_unit_ends_every_job_and_records_it(
    daemon: Daemon, state_dir: Path
) -> None:
    jobs = await _start_jobs(daemon)
    states = [_state(daemon.config, job) for job in jobs]
    env = _fake_systemctl(state_dir / "bin", f"7 {UNIT} stop running\n")
    result = _after_stop(daemon, env)
    assert result.returncode == 0, result.stderr
    assert (state_dir / "bin" / "calls").read_text().split() == [
        "list-jobs",
        "--no-legend",
        "--plain",
        "--no-pager",
        "--full",
        UNIT,
    ]
    for job, before in zip(jobs, states, strict=True):
        after = _state(daemon.config, job)
        assert after.state is JobState.STOPPED, after  # recorded by its monitor
        assert process_gone(before.monitor_pid)
        assert process_gone(before.job_pid)
    assert _state(daemon.config, jobs[1]).signal == signal.SIGKILL  # it had its grace
    assert "runner unit stopped; running jobs ended" in result.stderr
    assert f"job={jobs[0]} owner=alice type=drip state=STOPPED duration_s=" in result.stderr
    daemon.start()
    async with RunnerClient(daemon.config.socket) as client:  # and the next runner agrees
        assert (await client.status(*USER, jobs[0])).state is JobState.STOPPED


@pytest.mark.parametrize(
    ("answer", "status", "says"),
    [
        (f"7 {UNIT} restart running\n", 0, "runner unit restarting; running jobs go on"),
        ("", 0, "systemd_job=-"),  # it crashed: systemd restarts it, no job queued
        ("9 other.service stop waiting\n", 0, "systemd_job=-"),
        ("", 1, "cannot tell a stop from a restart; running jobs go on"),
    ],
    ids=["restart", "crash", "another-unit-stops", "systemctl-fails"],
)
async def test_jobs_go_on_unless_the_unit_is_being_stopped(
    daemon: Daemon, state_dir: Path, answer: str, status: int, says: str
) -> None:
    jobs = await _start_jobs(daemon)
    env = _fake_systemctl(state_dir / "bin", answer, status)
    result = _after_stop(daemon, env)
    assert result.returncode == 0, result.stderr
    assert says in result.stderr
    for job in jobs:
        state = _state(daemon.config, job)
        assert state.state is JobState.RUNNING
        assert not process_gone(state.job_pid)
    daemon.start()
    async with RunnerClient(daemon.config.socket) as client:  # adopted by the next runner
        assert (await client.status(*USER, jobs[0])).state is JobState.RUNNING


async def test_keep_jobs_on_stop_keeps_them_on_a_stop_too(
    runner_config: RunnerConfig, state_dir: Path
) -> None:
    cfg = dataclasses.replace(runner_config, keep_jobs_on_stop=True)
    config_path = state_dir / "runner.toml"
    write_runner_config(cfg, config_path)
    with config_path.open("a") as f:
        f.write("keep_jobs_on_stop = true\n")
    daemon = Daemon(cfg, config_path, state_dir / "runner.log")
    daemon.start()
    try:
        jobs = await _start_jobs(daemon)
        env = _fake_systemctl(state_dir / "bin", f"7 {UNIT} stop running\n")
        result = _after_stop(daemon, env)
        assert result.returncode == 0, result.stderr
        assert "running jobs go on (keep_jobs_on_stop)" in result.stderr
        for job in jobs:
            assert _state(cfg, job).state is JobState.RUNNING
    finally:
        daemon.stop()
        await asyncio.to_thread(_stop_leftover_jobs, cfg)


def test_the_api_says_ready_once_its_port_listens(
    state_dir: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    make_certs(state_dir / "certs", os.geteuid())
    port = _free_port()
    config = write_api_config(
        state_dir / "api.toml", port, state_dir / "certs", state_dir / "runner.sock"
    )
    with (state_dir / "api.log").open("wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "workernator_api.server", "--config", str(config)],
            cwd="/",
            env=dict(os.environ, PYTHONPATH=str(ROOT), NOTIFY_SOCKET=address),
            stdout=log,
            stderr=log,
        )
    try:
        assert b"READY=1\n" in sock.recv(4096).splitlines(keepends=True)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # listening by the time it said so (without a runner: health says so)
        api.send_signal(signal.SIGTERM)
        assert b"STOPPING=1\n" in sock.recv(4096).splitlines(keepends=True)
        assert api.wait(timeout=30) == 0
    finally:
        if api.poll() is None:
            api.kill()
            api.wait()
