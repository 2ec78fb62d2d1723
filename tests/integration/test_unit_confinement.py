"""The runner, confined as its unit confines it (tests/unit_confine.py reads the unit file),
runs every job type, an egress job, a stop and the unit's ExecStopPost= helper.

So a capability, path or system call the unit takes away and the runner needs fails here, not
on an operator's host. Each test starts the real ``workernator-runner`` and talks to its socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.model import JobState, JobStatus
from tests.conftest import PROBE_MODULE, ROOT, Daemon, _stop_leftover_jobs, write_runner_config
from tests.e2e.conftest import _free_port, make_certs, write_api_config
from tests.nethosts import EgressLab, NetHost, bridge_host, ensure_job_user
from tests.unit_confine import service_settings
from workernator_api.runner_client import RunnerClient
from workernator_runner import store
from workernator_runner.config import RunnerConfig

UNIT = ROOT / "deploy/systemd/workernator-runner.service"
USER = ("alice", "user")
# Capability numbers (linux/capability.h) of what the unit keeps.
CAPS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_NICE": 23,
}
pytestmark = pytest.mark.privileged


def confined(argv: list[str], unit: Path = UNIT) -> list[str]:
    """``argv`` as ``unit`` would run it."""
    return [sys.executable, "-m", "tests.unit_confine", str(unit), "--", *argv]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


PROBE = r"""
import ctypes, errno, json, os, socket
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines()
              if ":\t" in line)
libc = ctypes.CDLL(None, use_errno=True)
result = {k: status[k].strip() for k in ("CapBnd", "CapAmb", "CapInh", "NoNewPrivs", "Seccomp")}
result["usr_writable"] = os.access("/usr", os.W_OK)
result["root_entries"] = os.listdir("/root")
try:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    result["packet"] = "allowed"
except OSError as exc:
    result["packet"] = errno.errorcode[exc.errno]
