"""The ``workernator`` CLI through click's CliRunner, against a fake JobService over real mTLS.

The fake answers like the API server does (the e2e tests run the real one): it lets these tests
check what the CLI sends, what it prints, and how it reports every kind of error, in one line.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import grpc
import pytest
from click.shell_completion import ShellComplete
from click.testing import CliRunner, Result
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from tests import pki as pkitools
from workernator_api import certs, cli
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb

BLOCKING_JOB = "BL0CK0"
BROKEN_JOB = "BR0KEN"
SLOW_JOB = "SL0W00"  # its status never comes
TITLES = {"noop": "No-op", "fib": "Fibonacci", "eval": "Evaluate", "wait": "Wait"}
TYPES = {
    "noop": pb.JOB_TYPE_NOOP,
    "fib": pb.JOB_TYPE_FIB,
    "eval": pb.JOB_TYPE_EVAL,
    "wait": pb.JOB_TYPE_WAIT,
}


@dataclass
class FakeService:
    """A JobService that keeps jobs in a dict and records every request."""

    jobs: dict[str, pb.JobStatus] = field(default_factory=dict)
    output: dict[str, list[pb.TailJobOutputResponse]] = field(default_factory=dict)
    requests: list[Message] = field(default_factory=list)
    fail: tuple[grpc.StatusCode, str] | None = None
    next_id: str = "XE38YM"
    stop_deadline: float | None = None  # seconds the last StopJob's client gave it
    max_page_size: int = 2  # a small page, so that listing pages

    def _enter(self, request: Message, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        if self.fail is not None:
            context.abort(*self.fail)

    def _job(self, job_id: str, context: grpc.ServicerContext) -> pb.JobStatus:
        if job_id not in self.jobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id}")
        return self.jobs[job_id]

    def start(
        self, request: pb.StartJobRequest, context: grpc.ServicerContext
    ) -> pb.StartJobResponse:
        self._enter(request, context)
        arm = request.WhichOneof("args") or "noop"
        if arm == "fib" and request.fib.position < 1:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "argument 'position': must be between 1 and 1000000, got 0",
            )
        started = Timestamp()
        started.GetCurrentTime()
        job = pb.JobStatus(
            id=self.next_id,
            type=TYPES[arm],
            title=TITLES[arm],
            owner="alice",
            state=pb.JOB_STATE_RUNNING,
            started_at=started,
        )
        getattr(job, arm).CopyFrom(getattr(request, arm))
        if request.HasField("limits"):  # the effective limits: here, what was asked for
            job.limits.CopyFrom(request.limits)
        self.jobs[job.id] = job
        return pb.StartJobResponse(job=job)

    def status(
        self, request: pb.GetJobStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetJobStatusResponse:
        self._enter(request, context)
        if request.job_id == SLOW_JOB:
            while context.is_active():
                time.sleep(0.05)
        return pb.GetJobStatusResponse(job=self._job(request.job_id, context))

    def stop(self, request: pb.StopJobRequest, context: grpc.ServicerContext) -> pb.StopJobResponse:
        self._enter(request, context)
        self.stop_deadline = context.time_remaining()
        job = self._job(request.job_id, context)
        if job.state == pb.JOB_STATE_RUNNING:
            job.state = pb.JOB_STATE_STOPPED
            job.ended_at.GetCurrentTime()
        return pb.StopJobResponse(job=job)

    def tail(
        self, request: pb.TailJobOutputRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.TailJobOutputResponse]:
        self._enter(request, context)
        self._job(request.job_id, context)
        yield from self.output.get(request.job_id, [])
        if request.job_id == BROKEN_JOB:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the runner is not available")
        if request.job_id == BLOCKING_JOB:  # a job that never ends: follow until cancelled
            while context.is_active():
                time.sleep(0.05)

    def list(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        self._enter(request, context)
        jobs = [
            job
            for job in self.jobs.values()
            if request.state in (pb.JOB_STATE_UNSPECIFIED, job.state)
            and request.owner in ("", job.owner)
        ]
        first = int(request.page_token or 0)
        last = first + min(request.page_size or 100, self.max_page_size)
        token = str(last) if last < len(jobs) else ""
        return pb.ListJobsResponse(jobs=jobs[first:last], next_page_token=token)

    def types(
        self, request: pb.ListJobTypesRequest, context: grpc.ServicerContext
    ) -> pb.ListJobTypesResponse:
        self._enter(request, context)
        return pb.ListJobTypesResponse(
            types=[
                pb.JobTypeInfo(name="noop", type=pb.JOB_TYPE_NOOP, title="No-op"),
                pb.JobTypeInfo(
                    name="fib",
                    type=pb.JOB_TYPE_FIB,
                    title="Fibonacci",
                    args=[pb.ArgumentInfo(name="position", type="int", required=True, min=1)],
                ),
            ]
        )


def _server(service: FakeService, deployment: certs.Deployment) -> tuple[grpc.Server, int]:
    def unary(
        fn: Any, request: type[Message], response: type[Message]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )

    handlers = {
        "StartJob": unary(service.start, pb.StartJobRequest, pb.StartJobResponse),
        "StopJob": unary(service.stop, pb.StopJobRequest, pb.StopJobResponse),
        "GetJobStatus": unary(service.status, pb.GetJobStatusRequest, pb.GetJobStatusResponse),
        "ListJobs": unary(service.list, pb.ListJobsRequest, pb.ListJobsResponse),
        "ListJobTypes": unary(service.types, pb.ListJobTypesRequest, pb.ListJobTypesResponse),
        "TailJobOutput": grpc.unary_stream_rpc_method_handler(
            service.tail,
            request_deserializer=pb.TailJobOutputRequest.FromString,
            response_serializer=pb.TailJobOutputResponse.SerializeToString,
        ),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("workernator.v1.JobService", handlers),)
    )
    credentials = grpc.ssl_server_credentials(
        [(deployment.server_key.read_bytes(), deployment.server_cert.read_bytes())],
        root_certificates=deployment.client_ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.fixture
def pki(tmp_path: Path) -> certs.Deployment:
    return certs.create_deployment(
        tmp_path / "pki", ["localhost", "127.0.0.1"], [("alice", "user"), ("bob", "user")]
    )


@pytest.fixture
def fake(pki: certs.Deployment) -> Iterator[tuple[FakeService, str]]:
    service = FakeService()
    server, port = _server(service, pki)
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def base_env(tmp_path: Path) -> dict[str, str | None]:
    """No WORKERNATOR_* variables from the outside, and a config directory of our own."""
    env: dict[str, str | None] = {
        name: None for name in os.environ if name.startswith("WORKERNATOR")
    }
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    return env


@pytest.fixture
def env(
    tmp_path: Path, pki: certs.Deployment, fake: tuple[FakeService, str]
) -> dict[str, str | None]:
    cert, key = pki.users["alice"]
    return base_env(tmp_path) | {
        "WORKERNATOR_HOST": fake[1],
        "WORKERNATOR_CERT": str(cert),
        "WORKERNATOR_KEY": str(key),
        "WORKERNATOR_CA": str(pki.server_ca_cert),
    }


def run(args: list[str], env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli.cli, args, env=env, prog_name="workernator")


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


# --- help -------------------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    top = run(["--help"])
    assert top.exit_code == 0
    for command in ("jobs", "certs", "completion"):
        assert f"\n  {command} " in top.stdout
    jobs = run(["jobs", "--help"])
    for command in ("start", "status", "stop", "tail", "list", "types"):
        assert f"\n  {command} " in jobs.stdout
    assert "WORKERNATOR_HOST" in jobs.stdout
    start = run(["jobs", "start", "--help"])
    lines = [line.split()[:2] for line in start.stdout.split("Commands:")[1].strip().splitlines()]
    assert lines == [
        ["noop", "(no"],
        ["fib", "POSITION"],
        ["eval", "EXPRESSION"],
        ["wait", "SECONDS"],
    ]
    assert "SECONDS URL" in start.stdout
    certs_help = run(["certs", "--help"])
    for command in ("ca", "server", "client", "init"):
        assert f"\n  {command} " in certs_help.stdout


def test_every_jobs_command_takes_the_connection_options() -> None:
    for args in (
        ["start", "noop"],
        ["start", "fib"],
        ["start", "eval"],
        ["start", "wait"],
        ["status"],
        ["stop"],
        ["tail"],
        ["list"],
        ["types"],
    ):
        text = run(["jobs", *args, "--help"]).stdout
        for option in ("--host", "--cert", "--key", "--ca", "--config", "--output"):
            assert option in text, (args, option)


LIMIT_OPTIONS = (
    "--cpu",
    "--memory",
    "--pids",
    "--io-read",
    "--io-write",
    "--io-read-iops",
    "--io-write-iops",
)


def test_every_start_command_takes_the_limit_options() -> None:
    for arm in ("noop", "fib", "eval", "wait"):
        text = run(["jobs", "start", arm, "--help"]).stdout
        for option in LIMIT_OPTIONS:
            assert f"\n  {option} " in text, (arm, option)
        flat = " ".join(text.split())
        assert "--cpu CPUS CPU time the job may use, in CPUs: 0.5 is half a CPU" in flat
        assert "--memory SIZE Memory the job may use, like 256M or 1.5G" in flat
        assert "which are powers of 1024 (K = 1024 bytes; KiB, MiB, GiB, TiB also work)" in flat
        assert "--io-read SIZE Bytes per second the job may read from disk" in flat
        assert "--pids N Processes and threads" in flat
    group = " ".join(run(["jobs", "start", "--help"]).stdout.split())
    assert "--cpu 0.5 --memory 256M --pids 64 --io-read 10M --io-write 10M" in group
    assert "powers of 1024 (K = 1024 bytes)" in group
    assert "takes the server's default" in group
    status_help = " ".join(run(["jobs", "status", "--help"]).stdout.split())
    assert "-v, --verbose Also show the owner, the resource limits" in status_help
    assert '"Out of memory: yes"' in status_help


def test_tail_help_documents_where_the_end_message_goes() -> None:
    text = " ".join(run(["jobs", "tail", "--help"]).stdout.split())
    assert "Job finished, no more output, exiting tail!" in text
    assert "on stdout when stdout is a terminal, else on stderr" in text


# --- usage errors (exit 2, click's message) ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs", "start", "fib"], "Missing argument 'POSITION'"),
        (["jobs", "start", "eval"], "Missing argument 'EXPRESSION'"),
        (["jobs", "start", "wait", "5"], "Missing argument 'URL'"),
        (["jobs", "start", "wait"], "Missing argument 'SECONDS'"),
        (["jobs", "status"], "Missing argument 'ID'"),
        (["jobs", "stop"], "Missing argument 'ID'"),
        (["jobs", "tail"], "Missing argument 'ID'"),
        (["jobs", "start", "fib", "three"], "Invalid value for 'POSITION'"),
        (["jobs", "start", "fib", "1", "2"], "Got unexpected extra argument (2)"),
        (["jobs", "start", "wait", "1x", "http://h"], "Invalid value for 'SECONDS'"),
        (
            ["jobs", "start", "wait", "99999999999999999999d", "http://h"],
            "Invalid value for 'SECONDS': '99999999999999999999d' is too long: at most 1 day",
        ),
        (["jobs", "start", "eval", "x", "--var", "x"], "Invalid value for '--var'"),
        (["jobs", "start", "eval", "x", "--var", "x=1", "--var", "x=2"], "more than once"),
        (["jobs", "tail", "ABC", "--last", "1", "--offset", "2"], "cannot be used together"),
        (["jobs", "list", "--state", "sleeping"], "Invalid value for '--state'"),
        (["jobs", "start", "sleep"], "No such command 'sleep'"),
        (["jobs", "start", "noop", "--cpu"], "Option '--cpu' requires an argument"),
        (["certs", "init", "d", "--user", "alice"], "is not USER:ROLE"),
        (["certs", "client", "alice"], "Missing option '--role'"),
    ],
)
def test_usage_errors_exit_2_with_clicks_message(args: list[str], message: str) -> None:
    result = run(args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--cpu", "0"], "Invalid value for '--cpu': '0' must be more than 0"),
        (["--cpu", "-0.5"], "Invalid value for '--cpu': '-0.5' must be more than 0"),
        (
            ["--cpu", "0.0005"],
            "Invalid value for '--cpu': '0.0005' has more than 3 decimals "
            "(the smallest step is 0.001 CPU)",
        ),
        (["--cpu", "half"], "Invalid value for '--cpu': 'half' is not a number of CPUs"),
        (
            ["--memory", "12Q"],
            "Invalid value for '--memory': '12Q' is not a size: give bytes, or a number with "
            "K, M, G or T (powers of 1024: K = 1024), like 256M or 1.5G",
        ),
        (["--memory", "1GB"], "Invalid value for '--memory': '1GB' is not a size"),
        (["--memory", "0"], "Invalid value for '--memory': '0' must be more than 0"),
        (["--io-read", "1.5"], "Invalid value for '--io-read': '1.5' is not a whole number"),
        (["--io-write", "9000000T"], "Invalid value for '--io-write': '9000000T' is too large"),
        (["--pids", "many"], "Invalid value for '--pids': 'many' is not a whole number"),
        (["--pids", "4294967296"], "Invalid value for '--pids': '4294967296' is too large"),
        (["--io-read-iops", "0"], "Invalid value for '--io-read-iops': '0' must be more than 0"),
        (["--io-write-iops", "1k"], "Invalid value for '--io-write-iops': '1k' is not a whole"),
    ],
)
def test_bad_limits_are_one_line_usage_errors(
    args: list[str], error: str, fake: tuple[FakeService, str], env: dict[str, str | None]
) -> None:
    result = run(["jobs", "start", "fib", "3", *args], env)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"Error: {error}")
    assert "Traceback" not in result.output
    assert fake[0].requests == []  # nothing was sent


# --- settings: flags, environment, config file ------------------------------------------------


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("cert", "no client certificate given: set --cert or WORKERNATOR_CERT"),
        ("key", "no client private key given: set --key or WORKERNATOR_KEY"),
        ("ca", "no server CA certificate (to verify the API server) given: set --ca"),
    ],
)
def test_missing_certificate_options(
    env: dict[str, str | None], missing: str, message: str
) -> None:
    env[f"WORKERNATOR_{missing.upper()}"] = None
    result = run(["jobs", "list"], env)
    assert_one_line_error(result, message, "[client] table of")


def test_unreachable_host_is_one_line(env: dict[str, str | None]) -> None:
    port = closed_port()
    result = run(["jobs", "status", "XE38YM", "--host", f"127.0.0.1:{port}"], env)
    assert_one_line_error(result, f"cannot reach the API at 127.0.0.1:{port}", "Connection refused")


def test_unreachable_host_from_the_console_script(env: dict[str, str | None]) -> None:
    port = closed_port()
    child_env = {k: v for k, v in (os.environ | env).items() if v is not None}
    child_env["WORKERNATOR_HOST"] = f"127.0.0.1:{port}"
    proc = subprocess.run(
        [sys.executable, "-m", "workernator_api.cli", "jobs", "list"],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"Error: cannot reach the API at 127.0.0.1:{port}: ")
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_precedence_flag_env_config_default(tmp_path: Path, env: dict[str, str | None]) -> None:
    config = tmp_path / "xdg" / "workernator" / "config.toml"
    config.parent.mkdir(parents=True)
    pki = Path(str(env["WORKERNATOR_CA"])).parent
    # Paths relative to the config file's directory.
    for name in ("cert", "key", "ca"):
        (config.parent / f"{name}.pem").symlink_to(Path(str(env[f"WORKERNATOR_{name.upper()}"])))
    ports = [closed_port() for _ in range(3)]
    config.write_text(
        f'[client]\nhost = "127.0.0.1:{ports[0]}"\ncert = "cert.pem"\nkey = "key.pem"\n'
        'ca = "ca.pem"\n'
    )
    only_config = base_env(tmp_path)
    assert f"127.0.0.1:{ports[0]}" in run(["jobs", "list"], only_config).stderr
    with_env = only_config | {"WORKERNATOR_HOST": f"127.0.0.1:{ports[1]}"}
    assert f"127.0.0.1:{ports[1]}" in run(["jobs", "list"], with_env).stderr
    with_flag = run(["jobs", "list", "--host", f"127.0.0.1:{ports[2]}"], with_env)
    assert f"127.0.0.1:{ports[2]}" in with_flag.stderr
    # --config names another file; the default host applies when no one sets one.
    other = tmp_path / "other.toml"
    other.write_text(
        f'[client]\ncert = "{pki}/alice.pem"\nkey = "{pki}/alice-key.pem"\n'
        f'ca = "{pki}/server-ca.pem"\n'
    )
    result = run(["jobs", "list", "--config", str(other)], base_env(tmp_path))
    assert "the API at localhost:8443" in result.stderr


def test_config_file_errors(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    missing = run(["jobs", "list", "--config", str(tmp_path / "nope.toml")], env)
    assert_one_line_error(missing, "nope.toml does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("[client\n")
    assert_one_line_error(run(["jobs", "list", "--config", str(bad)], env), "is not valid TOML")
    typo = tmp_path / "typo.toml"
    typo.write_text('[client]\nhots = "x"\n')
    env["WORKERNATOR_CONFIG"] = str(typo)
    assert_one_line_error(run(["jobs", "list"], env), "unknown key(s) in [client]: hots")


def test_unreadable_or_mismatched_certificate_files(
    tmp_path: Path, env: dict[str, str | None], pki: certs.Deployment
) -> None:
    result = run(["jobs", "list", "--cert", str(tmp_path / "none.pem")], env)
    assert_one_line_error(result, "cannot read the client certificate", "No such file")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    assert_one_line_error(
        run(["jobs", "list", "--ca", str(garbage)], env), "garbage.pem (--ca): not a PEM"
    )
    assert_one_line_error(
        run(["jobs", "list", "--key", str(garbage)], env), "is not a PEM private key"
    )
    bob_key = str(pki.users["bob"][1])
    assert_one_line_error(run(["jobs", "list", "--key", bob_key], env), "does not belong to")


def test_the_cli_checks_its_own_certificate_before_connecting(
    tmp_path: Path, env: dict[str, str | None], pki: certs.Deployment, fake: tuple[FakeService, str]
) -> None:
    """A wrong file is an error saying what is wrong with it, and nothing is sent (gRPC would
    say "Failed to create security handshaker." for a CA certificate, or a handshake error)."""

    def jobs_list(cert: Path, key: Path, ca: Path = pki.server_ca_cert) -> Result:
        return run(["jobs", "list", "--cert", str(cert), "--key", str(key), "--ca", str(ca)], env)

    assert_one_line_error(
        jobs_list(pki.client_ca_cert, pki.client_ca_key),
        f"{pki.client_ca_cert} (--cert) is a CA certificate, not a client certificate",
    )
    assert_one_line_error(
        jobs_list(pki.server_cert, pki.server_key),
        f"{pki.server_cert} (--cert) is not a client certificate",
        "lacks clientAuth (a server certificate?)",
    )
    client_ca = pkitools.load_pair(pki.client_ca_cert, pki.client_ca_key)
    expired = pkitools.issue(
        client_ca,
        pkitools.name("alice", "user"),
        not_before=pkitools.NOW - 10 * pkitools.DAY,
        not_after=pkitools.NOW - pkitools.DAY,
    )
    assert_one_line_error(
        jobs_list(*pkitools.write_pair(tmp_path, "expired", expired)),
        "the client certificate",
        "expired.pem (--cert) expired on",
    )
    later = pkitools.issue(
        client_ca, pkitools.name("alice", "user"), not_before=pkitools.NOW + pkitools.DAY
    )
    assert_one_line_error(
        jobs_list(*pkitools.write_pair(tmp_path, "later", later)), "is not valid before"
    )
    no_role = pkitools.issue(client_ca, pkitools.name("alice"))
    assert_one_line_error(
        jobs_list(*pkitools.write_pair(tmp_path, "norole", no_role)),
        "norole.pem (--cert) cannot be used: client certificate subject has no organization (O)",
    )
    alice_cert, alice_key = pki.users["alice"]
    assert_one_line_error(
        jobs_list(alice_cert, alice_key, pki.client_ca_cert),
        f"{pki.client_ca_cert} (--ca)",
        "is the client CA (it issues client certificates only); give the server CA",
    )
    assert_one_line_error(
        jobs_list(alice_cert, alice_key, pki.server_cert),
        f"{pki.server_cert} (--ca)",
        "is not a CA certificate",
    )
    assert fake[0].requests == []


def test_a_failed_security_handshaker_is_explained() -> None:
    details = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:4: "
        "Failed to create security handshaker."
    )
    message = cli.describe_rpc_error(grpc.StatusCode.UNAVAILABLE, details, "h:1")
    assert message.startswith("cannot reach the API at h:1: the TLS client could not start")
    assert "check --cert and --key" in message


def test_server_certificate_from_another_ca(tmp_path: Path, env: dict[str, str | None]) -> None:
    other = certs.create_deployment(tmp_path / "other", ["localhost"], [])
    result = run(["jobs", "list", "--ca", str(other.server_ca_cert)], env)
    assert_one_line_error(result, "TLS handshake failed", "check --ca")


def test_client_certificate_from_another_ca(tmp_path: Path, env: dict[str, str | None]) -> None:
    other = certs.create_deployment(tmp_path / "other", ["localhost"], [("alice", "user")])
    cert, key = other.users["alice"]
    result = run(["jobs", "list", "--cert", str(cert), "--key", str(key)], env)
    assert_one_line_error(result, "cannot reach the API", "client certificate")


def test_host_without_port_gets_the_default_port() -> None:
    assert cli.normalize_host("example.com") == "example.com:8443"
    assert cli.normalize_host("example.com:9000") == "example.com:9000"
    assert cli.normalize_host("::1") == "[::1]:8443"
    assert cli.normalize_host("[::1]") == "[::1]:8443"
    assert cli.normalize_host("[::1]:9000") == "[::1]:9000"
    with pytest.raises(click.ClickException, match="HOST:PORT"):
        cli.normalize_host("https://example.com")


# --- commands against the fake server ---------------------------------------------------------


def test_start_prints_the_transcript(
    fake: tuple[FakeService, str], env: dict[str, str | None]
) -> None:
    result = run(["jobs", "start", "fib", "3"], env)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "Started 'Fibonacci' job, ID: XE38YM\n"
        "Use 'workernator jobs tail XE38YM' to see the output of this job,\n"
        "'workernator jobs stop XE38YM' to stop the job.\n"
    )
    assert fake[0].requests[-1] == pb.StartJobRequest(fib=pb.FibArgs(position=3))


def test_start_sends_typed_arguments(
    fake: tuple[FakeService, str], env: dict[str, str | None]
) -> None:
    service = fake[0]
    assert run(["jobs", "start", "noop"], env).exit_code == 0
    assert service.requests[-1] == pb.StartJobRequest(noop=pb.NoopArgs())
    result = run(["jobs", "start", "eval", "2x * 3y", "--var", "x=2", "--var", "y=1.5"], env)
    assert result.exit_code == 0
    assert "Started 'Evaluate' job" in result.stdout
    assert service.requests[-1] == pb.StartJobRequest(
        eval=pb.EvalArgs(expression="2x * 3y", variables={"x": 2.0, "y": 1.5})
    )
    for text, seconds, nanos in (("1m30s", 90, 0), ("2.5", 2, 500_000_000), ("500ms", 0, 5e8)):
        assert run(["jobs", "start", "wait", text, "http://h/"], env).exit_code == 0
        request = service.requests[-1]
        assert isinstance(request, pb.StartJobRequest)
        assert (request.wait.seconds.seconds, request.wait.seconds.nanos) == (seconds, nanos)
        assert request.wait.url == "http://h/"


def test_start_sends_the_limits(fake: tuple[FakeService, str], env: dict[str, str | None]) -> None:
    service = fake[0]
    result = run(
        [
            "jobs",
            "start",
            "fib",
            "3",
            "--cpu",
            "0.5",
            "--memory",
            "256M",
            "--pids",
            "64",
            "--io-read",
            "10MiB",
            "--io-write",
            "1.5g",
            "--io-read-iops",
            "100",
            "--io-write-iops",
            "200",
        ],
        env,
    )
    assert result.exit_code == 0, result.output
    assert service.requests[-1] == pb.StartJobRequest(
        fib=pb.FibArgs(position=3),
        limits=pb.ResourceLimits(
            cpu_millis=500,
            memory_bytes=256 << 20,
            pids=64,
            io_read_bps=10 << 20,
            io_write_bps=3 << 29,
            io_read_iops=100,
            io_write_iops=200,
        ),
    )
    # Every job type takes them; the ones not given stay 0 (the server's default).
    for args in (
        ["noop"],
        ["eval", "1+1", "--var", "x=1"],
        ["wait", "5", "http://h/"],
    ):
        assert run(["jobs", "start", *args, "--memory", "1G", "--cpu", "2"], env).exit_code == 0
        request = service.requests[-1]
        assert isinstance(request, pb.StartJobRequest)
        assert request.WhichOneof("args") == args[0]
        assert request.limits == pb.ResourceLimits(cpu_millis=2000, memory_bytes=1 << 30)
    assert run(["jobs", "start", "noop"], env).exit_code == 0
    assert not service.requests[-1].HasField("limits")  # none given: none sent


def test_the_servers_limit_errors_are_one_line(
    fake: tuple[FakeService, str], env: dict[str, str | None]
) -> None:
    message = "limit 'memory': 8 GiB is over the runner's maximum of 2 GiB"
    fake[0].fail = (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert_one_line_error(run(["jobs", "start", "noop", "--memory", "8G"], env), message)
    refused = "IO limits cannot be applied: no disk to throttle"
    fake[0].fail = (grpc.StatusCode.FAILED_PRECONDITION, refused)
    result = run(["jobs", "start", "noop", "--io-read", "1M"], env)
    assert_one_line_error(result, f"failed_precondition: {refused}")


def test_status_verbose_and_json_show_limits_usage_and_oom(
    fake: tuple[FakeService, str], env: dict[str, str | None]
) -> None:
    run(["jobs", "start", "fib", "3", "--cpu", "0.5", "--memory", "256M", "--pids", "64"], env)
    job = fake[0].jobs["XE38YM"]
    job.usage.peak_memory_bytes = 3 << 20
    job.usage.cpu_time.FromMilliseconds(120)
    job.oom_killed = True
    lines = run(["jobs", "status", "XE38YM", "-v"], env).stdout.splitlines()
    assert lines[7:] == [
        "Owner:          alice",
        "Limits:",
        "  CPU:          0.5",
        "  Memory:       256 MiB",
        "  Processes:    64",
        "Usage:",
        "  CPU time:     120 ms",
        "  Peak memory:  3 MiB",
        "  Disk read:    0 B",
        "  Disk written: 0 B",
        "Out of memory:  yes",
    ]
    plain = run(["jobs", "status", "XE38YM"], env).stdout
    assert "Limits" not in plain and "Out of memory" not in plain
    data = json.loads(run(["jobs", "status", "XE38YM", "-o", "json"], env).stdout)
    assert data["oom_killed"] is True
    assert data["limits"] == {
        "cpu_millis": 500,
        "memory_bytes": str(256 << 20),
        "pids": 64,
        "io_read_bps": "0",
        "io_write_bps": "0",
        "io_read_iops": "0",
        "io_write_iops": "0",
    }
    assert data["usage"] == {
        "cpu_time": "0.120s",
        "peak_memory_bytes": str(3 << 20),
        "read_bytes": "0",
        "written_bytes": "0",
    }
    listed = json.loads(run(["jobs", "list", "-o", "json"], env).stdout)["jobs"]
    assert [(j["limits"], j["usage"], j["oom_killed"]) for j in listed] == [
        (data["limits"], data["usage"], True)
    ]
    started = json.loads(run(["jobs", "start", "noop", "-o", "json"], env).stdout)
    assert started["limits"]["cpu_millis"] == 0 and started["oom_killed"] is False


def test_invalid_argument_is_the_servers_message(env: dict[str, str | None]) -> None:
    result = run(["jobs", "start", "fib", "0"], env)
    assert_one_line_error(result, "argument 'position': must be between 1 and 1000000, got 0")


def test_status_piped_is_only_the_block(env: dict[str, str | None]) -> None:
    run(["jobs", "start", "fib", "3"], env)
    result = run(["jobs", "status", "xe38ym"], env)  # IDs are case-insensitive
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:3] == ["Job XE38YM: Fibonacci", "Arguments:", "  Number:   3"]
    assert lines[3] == "Status:     Running"
    assert lines[5] == "Finished:   -"
    assert "Getting info" not in result.output


def test_status_on_a_terminal_shows_progress(
    env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(["jobs", "start", "fib", "3"], env)
    monkeypatch.setattr(cli, "_isatty", lambda stream: True)
    result = run(["jobs", "status", "XE38YM"], env)
    assert result.stdout.startswith(
        "Getting info for job XE38YM... DONE!\n\nJob XE38YM: Fibonacci\n"
    )
    failed = run(["jobs", "status", "NOPE00"], env)
    assert failed.stdout == "Getting info for job NOPE00... FAILED!\n"
    assert failed.stderr == "Error: job NOPE00 not found\n"


def test_status_json(env: dict[str, str | None]) -> None:
    run(["jobs", "start", "fib", "3"], env)
    for args in (
        ["jobs", "status", "XE38YM", "-o", "json"],
        ["-o", "json", "jobs", "status", "XE38YM"],
    ):
        data = json.loads(run(args, env).stdout)
        assert data["id"] == "XE38YM"
        assert data["state"] == "JOB_STATE_RUNNING"
        assert data["fib"] == {"position": "3"}


def test_not_found(env: dict[str, str | None]) -> None:
    for command in ("status", "stop", "tail"):
        assert_one_line_error(run(["jobs", command, "ZZZZZZ"], env), "job ZZZZZZ not found")


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "role viewer may not start jobs",
            "permission denied: role viewer may not start jobs",
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "the runner is not available",
            "is unavailable: the runner is not available",
        ),
        (
            grpc.StatusCode.UNAUTHENTICATED,
            "bad identity",
            "did not accept the client certificate: bad identity",
        ),
        (grpc.StatusCode.INTERNAL, "boom\nline two", "internal: boom line two"),
    ],
)
def test_server_errors_are_one_line(
    fake: tuple[FakeService, str],
    env: dict[str, str | None],
    code: grpc.StatusCode,
    details: str,
    expected: str,
) -> None:
    fake[0].fail = (code, details)
    for args in (["jobs", "start", "noop"], ["jobs", "list"], ["jobs", "tail", "XE38YM"]):
        assert_one_line_error(run(args, env), expected)


def test_stop(fake: tuple[FakeService, str], env: dict[str, str | None]) -> None:
    run(["jobs", "start", "wait", "30", "http://h/"], env)
    result = run(["jobs", "stop", "XE38YM"], env)
    assert (result.exit_code, result.stdout) == (0, "Stopped job XE38YM.\n")
    # Stop returns once the job is gone, after the server's grace period (up to an hour).
    assert fake[0].stop_deadline is not None and fake[0].stop_deadline > 3600
    fake[0].next_id = "D0NE00"
    run(["jobs", "start", "noop"], env)
    fake[0].jobs["D0NE00"].state = pb.JOB_STATE_COMPLETED
    again = run(["jobs", "stop", "D0NE00"], env)
    assert (again.exit_code, again.stdout) == (0, "Job D0NE00 had already ended: Complete.\n")


def test_tail_writes_exact_bytes_to_each_stream(
    fake: tuple[FakeService, str], env: dict[str, str | None]
) -> None:
    service = fake[0]
    run(["jobs", "start", "fib", "3"], env)
    service.output["XE38YM"] = [
        pb.TailJobOutputResponse(
            chunks=[
                pb.OutputChunk(stream=pb.STREAM_STDOUT, data=b"[JOB] Starting\n\xff\xfe raw\n"),
                pb.OutputChunk(stream=pb.STREAM_STDERR, data=b"warning\n"),
            ],
            next_offset=10,
        ),
        pb.TailJobOutputResponse(
            chunks=[pb.OutputChunk(stream=pb.STREAM_STDOUT, data=b"[RESULT] 1")], next_offset=20
        ),
    ]
    result = run(["jobs", "tail", "XE38YM"], env)
    assert result.exit_code == 0
    assert result.stdout_bytes == b"[JOB] Starting\n\xff\xfe raw\n[RESULT] 1"
    assert result.stderr_bytes == b"warning\n"  # not a terminal: no end message anywhere
    assert service.requests[-1] == pb.TailJobOutputRequest(job_id="XE38YM", follow=True)


def test_broken_tail_says_where_to_resume(
    fake: tuple[FakeService, str], env: dict[str, str | None]
) -> None:
    service = fake[0]
    service.next_id = BROKEN_JOB
    run(["jobs", "start", "noop"], env)
    service.output[BROKEN_JOB] = [
        pb.TailJobOutputResponse(
            chunks=[pb.OutputChunk(stream=pb.STREAM_STDOUT, data=b"hi\n")], next_offset=33
        )
    ]
    result = run(["jobs", "tail", BROKEN_JOB, "--no-reconnect"], env)
    assert result.stdout == "hi\n"
    assert_one_line_error(
        result,
        "the output stream broke off (the API at",
        "is unavailable: the runner is not available); resume with: workernator jobs tail "
        "BR0KEN --offset 33",
    )


def cli_process(env: dict[str, str | None], *args: str) -> subprocess.Popen[bytes]:
    """The console script's code in a process of its own (a real SIGINT needs one)."""
    child_env = {k: v for k, v in (os.environ | env).items() if v is not None}
    return subprocess.Popen(
        [sys.executable, "-m", "workernator_api.cli", *args],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def assert_exits_130_quietly(proc: subprocess.Popen[bytes]) -> None:
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err) == (130, b"", b"")


