"""``workernator-api``: the unprivileged gRPC front-end (design sections 2 and 8).

It terminates mTLS, takes the caller's identity from the client certificate (CN = user,
O = role), authorizes every call, validates typed arguments with the shared job catalog, and
forwards the request to the runner over its Unix socket. It holds no job state; it only
remembers, briefly, what cannot change (``jobcache.py``: owners, and ended jobs' statuses).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from cryptography import x509
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared import catalog, ids, log, service
from shared.errors import ErrorCode, InvalidArgument, NotFound, WorkernatorError
from shared.model import JobState, JobStatus, OutputChunk
from shared.protocol import MAX_ID, MAX_NAME, MAX_TAIL_LINES
from workernator_api import authz, certs, convert, drain, fanout, jobcache, memory
from workernator_api import config as config_mod
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api._proto.workernator.v1 import workernator_pb2_grpc as pb_grpc
from workernator_api.limits import MAX_TRANSPORT_BYTES, ConcurrencyLimit, request_too_large
from workernator_api.runner_client import RunnerClient, RunnerUnavailable
from workernator_api.tls import (
    MAX_VERIFIED,
    AuthInterceptor,
    ServerTls,
    Unauthenticated,
    checked_caller,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name
TAIL_METHOD = f"/{SERVICE_NAME}/TailJobOutput"

# Deadlines of unary calls, connecting to the runner included. Stop waits for the runner to
# stop the job: up to its stop_grace_seconds (at most 3600, a runner setting the api cannot
# see) plus 10 s, so Stop gets the longest grace and a margin.
UNARY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 3700.0

# Concurrency limits (docs/architecture.md section 9). Over a per-user or total limit a call
# fails at once with RESOURCE_EXHAUSTED; only the shared connection's budget makes calls wait.
MAX_CONCURRENT_RPCS = 2048  # every RPC of the grpc server together (grpc enforces it)
MAX_UNARY_PER_USER = 64  # unary calls of one user in flight
MAX_RUNNER_REQUESTS = 200  # requests in flight on the shared runner connection, which the
# runner caps at 256; further calls wait for a place, within their deadline
MAX_TAILS_PER_USER = 128  # open TailJobOutput streams of one user
MAX_TAILS = 1000  # open TailJobOutput streams in all; tails of one job share runner streams
MAX_STREAMS_PER_USER = 32  # runner streams opened for one user's tails (one per job and
# position followed, fanout.Hub) and their tails that do not follow or start at the last lines
MAX_STREAMS = 120  # runner streams in all: each has a runner connection of its own and the
# runner accepts 128 (the shared one and a spare included): the api refuses first, says why

# Shutdown: after drain_seconds the open streams are cut; this long more for the cut to reach
# the clients before grpc cancels what is left.
CUT_SECONDS = 1.0

# ListJobs paging.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500  # larger page sizes are lowered to this
MAX_PAGE_BYTES = 2 << 20  # a page ends early rather than grow past this (clients take 4 MiB)
_PAGE_TOKEN = re.compile(r"(\d{1,19}):([A-Z0-9]{6})")

GRPC_CODES: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

T = TypeVar("T")


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def identity_of(context: grpc.aio.ServicerContext[Any, Any], tls: ServerTls) -> authz.Identity:
    """The caller, from its client certificate as ``tls`` verifies it for every call: on TLS
    1.3, issued directly by a client CA loaded now, valid now (:meth:`ServerTls.authenticate`).

    :class:`AuthInterceptor` has already checked the call and left the certificate it accepted
    (:func:`checked_caller`); the check runs here only for a call it did not see.
    """
    try:
        cert = checked_caller() or tls.authenticate(context.auth_context())
        return _identity(cert)
    except Unauthenticated as exc:
        raise _Denied(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
    except ValueError as exc:
        message = f"unusable client certificate: {exc}"
        raise _Denied(grpc.StatusCode.UNAUTHENTICATED, message) from None


_IDENTITIES: dict[int, tuple[x509.Certificate, authz.Identity]] = {}


def _identity(cert: x509.Certificate) -> authz.Identity:
    """The identity a verified certificate carries, read once per certificate object (the
    one :class:`ServerTls` remembers) rather than once per call; a failure is raised again on
    every call. Keyed by identity: hashing a certificate costs as much as reading it."""
    found = _IDENTITIES.get(id(cert))
    if found is not None and found[0] is cert:
        return found[1]
    user, role = certs.identity_from_cert(cert)
    identity = authz.Identity(user, authz.Role(role))
    if len(_IDENTITIES) >= MAX_VERIFIED:
        _IDENTITIES.clear()
    _IDENTITIES[id(cert)] = (cert, identity)  # the entry keeps the object, and so its id
    return identity


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health.aio.HealthServicer):
    """grpcio-health-checking's servicer, plus ``List``: reflection lists the method, but the
    package (1.85 and before) answers it UNIMPLEMENTED.

    It keeps its own copy of every service's status, changed exactly when the base class
    changes its own: by :meth:`set`, except after :meth:`enter_graceful_shutdown`, which makes
    every service NOT_SERVING.
    """

    MAX_SERVICES = 100  # as grpc's own implementations: more and List is RESOURCE_EXHAUSTED

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {health.OVERALL_HEALTH: SERVING}
        self._shutting_down = False

    async def set(self, service: str, status: int) -> None:
        await super().set(service, status)
        if not self._shutting_down:
            self._statuses[service] = status

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._shutting_down = True
        self._statuses = dict.fromkeys(self._statuses, NOT_SERVING)

    async def List(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """Every registered service (the server as a whole is "") and its status."""
        if len(self._statuses) > self.MAX_SERVICES:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {self.MAX_SERVICES} services; ask for each with Check",
            )
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._statuses.items()
        }
        # The type stubs of grpcio-health-checking do not know List's messages yet.
        return health_pb2.HealthListResponse(statuses=statuses)  # type: ignore[attr-defined]


class SerializedTails(grpc.aio.ServerInterceptor):
    """Lets ``TailJobOutput`` yield responses already serialized (bytes): the fan-out
    serializes each batch once for every tail reading it, not once per tail."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or details.method != TAIL_METHOD or handler.unary_stream is None:
            return handler
        serialize = handler.response_serializer
        assert serialize is not None

        def serialized(response: pb.TailJobOutputResponse | bytes) -> bytes:
            return response if isinstance(response, bytes) else serialize(response)

        return grpc.unary_stream_rpc_method_handler(
            handler.unary_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=serialized,
        )


