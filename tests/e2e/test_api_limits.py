"""The api in this process, over real mTLS, in front of a scripted runner speaking the real
protocol: a runner that refuses connections, never says hello, never answers, or answers some
users only. These show what the api does when the runner misbehaves and when callers push its
limits, which the real runner cannot be made to do on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from shared import protocol as p
from shared.errors import ErrorCode
from shared.model import JobState, JobStatus, JobUsage, OutputChunk, ResourceLimits, Stream
from workernator_api import certs, convert, server
from workernator_api import config as config_mod
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api._proto.workernator.v1 import workernator_pb2_grpc as pb_grpc
from workernator_api.runner_client import RunnerClient, RunnerUnavailable

Code = grpc.StatusCode
USERS = [("alice", "user"), ("bob", "user"), ("root", "admin")]
JOB = "JOB001"
STARTED = "NEW001"
DEFAULTS = ResourceLimits(cpu_millis=1000, memory_bytes=512 << 20, pids=256)


@dataclass
class FakeRunner:
    """A runner on a Unix socket that follows a script instead of running jobs.

    ``mode``: ``serve`` (answer), ``refuse`` (an error frame instead of hello, as the real
    runner does for a uid it does not allow), ``silent`` (accept, never say hello).
    Requests of users in ``ignore`` are never answered; ``in_flight`` counts open requests.
    """

    path: Path
    mode: str = "serve"
    ignore: set[str] = field(default_factory=set)
    jobs: dict[str, JobStatus] = field(default_factory=dict)
    started: list[p.StartArgs] = field(default_factory=list)  # every start request
    start_error: tuple[ErrorCode, str] | None = None  # the answer to a start, if not a job
    in_flight: int = 0
    most_in_flight: int = 0
    tails: int = 0  # tail requests received
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._session(reader, writer)
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            refusal = p.ErrorReply(None, ErrorCode.FAILED_PRECONDITION, "uid 65534 is not allowed")
            writer.write(p.encode_frame(refusal))
            return
        if self.mode == "silent":
            await asyncio.sleep(3600)
        conn = p.Connection(p.Role.SERVER)
        writer.write(conn.send(p.Hello(software="fake runner")))
        requests: set[asyncio.Task[None]] = set()
        try:
            while data := await reader.read(65536):
                conn.receive_data(data)
                while (message := conn.next_message()) is not None:
                    if isinstance(message, p.Request):
                        handler = asyncio.create_task(self._answer(message, writer))
                        requests.add(handler)
                        handler.add_done_callback(requests.discard)
        finally:
            for handler in requests:
                handler.cancel()

    async def _answer(self, request: p.Request, writer: asyncio.StreamWriter) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if request.caller.user in self.ignore:
                await asyncio.sleep(3600)
            for reply in self._replies(request):
                writer.write(p.encode_frame(reply))
            if request.op is p.Op.TAIL:
                await asyncio.sleep(3600)  # following a job that never ends
        finally:
            self.in_flight -= 1

    def _replies(self, request: p.Request) -> list[p.ServerMessage]:
        args, rid = request.args, request.id
        if isinstance(args, p.JobRef):
            if args.job_id not in self.jobs:
                return [p.ErrorReply(rid, ErrorCode.NOT_FOUND, f"job {args.job_id} not found")]
            return [p.JobReply(rid, self.jobs[args.job_id])]
        if isinstance(args, p.TailArgs):
            self.tails += 1
            chunk = OutputChunk(0, 6, time.time_ns(), Stream.STDOUT, b"hello\n")
            return [p.OutputItem(rid, [chunk])]
        if isinstance(args, p.ListArgs):
            jobs = [j for j in self.jobs.values() if args.owner in (None, j.owner)]
            jobs.sort(key=lambda j: (j.created_ns, j.id))
            replies: list[p.ServerMessage] = [
                p.JobsItem(rid, jobs[i : i + 32]) for i in range(0, len(jobs), 32)
            ]
            return [*replies, p.End(rid)]
        if isinstance(args, p.TypesArgs):
            return [p.TypesReply(rid, [])]
        if isinstance(args, p.StartArgs):
            self.started.append(args)
            if self.start_error is not None:
                return [p.ErrorReply(rid, *self.start_error)]
            asked = args.limits.as_dict()  # 0 takes the default, as the runner does
            limits = replace(DEFAULTS, **{k: v for k, v in asked.items() if v})
            started = job(STARTED, request.caller.user, args.job_type)
            return [p.JobReply(rid, replace(started, args=args.args, limits=limits))]
        return [p.ErrorReply(rid, ErrorCode.INTERNAL, "not scripted")]


def job(job_id: str, owner: str, job_type: str = "noop", created_ns: int = 1) -> JobStatus:
    args: dict[str, Any] = {"count": 1} if job_type not in convert.JOB_TYPES else {}
    return JobStatus(job_id, job_type, args, owner, JobState.RUNNING, created_ns, created_ns)


@dataclass
class Api:
    runner: FakeRunner
    api: server.ApiServer
    pki: certs.Deployment
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def stub(self, user: str) -> Any:
        """A JobService stub acting as ``user``, on a channel (a connection) of its own."""
        cert, key = self.pki.users[user]
        creds = grpc.ssl_channel_credentials(
            self.pki.server_ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes()
        )
        channel = grpc.aio.secure_channel(f"127.0.0.1:{self.api.port}", creds)
        self.channels.append(channel)
        return pb_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
def tmp(state_dir: Path) -> Path:
    """A short directory (Unix socket paths), removed after the test: tests/conftest.py's."""
    return state_dir


