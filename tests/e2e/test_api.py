"""The api end to end over real mTLS: authn, authz, every method, streaming, errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.errors import NotFound
from shared.model import JobState
from tests import pki
from tests.e2e.conftest import API_USER, Stack, channel
from workernator_api import certs, jobcache
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api._proto.workernator.v1 import workernator_pb2_grpc as pb_grpc
from workernator_api.runner_client import RunnerClient

Code = grpc.StatusCode


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

    async def delete(self, job_id: str) -> pb.JobStatus:
        response: pb.DeleteJobResponse = await self.stub.DeleteJob(
            pb.DeleteJobRequest(job_id=job_id)
        )
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
        (
            {"fib": pb.FibArgs(position=10**7)},
            "'position': must be between 1 and 1000000, got 10000000",
        ),
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


# --- the role x method x owner table of docs/security.md ----------------------------------------

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
ROLE_COLUMNS = ("admin", "user", "viewer", "no or unknown role")
# Who acts in each column: certificates of the client CA. "nemo" has no O (no role) and
# "mallory" has O=root (no such role); both pass the TLS handshake.
ACTORS: dict[str, tuple[str, ...]] = {
    "admin": ("admin",),
    "user": ("alice",),
    "viewer": ("carol",),
    "no or unknown role": ("nemo", "mallory"),
}
OTHER_USER = "bob"  # "another user's job" belongs to bob, who is none of the actors
NO_SUCH_JOB = "ZZZZZZ"
JOB_KINDS = ("own", "another user's", "no such job")  # the "job" column, or "—"


def role_table() -> dict[tuple[str, str], dict[str, str]]:
    """The table under "Who may call what" in docs/security.md: (method, job) -> outcome per
    role column. The doc is the single source of truth; the test below checks every cell."""
    lines = SECURITY_DOC.read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| method | job |"))
    columns = [cell.strip() for cell in lines[head].strip("|").split("|")]
    assert tuple(columns[2:]) == ROLE_COLUMNS, columns
    table: dict[tuple[str, str], dict[str, str]] = {}
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        assert len(cells) == len(columns), line
        assert (cells[0], cells[1]) not in table, f"row given twice: {line}"
        table[cells[0], cells[1]] = dict(zip(ROLE_COLUMNS, cells[2:], strict=True))
    return table


def _client_certificate(stack: Stack, user: str, role: str | None) -> None:
    """A client certificate from the stack's client CA with CN ``user`` and O ``role`` (None: no
    O), even one that is not a role, written as the stack's other users' are."""
    client_ca = pki.load_pair(stack.certs / "client-ca.pem", stack.certs / "ca/client-ca-key.pem")
    key, cert = pki.issue(client_ca, pki.name(user, role))
    certs.write_key(stack.certs / f"{user}-key.pem", key, overwrite=True)
    certs.write_cert(stack.certs / f"{user}.pem", cert, overwrite=True)


async def _outcome(call: Any) -> tuple[str, Any]:
    """("OK", the answer) or (the status code's name, None)."""
    try:
        return "OK", await call
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, None


async def _ids_listed(client: Client, **kw: Any) -> set[str] | str:
    try:
        return set((await _all_pages(client, **kw))[0])
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def _health_watch(client: Client) -> int:
    stub: Any = health_pb2_grpc.HealthStub(client.channel)
    async for response in stub.Watch(health_pb2.HealthCheckRequest(service="")):
        status: int = response.status
        return status
    raise AssertionError("Watch ended without an answer")


async def _reflection(client: Client) -> list[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub: Any = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for response in stub.ServerReflectionInfo(iter([request])):
        return [s.name for s in response.list_services_response.service]
    raise AssertionError("reflection ended without an answer")


async def _call(
    method: str, client: Client, user: str, job_id: str | None, owner: str | None
) -> str:
    """Make the call ``method`` names as ``client`` (acting as ``user``) on ``job_id`` (owned
    by ``owner``), and say how it went in the table's words, after checking that an OK answer
    is the right one."""
    if method == "StartJob":
        outcome, job = await _outcome(client.start(noop=pb.NoopArgs()))
        assert job is None or job.owner == user
        return str(outcome)
    if method == "ListJobTypes":
        outcome, types = await _outcome(client.stub.ListJobTypes(pb.ListJobTypesRequest()))
        assert types is None or [t.name for t in types.types] == ["noop", "fib", "eval", "wait"]
        return str(outcome)
    if method.startswith("grpc.health.v1.Health/"):
        health: Any = health_pb2_grpc.HealthStub(client.channel)
        check = health_pb2.HealthCheckRequest(service="")
        name = method.split("/")[1]
        if name == "Watch":
            return (await _outcome(_health_watch(client)))[0]
        request: Any = (
            check if name == "Check" else health_pb2.HealthListRequest()  # type: ignore[attr-defined]
        )
        return (await _outcome(getattr(health, name)(request)))[0]
    if method == "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo":
        outcome, services = await _outcome(_reflection(client))
        assert services is None or "workernator.v1.JobService" in services
        return str(outcome)
    assert job_id is not None, method
    if method == "GetJobStatus":
        outcome, job = await _outcome(client.status(job_id))
        assert job is None or job.id == job_id
        return str(outcome)
    if method == "TailJobOutput":
        outcome, output = await _outcome(client.tail(job_id, follow=False))
        assert output is None or b"[RESULT] 1\n" in output  # fib 3
        return str(outcome)
    if method == "StopJob":
        outcome, job = await _outcome(client.stop(job_id))
        assert job is None or job.state == pb.JOB_STATE_STOPPED
        return str(outcome)
    if method == "DeleteJob":
        outcome, job = await _outcome(client.delete(job_id))
        assert job is None or job.id == job_id
        return str(outcome)
    if method == "ListJobs":  # listed or not, whether or not asked for the owner's jobs
        everything = await _ids_listed(client)
        if isinstance(everything, str):
            return everything
        theirs = await _ids_listed(client, owner=owner)
        assert isinstance(theirs, set) and (job_id in everything) == (job_id in theirs)
        return "listed" if job_id in everything else "not listed"
    raise AssertionError(f"the table names a method this test cannot call: {method}")


async def test_every_role_against_every_method(stack: Stack) -> None:
    """Every cell of the role x method x owner table in docs/security.md, as a real call."""
    table = role_table()
    rpcs = [m.name for m in pb.DESCRIPTOR.services_by_name["JobService"].methods]
    for rpc in rpcs:  # every method of the proto has its rows, and each kind of job its row
        kinds = {job for method, job in table if method == rpc}
        assert kinds in ({"—"}, set(JOB_KINDS)), (rpc, kinds)
    _client_certificate(stack, "nemo", None)
    _client_certificate(stack, "mallory", "root")
    actors = [user for users in ACTORS.values() for user in users]
    clients = {user: Client(stack, user) for user in actors}

    async with RunnerClient(stack.runner_socket) as runner:

        async def job_of(owner: str, method: str) -> str:
            """A job for one call: a running one for StopJob (each call its own), a finished
            fib for the others."""
            if method == "StopJob":
                args = {"seconds": 600, "url": "http://127.0.0.1:9/"}
                return (await runner.start(owner, "user", "wait", args)).id
            job = await runner.start(owner, "user", "fib", {"position": 3})
            async for _ in runner.tail(owner, "user", job.id, follow=True):
                pass
            return job.id

        wrong: list[str] = []
        try:
            for (method, kind), expected in table.items():
                for column, users in ACTORS.items():
                    for user in users:
                        owner = {"own": user, "another user's": OTHER_USER}.get(kind)
                        job_id = NO_SUCH_JOB if kind == "no such job" else None
                        if owner is not None:
                            job_id = await job_of(owner, method)
                        seen = await _call(method, clients[user], user, job_id, owner)
                        if seen != expected[column]:
                            wrong.append(f"{method} on {kind} as {user} ({column}): {seen}")
                        if method == "StopJob" and job_id not in (None, NO_SUCH_JOB):
                            after = await runner.status("root", "admin", job_id)
                            refused = seen != "OK"
                            assert (after.state is JobState.RUNNING) == refused, (user, kind)
                            await runner.stop("root", "admin", job_id)
                        if method == "DeleteJob" and job_id not in (None, NO_SUCH_JOB):
                            try:
                                await runner.status("root", "admin", job_id)
                                still_there = True
                            except NotFound:
                                still_there = False
                            assert still_there == (seen != "OK"), (user, kind)
        finally:
            for client in clients.values():
                await client.close()
    assert not wrong, "calls that do not do what docs/security.md says:\n" + "\n".join(wrong)


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


@contextlib.contextmanager
def _runner_paused(stack: Stack) -> Iterator[None]:
    """The test's own runner stopped (SIGSTOP) meanwhile: whatever needs it waits."""
    assert stack.runner.process is not None
    pid = stack.runner.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def _ended(client: Client, job_id: str) -> pb.JobStatus:
    for _ in range(500):
        job = await client.status(job_id)
        if job.state != pb.JOB_STATE_RUNNING:
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} did not end")


async def _code_within(call: Any) -> Code:
    """The code a call ends with; the calls passed here carry a short deadline."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        code: Code = exc.code()
        return code
    return Code.OK


async def test_what_the_api_remembers_of_jobs_is_what_cannot_change(
    stack: Stack, clients: dict[str, Client]
) -> None:
    """An ended job's status is answered without the runner (jobcache.py); a running job's
    status always comes from the runner; another user's job answers as a missing one does,
    remembered or not; a delete is seen at once."""
    alice, bob, carol, admin = (clients[u] for u in ("alice", "bob", "carol", "admin"))
    done = await _ended(alice, (await alice.start(noop=pb.NoopArgs())).id)
    running = await alice.start(
        wait=pb.WaitArgs(seconds=Duration(seconds=30), url="http://127.0.0.1:9/")
    )

    def status(client: Client, job_id: str) -> Any:
        return client.stub.GetJobStatus(pb.GetJobStatusRequest(job_id=job_id), timeout=0.3)

    try:
        for _attempt in range(5):
            await asyncio.sleep(jobcache.FINAL_SECONDS + 0.05)  # what it remembers is too old
            fetched = time.monotonic()
            assert (await alice.status(done.id)) == done  # from the runner, remembered
            with _runner_paused(stack):
                answer = await _code_within(status(alice, done.id))
                if answer != Code.OK:
                    # Only a status older than FINAL_SECONDS may need the runner (a slow host).
                    assert answer == Code.DEADLINE_EXCEEDED
                    assert time.monotonic() - fetched > jobcache.FINAL_SECONDS
                    continue
                # A running job's status is the runner's, now: it waits for the runner.
                assert await _code_within(status(alice, running.id)) == Code.DEADLINE_EXCEEDED
                # Alice's job, remembered, is refused to bob exactly as a missing job is.
                assert await _code_within(status(bob, done.id)) == Code.DEADLINE_EXCEEDED
                assert await _code_within(status(bob, "NOJOB1")) == Code.DEADLINE_EXCEEDED
            break
        else:
            raise AssertionError("the host was too slow five times in a row")
        assert await _code(bob.status(done.id)) == Code.NOT_FOUND
        assert await _code(bob.tail(running.id, follow=True)) == Code.NOT_FOUND
        assert (await carol.status(done.id)) == done  # a viewer sees every job
        assert (await admin.delete(done.id)).id == done.id
        assert await _code(alice.status(done.id)) == Code.NOT_FOUND  # forgotten at once
        assert await _code(carol.tail(done.id, follow=False)) == Code.NOT_FOUND
    finally:
        await alice.stop(running.id)


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


@pytest.mark.privileged  # so that under CI=true a skip fails the run
def test_the_api_runs_unprivileged_from_the_installed_code(
    stack: Stack, installed_code: Path
) -> None:
    """Wherever the checkout is (a clone under /root, mode 0700, included), the api runs as its
    own user, from code installed where that user can read it: never as root."""
    status = Path(f"/proc/{stack.api.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == [str(pwd.getpwnam(API_USER).pw_uid)] * 4  # real, effective, saved, fs
    assert "0" not in uids
    groups = next(line for line in status.splitlines() if line.startswith("Groups:")).split()[1:]
    assert groups == []  # none of root's groups either
    # It runs the installed code: its interpreter is the install's, and gRPC's native code is
    # mapped from the install's site-packages.
    argv = Path(f"/proc/{stack.api.pid}/cmdline").read_bytes().split(b"\0")
    assert argv[0] == bytes(installed_code / "bin" / "python")
    maps = Path(f"/proc/{stack.api.pid}/maps").read_text()
    assert f"{installed_code}/lib/" in maps
