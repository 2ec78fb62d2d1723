"""The PKI and TLS against the real api and CLI: the attacks of issue 8 that must fail, renewing
certificates without a restart, and what real TLS tools (sslyze, buf curl) see.

Tests that change certificate files start an api of their own (``own_api``) beside the module's
``stack``, on the same runner, so the other tests keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2

from tests import pki
from tests.conftest import IN_CI, ROOT
from tests.e2e.conftest import (
    API_USER,
    Stack,
    _free_port,
    make_certs,
    run_api,
    start_api,
    stop_api,
    write_api_config,
)
from tests.nethosts import EgressLab, bridge_host
from workernator_api import certs
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb

Code = grpc.StatusCode
BUF = Path(sys.executable).parent / "buf"  # buf-bin, a dev dependency
RELOADED = 'msg="TLS files reloaded"'
UNUSABLE = 'msg="TLS files changed but cannot be used; still using the previous ones"'


# --- helpers ----------------------------------------------------------------------------------


@dataclass
class OwnApi:
    """An api process of a test's own, with certificate files the test may change."""

    address: str
    pki: certs.Deployment
    log: Path
    process: subprocess.Popen[bytes]
    api_uid: int

    def log_lines(self, fragment: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if fragment in line]

    def credentials(self, user: str) -> grpc.ChannelCredentials:
        cert, key = self.pki.users[user]
        return credentials(self.pki.server_ca_cert, cert, key)