@pytest.fixture
def pki(tmp: Path) -> certs.Deployment:
    return certs.create_deployment(tmp / "pki", ["localhost", "127.0.0.1"], USERS)


def api_config(tmp: Path, pki: certs.Deployment) -> config_mod.ApiConfig:
    return config_mod.ApiConfig(
        listen="127.0.0.1:0",
        cert=pki.server_cert,
        key=pki.server_key,
        client_ca=pki.client_ca_cert,
        runner_socket=tmp / "runner.sock",
    )


@contextlib.asynccontextmanager
async def running(tmp: Path, pki: certs.Deployment, mode: str = "serve") -> AsyncIterator[Api]:
    runner = FakeRunner(tmp / "runner.sock", mode=mode)
    runner.jobs[JOB] = job(JOB, "alice")
    await runner.start()
    api = server.ApiServer(api_config(tmp, pki))
    await asyncio.wait_for(api.start(), 30)  # whatever the runner does, start() returns
    made = Api(runner, api, pki)
    try:
        yield made
    finally:
        for channel in made.channels:
            await channel.close()
        await api.stop(grace=0)
        await runner.stop()


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value


def status_request(job_id: str = JOB) -> pb.GetJobStatusRequest:
    return pb.GetJobStatusRequest(job_id=job_id)


# --- resource limits: StartJob passes them on, the status brings back what the job got --------


async def test_start_passes_the_limits_to_the_runner(tmp: Path, pki: certs.Deployment) -> None:
    asked = ResourceLimits(
        cpu_millis=500,
        memory_bytes=256 << 20,
        pids=0,  # the runner's default
        io_read_bps=10 << 20,
        io_write_bps=0,
        io_read_iops=100,
        io_write_iops=200,
    )
    async with running(tmp, pki) as api:
        stub = api.stub("alice")
        request = pb.StartJobRequest(
            fib=pb.FibArgs(position=3), limits=pb.ResourceLimits(**asked.as_dict())
        )
        response: pb.StartJobResponse = await stub.StartJob(request)
        plain: pb.StartJobResponse = await stub.StartJob(pb.StartJobRequest(noop=pb.NoopArgs()))
    assert [(a.job_type, a.limits) for a in api.runner.started] == [
        ("fib", asked),
        ("noop", ResourceLimits()),  # no limits in the request: every one the default
    ]
    assert response.job.limits == pb.ResourceLimits(**(asked.as_dict() | {"pids": DEFAULTS.pids}))
    assert response.job.fib.position == 3
    assert plain.job.limits == pb.ResourceLimits(**DEFAULTS.as_dict())