result["swapoff"] = (libc.swapoff(b"/nonexistent"), errno.errorcode.get(ctypes.get_errno()))
print(json.dumps(result))
"""


def test_the_confinement_is_the_units() -> None:
    """The harness applies what the unit says (the control for the tests below)."""
    settings = service_settings(UNIT)
    kept = settings["CapabilityBoundingSet"][0].split()
    assert set(kept) == set(CAPS)  # a capability added to the unit must be added here too
    result = subprocess.run(
        confined([sys.executable, "-c", PROBE]),
        cwd="/",
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout)
    assert int(probe["CapBnd"], 16) == sum(1 << CAPS[c] for c in kept)
    assert int(probe["CapAmb"], 16) == int(probe["CapInh"], 16) == 0
    assert probe["NoNewPrivs"] == "1"
    assert probe["Seccomp"] == "2"
    assert probe["usr_writable"] is False  # ProtectSystem=full
    assert probe["root_entries"] == []  # ProtectHome=yes
    assert probe["packet"] == "EAFNOSUPPORT"  # RestrictAddressFamilies=
    assert probe["swapoff"] == [-1, "EPERM"]  # SystemCallFilter=~@swap, SystemCallErrorNumber=


@pytest.fixture
def unit_state() -> Iterator[Path]:
    """The runner's state outside /tmp and /var/tmp (the unit has PrivateTmp=yes)."""
    path = Path(tempfile.mkdtemp(prefix="wn-unit-", dir="/run"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _wait_ready(notify: socket.socket, runner: subprocess.Popen[bytes], log: Path) -> None:
    """READY=1 from a daemon, or a failure with its log as soon as it exits without it."""
    notify.settimeout(0.2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if b"READY=1" in notify.recv(4096):
                return
        except TimeoutError:
            pass
        if runner.poll() is not None:
            pytest.fail(f"it exited {runner.returncode}: {log.read_text()}")
    pytest.fail(f"no READY=1 within 60 s: {log.read_text()}")


def _read_state(cfg: RunnerConfig, job_id: str) -> store.StateFile:
    state = store.read_state(cfg.jobs_dir / job_id)
    assert state is not None
    return state


def _fake_systemctl(directory: Path, answer: str) -> str:
    directory.mkdir(exist_ok=True)
    (directory / "systemctl").write_text(f"#!/bin/sh\nprintf '%s' '{answer}'\n")
    (directory / "systemctl").chmod(0o755)
    return f"{directory}:{os.environ.get('PATH', '/usr/bin:/bin')}"


async def _run_jobs(
    cfg: RunnerConfig, host: NetHost, port: int
) -> tuple[dict[str, tuple[JobStatus, bytes]], JobStatus, JobStatus]:
    """Each job type to its end, a stubborn job stopped, and a job left running."""
    async with RunnerClient(cfg.socket) as client:
        results = {}
        for job_type, args in (
            ("noop", {}),
            ("fib", {"position": 10}),
            ("eval", {"expression": "2 * x + 1", "variables": {"x": 20}}),
            ("wait", {"seconds": 0, "url": f"http://{host.address}:{port}/ok"}),
            ("write", {"megabytes": 1, "direct": 0}),  # leaves a file in its workspace
        ):
            job = await client.start(*USER, job_type, args)
            out = b"".join([c.data async for batch in client.tail(*USER, job.id) for c in batch])
            results[job_type] = (await client.status(*USER, job.id), out)
        stubborn = await client.start(*USER, "stubborn", {})
        stopped = await client.stop(*USER, stubborn.id)
        running = await client.start(*USER, "drip", {"count": 600, "interval": 0.5})
    return results, stopped, running


def test_every_job_type_runs_under_the_units_confinement_and_a_stop_ends_them(
    unit_state: Path,
    job_user: str,
    egress_lab: EgressLab,
) -> None:
    cfg = RunnerConfig(
        socket=unit_state / "run" / "runner.sock",
        socket_group="",
        state_dir=unit_state / "state",
        stop_grace_seconds=1.0,
        job_modules=(PROBE_MODULE,),
        job_user=job_user,
        egress_bridge=egress_lab.bridge,
        egress_subnet=egress_lab.subnet,
        resolv_conf=egress_lab.resolv_conf,
    )
    (unit_state / "run").mkdir(mode=0o755)
    config_path = unit_state / "runner.toml"
    write_runner_config(cfg, config_path)
    log_path = unit_state / "runner.log"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"wn-unit-notify-{os.getpid()}-{time.monotonic_ns()}"
    notify.bind("\0" + name)
    daemon = [sys.executable, "-m", "workernator_runner.daemon", "--config", str(config_path)]
    with log_path.open("wb") as log:
        runner = subprocess.Popen(
            confined(daemon),
            cwd="/",
            env=_env(NOTIFY_SOCKET="@" + name, WN_UNIT_CONFINE_WRITABLE=str(unit_state)),
            stdout=log,
            stderr=log,
        )
    try:
        _wait_ready(notify, runner, log_path)
        with bridge_host(egress_lab) as host:  # on the bridge the runner just made
            port, _ = host.http_server()
            results, stopped, running = asyncio.run(_run_jobs(cfg, host, port))
        for job_type, (status, out) in results.items():
            assert status.state is JobState.COMPLETED, (job_type, status, out)
        assert b"[RESULT] 34\n" in results["fib"][1]
        assert b"[RESULT] 41\n" in results["eval"][1]
        assert b"[RESULT] 201" in results["wait"][1]  # egress: bridge, veth, nftables
        assert stopped.state is JobState.STOPPED and stopped.signal == signal.SIGKILL
        left = [p.name for p in cfg.workspaces_dir.iterdir() if not p.name.startswith(".spare-")]
        assert left == [running.id]  # the job user's files of the others were removed

        runner.send_signal(signal.SIGTERM)  # systemctl stop: the runner alone...
        assert runner.wait(30) == 0
        state = _read_state(cfg, running.id)
        assert state.state is JobState.RUNNING  # ...its jobs go on until ExecStopPost=
        after_stop = subprocess.run(
            confined([*daemon, "--after-stop", "workernator-runner.service"]),
            cwd="/",
            env=_env(
                WN_UNIT_CONFINE_WRITABLE=str(unit_state),
                PATH=_fake_systemctl(
                    unit_state / "bin", "1 workernator-runner.service stop running\n"
                ),
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert after_stop.returncode == 0, after_stop.stderr
        assert _read_state(cfg, running.id).state is JobState.STOPPED
    finally:
        notify.close()
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        _stop_leftover_jobs(cfg)
        if runner.returncode not in (0, None):
            print(log_path.read_text())


# --- the api ----------------------------------------------------------------------------------

API_UNIT = ROOT / "deploy/systemd/workernator-api.service"
API_USER = "workernator-api"  # the unit's User= (deploy/sysusers.d makes it on a real host)

API_PROBE = r"""
import ctypes, errno, json, mmap, os, socket
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines()
              if ":\t" in line)
out = {k: status[k].strip() for k in ("Uid", "CapBnd", "CapEff", "NoNewPrivs", "Seccomp")}
out["writable"] = [p for p in ("/usr", "/etc", "/var", "/run", "/tmp") if os.access(p, os.W_OK)]
out["pid1_visible"] = os.path.exists("/proc/1")
out["sys_tunables"] = os.path.exists("/proc/sys/kernel")
out["devices"] = sorted(os.listdir("/dev"))
def attempt(action):
    try:
        action()
        return "allowed"
    except OSError as exc:
        return errno.errorcode[exc.errno]
out["wx"] = attempt(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC))
out["netlink"] = attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
out["setpriority"] = attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, 1))
libc = ctypes.CDLL(None, use_errno=True)
out["unshare"] = (libc.unshare(0x20000), errno.errorcode.get(ctypes.get_errno()))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def api_user() -> int:
    ensure_job_user(API_USER)  # a system user with a group of its own, as sysusers.d makes
    return pwd.getpwnam(API_USER).pw_uid


def test_the_api_confinement_is_the_units(api_user: int) -> None:
    """The harness applies what the api's unit says (the control for the test below)."""
    result = subprocess.run(
        confined([sys.executable, "-c", API_PROBE], API_UNIT),
        cwd="/",
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout)
    assert probe["Uid"].split() == [str(api_user)] * 4
    assert int(probe["CapBnd"], 16) == int(probe["CapEff"], 16) == 0
    assert (probe["NoNewPrivs"], probe["Seccomp"]) == ("1", "2")
    assert probe["writable"] == ["/tmp"]  # ProtectSystem=strict, PrivateTmp=yes
    assert probe["pid1_visible"] is False  # ProtectProc=invisible
    assert probe["sys_tunables"] is False  # ProcSubset=pid
    assert probe["devices"] == ["full", "null", "random", "shm", "tty", "urandom", "zero"]
    assert probe["wx"] == "EACCES"  # MemoryDenyWriteExecute=yes
    assert probe["netlink"] == "EAFNOSUPPORT"  # RestrictAddressFamilies=
    assert probe["setpriority"] == "EPERM"  # SystemCallFilter=~@resources
    assert probe["unshare"] == [-1, "EPERM"]  # RestrictNamespaces=yes


@pytest.fixture
def api_dir() -> Iterator[Path]:
    """Config and certificates where the confined api can read them (not /tmp, not /root)."""
    path = Path(tempfile.mkdtemp(prefix="wn-api-", dir="/run"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_api_serves_jobs_under_its_units_confinement(
    api_user: int, api_dir: Path, runner_config: RunnerConfig, state_dir: Path
) -> None:
    """grpcio, TLS and the runner's socket, with no capability, no writable and executable
    memory, the system calls of @system-service without @privileged and @resources, a /proc of
    its own processes, a read-only system: the CLI starts a job and reads it back."""
    group = grp.getgrnam(API_USER).gr_name
    cfg = dataclasses.replace(
        runner_config,
        socket=api_dir / "run" / "runner.sock",
        socket_group=group,
        allowed_uids=frozenset({0, api_user}),
    )
    (api_dir / "run").mkdir(mode=0o755)
    write_runner_config(cfg, state_dir / "runner.toml")
    runner = Daemon(cfg, state_dir / "runner.toml", state_dir / "runner.log")
    runner.start()
    make_certs(api_dir / "certs", api_user)
    port = _free_port()
    config = write_api_config(api_dir / "api.toml", port, api_dir / "certs", cfg.socket)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"wn-api-notify-{os.getpid()}-{time.monotonic_ns()}"
    notify.bind("\0" + name)
    log_path = api_dir / "api.log"
    api_argv = [sys.executable, "-m", "workernator_api.server", "--config", str(config)]
    with log_path.open("wb") as log:
        api = subprocess.Popen(
            confined(api_argv, API_UNIT),
            cwd="/",
            env=_env(NOTIFY_SOCKET="@" + name),
            stdout=log,
            stderr=log,
        )
    try:
        _wait_ready(notify, api, log_path)
        status = Path(f"/proc/{api.pid}/status").read_text()
        assert f"Uid:\t{api_user}\t" in status  # the api itself, as its user
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            WORKERNATOR_HOST=f"127.0.0.1:{port}",
            WORKERNATOR_CERT=str(api_dir / "certs" / "alice.pem"),
            WORKERNATOR_KEY=str(api_dir / "certs" / "alice-key.pem"),
            WORKERNATOR_CA=str(api_dir / "certs" / "server-ca.pem"),
            WORKERNATOR_CONFIG=os.devnull,
        )
        cli = [sys.executable, "-m", "workernator_api.cli"]
        started = subprocess.run(
            [*cli, "jobs", "start", "fib", "10"], env=env, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr + log_path.read_text()
        job_id = started.stdout.split("ID: ")[1].split()[0]
        tail = subprocess.run(
            [*cli, "jobs", "tail", job_id], env=env, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert "[RESULT] 34\n" in tail.stdout, tail.stderr
        assert f"job={job_id} owner=alice type=fib" in log_path.read_text()
    finally:
        notify.close()
        if api.poll() is None:
            api.terminate()
            api.wait(timeout=30)
        runner.stop()