def credentials(server_ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(server_ca.read_bytes(), key.read_bytes(), cert.read_bytes())


def stack_credentials(stack: Stack, user: str) -> grpc.ChannelCredentials:
    ca, cert, key = stack.credentials(user)
    return grpc.ssl_channel_credentials(ca, key, cert)


async def list_jobs(channel: grpc.aio.Channel) -> list[pb.JobStatus]:
    call = channel.unary_unary(
        "/workernator.v1.JobService/ListJobs",
        request_serializer=pb.ListJobsRequest.SerializeToString,
        response_deserializer=pb.ListJobsResponse.FromString,
    )
    response: pb.ListJobsResponse = await call(pb.ListJobsRequest(), timeout=20)
    return list(response.jobs)


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value


async def refusal(address: str, creds: grpc.ChannelCredentials) -> grpc.aio.AioRpcError:
    """How ListJobs fails on a new connection with ``creds``."""
    async with grpc.aio.secure_channel(address, creds) as channel:
        return await failure(list_jobs(channel))


def served_certificate(address: str, server_ca: Path, cert: Path, key: Path) -> x509.Certificate:
    """The certificate the api presents to a new TLS 1.3 connection (Python's ssl, a client
    certificate, ALPN h2, as a gRPC client would)."""
    context = ssl.create_default_context(cafile=str(server_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def install(source: Path | bytes, target: Path, *, mode: int, uid: int = 0) -> None:
    """Replace ``target`` atomically, as docs/operations.md tells operators to: write a file
    beside it with its final mode and owner, then rename it over the old one."""
    staging = target.with_name(f".{target.name}.new")
    staging.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    os.chmod(staging, mode)
    os.chown(staging, uid, -1)
    os.replace(staging, target)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``workernator`` CLI, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "workernator_api.cli", *args],
        env=dict(os.environ, PYTHONPATH=str(ROOT), WORKERNATOR_CONFIG=os.devnull) | (env or {}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: "), proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def api_tmp(stack: Stack) -> Iterator[Path]:
    """A directory the api's (unprivileged) user can reach, removed after the test."""
    tmp = Path(tempfile.mkdtemp(prefix="tls-", dir=stack.tmp))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def own_api_factory(stack: Stack, api_tmp: Path) -> Iterator[Callable[..., OwnApi]]:
    """Start apis of the test's own (fresh certificates; ``prepare`` may change them first)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(prepare: Callable[[certs.Deployment], None] | None = None) -> OwnApi:
        directory = Path(tempfile.mkdtemp(dir=api_tmp))
        os.chmod(directory, 0o755)
        deployment = make_certs(directory / "certs", stack.api_uid)
        if prepare is not None:
            prepare(deployment)
        port = _free_port()
        config = write_api_config(
            directory / "api.toml", port, deployment.directory, stack.runner_socket
        )
        log = directory / "api.log"
        process = start_api(config, log, stack.api_uid, port, stack.api_python)
        started.append(process)
        return OwnApi(f"127.0.0.1:{port}", deployment, log, process, stack.api_uid)

    try:
        yield start
    finally:
        for process in started:
            stop_api(process)


@pytest.fixture
def own_api(own_api_factory: Callable[..., OwnApi]) -> OwnApi:
    return own_api_factory()


# --- 1. no intermediate CAs -------------------------------------------------------------------


async def test_a_leaf_under_an_intermediate_of_the_client_ca_is_refused(
    stack: Stack, tmp_path: Path
) -> None:
    """The attack: an intermediate CA certificate signed with the client CA's key (path length
    0 notwithstanding), under it a leaf O=admin, both sent. The TLS handshake accepts the chain
    (BoringSSL does not enforce path length); every call is refused UNAUTHENTICATED, on every
    service, and nothing runs."""
    client_ca = pki.load_pair(stack.certs / "client-ca.pem", stack.certs / "ca/client-ca-key.pem")
    leaf, intermediate = pki.intermediate_chain(client_ca, "admin", "admin")
    cert, key = pki.write_pair(tmp_path, "mallory", leaf, intermediate)
    creds = credentials(stack.certs / "server-ca.pem", cert, key)
    async with grpc.aio.secure_channel(stack.address, creds) as channel:
        refused = await failure(list_jobs(channel))
        assert refused.code() == Code.UNAUTHENTICATED
        assert refused.details() == (
            "unusable client certificate: client certificate was not issued directly by a "
            "client CA this server trusts (its issuer is CN=Workernator team CA; intermediate "
            "CAs are not accepted)"
        )
        start = channel.unary_unary(
            "/workernator.v1.JobService/StartJob",
            request_serializer=pb.StartJobRequest.SerializeToString,
            response_deserializer=pb.StartJobResponse.FromString,
        )
        started = await failure(start(pb.StartJobRequest(noop=pb.NoopArgs()), timeout=20))
        assert started.code() == Code.UNAUTHENTICATED
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        health = await failure(check(health_pb2.HealthCheckRequest(), timeout=20))
        assert health.code() == Code.UNAUTHENTICATED
        assert "not issued directly by a client CA" in str(health.details())

        from grpc_reflection.v1alpha import reflection_pb2

        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        # Nothing is written: the refusal comes before the server reads a request (writing
        # one could race with it and fail on the client's side instead).
        listing = reflect()
        assert await listing.code() == Code.UNAUTHENTICATED
        assert "not issued directly by a client CA" in str(await listing.details())

    # The admin's real certificate (issued by the client CA itself) is served, and sees that
    # no job of "admin" was started by the attempt above.
    async with grpc.aio.secure_channel(stack.address, stack_credentials(stack, "admin")) as ch:
        before = {job.id for job in await list_jobs(ch)}
    # Through the CLI the same chain gets the api's reason, in one line.
    proc = cli(
        "jobs",
        "list",
        env=stack.env("admin") | {"WORKERNATOR_CERT": str(cert), "WORKERNATOR_KEY": str(key)},
    )
    one_line_error(
        proc,
        f"the API at {stack.address} did not accept the client certificate",
        "not issued directly by a client CA",
    )
    async with grpc.aio.secure_channel(stack.address, stack_credentials(stack, "admin")) as ch:
        assert {job.id for job in await list_jobs(ch)} == before


# --- 2. separate CAs --------------------------------------------------------------------------


async def test_a_client_certificate_signed_by_the_server_ca_is_refused(
    stack: Stack, tmp_path: Path
) -> None:
    """Whoever holds the server CA's key (it signs the api's certificate) cannot make clients:
    the api trusts the client CA only, with or without the server CA sent along."""
    server_ca = pki.load_pair(stack.certs / "server-ca.pem", stack.certs / "ca/server-ca-key.pem")
    forged = pki.issue(server_ca, pki.name("admin", "admin"))
    alone = pki.write_pair(tmp_path, "alone", forged)
    with_ca = pki.write_pair(tmp_path, "with-ca", forged, server_ca[1])
    for cert, key in (alone, with_ca):
        refused = await refusal(
            stack.address, credentials(stack.certs / "server-ca.pem", cert, key)
        )
        assert refused.code() == Code.UNAVAILABLE, refused  # the handshake fails
    # The same subject from the client CA is served: what differs is only who signed it.
    async with grpc.aio.secure_channel(stack.address, stack_credentials(stack, "admin")) as ch:
        await list_jobs(ch)


def test_the_cli_refuses_a_server_whose_certificate_the_client_ca_signed(
    stack: Stack, own_api_factory: Callable[..., OwnApi]
) -> None:
    """An api whose certificate comes from the client CA's key (say, from a stolen client
    issuer) is not the api to the CLI, which trusts the server CA only."""

    def forge_server_cert(deployment: certs.Deployment) -> None:
        client_ca = pki.load_pair(deployment.client_ca_cert, deployment.client_ca_key)
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        forged = pki.issue(
            client_ca, pki.name("localhost"), eku=ExtendedKeyUsageOID.SERVER_AUTH, sans=names
        )
        install(pki.pem(forged[1]), deployment.server_cert, mode=0o644)
        install(pki.key_pem(forged[0]), deployment.server_key, mode=0o600, uid=stack.api_uid)

    impostor = own_api_factory(forge_server_cert)
    alice_cert, alice_key = impostor.pki.users["alice"]
    env = {
        "WORKERNATOR_HOST": impostor.address,
        "WORKERNATOR_CERT": str(alice_cert),
        "WORKERNATOR_KEY": str(alice_key),
        "WORKERNATOR_CA": str(impostor.pki.server_ca_cert),
    }
    one_line_error(
        cli("jobs", "list", env=env),
        f"cannot reach the API at {impostor.address}: TLS handshake failed, the server "
        "certificate was not accepted",
        "check --ca",
    )
    # Trusting the client CA for the server instead is refused before connecting.
    wrong_ca = env | {"WORKERNATOR_CA": str(impostor.pki.client_ca_cert)}
    one_line_error(cli("jobs", "list", env=wrong_ca), "(--ca)", "is the client CA")


def test_the_ca_keys_are_out_of_the_apis_reach(stack: Stack) -> None:
    """The api's config points at the public CA certificate only; the CA keys live in ca/
    (0700), which the api's user cannot enter."""
    key_dir = stack.certs / certs.CA_KEY_DIR
    assert key_dir.stat().st_mode & 0o777 == 0o700
    assert stack.api_uid != 0
    for key in sorted(key_dir.iterdir()):
        result = subprocess.run(
            ["cat", str(key)],
            user=stack.api_uid,
            group=pwd.getpwnam(API_USER).pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode != 0 and "Permission denied" in result.stderr, key


# --- 4. a wrong certificate or key says what is wrong -------------------------------------------


def test_the_cli_says_what_is_wrong_with_its_certificate(stack: Stack) -> None:
    """gRPC says "Failed to create security handshaker." for a CA certificate used as the
    client's; the CLI checks its certificate first and names the problem."""
    ca_as_client = stack.env("alice") | {
        "WORKERNATOR_CERT": str(stack.certs / "client-ca.pem"),
        "WORKERNATOR_KEY": str(stack.certs / "ca/client-ca-key.pem"),
    }
    one_line_error(
        cli("jobs", "list", env=ca_as_client),
        f"{stack.certs / 'client-ca.pem'} (--cert) is a CA certificate, not a client certificate",
    )
    server_as_client = stack.env("alice") | {
        "WORKERNATOR_CERT": str(stack.certs / "server.pem"),
        "WORKERNATOR_KEY": str(stack.certs / "server-key.pem"),
    }
    one_line_error(
        cli("jobs", "list", env=server_as_client),
        "(--cert) is not a client certificate: its extended key usage lacks clientAuth "
        "(a server certificate?)",
    )


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"cert": "alice.pem", "key": "alice-key.pem"},
            "api.cert: {dir}/alice.pem: not a server certificate: its extended key usage lacks "
            "serverAuth (a client certificate?)",
        ),
        (
            {"client_ca": "server-ca.pem"},
            "api.client_ca: {dir}/server-ca.pem: CN=Workernator server CA is the server CA (it "
            "issues server certificates only); give the client CA",
        ),
        (
            {"client_ca": "alice.pem"},
            "api.client_ca: {dir}/alice.pem: CN=alice,O=user is not a CA certificate",
        ),
        (
            {"key": "bob-key.pem"},
            "api.key: {dir}/bob-key.pem: the key does not belong to the server certificate",
        ),
    ],
    ids=["client-cert-as-server", "server-ca-for-clients", "leaf-as-client-ca", "other-key"],
)
def test_the_api_refuses_to_start_with_unusable_tls_files(
    stack: Stack, api_tmp: Path, files: dict[str, str], message: str
) -> None:
    tmp_path = api_tmp
    directory = tmp_path / "certs"
    deployment = make_certs(directory, stack.api_uid)
    for name in ("alice-key.pem", "bob-key.pem"):  # readable by the api, for the test's sake
        os.chown(directory / name, stack.api_uid, -1)
    port = _free_port()
    overrides = {name: directory / file for name, file in files.items()}
    config = write_api_config(
        tmp_path / "api.toml", port, deployment.directory, stack.runner_socket, **overrides
    )
    api = run_api(config, tmp_path / "api.log", stack.api_uid, stack.api_python)
    try:
        assert api.wait(timeout=60) == 1
    finally:
        stop_api(api)
    assert (
        (tmp_path / "api.log")
        .read_text()
        .splitlines()[-1]
        .startswith("workernator-api: " + message.format(dir=directory))
    )