class JobService(pb_grpc.JobServiceServicer):
    def __init__(
        self, runner_socket: Path, health_servicer: health.aio.HealthServicer, tls: ServerTls
    ) -> None:
        self.runner_socket = runner_socket
        self.health = health_servicer
        self.tls = tls
        self._shared: RunnerClient | None = None
        self._spare: RunnerClient | None = None  # connected ahead for the next stream
        self._refill: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self.unary_calls = ConcurrencyLimit("requests", per_user=MAX_UNARY_PER_USER)
        self.tails = ConcurrencyLimit(
            "output streams", per_user=MAX_TAILS_PER_USER, total=MAX_TAILS
        )
        self.drain = drain.Drain()  # cuts the open streams at the end of a shutdown's drain
        self.streams = ConcurrencyLimit(
            "runner streams (one per job and position followed)",
            per_user=MAX_STREAMS_PER_USER,
            total=MAX_STREAMS,
        )
        self.hub = fanout.Hub(self._follow, self.streams)
        self.trimmer = memory.Trimmer()  # memory back to the system after bursts of output
        self.jobs = jobcache.JobCache()  # owners (60 s) and ended jobs' statuses (1 s)

    # --- the runner connection ----------------------------------------------------------------

    async def _runner(self) -> RunnerClient:
        """The shared runner connection for unary calls, reconnecting when it broke."""
        async with self._connect_lock:
            if self._shared is None or not self._shared.connected:
                if self._shared is not None:
                    await self._shared.close()
                client = RunnerClient(self.runner_socket, max_in_flight=MAX_RUNNER_REQUESTS)
                try:
                    await client.connect()
                except RunnerUnavailable:
                    await self._set_serving(False)
                    raise
                self._shared = client
                await self._set_serving(True)
            return self._shared

    async def _follow(
        self, user: str, role: str, job_id: str, offset: int
    ) -> AsyncGenerator[list[OutputChunk], None]:
        """A runner tail of ``job_id`` from ``offset``, following it, on a connection of its
        own: a feed that stops reading backs up only its own connection."""
        async with self._stream_connection() as runner:
            batches = runner.tail(user, role, job_id, follow=True, offset=offset)
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    yield batch

    async def _set_serving(self, serving: bool) -> None:
        await self.health.set(SERVICE_NAME, SERVING if serving else NOT_SERVING)

    @contextlib.asynccontextmanager
    async def _stream_connection(self) -> AsyncIterator[RunnerClient]:
        """A runner connection for one stream, closed after it: the spare one connected
        beforehand when there is one (a tail does not wait for a connect and a hello
        exchange), and another spare is made meanwhile."""
        spare, self._spare = self._spare, None
        if spare is None or not spare.connected:
            if spare is not None:
                await spare.close()
            spare = RunnerClient(self.runner_socket)
            await spare.connect()
        if self._refill is None or self._refill.done():
            self._refill = asyncio.create_task(self._make_spare())
        try:
            yield spare
        finally:
            await spare.close()

    async def _make_spare(self) -> None:
        if self._spare is not None:
            return
        client = RunnerClient(self.runner_socket)
        try:
            await client.connect()
        except RunnerUnavailable:
            return  # the next stream connects itself, and reports why it cannot
        if self._spare is None:
            self._spare = client
        else:
            await client.close()

    async def close(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        for client in (self._shared, self._spare):
            if client is not None:
                await client.close()

    async def _unary(
        self,
        identity: authz.Identity,
        action: Callable[[authz.Identity, RunnerClient], Awaitable[T]],
        seconds: float,
    ) -> T:
        """Run ``action`` on the shared runner connection, within the caller's share of it and
        a deadline of ``seconds`` (which covers waiting for a slot and connecting too)."""
        with self.unary_calls.hold(identity.user):
            try:
                async with asyncio.timeout(seconds):
                    runner = await self._runner()
                    return await action(identity, runner)
            except TimeoutError:
                raise _Denied(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the runner did not answer within {seconds:g} seconds",
                ) from None

    async def _call(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        request: Message,
        action: Callable[[authz.Identity, RunnerClient], Awaitable[T]],
        seconds: float | None = None,
        known: Callable[[authz.Identity], T | None] | None = None,
    ) -> T:
        """Check the request's size, authenticate, answer with ``known`` when it knows the
        answer without the runner, else run ``action`` against the runner within ``seconds``
        (default :data:`UNARY_TIMEOUT_SECONDS`); map every error to a status."""
        try:
            with self.drain.admitted():
                _check_size(request)
                identity = identity_of(context, self.tls)
                if known is not None and (answer := known(identity)) is not None:
                    return answer
                limit = UNARY_TIMEOUT_SECONDS if seconds is None else seconds
                return await self._unary(identity, action, limit)
        except Exception as exc:
            await _abort(context, exc)

    @staticmethod
    def _require(identity: authz.Identity, action: authz.Action) -> None:
        if not authz.may(identity, action):
            raise _Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"role '{identity.role}' may not {action.value} jobs",
            )

    @staticmethod
    def _may_touch(
        identity: authz.Identity, action: authz.Action, owner: str, job_type: str
    ) -> bool:
        """Jobs of types the api does not offer (extra runner job modules) do not exist here."""
        return job_type in convert.JOB_TYPES and authz.may_touch(identity, action, owner)

    async def _owned_job(
        self, runner: RunnerClient, identity: authz.Identity, action: authz.Action, job_id: str
    ) -> JobStatus:
        """The job, if ``identity`` may do ``action`` on it; otherwise it does not exist."""
        self._require(identity, action)
        if not ids.is_job_id(job_id):  # cannot name a job; the runner need not be asked
            raise NotFound(f"job {job_id!r} not found")
        epoch = self.jobs.epoch()
        job = await runner.status(identity.user, identity.role, job_id)
        self.jobs.remember(job, epoch)
        if not self._may_touch(identity, action, job.owner, job.type):
            raise NotFound(f"job {job_id!r} not found")
        return job

    # What the api remembers (jobcache.py) only ever allows: a call it would refuse, a job it
    # does not know and a malformed id all take the runner's path, so that another user's job
    # answers exactly as a missing one does (the same code, the same limits, the same wait).

    def _known_final(self, identity: authz.Identity, job_id: str) -> JobStatus | None:
        """The status of an ended job ``identity`` may read, when the api has it."""
        job = self.jobs.final(job_id)
        if job is None or not self._may_touch(identity, authz.Action.READ, job.owner, job.type):
            return None
        return job

    async def _authorize_tail(self, identity: authz.Identity, job_id: str) -> None:
        """May ``identity`` read the job's output? From the owner the api remembers of a job it
        saw lately (a tail right after StartJob, or many tails of one job), else from the
        runner's answer."""
        known = self.jobs.owner(job_id)
        if known is not None and self._may_touch(identity, authz.Action.READ, *known):
            return
        await self._unary(
            identity,
            lambda caller, runner: self._owned_job(runner, caller, authz.Action.READ, job_id),
            UNARY_TIMEOUT_SECONDS,
        )

    # --- rpcs ---------------------------------------------------------------------------------

    async def StartJob(
        self, request: pb.StartJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StartJobResponse:
        async def start(identity: authz.Identity, runner: RunnerClient) -> pb.StartJobResponse:
            self._require(identity, authz.Action.START)
            job_type, args = convert.start_request_args(request)
            spec = catalog.BUILTIN[job_type]
            clean = spec.validate(args)  # precise errors here, before the runner is asked
            limits = convert.start_request_limits(request)  # the runner checks its maxima
            epoch = self.jobs.epoch()
            job = await runner.start(identity.user, identity.role, job_type, clean, limits)
            self.jobs.remember(job, epoch)
            log.job("job started", job, by=identity.user)
            return pb.StartJobResponse(job=convert.job_status(job, spec.title))

        return await self._call(context, request, start)

    async def StopJob(
        self, request: pb.StopJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StopJobResponse:
        async def stop(identity: authz.Identity, runner: RunnerClient) -> pb.StopJobResponse:
            await self._owned_job(runner, identity, authz.Action.STOP, request.job_id)
            epoch = self.jobs.epoch()
            job = await runner.stop(identity.user, identity.role, request.job_id)
            self.jobs.remember(job, epoch)
            log.job("job stopped", job, by=identity.user)
            return pb.StopJobResponse(job=_status(job))

        return await self._call(context, request, stop, seconds=STOP_TIMEOUT_SECONDS)

    async def DeleteJob(
        self, request: pb.DeleteJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteJobResponse:
        async def delete(identity: authz.Identity, runner: RunnerClient) -> pb.DeleteJobResponse:
            await self._owned_job(runner, identity, authz.Action.DELETE, request.job_id)
            # Forgotten before the runner is asked, and again after: a delete whose caller
            # left (a deadline, a cancel) may still be carried out by the runner.
            self.jobs.forget(request.job_id)
            try:
                job = await runner.delete(identity.user, identity.role, request.job_id)
            finally:
                self.jobs.forget(request.job_id)
            log.job("job deleted", job, by=identity.user)
            return pb.DeleteJobResponse(job=_status(job))

        return await self._call(context, request, delete)

    async def GetJobStatus(
        self, request: pb.GetJobStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetJobStatusResponse:
        async def status(identity: authz.Identity, runner: RunnerClient) -> pb.GetJobStatusResponse:
            job = await self._owned_job(runner, identity, authz.Action.READ, request.job_id)
            return pb.GetJobStatusResponse(job=_status(job))

        def final(identity: authz.Identity) -> pb.GetJobStatusResponse | None:
            job = self._known_final(identity, request.job_id)
            return None if job is None else pb.GetJobStatusResponse(job=_status(job))

        return await self._call(context, request, status, known=final)

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListJobsResponse:
        async def list_jobs(identity: authz.Identity, runner: RunnerClient) -> pb.ListJobsResponse:
            self._require(identity, authz.Action.READ)
            state = _state_filter(request.state)
            page_size = _page_size(request.page_size)
            after = _decode_page_token(request.page_token)
            requested = request.owner or None
            owner = authz.owner_filter(identity, requested)
            if requested is not None and (owner != requested or len(requested) > MAX_NAME):
                return pb.ListJobsResponse()  # someone else's jobs, or a name no one has
            response = pb.ListJobsResponse()
            size = 0
            last: JobStatus | None = None
            # The runner lists oldest first by (created_ns, id): the page starts after the
            # token's job, and leaving the stream early cancels the rest of it.
            jobs = runner.iter_jobs(identity.user, identity.role, owner=owner, after=after)
            async with contextlib.aclosing(jobs):
                async for job in jobs:
                    if after is not None and (job.created_ns, job.id) <= after:
                        continue
                    if job.type not in convert.JOB_TYPES:
                        continue  # the api offers only its own job types
                    if state is not None and job.state is not state:
                        continue
                    status = _status(job)
                    entry = status.ByteSize() + 8  # and the field's tag and length
                    if last is not None and (
                        len(response.jobs) >= page_size or size + entry > MAX_PAGE_BYTES
                    ):
                        response.next_page_token = _encode_page_token(last)
                        break
                    response.jobs.append(status)
                    size += entry
                    last = job
            return response

        return await self._call(context, request, list_jobs)

    async def ListJobTypes(
        self, request: pb.ListJobTypesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListJobTypesResponse:
        async def types(identity: authz.Identity, runner: RunnerClient) -> pb.ListJobTypesResponse:
            self._require(identity, authz.Action.TYPES)
            described = await runner.types(identity.user, identity.role)
            infos = [convert.job_type_info(d) for d in described]
            return pb.ListJobTypesResponse(types=[i for i in infos if i is not None])

        return await self._call(context, request, types)

    async def TailJobOutput(
        self, request: pb.TailJobOutputRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """The job's output; responses may come serialized already (:class:`SerializedTails`)."""
        self.hub.arrived()
        try:
            _check_size(request)
            identity = identity_of(context, self.tls)
            offset, last = _tail_start(request)
            with self.drain.admitted(), self.tails.hold(identity.user):
                await self._authorize_tail(identity, request.job_id)
                self.trimmer.opened()
                try:
                    responses = self._tail(identity, request, offset, last)
                    async with contextlib.aclosing(responses):
                        async for response in self.drain.until_cut(responses):  # shutdown
                            self.trimmer.sent += len(response)
                            yield response
                finally:
                    self.trimmer.closed()
        except Exception as exc:
            await _abort(context, exc)

    async def _tail(
        self,
        identity: authz.Identity,
        request: pb.TailJobOutputRequest,
        offset: int | None,
        last: int | None,
    ) -> AsyncGenerator[bytes, None]:
        """The serialized responses of an authorized tail."""
        if request.follow and last is None:
            # Shared with the other tails of this job at this position (fanout.py).
            shared = self.hub.tail(identity.user, identity.role, request.job_id, offset or 0)
            async with contextlib.aclosing(shared):
                async for response in shared:
                    yield response
            return
        # Not following (it ends at the current end), or from the last lines (which the
        # runner finds): a runner stream of this tail's own.
        with self.streams.hold(identity.user):
            async with self._stream_connection() as runner:
                batches = runner.tail(
                    identity.user,
                    identity.role,
                    request.job_id,
                    follow=request.follow,
                    offset=offset,
                    last=last,
                )
                async with contextlib.aclosing(batches):
                    async for batch in batches:
                        yield convert.tail_response(batch).SerializeToString()


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    """End the call with the status for ``exc``. Clients never see class names or tracebacks:
    an unexpected exception is logged and answered INTERNAL "internal error"."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc  # the call was already ended with a status
    if isinstance(exc, _Denied):
        code, message = exc.code, exc.message
    elif isinstance(exc, drain.Cut | drain.Refused):
        code, message = grpc.StatusCode.UNAVAILABLE, exc.args[0]
    elif isinstance(exc, RunnerUnavailable):
        log.error("runner unavailable", error=exc.message)
        code, message = grpc.StatusCode.UNAVAILABLE, "the runner is not available"
    elif isinstance(exc, WorkernatorError):
        code, message = GRPC_CODES[exc.code], exc.message
    else:
        log.logger.error("unexpected error in a call", exc_info=exc)
        code, message = grpc.StatusCode.INTERNAL, "internal error"
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


def _check_size(request: Message) -> None:
    """Refuse a request larger than any real one, saying so (see :mod:`limits`)."""
    refusal = request_too_large(request.ByteSize())
    if refusal is not None:
        raise _Denied(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)


def _tail_start(request: pb.TailJobOutputRequest) -> tuple[int | None, int | None]:
    """(offset, last lines) of a tail request. More lines than the runner keeps count means all
    of them; an offset beyond any file is refused before the runner is asked."""
    start = request.WhichOneof("start")
    if start == "offset":
        if request.offset > MAX_ID:
            raise InvalidArgument("offset is too large")
        return request.offset, None
    if start == "last_lines":
        return None, min(request.last_lines, MAX_TAIL_LINES)
    return None, None


def _state_filter(state: pb.JobState) -> JobState | None:
    """The state to list, None for any; a value this api does not know is an error."""
    if state == pb.JOB_STATE_UNSPECIFIED:
        return None
    found = convert.STATE_NAMES.get(state)
    if found is None:
        raise InvalidArgument(f"unknown state {state}")
    return found


def _page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _encode_page_token(job: JobStatus) -> str:
    """An opaque position in the list: where the next page starts, after this job."""
    raw = f"{job.created_ns}:{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str) -> tuple[int, str] | None:
    if not token:
        return None
    try:
        if len(token) > 64:
            raise ValueError("too long")
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        match = _PAGE_TOKEN.fullmatch(raw.decode("ascii"))
        if match is None or int(match.group(1)) > MAX_ID:
            raise ValueError("not a position")
    except (ValueError, binascii.Error):
        raise InvalidArgument("invalid page_token (pass next_page_token unchanged)") from None
    return int(match.group(1)), match.group(2)


def _status(job: JobStatus) -> pb.JobStatus:
    spec = catalog.BUILTIN.get(job.type)
    return convert.job_status(job, spec.title if spec else job.type)


class ApiServer:
    def __init__(self, cfg: config_mod.ApiConfig) -> None:
        self.config = cfg
        # mTLS: the files are checked now (a ConfigError names a bad one) and followed after.
        self.tls = ServerTls(cfg)
        self.health = HealthServicer()
        self.service = JobService(cfg.runner_socket, self.health, self.tls)
        self.server = grpc.aio.server(
            # Every call of every service (health, reflection too) is authenticated first.
            interceptors=[AuthInterceptor(self.tls), SerializedTails()],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", MAX_TRANSPORT_BYTES),
            ],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        pb_grpc.add_JobServiceServicer_to_server(self.service, self.server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    async def start(self) -> None:
        self.port = self.server.add_secure_port(self.config.listen, self.tls.credentials())
        if self.port == 0:
            raise config_mod.ConfigError(f"cannot listen on {self.config.listen}")
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        with contextlib.suppress(RunnerUnavailable):
            await self.service._runner()  # report the runner's state in health from the start
        log.info("api listening", listen=self.config.listen, port=self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health says NOT_SERVING and new calls are refused UNAVAILABLE; open calls
        get ``drain_seconds`` (or ``grace``) to end, then open streams are cut with UNAVAILABLE
        (clients reconnect and resume), and whatever is left is cancelled."""
        deadline = self.config.drain_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        # Not grpc's own stop yet: during its grace it cancels new calls (CANCELLED, which
        # says nothing) and closes the port. Until the deadline, new calls are refused
        # UNAVAILABLE "shutting down" instead, which clients know to retry.
        self.service.drain.begin()
        if not await self.service.drain.wait_ended(deadline):
            log.info("draining: cutting the open streams", after_seconds=deadline)
        self.service.drain.cut()
        await self.server.stop(CUT_SECONDS)
        await self.service.close()
        log.info("api stopped")


def main(argv: list[str] | None = None) -> int:
    return service.main(
        prog="workernator-api",
        description="The Workernator API: gRPC over mTLS in front of the runner (unprivileged).",
        default_path=config_mod.DEFAULT_PATH,
        load=config_mod.load,
        default=config_mod.ApiConfig,
        service=ApiServer,
        errors=(config_mod.ConfigError,),
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
