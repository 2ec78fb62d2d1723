"""Issue 8's smaller findings, end to end: what people see when something is wrong.

Each test reproduces what an attacker or a confused user tried, through the real api (a gRPC
client over mTLS), the real CLI (a subprocess) or the real runner socket, and checks the answer
is clear, bounded and safe, and that nothing was left behind:

- ``grpc.health.v1.Health/List`` answers (it was UNIMPLEMENTED though reflection listed it);
- a failed job says why (``failure_reason``), and a hostile job or server cannot put terminal
  escapes or megabytes into that;
- an out-of-range number names the range, too large and too small alike;
- a long URL is refused with its real limit (2048), which ListJobTypes states;
- an oversized request is refused with its size and the limit;
- expressions and numbers may start with '-' on the command line; ``--frob`` stays an error;
- an expression may come from a file or standard input, with clear errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.errors import InvalidArgument
from shared.model import MAX_FAILURE_REASON, JobState, JobStatus
from tests.e2e.conftest import Stack, channel
from tests.e2e.test_api import Client
from tests.e2e.test_cli import ok, one_line_error, start, status, wait_until_ended, wn
from tests.nethosts import EgressLab, NetHost, bridge_host
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api.limits import MAX_REQUEST_BYTES, MAX_TRANSPORT_BYTES
from workernator_api.runner_client import RunnerClient

Code = grpc.StatusCode
JOB_SERVICE = "workernator.v1.JobService"


@pytest.fixture
async def alice(stack: Stack) -> AsyncIterator[Client]:
    client = Client(stack, "alice")
    yield client
    await client.close()


async def _ended(client: Client, job_id: str) -> pb.JobStatus:
    """The job's status once it has ended: a following tail returns when it has."""
    await client.tail(job_id, follow=True)
    return await client.status(job_id)


def _job_ids(stack: Stack, user: str) -> set[str]:
    data = json.loads(ok(stack, user, "jobs", "list", "-o", "json"))
    return {job["id"] for job in data["jobs"]}


# --- health -----------------------------------------------------------------------------------


async def test_health_list_answers_every_registered_service(stack: Stack) -> None:
    async with channel(stack, "carol") as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)
        listed = await stub.List(health_pb2.HealthListRequest(), timeout=10)  # type: ignore[attr-defined]
        statuses = {name: response.status for name, response in listed.statuses.items()}
        assert statuses == {
            "": health_pb2.HealthCheckResponse.SERVING,
            JOB_SERVICE: health_pb2.HealthCheckResponse.SERVING,
        }
        for name, expected in statuses.items():  # List and Check agree
            checked = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert checked.status == expected


# --- why a job failed -------------------------------------------------------------------------


async def test_a_failed_jobs_reason_is_in_its_status(stack: Stack, alice: Client) -> None:
    """`jobs start eval '1/0'` said only "exited with status 1"; the reason was in the output."""
    job = await _ended(alice, (await alice.start(eval=pb.EvalArgs(expression="1/0"))).id)
    assert job.state == pb.JOB_STATE_FAILED
    assert job.failure_reason == "Cannot evaluate: division by zero"
    assert job.error == "exited with status 1"
    assert [j.failure_reason for j in await alice.list() if j.id == job.id] == [job.failure_reason]

    lines = [
        " ".join(line.split()) for line in ok(stack, "alice", "jobs", "status", job.id).splitlines()
    ]
    assert lines[lines.index("Status: Failed") + 1 :][:3] == [
        "Reason: Cannot evaluate: division by zero",
        "Error: exited with status 1",
        "Exit code: 1",
    ]
    assert status(stack, "alice", job.id)["failure_reason"] == "Cannot evaluate: division by zero"

    done = await _ended(alice, (await alice.start(fib=pb.FibArgs(position=3))).id)
    assert done.state == pb.JOB_STATE_COMPLETED and done.failure_reason == ""
    assert status(stack, "alice", done.id)["failure_reason"] == ""


# A web server that answers with terminal escapes where the status line should be: the wait job
# reports the line in its error, so it becomes the reason the owner reads in `jobs status`.
HOSTILE_HTTP = r"""
import socket, sys
server = socket.create_server(("0.0.0.0", 0))
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    conn.recv(65536)
    conn.sendall(bytes.fromhex(sys.argv[1]))
    conn.close()
"""
ESCAPES = b"\x1b]0;pwned\x07\x1b[2J\x1b[31mHACKED\x9b1m\r\n"