# --- 3. renewing without a restart --------------------------------------------------------------

HOLD_SERVER = r"""
import http.server, os, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        print("request", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a): pass
s = http.server.HTTPServer(("0.0.0.0", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


@contextlib.asynccontextmanager
async def held_request(egress_lab: EgressLab, tmp: Path) -> AsyncIterator[tuple[str, Path]]:
    """A host on the jobs' bridge that answers a POST only once the yielded file exists:
    (its URL, the file). A wait job that posts to it stays running until the test says so."""
    with bridge_host(egress_lab) as host:
        release = tmp / "release"
        process = host.popen(sys.executable, "-c", HOLD_SERVER, str(release))
        assert process.stdout is not None
        port = int(process.stdout.readline())
        try:
            yield f"http://{host.address}:{port}/hook", release
        finally:
            release.touch()


async def test_renewed_certificates_serve_new_connections_and_open_streams_go_on(
    own_api: OwnApi, egress_lab: EgressLab, tmp_path: Path
) -> None:
    """Renew the server's pair with the CLI and rotate the client CA, renaming the files into
    place while a tail stream is open: new connections get the new files at once, no restart;
    calls on an old connection are checked against the client CA in force; the stream opened
    before goes on receiving the job's output to its end."""
    api, directory = own_api, own_api.pki.directory
    old_server_cert = certs.load_cert(directory / "server.pem")
    alice = (directory / "alice.pem", directory / "alice-key.pem")
    assert served_certificate(api.address, api.pki.server_ca_cert, *alice) == old_server_cert

    async with (
        held_request(egress_lab, tmp_path) as (url, release),
        grpc.aio.secure_channel(api.address, api.credentials("alice")) as old_channel,
    ):
        start = old_channel.unary_unary(
            "/workernator.v1.JobService/StartJob",
            request_serializer=pb.StartJobRequest.SerializeToString,
            response_deserializer=pb.StartJobResponse.FromString,
        )
        seconds = Duration(nanos=100_000_000)
        job = (await start(pb.StartJobRequest(wait=pb.WaitArgs(seconds=seconds, url=url)))).job
        tail = old_channel.unary_stream(
            "/workernator.v1.JobService/TailJobOutput",
            request_serializer=pb.TailJobOutputRequest.SerializeToString,
            response_deserializer=pb.TailJobOutputResponse.FromString,
        )
        stream = tail(pb.TailJobOutputRequest(job_id=job.id, follow=True))
        before = bytearray()
        async with asyncio.timeout(60):
            async for response in stream:
                before += b"".join(chunk.data for chunk in response.chunks)
                if b"[WAIT] Sending a POST" in before:
                    break  # the job now waits for the held request; the stream stays open

        # Renew the server's pair with the real CLI; install the key first, then the cert.
        renewed = await asyncio.to_thread(
            cli, "certs", "server", "--dir", str(directory), "--name", "localhost",
            "--name", "127.0.0.1", "--out", "server.new",
        )  # fmt: skip
        assert renewed.returncode == 0, renewed.stderr
        install(
            directory / "server.new-key.pem",
            directory / "server-key.pem",
            mode=0o600,
            uid=api.api_uid,
        )
        install(directory / "server.new.pem", directory / "server.pem", mode=0o644)
        new_server_cert = certs.load_cert(directory / "server.pem")
        assert new_server_cert != old_server_cert
        assert served_certificate(api.address, api.pki.server_ca_cert, *alice) == new_server_cert

        # Rotate the client CA: a new one replaces the old in the bundle.
        following = tmp_path / "next"
        for args in (("ca", "client"), ("client", "dave", "--role", "user")):
            made = await asyncio.to_thread(cli, "certs", *args, "--dir", str(following))
            assert made.returncode == 0, made.stderr
        install(following / "client-ca.pem", directory / "client-ca.pem", mode=0o644)
        dave = credentials(
            api.pki.server_ca_cert, following / "dave.pem", following / "dave-key.pem"
        )
        async with grpc.aio.secure_channel(api.address, dave) as channel:
            assert [j.owner for j in await list_jobs(channel)] == []  # dave's jobs: none
        # alice's certificate is from the CA taken out: refused on a new connection, and on
        # the connection she opened before, call by call.
        assert (await refusal(api.address, api.credentials("alice"))).code() == Code.UNAVAILABLE
        old = await failure(list_jobs(old_channel))
        assert old.code() == Code.UNAUTHENTICATED
        assert "not issued directly by a client CA this server trusts" in str(old.details())

        # The stream opened before all this receives the rest of the job's output.
        release.touch()
        after = bytearray()
        async with asyncio.timeout(60):
            async for response in stream:
                after += b"".join(chunk.data for chunk in response.chunks)
        assert after.endswith(
            b"[WAIT] Response status: 201 Created\n[RESULT] 201\n[JOB] Complete\n"
        )
        assert await stream.code() == Code.OK

    assert len(api.log_lines(RELOADED)) == 2  # the server's pair, then the client CA
    assert api.log_lines(UNUSABLE) == []
    assert api.process.poll() is None  # never restarted