def test_interrupted_tail_exits_130_quietly(
    fake: tuple[FakeService, str], env: dict[str, str | None]
) -> None:
    service = fake[0]
    service.next_id = BLOCKING_JOB
    run(["jobs", "start", "noop"], env)
    service.output[BLOCKING_JOB] = [
        pb.TailJobOutputResponse(chunks=[pb.OutputChunk(stream=pb.STREAM_STDOUT, data=b"hi\n")])
    ]
    for _ in range(3):
        proc = cli_process(env, "jobs", "tail", BLOCKING_JOB)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"hi\n"  # it is following now
        proc.send_signal(signal.SIGINT)
        assert_exits_130_quietly(proc)


def test_interrupted_request_exits_130_quietly(
    fake: tuple[FakeService, str], env: dict[str, str | None]
) -> None:
    service = fake[0]
    proc = cli_process(env, "jobs", "status", SLOW_JOB)
    deadline = time.monotonic() + 30
    while pb.GetJobStatusRequest(job_id=SLOW_JOB) not in service.requests:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # while it waits for the answer
    assert_exits_130_quietly(proc)


def test_interrupt_while_the_cli_loads_exits_130_quietly() -> None:
    # Ctrl-C lands while grpc is being imported (the slow part of starting the CLI).
    code = (
        "import builtins\n"
        "real_import = builtins.__import__\n"
        "def interrupted_import(name, *args, **kwargs):\n"
        "    if name == 'grpc':\n"
        "        raise KeyboardInterrupt\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted_import\n"
        "from workernator_api.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, b"", b"")


def test_tail_end_message_on_a_terminal(
    fake: tuple[FakeService, str], env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(["jobs", "start", "fib", "3"], env)
    fake[0].output["XE38YM"] = [
        pb.TailJobOutputResponse(chunks=[pb.OutputChunk(stream=pb.STREAM_STDOUT, data=b"1")])
    ]
    monkeypatch.setattr(cli, "_isatty", lambda stream: stream is sys.stdout)
    result = run(["jobs", "tail", "XE38YM"], env)
    assert result.stdout == "1\nJob finished, no more output, exiting tail!\n"
    monkeypatch.setattr(cli, "_isatty", lambda stream: stream is sys.stderr)
    result = run(["jobs", "tail", "XE38YM"], env)
    assert result.stdout == "1"
    assert result.stderr == "Job finished, no more output, exiting tail!\n"
    monkeypatch.setattr(cli, "_isatty", lambda stream: True)
    result = run(["jobs", "tail", "XE38YM", "--no-follow"], env)
    assert result.stdout == "1"  # the job may still run: no end message


def test_tail_options_and_json(fake: tuple[FakeService, str], env: dict[str, str | None]) -> None:
    service = fake[0]
    run(["jobs", "start", "fib", "3"], env)
    service.output["XE38YM"] = [
        pb.TailJobOutputResponse(
            chunks=[
                pb.OutputChunk(stream=pb.STREAM_STDOUT, data=b"a\n"),
                pb.OutputChunk(stream=pb.STREAM_STDERR, data=b"\xff\n"),
            ],
            next_offset=7,
        )
    ]
    result = run(["jobs", "tail", "XE38YM", "--no-follow", "--last", "5", "-o", "json"], env)
    assert service.requests[-1] == pb.TailJobOutputRequest(
        job_id="XE38YM", follow=False, last_lines=5
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(x["stream"], base64.b64decode(x["data"])) for x in lines] == [
        ("stdout", b"a\n"),
        ("stderr", b"\xff\n"),
    ]
    assert "next_offset" not in lines[0]
    assert lines[1]["next_offset"] == 7
    assert result.stderr == ""
    run(["jobs", "tail", "XE38YM", "--offset", "7"], env)
    assert service.requests[-1] == pb.TailJobOutputRequest(job_id="XE38YM", follow=True, offset=7)


def test_list(fake: tuple[FakeService, str], env: dict[str, str | None]) -> None:
    assert run(["jobs", "list"], env).stdout == "No jobs.\n"
    run(["jobs", "start", "fib", "3"], env)
    fake[0].next_id = "AB12CD"
    run(["jobs", "start", "noop"], env)
    lines = run(["jobs", "list"], env).stdout.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "STATE", "OWNER", "STARTED", "DURATION"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["XE38YM", "fib", "Running", "alice"],
        ["AB12CD", "noop", "Running", "alice"],
    ]
    run(["jobs", "list", "--state", "STOPPED", "--owner", "bob"], env)
    assert fake[0].requests[-1] == pb.ListJobsRequest(
        state=pb.JOB_STATE_STOPPED, owner="bob", page_size=500
    )
    data = json.loads(run(["jobs", "list", "--output", "json"], env).stdout)
    assert [job["id"] for job in data["jobs"]] == ["XE38YM", "AB12CD"]


def test_list_follows_every_page(fake: tuple[FakeService, str], env: dict[str, str | None]) -> None:
    service = fake[0]
    ids = [f"J0B00{i}" for i in range(5)]
    for job_id in ids:
        service.next_id = job_id
        run(["jobs", "start", "noop"], env)
    del service.requests[:]
    lines = run(["jobs", "list"], env).stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ids
    assert [r.page_token for r in service.requests] == ["", "2", "4"]  # type: ignore[attr-defined]
    data = json.loads(run(["jobs", "list", "-o", "json"], env).stdout)
    assert [job["id"] for job in data["jobs"]] == ids
    assert "nextPageToken" not in data and "next_page_token" not in data


def test_types(env: dict[str, str | None]) -> None:
    result = run(["jobs", "types"], env)
    assert result.exit_code == 0
    assert "fib - Fibonacci\n  Usage: workernator jobs start fib POSITION\n" in result.stdout
    assert "    position (int, required, at least 1)\n" in result.stdout
    data = json.loads(run(["jobs", "types", "-o", "json"], env).stdout)
    assert [t["name"] for t in data["types"]] == ["noop", "fib"]


# --- completion -------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str) -> None:
    result = run(["completion", shell])
    assert result.exit_code == 0
    assert "_WORKERNATOR_COMPLETE" in result.stdout


def test_job_ids_complete(
    env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch, fake: tuple[FakeService, str]
) -> None:
    run(["jobs", "start", "fib", "3"], env)
    for job_id in ("AA0001", "AA0002", "AB0003"):  # more than one page
        fake[0].next_id = job_id
        run(["jobs", "start", "noop"], env)
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    complete = ShellComplete(cli.cli, {}, "workernator", "_WORKERNATOR_COMPLETE")
    items = complete.get_completions(["jobs", "status"], "xe")
    assert [item.value for item in items] == ["XE38YM"]
    items = complete.get_completions(["jobs", "status"], "A")
    assert [item.value for item in items] == ["AA0001", "AA0002", "AB0003"]
    assert complete.get_completions(["jobs", "status"], "Q") == []
    monkeypatch.setenv("WORKERNATOR_HOST", f"127.0.0.1:{closed_port()}")
    assert complete.get_completions(["jobs", "stop"], "") == []  # errors complete nothing


def test_limit_options_complete() -> None:
    complete = ShellComplete(cli.cli, {}, "workernator", "_WORKERNATOR_COMPLETE")
    items = complete.get_completions(["jobs", "start", "fib"], "--io")
    assert [item.value for item in items] == [
        "--io-read",
        "--io-write",
        "--io-read-iops",
        "--io-write-iops",
    ]
    assert items[0].help == "Bytes per second the job may read from disk, like 10M."
    for option in ("--memory", "--io-read", "--io-write"):
        items = complete.get_completions(["jobs", "start", "noop", option], "256")
        assert [(item.value, item.help) for item in items] == [
            ("256K", "256 KiB"),
            ("256M", "256 MiB"),
            ("256G", "256 GiB"),
            ("256T", "256 TiB"),
        ]
        assert complete.get_completions(["jobs", "start", "noop", option], "256M") == []
    assert complete.get_completions(["jobs", "start", "noop", "--cpu"], "0") == []


# --- certs ------------------------------------------------------------------------------------


def test_certs_ca_server_client(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    for kind in ("server", "client"):
        result = run(["certs", "ca", kind, "--dir", str(d)])
        assert result.exit_code == 0, result.output
        assert f"ca/{kind}-ca-key.pem (private key, mode 0600)" in result.stdout
    assert (d / "ca").stat().st_mode & 0o777 == 0o700
    assert certs.ca_kind(certs.load_cert(d / "server-ca.pem")) == "server"
    assert certs.ca_kind(certs.load_cert(d / "client-ca.pem")) == "client"
    result = run(["certs", "server", "--dir", str(d), "--name", "localhost", "--name", "127.0.0.1"])
    assert result.exit_code == 0, result.output
    result = run(["certs", "client", "alice", "--role", "viewer", "--dir", str(d)])
    assert result.exit_code == 0, result.output
    assert "alice-key.pem (private key, mode 0600)" in result.stdout
    for name in ("ca/server-ca-key.pem", "ca/client-ca-key.pem", "server-key.pem", "alice-key.pem"):
        assert (d / name).stat().st_mode & 0o777 == 0o600
    # Each leaf is signed by its own CA, directly.
    server_ca, client_ca = (
        certs.load_cert(d / "server-ca.pem"),
        certs.load_cert(d / "client-ca.pem"),
    )
    certs.load_cert(d / "server.pem").verify_directly_issued_by(server_ca)
    alice = certs.load_cert(d / "alice.pem")
    assert certs.check_issuer(alice, [client_ca]) == client_ca
    with pytest.raises(certs.InvalidIdentityError):
        certs.check_issuer(alice, [server_ca])
    assert certs.identity_from_cert(alice) == ("alice", "viewer")
    again = run(["certs", "client", "alice", "--role", "user", "--dir", str(d)])
    assert_one_line_error(again, f"{d / 'alice.pem'} already exists; use --force")
    forced = run(["certs", "client", "alice", "--role", "user", "--dir", str(d), "--force"])
    assert forced.exit_code == 0
    assert certs.identity_from_pem((d / "alice.pem").read_bytes()) == ("alice", "user")
    ca_again = run(["certs", "ca", "client", "--dir", str(d)])
    assert_one_line_error(ca_again, f"{d / 'client-ca.pem'} already exists; use --force")
    assert certs.load_cert(d / "client-ca.pem") == client_ca  # untouched


def test_certs_errors(tmp_path: Path) -> None:
    no_ca = run(["certs", "client", "alice", "--role", "user", "--dir", str(tmp_path)])
    assert_one_line_error(no_ca, "client-ca.pem does not exist", "workernator certs ca client")
    no_ca = run(["certs", "server", "--name", "localhost", "--dir", str(tmp_path)])
    assert_one_line_error(no_ca, "server-ca.pem does not exist", "workernator certs ca server")
    run(["certs", "ca", "server", "--dir", str(tmp_path)])
    run(["certs", "ca", "client", "--dir", str(tmp_path)])
    bad_user = run(["certs", "client", "al ice", "--role", "user", "--dir", str(tmp_path)])
    assert_one_line_error(bad_user, "contains characters that are not allowed")
    bad_name = run(["certs", "server", "--name", "-bad-", "--dir", str(tmp_path)])
    assert_one_line_error(bad_name, "invalid label")
    # Each CA signs only its own kind: the client CA makes no server certificate, and back.
    client_ca = ["--ca", str(tmp_path / "client-ca.pem")]
    client_ca += ["--ca-key", str(tmp_path / "ca" / "client-ca-key.pem")]
    server_ca = ["--ca", str(tmp_path / "server-ca.pem")]
    server_ca += ["--ca-key", str(tmp_path / "ca" / "server-ca-key.pem")]
    crossed = run(["certs", "server", "--name", "localhost", "--dir", str(tmp_path), *client_ca])
    assert_one_line_error(crossed, "issues client certificates only", "with the server CA")
    crossed = run(["certs", "client", "eve", "--role", "admin", "--dir", str(tmp_path), *server_ca])
    assert_one_line_error(crossed, "issues server certificates only", "with the client CA")
    assert not (tmp_path / "server.pem").exists() and not (tmp_path / "eve.pem").exists()


def test_certs_ca_refuses_a_key_directory_open_to_others(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir(mode=0o755)
    (tmp_path / "ca").chmod(0o755)
    result = run(["certs", "ca", "client", "--dir", str(tmp_path)])
    assert_one_line_error(result, f"{tmp_path / 'ca'} is open to group or others (mode 0755)")
    assert list(tmp_path.rglob("*.pem")) == []
    init = run(["certs", "init", str(tmp_path)])
    assert_one_line_error(init, "is open to group or others")
    assert list(tmp_path.rglob("*.pem")) == []


def test_certs_init(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    result = run(["certs", "init", str(d), "--user", "alice:user", "--user", "root:admin"])
    assert result.exit_code == 0, result.output
    assert f"export WORKERNATOR_CERT={(d / 'alice.pem').resolve()}" in result.stdout
    assert f"export WORKERNATOR_CA={(d / 'server-ca.pem').resolve()}" in result.stdout
    names = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    leaves = ["server", "alice", "root"]
    assert names == sorted(
        [f"{n}.pem" for n in leaves]
        + [f"{n}-key.pem" for n in leaves]
        + ["server-ca.pem", "client-ca.pem", "ca", "ca/server-ca-key.pem", "ca/client-ca-key.pem"]
    )
    assert (d / "ca").stat().st_mode & 0o777 == 0o700
    assert certs.identity_from_pem((d / "root.pem").read_bytes()) == ("root", "admin")
    before = {p: p.read_bytes() for p in d.rglob("*.pem")}
    refused = run(["certs", "init", str(d)])
    assert_one_line_error(refused, f"{d / 'server-ca.pem'} already exists", "(use --force)")
    assert {p: p.read_bytes() for p in d.rglob("*.pem")} == before
    forced = run(["certs", "init", str(d), "--force", "--user", "alice:admin"])
    assert forced.exit_code == 0, forced.output
    assert (d / "server-ca.pem").read_bytes() != before[d / "server-ca.pem"]
    assert certs.identity_from_pem((d / "alice.pem").read_bytes()) == ("alice", "admin")
    bad_role = run(["certs", "init", str(tmp_path / "x"), "--user", "alice:root"])
    assert bad_role.exit_code == 2
    assert "unknown role 'root'" in bad_role.stderr