@pytest.fixture
def hostile_host(egress_lab: EgressLab) -> Iterator[tuple[NetHost, int]]:
    with bridge_host(egress_lab) as host:
        process = host.popen(sys.executable, "-c", HOSTILE_HTTP, ESCAPES.hex())
        assert process.stdout is not None
        yield host, int(process.stdout.readline())


async def test_a_hostile_server_cannot_put_terminal_escapes_into_status(
    stack: Stack, alice: Client, hostile_host: tuple[NetHost, int]
) -> None:
    host, port = hostile_host
    url = f"http://{host.address}:{port}/"
    job = await alice.start(wait=pb.WaitArgs(seconds=Duration(), url=url))
    ended = await _ended(alice, job.id)
    assert ended.state == pb.JOB_STATE_FAILED
    assert ended.failure_reason == (
        f"Request to {url} failed: \\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mHACKED\\x9b1m"
    )
    shown = wn(stack, "alice", "jobs", "status", job.id)
    assert shown.returncode == 0
    assert b"Reason:" in shown.stdout and b"Request to" in shown.stdout
    assert not any(byte < 0x20 and byte != 0x0A for byte in shown.stdout)  # no ESC, BEL, CR
    assert "\x9b" not in shown.stdout.decode()  # nor the 8-bit CSI
    data = json.loads(ok(stack, "alice", "jobs", "status", job.id, "-o", "json"))
    assert data["failure_reason"] == ended.failure_reason


async def _runner_job(stack: Stack, job_type: str, args: dict[str, Any]) -> JobStatus:
    """Run a probe job through the runner's socket (as root, beside the api) to its end."""
    async with RunnerClient(stack.runner_socket) as runner:
        job = await runner.start("alice", "user", job_type, args)
        async for _ in runner.tail("alice", "user", job.id, follow=True):
            pass
        return await runner.status("alice", "user", job.id)


@pytest.mark.parametrize(
    ("err", "repeat", "reason"),
    [
        # 8 MB on one line, without a newline: the reason is its start, cut.
        (b"\x1b[2J" + b"A" * 1000, 8000, "\\x1b[2J" + "A" * (MAX_FAILURE_REASON - 8) + "…"),
        # megabytes of lines: the last one that is not blank
        (b"line\n\n", 500_000, "line"),
        (b"x" * 1500 + b"\n", 1000, "x" * (MAX_FAILURE_REASON - 1) + "…"),
        # not UTF-8, C1 controls, bidirectional overrides, a NUL, and a carriage return
        (b"bad \xff\xfe \xc2\x9b \xe2\x80\xae evil \x00 \rover\n", 1, None),
        (b"[ERROR] Cannot do it\n   \n", 1, "Cannot do it"),
    ],
)
async def test_a_hostile_jobs_stderr_is_bounded_and_escaped_in_its_reason(
    stack: Stack, err: bytes, repeat: int, reason: str | None
) -> None:
    job = await _runner_job(
        stack, "bytes", {"hex": "", "err_hex": err.hex(), "err_repeat": repeat, "exit": 3}
    )
    assert job.state is JobState.FAILED and job.exit_code == 3
    assert len(job.failure_reason) <= MAX_FAILURE_REASON
    assert job.failure_reason.isprintable()
    if reason is not None:
        assert job.failure_reason == reason
    else:
        assert job.failure_reason == ("bad \\xff\\xfe \\x9b \\u202e evil \\x00 \\x0dover")


# --- numbers out of range ---------------------------------------------------------------------

FIB_RANGE = "argument 'position': must be between 1 and 1000000, got"


@pytest.mark.parametrize("position", ["99999999999999999999999999", "-5", "0", "1000001"])
def test_fib_out_of_range_names_the_range_in_the_cli(stack: Stack, position: str) -> None:
    before = _job_ids(stack, "alice")
    one_line_error(wn(stack, "alice", "jobs", "start", "fib", position), f"{FIB_RANGE} {position}")
    assert _job_ids(stack, "alice") == before