def test_a_broken_renewal_keeps_the_old_files_and_is_logged_once_per_change(
    own_api: OwnApi, tmp_path: Path
) -> None:
    api, directory = own_api, own_api.pki.directory
    alice = (directory / "alice.pem", directory / "alice-key.pem")
    original = certs.load_cert(directory / "server.pem")
    kept = {name: (directory / name).read_bytes() for name in ("server.pem", "server-key.pem")}

    def serves(cert: x509.Certificate, connections: int = 5) -> None:
        for _ in range(connections):
            assert served_certificate(api.address, api.pki.server_ca_cert, *alice) == cert

    def warnings(count: int, fragment: str) -> None:
        wait_for(lambda: len(api.log_lines(UNUSABLE)) >= count, f"{count} warnings")
        lines = api.log_lines(UNUSABLE)
        assert len(lines) == count, lines
        assert fragment in lines[-1], lines[-1]

    # Not a key at all.
    install(b"garbage\n", directory / "server-key.pem", mode=0o600, uid=api.api_uid)
    serves(original)
    warnings(1, f"api.key: {directory / 'server-key.pem'}: not a PEM private key")
    # A key of another certificate.
    other = certs.generate_key()
    install(pki.key_pem(other), directory / "server-key.pem", mode=0o600, uid=api.api_uid)
    serves(original)
    warnings(2, "the key does not belong to the server certificate")
    # An expired pair.
    server_ca = pki.load_pair(api.pki.server_ca_cert, api.pki.server_ca_key)
    expired = pki.issue(
        server_ca,
        pki.name("localhost"),
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        not_before=pki.NOW - 3 * pki.DAY,
        not_after=pki.NOW - pki.DAY,
        sans=[x509.DNSName("localhost")],
    )
    install(pki.key_pem(expired[0]), directory / "server-key.pem", mode=0o600, uid=api.api_uid)
    install(pki.pem(expired[1]), directory / "server.pem", mode=0o644)
    serves(original)
    warnings(3, "api.cert: ")
    assert "the server certificate expired on" in api.log_lines(UNUSABLE)[-1]
    # The files in force put back: nothing to log, nothing changes.
    install(kept["server-key.pem"], directory / "server-key.pem", mode=0o600, uid=api.api_uid)
    install(kept["server.pem"], directory / "server.pem", mode=0o644)
    serves(original, connections=1)
    # A client CA file that is not one.
    client_ca = api.pki.client_ca_cert.read_bytes()
    install(b"", directory / "client-ca.pem", mode=0o644)
    serves(original)
    warnings(4, f"api.client_ca: {directory / 'client-ca.pem'}: not a PEM certificate")
    assert api.log_lines(RELOADED) == []
    # Calls go on meanwhile, with the files of the start.
    with grpc.secure_channel(api.address, api.credentials("alice")) as channel:
        call = channel.unary_unary(
            "/workernator.v1.JobService/ListJobs",
            request_serializer=pb.ListJobsRequest.SerializeToString,
            response_deserializer=pb.ListJobsResponse.FromString,
        )
        response: pb.ListJobsResponse = call(pb.ListJobsRequest(), timeout=20)
        assert {job.owner for job in response.jobs} <= {"alice"}

    # A good renewal is taken up at once.
    install(client_ca, directory / "client-ca.pem", mode=0o644)
    renewed = cli(
        "certs",
        "server",
        "--dir",
        str(directory),
        "--name",
        "localhost",
        "--name",
        "127.0.0.1",
        "--out",
        "good",
    )
    assert renewed.returncode == 0, renewed.stderr
    install(directory / "good-key.pem", directory / "server-key.pem", mode=0o600, uid=api.api_uid)
    install(directory / "good.pem", directory / "server.pem", mode=0o644)
    good = certs.load_cert(directory / "good.pem")
    serves(good, connections=2)
    wait_for(lambda: len(api.log_lines(RELOADED)) == 1, "the reload to be logged")
    assert len(api.log_lines(UNUSABLE)) == 4


