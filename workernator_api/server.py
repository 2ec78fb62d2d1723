"""``workernator-api``: the unprivileged gRPC front-end (design sections 2 and 8).

It terminates mTLS, takes the caller's identity from the client certificate (CN = user,
O = role), authorizes every call, validates typed arguments with the shared job catalog, and
forwards the request to the runner over its Unix socket. It holds no job state.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared import catalog, ids, log, service
from shared.errors import ErrorCode, NotFound, WorkernatorError
from shared.model import JobStatus
from shared.protocol import MAX_NAME
from workernator_api import authz, certs, convert
from workernator_api import config as config_mod
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api._proto.workernator.v1 import workernator_pb2_grpc as pb_grpc
from workernator_api.runner_client import RunnerClient, RunnerUnavailable

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name
UNARY_TIMEOUT_SECONDS = 60.0

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


def identity_of(context: grpc.aio.ServicerContext[Any, Any]) -> authz.Identity:
    """The caller, from its verified client certificate, on a TLS 1.3 connection only."""
    auth = context.auth_context()
    if auth.get("ssl_tls_version") != [b"TLSv1.3"]:
        raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "TLS 1.3 is required")
    pems = list(auth.get("x509_pem_cert", ()))
    if not pems:
        raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
    try:
        user, role = certs.identity_from_pem(pems[0])
    except ValueError as exc:
        message = f"unusable client certificate: {exc}"
        raise _Denied(grpc.StatusCode.UNAUTHENTICATED, message) from None
    return authz.Identity(user, authz.Role(role))


class JobService(pb_grpc.JobServiceServicer):
    def __init__(self, runner_socket: Path, health_servicer: health.aio.HealthServicer) -> None:
        self.runner_socket = runner_socket
        self.health = health_servicer
        self._shared: RunnerClient | None = None
        self._connect_lock = asyncio.Lock()

    # --- the runner connection ----------------------------------------------------------------

    async def _runner(self) -> RunnerClient:
        """The shared runner connection for unary calls, reconnecting when it broke."""
        async with self._connect_lock:
            if self._shared is None or not self._shared.connected:
                client = RunnerClient(self.runner_socket)
                try:
                    await client.connect()
                except RunnerUnavailable:
                    await self._set_serving(False)
                    raise
                self._shared = client
                await self._set_serving(True)
            return self._shared

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(SERVICE_NAME, status)

    async def close(self) -> None:
        if self._shared is not None:
            await self._shared.close()

    async def _call(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        action: Callable[[authz.Identity, RunnerClient], Awaitable[T]],
    ) -> T:
        """Authenticate, run ``action`` against the runner, and map every error to a status."""
        try:
            identity = identity_of(context)
            runner = await self._runner()
            return await asyncio.wait_for(action(identity, runner), UNARY_TIMEOUT_SECONDS)
        except _Denied as exc:
            await context.abort(exc.code, exc.message)
        except RunnerUnavailable as exc:
            log.error("runner unavailable", error=exc.message)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the runner is not available")
        except WorkernatorError as exc:
            await context.abort(GRPC_CODES[exc.code], exc.message)
        raise AssertionError("unreachable: abort raises")

    @staticmethod
    def _require(identity: authz.Identity, action: authz.Action) -> None:
        if not authz.may(identity, action):
            raise _Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"role '{identity.role}' may not {action.value} jobs",
            )

    @staticmethod
    async def _owned_job(
        runner: RunnerClient, identity: authz.Identity, action: authz.Action, job_id: str
    ) -> JobStatus:
        """The job, if ``identity`` may do ``action`` on it; otherwise it does not exist."""
        JobService._require(identity, action)
        if not ids.is_job_id(job_id):  # cannot name a job; the runner need not be asked
            raise NotFound(f"job {job_id!r} not found")
        job = await runner.status(identity.user, identity.role, job_id)
        if not authz.may_touch(identity, action, job.owner):
            raise NotFound(f"job {job_id!r} not found")
        return job

    # --- rpcs ---------------------------------------------------------------------------------

    async def StartJob(
        self, request: pb.StartJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StartJobResponse:
        async def start(identity: authz.Identity, runner: RunnerClient) -> pb.StartJobResponse:
            self._require(identity, authz.Action.START)
            job_type, args = convert.start_request_args(request)
            spec = catalog.BUILTIN[job_type]
            clean = spec.validate(args)  # precise errors here, before the runner is asked
            job = await runner.start(identity.user, identity.role, job_type, clean)
            log.info("job started", job=job.id, type=job_type, user=identity.user)
            return pb.StartJobResponse(job=convert.job_status(job, spec.title))

        return await self._call(context, start)

    async def StopJob(
        self, request: pb.StopJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StopJobResponse:
        async def stop(identity: authz.Identity, runner: RunnerClient) -> pb.StopJobResponse:
            await self._owned_job(runner, identity, authz.Action.STOP, request.job_id)
            job = await runner.stop(identity.user, identity.role, request.job_id)
            log.info("job stopped", job=job.id, user=identity.user)
            return pb.StopJobResponse(job=_status(job))

        return await self._call(context, stop)

    async def GetJobStatus(
        self, request: pb.GetJobStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetJobStatusResponse:
        async def status(identity: authz.Identity, runner: RunnerClient) -> pb.GetJobStatusResponse:
            job = await self._owned_job(runner, identity, authz.Action.READ, request.job_id)
            return pb.GetJobStatusResponse(job=_status(job))

        return await self._call(context, status)

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListJobsResponse:
        async def list_jobs(identity: authz.Identity, runner: RunnerClient) -> pb.ListJobsResponse:
            self._require(identity, authz.Action.READ)
            requested = request.owner or None
            owner = authz.owner_filter(identity, requested)
            if requested is not None and (owner != requested or len(requested) > MAX_NAME):
                return pb.ListJobsResponse()  # someone else's jobs, or a name no one has
            jobs = await runner.list_jobs(identity.user, identity.role, owner=owner)
            state = convert.STATE_NAMES.get(request.state)
            return pb.ListJobsResponse(
                jobs=[_status(j) for j in jobs if state is None or j.state is state]
            )

        return await self._call(context, list_jobs)

    async def ListJobTypes(
        self, request: pb.ListJobTypesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListJobTypesResponse:
        async def types(identity: authz.Identity, runner: RunnerClient) -> pb.ListJobTypesResponse:
            self._require(identity, authz.Action.TYPES)
            described = await runner.types(identity.user, identity.role)
            infos = [convert.job_type_info(d) for d in described]
            return pb.ListJobTypesResponse(types=[i for i in infos if i is not None])

        return await self._call(context, types)

    async def TailJobOutput(
        self, request: pb.TailJobOutputRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.TailJobOutputResponse]:
        # Authorize on the shared connection, then stream on a connection of this tail's own:
        # when this client reads slowly, only its own runner connection backs up.
        await self._call(
            context,
            lambda identity, runner: self._owned_job(
                runner, identity, authz.Action.READ, request.job_id
            ),
        )
        identity = identity_of(context)
        start = request.WhichOneof("start")
        offset = request.offset if start == "offset" else None
        last = request.last_lines if start == "last_lines" else None
        try:
            async with RunnerClient(self.runner_socket) as runner:
                async for batch in runner.tail(
                    identity.user,
                    identity.role,
                    request.job_id,
                    follow=request.follow,
                    offset=offset,
                    last=last,
                ):
                    yield convert.tail_response(batch)
        except RunnerUnavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the runner is not available")
        except WorkernatorError as exc:
            await context.abort(GRPC_CODES[exc.code], exc.message)


def _status(job: JobStatus) -> pb.JobStatus:
    spec = catalog.BUILTIN.get(job.type)
    return convert.job_status(job, spec.title if spec else job.type)


def server_credentials(cfg: config_mod.ApiConfig) -> grpc.ServerCredentials:
    """mTLS: our key pair, and client certificates required and verified against the CA."""
    try:
        key, cert, ca = cfg.key.read_bytes(), cfg.cert.read_bytes(), cfg.client_ca.read_bytes()
    except OSError as exc:
        raise config_mod.ConfigError(f"cannot read TLS files: {exc}") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


class ApiServer:
    def __init__(self, cfg: config_mod.ApiConfig) -> None:
        self.config = cfg
        self.health = health.aio.HealthServicer()
        self.service = JobService(cfg.runner_socket, self.health)
        self.server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 1 << 20)]
        )
        pb_grpc.add_JobServiceServicer_to_server(self.service, self.server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    async def start(self) -> None:
        self.port = self.server.add_secure_port(self.config.listen, server_credentials(self.config))
        if self.port == 0:
            raise config_mod.ConfigError(f"cannot listen on {self.config.listen}")
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        with contextlib.suppress(RunnerUnavailable):
            await self.service._runner()  # report the runner's state in health from the start
        log.info("api listening", listen=self.config.listen, port=self.port)

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
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