async def test_fib_out_of_range_names_the_range_in_the_api_and_the_runner(
    stack: Stack, alice: Client
) -> None:
    for position in (0, 1_000_001, 2**64 - 1):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await alice.start(fib=pb.FibArgs(position=position))
        assert exc.value.code() == Code.INVALID_ARGUMENT
        assert exc.value.details() == f"{FIB_RANGE} {position}"
    async with RunnerClient(stack.runner_socket) as runner:
        for position in (0, 10**7, -(2**63)):
            with pytest.raises(InvalidArgument) as caught:
                await runner.start("alice", "user", "fib", {"position": position})
            assert caught.value.message == f"{FIB_RANGE} {position}"


# --- one URL limit ----------------------------------------------------------------------------


async def test_a_long_url_is_refused_with_its_real_limit_everywhere(
    stack: Stack, alice: Client
) -> None:
    long_url = "http://127.0.0.1:9/" + "a" * 10_000
    refusal = "argument 'url': is 10019 characters long; the most allowed is 2048"
    one_line_error(wn(stack, "alice", "jobs", "start", "wait", "1", long_url), refusal)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await alice.start(wait=pb.WaitArgs(seconds=Duration(seconds=1), url=long_url))
    assert (exc.value.code(), exc.value.details()) == (Code.INVALID_ARGUMENT, refusal)
    # The runner checks again. (Its protocol refuses any argument string over 4096 characters
    # before that, in the protocol's words: only the api speaks it.)
    async with RunnerClient(stack.runner_socket) as runner:
        with pytest.raises(InvalidArgument) as caught:
            await runner.start("alice", "user", "wait", {"seconds": 1, "url": long_url[:3000]})
        assert caught.value.message == (
            "argument 'url': is 3000 characters long; the most allowed is 2048"
        )

    longest = "http://127.0.0.1:9/" + "a" * (2048 - 19)
    job = await alice.start(wait=pb.WaitArgs(seconds=Duration(seconds=60), url=longest))
    assert job.wait.url == longest
    assert (await alice.stop(job.id)).state == pb.JOB_STATE_STOPPED

    types: pb.ListJobTypesResponse = await alice.stub.ListJobTypes(pb.ListJobTypesRequest())
    lengths = {(t.name, a.name): a.max_length for t in types.types for a in t.args}
    assert lengths[("wait", "url")] == 2048 and lengths[("eval", "expression")] == 4096
    text = ok(stack, "alice", "jobs", "types").splitlines()
    assert "    url (url, required, at most 2048 characters)" in text
    assert "    expression (expression, required, at most 4096 characters)" in text


# --- oversized requests -----------------------------------------------------------------------


async def test_an_oversized_request_is_refused_saying_so(stack: Stack, alice: Client) -> None:
    before = {j.id for j in await alice.list()}
    request = pb.StartJobRequest(eval=pb.EvalArgs(expression="1+" * 40_000 + "1"))
    size = request.ByteSize()
    assert MAX_REQUEST_BYTES < size < MAX_TRANSPORT_BYTES
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await alice.stub.StartJob(request)
    assert exc.value.code() == Code.RESOURCE_EXHAUSTED
    assert exc.value.details() == (
        f"request too large: {size} bytes, the api accepts at most {MAX_REQUEST_BYTES}"
    )
    # Over grpc's own limit, a raw client gets grpc's words: the size and the limit.
    huge = pb.StartJobRequest(eval=pb.EvalArgs(expression="1" * (2 << 20)))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await alice.stub.StartJob(huge)
    assert exc.value.code() == Code.RESOURCE_EXHAUSTED
    assert f"({huge.ByteSize()} vs. {MAX_TRANSPORT_BYTES})" in str(exc.value.details())
    assert {j.id for j in await alice.list()} == before  # nothing started; the api still serves


def test_the_cli_refuses_an_oversized_request_before_sending_it(stack: Stack) -> None:
    before = _job_ids(stack, "alice")
    many = [arg for i in range(6000) for arg in ("--var", f"v{i}=1")]
    proc = wn(stack, "alice", "jobs", "start", "eval", "1", *many)
    error = one_line_error(
        proc, "request too large: ", f"the api accepts at most {MAX_REQUEST_BYTES}"
    )
    assert int(error.split("request too large: ")[1].split()[0]) > MAX_REQUEST_BYTES
    assert _job_ids(stack, "alice") == before