# --- what real TLS tools see --------------------------------------------------------------------


def test_sslyze_sees_tls_1_3_only_with_aead_suites(stack: Stack, tmp_path: Path) -> None:
    """SSL 2 to TLS 1.2: every suite refused; TLS 1.3: AEAD suites only (AES-GCM, ChaCha20-
    Poly1305). The exact command is in docs/security.md."""
    out = tmp_path / "sslyze.json"
    cert, key = stack.certs / "alice.pem", stack.certs / "alice-key.pem"
    result = subprocess.run(
        [
            sys.executable, "-m", "sslyze", "--quiet", "--mozilla_config", "disable",
            "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3",
            "--cert", str(cert), "--key", str(key), "--json_out", str(out), stack.address,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout, result.stderr)
    (server,) = json.loads(out.read_text())["server_scan_results"]
    assert server["connectivity_status"] == "COMPLETED", server["connectivity_error_trace"]
    accepted: dict[str, list[str]] = {}
    for name, scan in server["scan_result"].items():
        if not name.endswith("_cipher_suites"):
            continue
        assert scan["status"] == "COMPLETED", (name, scan)
        suites = scan["result"]["accepted_cipher_suites"]
        accepted[name] = sorted(suite["cipher_suite"]["name"] for suite in suites)
    assert accepted == {
        "ssl_2_0_cipher_suites": [],
        "ssl_3_0_cipher_suites": [],
        "tls_1_0_cipher_suites": [],
        "tls_1_1_cipher_suites": [],
        "tls_1_2_cipher_suites": [],
        "tls_1_3_cipher_suites": [
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
        ],
    }


def buf() -> Path:
    """buf, from the dev dependency buf-bin (in the venv)."""
    if not BUF.exists():
        if IN_CI:
            pytest.fail(f"{BUF} is missing: run 'make venv' (buf-bin is a dev dependency)")
        pytest.skip(f"{BUF} is missing: run 'make venv' (buf-bin is a dev dependency)")
    return BUF


def buf_curl(
    stack: Stack, *args: str, ca: str = "server-ca.pem"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(buf()), "curl", "--protocol", "grpc", "--connect-timeout", "10",
            "--cacert", str(stack.certs / ca),
            "--cert", str(stack.certs / "carol.pem"), "--key", str(stack.certs / "carol-key.pem"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip


def test_buf_curl_reaches_health_and_reflection(stack: Stack) -> None:
    """An external gRPC client (Go's TLS, server reflection for the schema) with the viewer's
    certificate: the services are listed, and Health/Check answers."""
    base = f"https://{stack.address}"
    listed = buf_curl(stack, "--list-services", base)
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "workernator.v1.JobService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    check = buf_curl(
        stack,
        "-d",
        '{"service":"workernator.v1.JobService"}',
        f"{base}/grpc.health.v1.Health/Check",
    )
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout) == {"status": "SERVING"}
    # Trusting the client CA for the server does not work: the server CA signed the api's.
    wrong = buf_curl(stack, "--list-services", base, ca="client-ca.pem")
    assert wrong.returncode != 0 and wrong.stdout == ""
