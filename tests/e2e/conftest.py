"""The whole stack for end-to-end tests: a runner, an api on loopback, fresh certificates."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import PROBE_MODULE, ROOT, Daemon, short_tmpdir, write_runner_config
from tests.nethosts import EgressLab
from workernator_api import certs
from workernator_runner.config import RunnerConfig

USERS = [("admin", "admin"), ("alice", "user"), ("bob", "user"), ("carol", "viewer")]
API_USER = "nobody"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Stack:
    address: str
    certs: Path
    runner_socket: Path
    runner: Daemon
    api: subprocess.Popen[bytes]
    api_log: Path
    api_uid: int
    api_python: Path  # the interpreter of the installed code the api runs from
    tmp: Path
    extra: dict[str, Path] = field(default_factory=dict)

    def env(self, user: str) -> dict[str, str]:
        """The environment for the CLI acting as ``user``."""
        return dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            WORKERNATOR_HOST=self.address,
            WORKERNATOR_CERT=str(self.certs / f"{user}.pem"),
            WORKERNATOR_KEY=str(self.certs / f"{user}-key.pem"),
            WORKERNATOR_CA=str(self.certs / "server-ca.pem"),
            WORKERNATOR_CONFIG=os.devnull,  # no config file: flags and env only
        )

    def credentials(self, user: str) -> tuple[bytes, bytes, bytes]:
        """(server CA, cert, key) PEM bytes for a gRPC client acting as ``user``."""
        return (
            (self.certs / "server-ca.pem").read_bytes(),
            (self.certs / f"{user}.pem").read_bytes(),
            (self.certs / f"{user}-key.pem").read_bytes(),
        )


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"api exited: {log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("api did not start listening")


def make_certs(cert_dir: Path, api_uid: int) -> certs.Deployment:
    """The deployment of the e2e tests: both CAs, the api's pair, a client pair per user.

    The api's own key is readable by the api's user only; the CA keys stay in ``ca/`` (0700,
    root's), which the api cannot enter: it never needs them.
    """
    deployment = certs.create_deployment(cert_dir, ["localhost", "127.0.0.1"], USERS)
    os.chown(deployment.server_key, api_uid, -1)
    os.chmod(cert_dir, 0o755)
    return deployment


def write_api_config(
    path: Path, port: int, cert_dir: Path, runner_socket: Path, **files: Path
) -> Path:
    """An api.toml for ``cert_dir``'s server pair and client CA (``files`` overrides them)."""
    paths = {
        "cert": cert_dir / "server.pem",
        "key": cert_dir / "server-key.pem",
        "client_ca": cert_dir / "client-ca.pem",
    } | files
    path.write_text(
        "[api]\n"
        f'listen = "127.0.0.1:{port}"\n'
        + "".join(f'{name} = "{value}"\n' for name, value in paths.items())
        + f'runner_socket = "{runner_socket}"\n'
    )
    return path


def run_api(config: Path, log: Path, api_uid: int, python: Path) -> subprocess.Popen[bytes]:
    """``workernator-api --config config`` as ``api_uid`` (never root), from the installed code
    of ``python`` (:func:`tests.conftest.installed_code`), its output in ``log``."""
    assert api_uid != 0, "the api runs unprivileged"
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(python), "-m", "workernator_api.server", "--config", str(config)],
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            stdout=out,
            stderr=out,
            user=api_uid,
            group=pwd.getpwuid(api_uid).pw_gid,
            extra_groups=[],
        )


def start_api(
    config: Path, log: Path, api_uid: int, port: int, python: Path
) -> subprocess.Popen[bytes]:
    """:func:`run_api`, returning once it listens on ``port``."""
    api = run_api(config, log, api_uid, python)
    try:
        _wait_for_port(port, api, log)
    except BaseException:
        stop_api(api)
        raise
    return api


def stop_api(api: subprocess.Popen[bytes]) -> None:
    if api.poll() is None:
        api.terminate()
    try:
        api.wait(timeout=20)
    except subprocess.TimeoutExpired:
        api.kill()
        api.wait()


@pytest.fixture(scope="module")
def stack(job_user: str, egress_lab: EgressLab, installed_code: Path) -> Iterator[Stack]:
    """The runner (root, from this checkout) and the api as API_USER, from the installed code:
    the api never runs as root, wherever the checkout is."""
    tmp = short_tmpdir("wn-e2e-")
    os.chmod(tmp, 0o755)
    cert_dir = tmp / "certs"
    api_uid = pwd.getpwnam(API_USER).pw_uid
    api_python = installed_code / "bin" / "python"
    make_certs(cert_dir, api_uid)

    state = tmp / "state"
    state.mkdir()
    cfg = RunnerConfig(
        socket=tmp / "run" / "runner.sock",
        socket_group="",
        state_dir=state,
        stop_grace_seconds=1.0,
        allowed_uids=frozenset({0, api_uid}),
        job_modules=(PROBE_MODULE,),  # job types the runner has and the api does not offer
        job_user=job_user,
        egress_bridge=egress_lab.bridge,
        egress_subnet=egress_lab.subnet,
        resolv_conf=egress_lab.resolv_conf,
    )
    (tmp / "run").mkdir(mode=0o755)
    write_runner_config(cfg, tmp / "runner.toml")
    runner = Daemon(cfg, tmp / "runner.toml", tmp / "runner.log")
    runner.start()
    os.chown(cfg.socket, -1, pwd.getpwnam(API_USER).pw_gid)
    os.chmod(cfg.socket, 0o660)

    port = _free_port()
    config = write_api_config(tmp / "api.toml", port, cert_dir, cfg.socket)
    api_log = tmp / "api.log"
    api = run_api(config, api_log, api_uid, api_python)
    stack: Stack | None = None
    try:
        _wait_for_port(port, api, api_log)
        stack = Stack(
            f"127.0.0.1:{port}",
            cert_dir,
            cfg.socket,
            runner,
            api,
            api_log,
            api_uid,
            api_python,
            tmp,
        )
        yield stack
    finally:
        stop_api(api)
        if stack is not None and stack.api is not api:  # a test restarted it: that one too
            stop_api(stack.api)
        runner.stop()
        from tests.conftest import _stop_leftover_jobs

        _stop_leftover_jobs(cfg)
        shutil.rmtree(tmp, ignore_errors=True)


def channel(
    stack: Stack, user: str, options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """An mTLS channel to the stack's api, acting as ``user``."""
    ca, cert, key = stack.credentials(user)
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.aio.secure_channel(stack.address, creds, options=options)