# --- words that start with '-' ----------------------------------------------------------------


def _result(stack: Stack, job_id: str) -> bytes:
    wait_until_ended(stack, "alice", job_id)
    return wn(stack, "alice", "jobs", "tail", job_id).stdout


def test_expressions_and_numbers_may_start_with_a_dash(stack: Stack) -> None:
    assert b"[RESULT] -4\n" in _result(stack, start(stack, "alice", "eval", "-2^2"))
    job_id = start(stack, "alice", "eval", "-2^2", "--cpu", "0.5", "--var", "x=-1")
    assert status(stack, "alice", job_id)["limits"]["cpu_millis"] == 500
    assert status(stack, "alice", job_id)["eval"] == {"expression": "-2^2", "variables": {"x": -1}}
    assert b"[RESULT] 3\n" in _result(stack, start(stack, "alice", "eval", "-x", "--var", "x=-3"))
    assert b"[RESULT] -2\n" in _result(stack, start(stack, "alice", "eval", "--", "-sqrt(4)"))
    one_line_error(wn(stack, "alice", "jobs", "start", "fib", "-5"), f"{FIB_RANGE} -5")

    before = _job_ids(stack, "alice")
    for args, message in (
        (["eval", "--frob", "1"], b"No such option '--frob'"),
        (["eval", "1", "--frob"], b"No such option '--frob'"),
        (["fib", "3", "--frob=2"], b"No such option '--frob'"),
        (["wait", "-5", "http://127.0.0.1:9/"], b"'-5' is negative: a wait is from 0 seconds"),
    ):
        proc = wn(stack, "alice", "jobs", "start", *args)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
    assert _job_ids(stack, "alice") == before


# --- an expression from a file ----------------------------------------------------------------


def _with_stdin(stack: Stack, data: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "workernator_api.cli", "jobs", "start", *args],
        env=stack.env("alice") | {"WORKERNATOR_CONFIG": os.devnull},
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_an_expression_from_a_file_or_standard_input(stack: Stack, tmp_path: Path) -> None:
    formula = tmp_path / "formula.txt"
    formula.write_text("2x *\n  3y\n")
    job_id = start(stack, "alice", "eval", "-f", str(formula), "--var", "x=2", "--var", "y=1.5")
    assert b"[RESULT] 18\n" in _result(stack, job_id)
    assert status(stack, "alice", job_id)["eval"]["expression"] == "2x *\n  3y"

    proc = _with_stdin(stack, b"-2^2\n", "eval", "-f", "-")
    assert proc.returncode == 0, proc.stderr
    assert b"[RESULT] -4\n" in _result(stack, proc.stdout.decode().split("ID: ")[1].split()[0])

    before = _job_ids(stack, "alice")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b" \n\n")
    (tmp_path / "long.txt").write_text("1+" * 2500 + "1")
    (tmp_path / "binary.txt").write_bytes(b"1 + \xff\xfe")
    (tmp_path / "huge.txt").write_bytes(b"1" * (10 << 20))
    for name, message in (
        ("missing.txt", "cannot read the expression file {} (-f): No such file or directory"),
        ("empty.txt", "the expression file {} (-f) is empty"),
        ("blank.txt", "the expression file {} (-f) is empty (blanks only)"),
        ("long.txt", "the expression in {} (-f) is 5001 characters long; the most allowed is 4096"),
        ("binary.txt", "the expression file {} (-f) is not UTF-8 text (byte 0xff at offset 4)"),
        ("huge.txt", "the expression file {} (-f) is larger than 65536 bytes"),
        ("", "cannot read the expression file {} (-f): Is a directory"),
    ):
        path = tmp_path / name
        one_line_error(
            wn(stack, "alice", "jobs", "start", "eval", "-f", str(path)), message.format(path)
        )
    one_line_error(_with_stdin(stack, b"", "eval", "-f", "-"), "standard input (-f -) is empty")
    proc = wn(stack, "alice", "jobs", "start", "eval", "1", "-f", str(formula))
    assert proc.returncode == 2 and b"give EXPRESSION or -f FILE, not both" in proc.stderr
    assert _job_ids(stack, "alice") == before
