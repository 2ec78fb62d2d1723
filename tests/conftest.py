"""Shared test fixtures: an in-process job manager, a runner daemon, privileged-test policy."""

from __future__ import annotations

import os as _os

# gRPC (used by the e2e tests in this process) must not install fork handlers: the runner
# tests fork monitors from this process, and the child must not touch gRPC state.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.nethosts import JOB_USER, EgressLab, ensure_job_user
from workernator_runner.config import Retention, RunnerConfig
from workernator_runner.jobs import load_registry
from workernator_runner.manager import JobManager

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PROBE_MODULE = "tests.probe_jobs"


# Jobs run in namespaces as an unprivileged user: whatever starts one needs root.
JOB_FIXTURES = frozenset({"manager", "daemon", "stack", "egress_lab"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if JOB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.privileged)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") and os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.hookimpl(tryfirst=True)  # before the terminal reporter files it as a skip
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Under CI=true a skipped privileged test is a failure: CI must exercise them."""
    if IN_CI and report.skipped and "privileged" in report.keywords:
        report.outcome = "failed"
        report.longrepr = f"privileged test skipped under CI=true: {report.longrepr}"


def short_tmpdir(prefix: str) -> Path:
    """A short directory path: Unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def build_wheels(path: Path) -> str:
    """Build this checkout's wheel and its dependencies' into ``path`` (what `make wheels`
    makes: scripts/build_wheels.sh); "" when it worked, else what the script said."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_wheels.sh"), str(path)],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        check=False,
    )
    return "" if result.returncode == 0 else result.stdout + result.stderr


@pytest.fixture(scope="session")
def wheelhouse() -> Iterator[Path]:
    """This checkout built as a wheel, with its dependencies' wheels: what `make wheels` makes
    and deploy/install.sh installs from, offline."""
    path = short_tmpdir("wn-wheels-")
    try:
        failure = build_wheels(path)
        assert not failure, failure
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def install_code(prefix: Path, wheels: Path) -> None:
    """``deploy/install.sh --code-only``: a virtualenv at ``prefix`` with the wheel installed."""
    command = ["bash", str(DEPLOY / "install.sh"), "--code-only"]
    result = subprocess.run(
        [*command, "--prefix", str(prefix), "--wheels", str(wheels)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def installed_code(wheelhouse: Path) -> Iterator[Path]:
    """The project installed the way a host gets it, in a directory every user can read (a
    checkout under /root is not): the api of the e2e tests runs from here, unprivileged."""
    base = short_tmpdir("wn-code-")
    os.chmod(base, 0o755)
    try:
        install_code(base / "venv", wheelhouse)
        yield base / "venv"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = short_tmpdir("wn-state-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def job_user() -> str:
    """The unprivileged user jobs run as, created for the tests if this host lacks it."""
    if os.geteuid() == 0:
        ensure_job_user(JOB_USER)
    return JOB_USER


@pytest.fixture(scope="session")
def egress_lab() -> Iterator[EgressLab]:
    """A bridge and subnet of the test session's own for egress jobs; removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lab = EgressLab.create()
    try:
        yield lab
    finally:
        lab.remove()


@pytest.fixture
def runner_config(state_dir: Path, job_user: str, egress_lab: EgressLab) -> RunnerConfig:
    return RunnerConfig(
        socket=state_dir / "runner.sock",
        socket_group="",
        state_dir=state_dir,
        stop_grace_seconds=1.0,
        job_modules=(PROBE_MODULE,),
        job_user=job_user,
        egress_bridge=egress_lab.bridge,
        egress_subnet=egress_lab.subnet,
        resolv_conf=egress_lab.resolv_conf,
    )


@contextlib.asynccontextmanager
async def manager_with(cfg: RunnerConfig, **changes: Any) -> AsyncIterator[JobManager]:
    """A job manager of ``cfg`` with ``changes``; running jobs are stopped at the end."""
    cfg = dataclasses.replace(cfg, **changes)
    m = JobManager(cfg, load_registry(cfg.job_modules))
    await m.open()
    try:
        yield m
    finally:
        for job in m.list():
            if not job.state.finished:
                await m.stop(job.id)
        await m.close()


@pytest.fixture
async def manager(runner_config: RunnerConfig) -> AsyncIterator[JobManager]:
    async with manager_with(runner_config) as m:
        yield m


def write_runner_config(cfg: RunnerConfig, path: Path) -> None:
    modules = ", ".join(f'"{m}"' for m in cfg.job_modules)
    path.write_text(
        "[runner]\n"
        f'socket = "{cfg.socket}"\n'
        f'socket_group = "{cfg.socket_group}"\n'
        f'state_dir = "{cfg.state_dir}"\n'
        f"stop_grace_seconds = {cfg.stop_grace_seconds}\n"
        f"job_modules = [{modules}]\n"
        f"allowed_uids = [{', '.join(str(u) for u in sorted(cfg.allowed_uids))}]\n"
        f'job_user = "{cfg.job_user}"\n'
        f'egress_bridge = "{cfg.egress_bridge}"\n'
        f'egress_subnet = "{cfg.egress_subnet}"\n'
        f'resolv_conf = "{cfg.resolv_conf}"\n'
        f"max_job_output = {cfg.max_job_output}\n"
        f"min_free_bytes = {cfg.min_free_bytes}\n"
    )
    if cfg.retention != Retention():  # last, and only then: tests append keys to [runner]
        with path.open("a") as f:
            f.write(
                "[retention]\n"
                f"max_jobs = {cfg.retention.max_jobs}\n"
                f'max_age = "{int(cfg.retention.max_age_seconds)}s"\n'
                f"max_output_bytes = {cfg.retention.max_output_bytes}\n"
            )


@dataclass
class Daemon:
    """A ``workernator-runner`` process of the test's own, restartable."""

    config: RunnerConfig
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workernator_runner.daemon", "--config", str(self.config_path)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 20
        while not self._listening():  # a socket left by a killed runner exists, refusing
            if self.process.poll() is not None:
                raise RuntimeError(f"runner exited: {self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("runner did not start")
            time.sleep(0.02)

    def _listening(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            return s.connect_ex(str(self.config.socket)) == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)
        self.process = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


@pytest.fixture
def daemon(runner_config: RunnerConfig, state_dir: Path) -> Iterator[Daemon]:
    config_path = state_dir / "runner.toml"
    write_runner_config(runner_config, config_path)
    d = Daemon(runner_config, config_path, state_dir / "runner.log")
    d.start()
    try:
        yield d
    finally:
        d.stop()
        _stop_leftover_jobs(runner_config)


def _stop_leftover_jobs(cfg: RunnerConfig) -> None:
    """Stop jobs a test left running, through a manager of our own."""

    async def stop_all() -> None:
        async with JobManager(cfg, load_registry(cfg.job_modules)) as m:
            for job in m.list():
                if not job.state.finished:
                    await m.stop(job.id)

    asyncio.run(stop_all())


@contextlib.contextmanager
def daemon_on_tmpfs_jobs(
    cfg: RunnerConfig, size: str, name: str, inodes: int = 0
) -> Iterator[Daemon]:
    """A started runner of ``cfg`` whose jobs directory is a tmpfs of ``size`` (and of
    ``inodes`` files, if given; named ``name`` in the mount table): a disk that fills. Stopped,
    its jobs ended and unmounted at the end."""
    jobs = cfg.state_dir / "jobs"
    jobs.mkdir(mode=0o700)
    options = f"size={size},mode=0700" + (f",nr_inodes={inodes}" if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, name, str(jobs)], check=True)
    config_path = cfg.state_dir / "runner.toml"
    write_runner_config(cfg, config_path)
    d = Daemon(cfg, config_path, cfg.state_dir / "runner.log")
    try:
        d.start()
        yield d
    finally:
        try:
            d.stop()
            _stop_leftover_jobs(cfg)
        finally:
            subprocess.run(["umount", str(jobs)], check=True)
