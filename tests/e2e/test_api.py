"""The api end to end over real mTLS: authn, authz, every method, streaming, errors."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.conftest import API_USER, Stack, _can_run_as
from workernator_api import certs
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api._proto.workernator.v1 import workernator_pb2_grpc as pb_grpc
from workernator_api.runner_client import RunnerClient

Code = grpc.StatusCode


def channel(stack: Stack, user: str) -> grpc.aio.Channel:
    ca, cert, key = stack.credentials(user)
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.aio.secure_channel(stack.address, creds)


class Client:
    """A typed wrapper over the generated stub, acting as one user."""

    def __init__(self, stack: Stack, user: str) -> None:
        self.channel = channel(stack, user)
        self.stub: Any = pb_grpc.JobServiceStub(self.channel)  # type: ignore[no-untyped-call]

    async def start(self, **arm: Any) -> pb.JobStatus:
        response: pb.StartJobResponse = await self.stub.StartJob(pb.StartJobRequest(**arm))
        return response.job

    async def status(self, job_id: str) -> pb.JobStatus:
        response: pb.GetJobStatusResponse = await self.stub.GetJobStatus(
            pb.GetJobStatusRequest(job_id=job_id)
        )
        return response.job

    async def stop(self, job_id: str) -> pb.JobStatus:
        response: pb.StopJobResponse = await self.stub.StopJob(pb.StopJobRequest(job_id=job_id))
        return response.job

    async def list(self, **kw: Any) -> list[pb.JobStatus]:
        response: pb.ListJobsResponse = await self.stub.ListJobs(pb.ListJobsRequest(**kw))
        return list(response.jobs)

    async def tail(self, job_id: str, **kw: Any) -> bytes:
        out = bytearray()
        stream: AsyncIterator[pb.TailJobOutputResponse] = self.stub.TailJobOutput(
            pb.TailJobOutputRequest(job_id=job_id, **kw)
        )
        async for response in stream:
            for chunk in response.chunks:
                out += chunk.data
        return bytes(out)

    async def close(self) -> None:
        await self.channel.close()


@pytest.fixture
async def clients(stack: Stack) -> AsyncIterator[dict[str, Client]]:
    made = {user: Client(stack, user) for user in ("admin", "alice", "bob", "carol")}
    yield made
    for client in made.values():
        await client.close()


async def _code(call: Any) -> Code:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    code: Code = exc.value.code()
    return code


async def test_every_job_type_runs_end_to_end(clients: dict[str, Client]) -> None:
    alice = clients["alice"]
    fib = await alice.start(fib=pb.FibArgs(position=10))
    assert fib.title == "Fibonacci" and fib.owner == "alice"
    assert fib.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_COMPLETED)
    assert b"[RESULT] 34\n" in await alice.tail(fib.id, follow=True)

    ev = await alice.start(eval=pb.EvalArgs(expression="2x * 3y", variables={"x": 2, "y": 1.5}))
    out = await alice.tail(ev.id, follow=True)
    assert b"[EVAL] Parsed expression: ((2 * x) * (3 * y))\n" in out
    assert b"[RESULT] 18\n" in out

    noop = await alice.start(noop=pb.NoopArgs())
    assert await alice.tail(noop.id, follow=True) == b""
    assert (await alice.status(noop.id)).state == pb.JOB_STATE_COMPLETED
    unset = await alice.start()  # no arm at all is noop, the zero value
    assert unset.type == pb.JOB_TYPE_NOOP

    wait = await alice.start(
        wait=pb.WaitArgs(seconds=Duration(seconds=30), url="http://127.0.0.1:9/")
    )
    running = await alice.status(wait.id)
    assert running.state == pb.JOB_STATE_RUNNING
    assert running.wait.url == "http://127.0.0.1:9/" and running.wait.seconds.seconds == 30
    assert not running.HasField("ended_at")
    stopped = await alice.stop(wait.id)
    assert stopped.state == pb.JOB_STATE_STOPPED
    assert stopped.HasField("ended_at")
    done = await alice.status(fib.id)
    assert done.state == pb.JOB_STATE_COMPLETED and done.exit_code == 0
    assert done.fib.position == 10


async def test_a_late_tail_gets_everything_and_20_tails_agree(
    clients: dict[str, Client],
) -> None:
    alice = clients["alice"]
    job = await alice.start(fib=pb.FibArgs(position=5000))
    await asyncio.sleep(0.5)  # well after the job printed everything
    outputs = await asyncio.gather(*(alice.tail(job.id, follow=True) for _ in range(20)))
    assert len(set(outputs)) == 1
    assert outputs[0].startswith(b"[JOB] Starting job 'Fibonacci'\n")
    assert outputs[0].endswith(b"[JOB] Complete\n")
    last = await alice.tail(job.id, follow=False, last_lines=1)
    assert last == b"[JOB] Complete\n"


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        ({"fib": pb.FibArgs(position=0)}, "argument 'position'"),
        ({"fib": pb.FibArgs(position=10**7)}, "argument 'position': must be at most"),
        ({"eval": pb.EvalArgs(expression="")}, "argument 'expression' is required"),
        ({"eval": pb.EvalArgs(expression="2 +* 3")}, "argument 'expression'"),
        ({"eval": pb.EvalArgs(expression="2x")}, "variable 'x' has no value"),
        ({"eval": pb.EvalArgs(expression="x", variables={"1x": 1})}, "argument 'variables'"),
        ({"wait": pb.WaitArgs(url="http://localhost/")}, "argument 'seconds' is required"),
        ({"wait": pb.WaitArgs(seconds=Duration(seconds=1))}, "argument 'url' is required"),
        ({"wait": pb.WaitArgs(seconds=Duration(seconds=1), url="file:///etc")}, "argument 'url'"),
        ({"wait": pb.WaitArgs(seconds=Duration(seconds=-1), url="http://x/")}, "'seconds'"),
        ({"wait": pb.WaitArgs(seconds=Duration(seconds=200_000), url="http://x/")}, "'seconds'"),
    ],
)
async def test_invalid_arguments_are_invalid_argument_naming_the_argument(
    clients: dict[str, Client], arm: dict[str, Any], message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await clients["alice"].start(**arm)
    assert exc.value.code() == Code.INVALID_ARGUMENT
    assert message in str(exc.value.details())


async def test_start_with_limits_returns_the_effective_limits(clients: dict[str, Client]) -> None:
    """A StartJob with limits returns a status whose limits echo the effective ones: what was
    asked for, the runner's defaults in place of zero fields. GetJobStatus and ListJobs agree,
    and the job runs under them."""
    alice = clients["alice"]
    defaults = (await alice.start(noop=pb.NoopArgs())).limits  # nothing asked: every default
    asked = pb.ResourceLimits(cpu_millis=500, memory_bytes=256 << 20, pids=64)
    job = await alice.start(fib=pb.FibArgs(position=3), limits=asked)
    expected = pb.ResourceLimits()
    expected.CopyFrom(defaults)
    expected.MergeFrom(asked)  # the fields set in asked (proto3: the non-zero ones) win
    assert job.limits == expected
    assert (await alice.status(job.id)).limits == expected
    assert [j.limits for j in await alice.list() if j.id == job.id] == [expected]
    assert b"[RESULT] 1\n" in await alice.tail(job.id, follow=True)
    done = await alice.status(job.id)
    assert done.state == pb.JOB_STATE_COMPLETED and not done.oom_killed
    assert done.limits == expected
    assert done.HasField("usage")


async def test_every_role_against_every_method(clients: dict[str, Client]) -> None:
    admin, alice, bob, carol = (clients[u] for u in ("admin", "alice", "bob", "carol"))
    job = await alice.start(wait=pb.WaitArgs(seconds=Duration(seconds=60), url="http://x/"))
    bobs = await bob.start(noop=pb.NoopArgs())

    # StartJob: admin and user yes, viewer no
    assert (await admin.start(noop=pb.NoopArgs())).owner == "admin"
    assert await _code(carol.start(noop=pb.NoopArgs())) == Code.PERMISSION_DENIED

    # GetJobStatus / TailJobOutput: owner, admin and viewer yes; another user: not found
    for reader in (alice, admin, carol):
        assert (await reader.status(job.id)).id == job.id
        assert b"[WAIT]" in await reader.tail(job.id, follow=False)
    assert await _code(bob.status(job.id)) == Code.NOT_FOUND
    assert await _code(bob.tail(job.id, follow=False)) == Code.NOT_FOUND
    missing = await _code(bob.status("ZZZZZZ"))
    assert missing == Code.NOT_FOUND  # indistinguishable from someone else's job

    # ListJobs: users see their own; admin and viewer see all, and may filter by owner
    assert {j.owner for j in await alice.list()} == {"alice"}
    assert {j.owner for j in await bob.list()} == {"bob"}
    assert await bob.list(owner="alice") == []
    everyone = {j.owner for j in await admin.list()}
    assert {"alice", "bob", "admin"} <= everyone
    assert {j.owner for j in await carol.list()} == everyone
    assert {j.owner for j in await carol.list(owner="bob")} == {"bob"}
    running = await admin.list(state=pb.JOB_STATE_RUNNING)
    assert job.id in {j.id for j in running} and bobs.id not in {j.id for j in running}

    # ListJobTypes: everyone
    for client in (admin, alice, carol):
        types: pb.ListJobTypesResponse = await client.stub.ListJobTypes(pb.ListJobTypesRequest())
        assert [t.name for t in types.types] == ["noop", "fib", "eval", "wait"]
        fib = types.types[1]
        assert fib.type == pb.JOB_TYPE_FIB and fib.args[0].name == "position"
        assert fib.args[0].min == 1

    # StopJob: viewer no; another user: not found; owner and admin yes
    assert await _code(carol.stop(job.id)) == Code.PERMISSION_DENIED
    assert await _code(bob.stop(job.id)) == Code.NOT_FOUND
    assert (await alice.status(job.id)).state == pb.JOB_STATE_RUNNING
    assert (await admin.stop(job.id)).state == pb.JOB_STATE_STOPPED
    assert (await alice.stop(job.id)).state == pb.JOB_STATE_STOPPED  # twice: not an error


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value


async def _all_pages(client: Client, **kw: Any) -> tuple[list[str], int]:
    """The ids of every job ListJobs returns, following next_page_token; and the page count."""
    ids: list[str] = []
    pages = 0
    token = ""
    while True:
        page: pb.ListJobsResponse = await client.stub.ListJobs(
            pb.ListJobsRequest(page_token=token, **kw)
        )
        ids += [j.id for j in page.jobs]
        pages += 1
        token = page.next_page_token
        if not token:
            return ids, pages


async def test_list_jobs_pages_through_everything_oldest_first(clients: dict[str, Client]) -> None:
    bob = clients["bob"]
    started = [(await bob.start(noop=pb.NoopArgs())).id for _ in range(5)]
    whole: pb.ListJobsResponse = await bob.stub.ListJobs(pb.ListJobsRequest(page_size=500))
    assert not whole.next_page_token
    ids = [j.id for j in whole.jobs]
    assert ids[-5:] == started  # oldest first
    assert await _all_pages(bob) == (ids, 1)  # the default page size is 100
    assert await _all_pages(bob, page_size=100_000) == (ids, 1)  # lowered to the maximum

    paged, pages = await _all_pages(bob, page_size=2)
    assert paged == ids and pages == (len(ids) + 1) // 2

    # A job started between two pages shows on a later page; no job shows twice.
    first: pb.ListJobsResponse = await bob.stub.ListJobs(pb.ListJobsRequest(page_size=2))
    late = (await bob.start(noop=pb.NoopArgs())).id
    rest, _ = await _all_pages(bob, page_size=2)  # from the start, to compare with
    following: list[str] = [j.id for j in first.jobs]
    token = first.next_page_token
    while token:
        page: pb.ListJobsResponse = await bob.stub.ListJobs(
            pb.ListJobsRequest(page_size=2, page_token=token)
        )
        following += [j.id for j in page.jobs]
        token = page.next_page_token
    assert following == rest == [*ids, late]

    # Filters apply across pages.
    done, _ = await _all_pages(bob, page_size=1, state=pb.JOB_STATE_COMPLETED)
    whole = await bob.stub.ListJobs(pb.ListJobsRequest(page_size=500))
    assert done == [j.id for j in whole.jobs if j.state == pb.JOB_STATE_COMPLETED]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.ListJobsRequest(page_token="bm90IGEgdG9rZW4"), "invalid page_token"),
        (pb.ListJobsRequest(page_token="!!!"), "invalid page_token"),
        (pb.ListJobsRequest(page_token="x" * 1000), "invalid page_token"),
        (pb.ListJobsRequest(page_size=-1), "page_size must not be negative"),
        (pb.ListJobsRequest(state=99), "unknown state 99"),  # type: ignore[arg-type]
    ],
)
async def test_bad_list_requests_are_invalid_argument(
    clients: dict[str, Client], request_: pb.ListJobsRequest, message: str
) -> None:
    error = await _failure(clients["alice"].stub.ListJobs(request_))
    assert error.code() == Code.INVALID_ARGUMENT
    assert message in str(error.details())


async def test_tail_start_positions_out_of_range(clients: dict[str, Client]) -> None:
    alice = clients["alice"]
    job = await alice.start(fib=pb.FibArgs(position=10))
    everything = await alice.tail(job.id, follow=True)
    for lines in (2_000_000, 2**32 - 1):  # more than the runner keeps count: all of them
        assert await alice.tail(job.id, follow=False, last_lines=lines) == everything
    error = await _failure(alice.tail(job.id, offset=2**63))
    assert error.code() == Code.INVALID_ARGUMENT
    assert error.details() == "offset is too large"


async def test_jobs_of_types_the_api_does_not_offer_do_not_exist_through_it(
    stack: Stack, clients: dict[str, Client]
) -> None:
    async with RunnerClient(stack.runner_socket) as runner:  # as root, beside the api
        probe = await runner.start("alice", "user", "drip", {"count": 600, "interval": 0.1})
    try:
        for user in ("alice", "admin", "carol"):
            client = clients[user]
            assert probe.id not in (await _all_pages(client))[0]
            assert await _code(client.status(probe.id)) == Code.NOT_FOUND
            assert await _code(client.tail(probe.id, follow=False)) == Code.NOT_FOUND
        assert await _code(clients["admin"].stop(probe.id)) == Code.NOT_FOUND
        assert await _code(clients["alice"].stop(probe.id)) == Code.NOT_FOUND
    finally:
        async with RunnerClient(stack.runner_socket) as runner:
            await runner.stop("root", "admin", probe.id)


async def _health(stack: Stack, user: str) -> int:
    async with channel(stack, user) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)
        response = await stub.Check(
            health_pb2.HealthCheckRequest(service="workernator.v1.JobService")
        )
        status: int = response.status
        return status


async def test_health_checking_is_enabled(stack: Stack) -> None:
    assert await _health(stack, "carol") == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(stack: Stack) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with channel(stack, "alice") as ch:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        services: list[str] = []
        async for response in stub.ServerReflectionInfo(iter([request])):
            services += [s.name for s in response.list_services_response.service]
    assert "workernator.v1.JobService" in services
    assert "grpc.health.v1.Health" in services


async def _call_with(stack: Stack, creds: grpc.ChannelCredentials) -> Code:
    async with grpc.aio.secure_channel(stack.address, creds) as ch:
        stub: Any = pb_grpc.JobServiceStub(ch)  # type: ignore[no-untyped-call]
        return await _code(stub.ListJobs(pb.ListJobsRequest(), timeout=10))


async def test_a_client_without_a_certificate_is_refused(stack: Stack) -> None:
    ca, _, _ = stack.credentials("alice")
    assert await _call_with(stack, grpc.ssl_channel_credentials(ca)) == Code.UNAVAILABLE


async def test_a_certificate_from_another_ca_is_refused(stack: Stack, tmp_path: Path) -> None:
    other = tmp_path / "other"
    certs.create_deployment(other, ["localhost"], [("alice", "admin")])
    ca, _, _ = stack.credentials("alice")
    creds = grpc.ssl_channel_credentials(
        ca, (other / "alice-key.pem").read_bytes(), (other / "alice.pem").read_bytes()
    )
    assert await _call_with(stack, creds) == Code.UNAVAILABLE


async def test_the_server_certificate_cannot_be_used_as_a_client(stack: Stack) -> None:
    ca, _, _ = stack.credentials("alice")
    creds = grpc.ssl_channel_credentials(
        ca, (stack.certs / "server-key.pem").read_bytes(), (stack.certs / "server.pem").read_bytes()
    )
    assert await _call_with(stack, creds) in (Code.UNAVAILABLE, Code.UNAUTHENTICATED)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_1_2_is_refused_and_tls_1_3_accepted(stack: Stack) -> None:
    host, port = stack.address.split(":")

    def handshake(version: str) -> str:
        result = subprocess.run(
            [
                "openssl",
                "s_client",
                f"-{version}",
                "-connect",
                f"{host}:{port}",
                "-CAfile",
                str(stack.certs / "server-ca.pem"),
                "-cert",
                str(stack.certs / "alice.pem"),
                "-key",
                str(stack.certs / "alice-key.pem"),
                "-alpn",
                "h2",
                "-brief",
            ],
            input=b"",
            capture_output=True,
            timeout=30,
            check=False,
        )
        return (result.stdout + result.stderr).decode(errors="replace")

    assert "Protocol version: TLSv1.3" in handshake("tls1_3")
    assert "Protocol version: TLSv1.2" not in handshake("tls1_2")


def test_the_api_runs_unprivileged_when_it_can(stack: Stack) -> None:
    status = Path(f"/proc/{stack.api.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid_line.split()[1]) == stack.api_uid
    if stack.api_uid == 0:  # only when it could not: the checkout is out of nobody's reach
        assert not _can_run_as(API_USER)