async def test_status_and_list_carry_limits_usage_and_oom(tmp: Path, pki: certs.Deployment) -> None:
    limits = ResourceLimits(cpu_millis=250, memory_bytes=64 << 20, pids=32, io_write_iops=5)
    usage = JobUsage(cpu_ns=120_000_000, peak_memory_bytes=63 << 20, read_bytes=1, written_bytes=2)
    async with running(tmp, pki) as api:
        api.runner.jobs[JOB] = replace(
            api.runner.jobs[JOB], limits=limits, usage=usage, oom_killed=True
        )
        stub = api.stub("alice")
        status: pb.GetJobStatusResponse = await stub.GetJobStatus(status_request())
        listed: pb.ListJobsResponse = await stub.ListJobs(pb.ListJobsRequest())
    for found in (status.job, *listed.jobs):
        assert found.limits == pb.ResourceLimits(**limits.as_dict())
        assert found.oom_killed is True
        assert found.usage.cpu_time.ToMilliseconds() == 120
        assert found.usage.peak_memory_bytes == 63 << 20
        assert (found.usage.read_bytes, found.usage.written_bytes) == (1, 2)


@pytest.mark.parametrize(
    ("code", "message", "grpc_code"),
    [
        (
            ErrorCode.INVALID_ARGUMENT,
            "limit 'memory': 8 GiB is over the runner's maximum of 2 GiB",
            Code.INVALID_ARGUMENT,
        ),
        (
            ErrorCode.FAILED_PRECONDITION,
            "IO limits cannot be applied: no disk under the workspaces",
            Code.FAILED_PRECONDITION,
        ),
    ],
)
async def test_the_runners_refusal_of_a_limit_reaches_the_client(
    tmp: Path, pki: certs.Deployment, code: ErrorCode, message: str, grpc_code: Code
) -> None:
    async with running(tmp, pki) as api:
        api.runner.start_error = (code, message)
        request = pb.StartJobRequest(limits=pb.ResourceLimits(memory_bytes=8 << 30))
        error = await failure(api.stub("alice").StartJob(request))
    assert (error.code(), error.details()) == (grpc_code, message)


async def test_a_limit_the_runner_protocol_cannot_carry_is_refused_by_the_api(
    tmp: Path, pki: certs.Deployment
) -> None:
    async with running(tmp, pki) as api:
        request = pb.StartJobRequest(limits=pb.ResourceLimits(io_write_bps=2**64 - 1))
        error = await failure(api.stub("alice").StartJob(request))
        assert api.runner.started == []  # the runner was not asked
    assert error.code() == Code.INVALID_ARGUMENT
    assert error.details() == f"limit 'io_write_bps' is too large: {2**64 - 1} (at most 2^63-1)"


# --- the runner connection --------------------------------------------------------------------


async def test_a_refused_connection_is_runner_unavailable_with_the_runners_reason(
    tmp: Path, pki: certs.Deployment
) -> None:
    runner = FakeRunner(tmp / "runner.sock", mode="refuse")
    await runner.start()
    try:
        for _ in range(20):  # the refusal may come before or after our hello was sent
            with pytest.raises(RunnerUnavailable, match="refused the connection: uid 65534"):
                await RunnerClient(runner.path).connect()
    finally:
        await runner.stop()


async def test_a_refused_connection_is_unavailable_for_clients(
    tmp: Path, pki: certs.Deployment
) -> None:
    async with running(tmp, pki, mode="refuse") as api:
        error = await failure(api.stub("alice").GetJobStatus(status_request()))
    assert error.code() == Code.UNAVAILABLE
    assert error.details() == "the runner is not available"


