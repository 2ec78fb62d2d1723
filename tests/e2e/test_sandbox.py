"""The sandbox end to end: jobs started through the api over mTLS, seen from outside and by
what they reach. (The isolation tests from inside a job are in
tests/integration/test_sandbox.py and test_network.py; the api offers only the four job
types, so here the wait job does the reaching and the host looks at the processes.)"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest
from google.protobuf.duration_pb2 import Duration

from tests.e2e.conftest import Stack
from tests.e2e.test_api import Client
from tests.nethosts import JOB_USER, EgressLab, NetHost, bridge_host, routed_host
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_runner import store


@pytest.fixture
async def alice(stack: Stack) -> AsyncIterator[Client]:
    client = Client(stack, "alice")
    yield client
    await client.close()


@pytest.fixture
def lan_host(egress_lab: EgressLab) -> Iterator[tuple[NetHost, int]]:
    with bridge_host(egress_lab) as host:
        port, _ = host.http_server()
        yield host, port


async def _wait_job(alice: Client, url: str, seconds: int = 0) -> tuple[pb.JobStatus, bytes]:
    job = await alice.start(wait=pb.WaitArgs(seconds=Duration(seconds=seconds), url=url))
    out = await alice.tail(job.id, follow=True)
    return await alice.status(job.id), out


async def test_a_wait_job_posts_to_a_test_host_through_the_api(
    alice: Client, lan_host: tuple[NetHost, int]
) -> None:
    host, port = lan_host
    status, out = await _wait_job(alice, f"http://{host.address}:{port}/ok")
    assert status.state == pb.JOB_STATE_COMPLETED
    assert b"[WAIT] Response status: 201 Created\n[RESULT] 201\n" in out
    server = host.processes[0]
    assert server.stdout is not None
    assert json.loads(server.stdout.readline())["method"] == "POST"


async def test_a_wait_job_cannot_reach_the_api_or_the_hosts_loopback(
    stack: Stack, alice: Client
) -> None:
    port = stack.address.rsplit(":", 1)[1]
    status, out = await _wait_job(alice, f"http://127.0.0.1:{port}/")
    assert status.state == pb.JOB_STATE_FAILED
    # Refused by the job's own loopback: had it reached the api (TLS, HTTP/2), the request
    # would have failed in another way.
    stderr = await alice.tail(status.id)
    assert b"Connection refused" in stderr + out


async def test_a_wait_job_cannot_reach_cloud_metadata(alice: Client) -> None:
    with routed_host("198.51.100.10", "169.254.169.254") as host:
        port, server = host.http_server()
        job = await alice.start(
            wait=pb.WaitArgs(seconds=Duration(seconds=0), url=f"http://169.254.169.254:{port}/")
        )
        await asyncio.sleep(2)  # it sent its SYN long ago; the firewall dropped it
        assert (await alice.status(job.id)).state == pb.JOB_STATE_RUNNING  # still waiting
        assert b"Sending a POST" in await alice.tail(job.id)
        await alice.stop(job.id)
        # The same host answers on its other address: its first request is that one.
        status, out = await _wait_job(alice, f"http://198.51.100.10:{port}/ok")
        assert status.state == pb.JOB_STATE_COMPLETED, out
        assert server.stdout is not None
        assert json.loads(server.stdout.readline())["path"] == "/ok"


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def _hostname_of(pid: int) -> str:
    result = subprocess.run(
        ["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def _status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


async def test_a_running_jobs_processes_seen_from_the_host(
    stack: Stack, alice: Client, lan_host: tuple[NetHost, int]
) -> None:
    host, port = lan_host
    job = await alice.start(
        wait=pb.WaitArgs(seconds=Duration(seconds=60), url=f"http://{host.address}:{port}/")
    )
    try:
        state = store.read_state(stack.tmp / "state" / "jobs" / job.id)
        assert state is not None
        init = state.job_pid
        (process,) = _children(init)
        user = pwd.getpwnam(JOB_USER)
        for pid in (init, process):
            fields = _status_fields(pid)
            assert fields["Uid"].split() == [str(user.pw_uid)] * 4
            assert fields["Groups"] == ""
            assert fields["CapEff"] == fields["CapPrm"] == fields["CapBnd"] == "0" * 16
            assert fields["NoNewPrivs"] == "1"
            assert fields["Seccomp"] == "2"
            assert fields["NSpid"].split()[1:] == ["1" if pid == init else "2"]
            for namespace in ("pid", "mnt", "net", "uts", "ipc", "cgroup"):
                ours = os.readlink(f"/proc/self/ns/{namespace}")
                assert os.readlink(f"/proc/{pid}/ns/{namespace}") != ours, namespace
        assert _hostname_of(process) == job.id
    finally:
        await alice.stop(job.id)
