"""The api's calls with what it remembers of jobs (jobcache.py), against a scripted runner: a
remembered job only ever allows a call; a refusal answers exactly as for a missing job; a
delete the runner carried out is forgotten even when its caller left."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from unittest import mock

import grpc
import pytest

from shared.errors import NotFound
from shared.model import JobState, JobStatus
from workernator_api import authz, server
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api.runner_client import RunnerUnavailable


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code


class Context:
    def __init__(self, user: str, role: str) -> None:
        self.identity = authz.Identity(user, authz.Role(role))

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)


class Runner:
    """Answers status and delete from a table; ``down`` makes every call unavailable."""

    connected = True

    def __init__(self) -> None:
        self.jobs: dict[str, JobStatus] = {}
        self.down = False
        self.asked = 0
        self.deleted = asyncio.Event()
        self.delete_answered = asyncio.Event()

    def add(self, job_id: str, owner: str, state: JobState = JobState.COMPLETED) -> None:
        self.jobs[job_id] = JobStatus(
            id=job_id, type="noop", args={}, owner=owner, state=state, created_ns=1
        )

    async def status(self, user: str, role: str, job_id: str) -> JobStatus:
        self.asked += 1
        await asyncio.sleep(0)
        if job_id not in self.jobs:
            raise NotFound(f"job {job_id!r} not found")
        return self.jobs[job_id]

    async def delete(self, user: str, role: str, job_id: str) -> JobStatus:
        job = self.jobs.pop(job_id)  # carried out at once...
        self.deleted.set()
        await self.delete_answered.wait()  # ...answered late
        return job


@pytest.fixture
def api() -> Iterator[tuple[server.JobService, Runner]]:
    runner = Runner()
    service = server.JobService(mock.MagicMock(), mock.AsyncMock(), mock.MagicMock())

    async def connection() -> Any:
        if runner.down:
            raise RunnerUnavailable("the test's runner is down")
        return runner

    service._runner = connection  # type: ignore[method-assign]
    with mock.patch.object(server, "identity_of", lambda context, tls: context.identity):
        yield service, runner


@pytest.fixture
async def remembered(
    api: tuple[server.JobService, Runner],
) -> tuple[server.JobService, Runner]:
    """The api with alice's ended job ALICE1, which it has just asked the runner about."""
    service, runner = api
    runner.add("ALICE1", "alice")
    assert await _status(service, "ALICE1", "alice") == "JOB_STATE_COMPLETED"
    return service, runner


async def _status(service: server.JobService, job_id: str, user: str, role: str = "user") -> str:
    """The outcome of GetJobStatus: the job's state, or the status code it was refused with."""
    try:
        response = await service.GetJobStatus(
            pb.GetJobStatusRequest(job_id=job_id),
            Context(user, role),  # type: ignore[arg-type]
        )
    except Aborted as exc:
        return exc.code.name
    return pb.JobState.Name(response.job.state)


async def _tail_allowed(service: server.JobService, job_id: str, user: str) -> str:
    try:
        await service._authorize_tail(authz.Identity(user, authz.Role.USER), job_id)
    except (NotFound, RunnerUnavailable) as exc:
        return type(exc).__name__
    return "allowed"


async def test_an_ended_status_and_an_owner_are_answered_without_the_runner(
    remembered: tuple[server.JobService, Runner],
) -> None:
    service, runner = remembered
    runner.down = True
    asked = runner.asked
    assert await _status(service, "ALICE1", "alice") == "JOB_STATE_COMPLETED"
    assert await _status(service, "ALICE1", "carol", "viewer") == "JOB_STATE_COMPLETED"
    assert await _tail_allowed(service, "ALICE1", "alice") == "allowed"
    assert runner.asked == asked


async def test_a_running_status_always_comes_from_the_runner(
    api: tuple[server.JobService, Runner],
) -> None:
    service, runner = api
    runner.add("ALICE1", "alice", JobState.RUNNING)
    assert await _status(service, "ALICE1", "alice") == "JOB_STATE_RUNNING"
    runner.down = True
    assert await _status(service, "ALICE1", "alice") == "UNAVAILABLE"


async def test_another_users_remembered_job_answers_exactly_as_a_missing_one(
    remembered: tuple[server.JobService, Runner],
) -> None:
    service, runner = remembered
    assert await _status(service, "ALICE1", "bob") == "NOT_FOUND"
    assert await _status(service, "NOJOB1", "bob") == "NOT_FOUND"
    assert await _tail_allowed(service, "ALICE1", "bob") == "NotFound"
    runner.down = True  # the refusal still takes the runner's path: the same answer as a miss
    for job_id in ("ALICE1", "NOJOB1", "bad id"):
        assert await _status(service, job_id, "bob") == "UNAVAILABLE", job_id
        assert await _tail_allowed(service, job_id, "bob") == "RunnerUnavailable", job_id


async def test_a_delete_the_runner_carried_out_is_forgotten_though_its_caller_left(
    remembered: tuple[server.JobService, Runner],
) -> None:
    service, runner = remembered
    delete = asyncio.create_task(
        service.DeleteJob(
            pb.DeleteJobRequest(job_id="ALICE1"),
            Context("admin", "admin"),  # type: ignore[arg-type]
        )
    )
    await runner.deleted.wait()  # the runner has deleted it; its answer has not come
    delete.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delete
    assert await _status(service, "ALICE1", "alice") == "NOT_FOUND"
    assert await _tail_allowed(service, "ALICE1", "alice") == "NotFound"