async def test_a_runner_that_never_says_hello_cannot_stall_the_api(
    tmp: Path, pki: certs.Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("workernator_api.runner_client.CONNECT_TIMEOUT_SECONDS", 0.5)
    began = time.monotonic()
    async with running(tmp, pki, mode="silent") as api:
        assert time.monotonic() - began < 5  # start() gave up on the runner in time
        stub = api.stub("alice")
        began = time.monotonic()
        errors = await asyncio.gather(
            *(failure(stub.GetJobStatus(status_request(), timeout=10)) for _ in range(3))
        )
        # One connect at a time (under a lock), each bounded: no call waits for long.
        assert time.monotonic() - began < 5
    assert {e.code() for e in errors} == {Code.UNAVAILABLE}


async def test_a_runner_that_does_not_answer_is_deadline_exceeded(
    tmp: Path, pki: certs.Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "UNARY_TIMEOUT_SECONDS", 0.5)
    async with running(tmp, pki) as api:
        api.runner.ignore.add("alice")
        stub = api.stub("alice")
        error = await failure(stub.GetJobStatus(status_request(), timeout=10))
        assert error.code() == Code.DEADLINE_EXCEEDED
        assert error.details() == "the runner did not answer within 0.5 seconds"
        # Stop waits for the runner's grace period, which the api cannot know: it is not cut
        # short by the unary deadline (here the client's own 2 s deadline ends it).
        began = time.monotonic()
        error = await failure(stub.StopJob(pb.StopJobRequest(job_id=JOB), timeout=2))
        assert error.code() == Code.DEADLINE_EXCEEDED
        assert error.details() == "Deadline Exceeded"
        assert time.monotonic() - began >= 1.9


async def test_an_unexpected_error_is_internal_without_details(
    tmp: Path,
    pki: certs.Deployment,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(job: JobStatus, title: str) -> pb.JobStatus:
        raise ZeroDivisionError("secret detail")

    monkeypatch.setattr(convert, "job_status", broken)
    async with running(tmp, pki) as api:
        error = await failure(api.stub("alice").GetJobStatus(status_request()))
    assert error.code() == Code.INTERNAL
    assert error.details() == "internal error"
    assert "ZeroDivisionError: secret detail" in caplog.text  # logged for the operator


# --- limits -----------------------------------------------------------------------------------


async def test_tails_per_user_are_capped_and_other_users_still_tail(
    tmp: Path, pki: certs.Deployment
) -> None:
    async with running(tmp, pki) as api:
        api.runner.jobs["BOBJOB"] = job("BOBJOB", "bob")
        alice = [api.stub("alice") for _ in range(4)]  # spread over a few connections
        tails = []
        for i in range(server.MAX_TAILS_PER_USER):
            call = alice[i % 4].TailJobOutput(pb.TailJobOutputRequest(job_id=JOB, follow=True))
            assert (await call.read()).chunks[0].data == b"hello\n"  # it streams, and stays open
            tails.append(call)
        assert api.api.service.tails.open_for("alice") == server.MAX_TAILS_PER_USER

        refused = alice[0].TailJobOutput(pb.TailJobOutputRequest(job_id=JOB, follow=True))
        error = await failure(refused.read())
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert error.details() == (
            f"too many output streams at once: user 'alice' has {server.MAX_TAILS_PER_USER} "
            "open, the most one user may have; wait for one to finish"
        )
        assert api.runner.tails == 1  # every one of them on one runner stream

        bobs = api.stub("bob").TailJobOutput(pb.TailJobOutputRequest(job_id="BOBJOB"))
        assert (await bobs.read()).chunks[0].data == b"hello\n"
        bobs.cancel()

        tails.pop().cancel()  # a tail that ends gives its slot back
        for _ in range(100):
            if api.api.service.tails.open_for("alice") < server.MAX_TAILS_PER_USER:
                break
            await asyncio.sleep(0.02)
        again = alice[1].TailJobOutput(pb.TailJobOutputRequest(job_id=JOB, follow=True))
        assert (await again.read()).chunks
        for call in [*tails, again]:
            call.cancel()


async def test_tails_in_all_are_capped(
    tmp: Path, pki: certs.Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "MAX_TAILS", 3)
    async with running(tmp, pki) as api:
        tails = []
        for user in ("alice", "alice", "root"):
            call = api.stub(user).TailJobOutput(pb.TailJobOutputRequest(job_id=JOB))
            assert (await call.read()).chunks
            tails.append(call)
        refused = api.stub("bob").TailJobOutput(pb.TailJobOutputRequest(job_id=JOB))
        error = await failure(refused.read())
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert error.details() == (
            "too many output streams at once: the server has 3 open, its limit; try again later"
        )
        for call in tails:
            call.cancel()


async def test_runner_streams_per_user_are_capped(tmp: Path, pki: certs.Deployment) -> None:
    """Tails that cannot share a runner stream (here: not following) each hold one, and one
    user may hold MAX_STREAMS_PER_USER of them; following tails of one job still share one."""
    async with running(tmp, pki) as api:
        stub = api.stub("alice")
        tails = []
        for _ in range(server.MAX_STREAMS_PER_USER):
            call = stub.TailJobOutput(pb.TailJobOutputRequest(job_id=JOB, follow=False))
            assert (await call.read()).chunks[0].data == b"hello\n"
            tails.append(call)
        refused = stub.TailJobOutput(pb.TailJobOutputRequest(job_id=JOB, follow=False))
        error = await failure(refused.read())
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert error.details() == (
            "too many runner streams (one per job and position followed) at once: user 'alice' "
            f"has {server.MAX_STREAMS_PER_USER} open, the most one user may have; wait for one "
            "to finish"
        )
        root = api.stub("root").TailJobOutput(pb.TailJobOutputRequest(job_id=JOB, follow=True))
        assert (await root.read()).chunks[0].data == b"hello\n"  # another user's share
        tails.pop().cancel()
        for _ in range(100):
            if api.api.service.streams.open_for("alice") < server.MAX_STREAMS_PER_USER:
                break
            await asyncio.sleep(0.02)
        again = stub.TailJobOutput(pb.TailJobOutputRequest(job_id=JOB, follow=False))
        assert (await again.read()).chunks
        for call in [*tails, root, again]:
            call.cancel()


async def test_unary_calls_per_user_are_capped_and_other_users_still_get_answers(
    tmp: Path, pki: certs.Deployment
) -> None:
    async with running(tmp, pki) as api:
        api.runner.ignore.add("alice")  # the runner sits on every request of alice
        stub = api.stub("alice")
        waiting = [
            asyncio.ensure_future(stub.GetJobStatus(status_request(), timeout=30))
            for _ in range(server.MAX_UNARY_PER_USER)
        ]
        for _ in range(200):
            if api.api.service.unary_calls.open_for("alice") == server.MAX_UNARY_PER_USER:
                break
            await asyncio.sleep(0.02)
        error = await failure(stub.GetJobStatus(status_request(), timeout=10))
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert "user 'alice' has 64 open" in str(error.details())

        api.runner.jobs["BOBJOB"] = job("BOBJOB", "bob")
        answer = await api.stub("bob").GetJobStatus(status_request("BOBJOB"), timeout=10)
        assert answer.job.owner == "bob"
        for call in waiting:
            call.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_requests_in_flight_on_the_shared_runner_connection_are_capped(
    tmp: Path, pki: certs.Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "MAX_RUNNER_REQUESTS", 5)
    async with running(tmp, pki) as api:
        api.runner.ignore.update({"alice", "bob"})
        api.runner.jobs["BOBJOB"] = job("BOBJOB", "bob")
        alice, bob = api.stub("alice"), api.stub("bob")
        calls = [
            stub.GetJobStatus(status_request(job_id), timeout=1.5)
            for stub, job_id in ((alice, JOB), (bob, "BOBJOB"))
            for _ in range(10)
        ]
        errors = await asyncio.gather(*(failure(call) for call in calls))
        # The calls beyond the cap waited for a slot, within their deadline.
        assert {e.code() for e in errors} == {Code.DEADLINE_EXCEEDED}
        assert api.runner.most_in_flight == 5
