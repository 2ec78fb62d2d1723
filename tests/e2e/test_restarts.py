"""Restarts under load and a full disk, end to end: the real CLI, api and runner.

Twenty ``workernator jobs tail`` processes follow ``wait`` jobs (of the types the api offers:
a few lines at once, the rest after the wait) while the runner is killed (SIGKILL) and
restarted, then the api is stopped (SIGTERM: it drains, cutting the open streams after
``drain_seconds``) and started again: every tail ends, when its job does, with every line
exactly once. A tail with ``--no-reconnect`` stops at the first cut and says where to resume.
And a runner below its disk reserve refuses starts through the api with
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.model import Stream
from tests.conftest import write_runner_config
from tests.e2e.conftest import API_USER, Stack, channel, start_api, stop_api
from tests.nethosts import EgressLab, bridge_host, wait_for
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api._proto.workernator.v1 import workernator_pb2_grpc as pb_grpc
from workernator_api.runner_client import RunnerClient
from workernator_runner import store

pytestmark = pytest.mark.privileged

TAILS = 20
WAIT_SECONDS = 25.0  # each job prints a line, waits this long, then prints the rest: the
# restarts fall in between, so every tail has output from before and after them
DRAIN_SECONDS = 1.5
SLOW_DRAIN_SECONDS = 5.0


@pytest.fixture
def http_server(egress_lab: EgressLab) -> Iterator[str]:
    """A URL the jobs' POSTs reach (a test host on the jobs' bridge)."""
    with bridge_host(egress_lab) as host:
        port, _ = host.http_server()
        yield f"http://{host.address}:{port}/ok"


def _restart_runner(stack: Stack, *, kill: bool) -> None:
    """Kill (SIGKILL) or stop the stack's runner and start it again, its socket the api's."""
    process = stack.runner.process
    assert process is not None
    if kill:
        process.kill()
        process.wait(timeout=20)
        stack.runner.process = None
    else:
        stack.runner.stop()
    stack.runner.start()
    os.chown(stack.runner_socket, -1, pwd.getpwnam(API_USER).pw_gid)
    os.chmod(stack.runner_socket, 0o660)


def _restart_api(stack: Stack) -> float:
    """SIGTERM the api, wait for it to exit (the drain), start it again; the drain's seconds."""
    began = time.monotonic()
    stack.api.send_signal(signal.SIGTERM)
    stack.api.wait(timeout=DRAIN_SECONDS + 20)
    drained = time.monotonic() - began
    port = int(stack.address.rpartition(":")[2])
    stack.api = start_api(
        stack.tmp / "api.toml", stack.api_log, stack.api_uid, port, stack.api_python
    )
    return drained


@contextlib.contextmanager
def _api_draining_for(stack: Stack, seconds: float) -> Iterator[Stack]:
    """The stack's api restarted with a drain of ``seconds``."""
    config = stack.tmp / "api.toml"
    original = config.read_text()
    config.write_text(original + f"drain_seconds = {seconds}\n")
    stop_api(stack.api)
    port = int(stack.address.rpartition(":")[2])
    stack.api = start_api(config, stack.api_log, stack.api_uid, port, stack.api_python)
    try:
        yield stack
    finally:
        config.write_text(original)


@pytest.fixture
def draining_api(stack: Stack) -> Iterator[Stack]:
    """The stack's api restarted with a short drain."""
    with _api_draining_for(stack, DRAIN_SECONDS) as draining:
        yield draining


@pytest.fixture
def slowly_draining_api(stack: Stack) -> Iterator[Stack]:
    """The stack's api restarted with a drain long enough to try new calls during it, on a
    busy host too (a new connection's handshake included)."""
    with _api_draining_for(stack, SLOW_DRAIN_SECONDS) as draining:
        yield draining


def _start_waits(stack: Stack, count: int, url: str) -> list[str]:
    async def start() -> list[str]:
        async with RunnerClient(stack.runner_socket) as client:
            args = {"seconds": WAIT_SECONDS, "url": url}
            jobs = [await client.start("alice", "user", "wait", args) for _ in range(count)]
        return [job.id for job in jobs]

    return asyncio.run(start())


def _runner_connections(stack: Stack) -> int:
    """Connections the runner has accepted and holds open: its sockets that ``ss`` shows
    established with a path of their own (socketpairs have none)."""
    fd_dir = Path(f"/proc/{stack.runner.pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    listing = subprocess.run(
        ["ss", "-xaH"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    count = 0
    for line in listing:
        fields = line.split()  # netid state recv-q send-q local inode peer inode
        if len(fields) == 8 and fields[1] == "ESTAB" and fields[4] != "*" and fields[5] in inodes:
            count += 1
    return count


def _saved_stdout(stack: Stack, job_id: str) -> bytes:
    """The job's stdout as the runner saved it."""
    path = stack.runner.config.jobs_dir / job_id / store.OUTPUT_FILE
    return b"".join(c.data for c in store.iter_records(path) if c.stream is Stream.STDOUT)


def _tail(
    stack: Stack, job_id: str, out: IO[bytes], err: IO[bytes], *flags: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "workernator_api.cli", "jobs", "tail", job_id, *flags],
        env=stack.env("alice"),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
    )


def _wait_tails(tails: list[subprocess.Popen[bytes]], seconds: float) -> None:
    """Wait for every tail to end, ``seconds`` in all."""
    deadline = time.monotonic() + seconds
    for tail in tails:
        tail.wait(timeout=max(1.0, deadline - time.monotonic()))


def _kill_tails(tails: list[subprocess.Popen[bytes]]) -> None:
    for tail in tails:
        if tail.poll() is None:
            tail.kill()
            tail.wait()


def test_tails_survive_a_runner_kill_and_an_api_restart_with_every_line_once(
    draining_api: Stack, http_server: str, tmp_path: Path
) -> None:
    stack = draining_api
    job_ids = _start_waits(stack, TAILS + 1, http_server)
    outs = [tmp_path / f"{job_id}.out" for job_id in job_ids]
    errs = [tmp_path / f"{job_id}.err" for job_id in job_ids]
    tails: list[subprocess.Popen[bytes]] = []
    try:
        for i, job_id in enumerate(job_ids):
            flags = ("--no-reconnect",) if i == TAILS else ()
            with outs[i].open("wb") as out, errs[i].open("wb") as err:
                tails.append(_tail(stack, job_id, out, err, *flags))
        try:
            wait_for(lambda: all(p.stat().st_size > 0 for p in outs), 60, "every tail's output")
        except AssertionError:
            raise AssertionError([e.read_text() for e in errs]) from None

        wait_for(lambda: _runner_connections(stack) > TAILS, 30, "every tail following")
        _restart_runner(stack, kill=True)
        wait_for(
            lambda: all(b"reconnecting in" in e.read_bytes() for e in errs[:TAILS]),
            60,
            "every tail reconnecting after the runner's restart",
        )
        # Each open tail holds a runner connection of its own (the api's shared one is one more).
        wait_for(lambda: _runner_connections(stack) > TAILS, 60, "every tail following again")
        drained = _restart_api(stack)
        _wait_tails(tails, 90)
    finally:
        _kill_tails(tails)

    for i in range(TAILS):
        stderr = errs[i].read_text()
        assert tails[i].returncode == 0, stderr
        saved = _saved_stdout(stack, job_ids[i])
        assert saved.endswith(b"[RESULT] 201\n[JOB] Complete\n"), saved
        assert outs[i].read_bytes() == saved, (job_ids[i], stderr)  # each line exactly once
        assert stderr.count("reconnecting in") >= 2, stderr  # the runner's and the api's cut
    # Open streams were cut at the drain's deadline, not waited for to the end of their jobs.
    assert DRAIN_SECONDS <= drained < DRAIN_SECONDS + 10, drained

    # Without reconnecting: an error at the first cut, naming where to resume.
    stderr = errs[TAILS].read_text()
    assert tails[TAILS].returncode == 1, stderr
    assert "the output stream broke off" in stderr and "--offset" in stderr, stderr
    assert "reconnecting" not in stderr, stderr
    assert _saved_stdout(stack, job_ids[TAILS]).startswith(outs[TAILS].read_bytes())


def test_a_start_below_the_disk_reserve_is_resource_exhausted_through_the_api(
    stack: Stack,
) -> None:
    cfg = stack.runner.config
    full = dataclasses.replace(cfg, min_free_bytes=1 << 60)  # more than any disk has free
    write_runner_config(full, stack.runner.config_path)
    try:
        _restart_runner(stack, kill=False)
        proc = subprocess.run(
            [sys.executable, "-m", "workernator_api.cli", "jobs", "start", "noop"],
            env=stack.env("alice"),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        stderr = proc.stderr.decode()
        assert proc.returncode == 1, stderr
        assert stderr.startswith("Error: resource_exhausted: the runner's disk is nearly full:")
        assert "below the reserve of" in stderr, stderr
        assert "min_free_bytes" in stderr and "free on the filesystem of" in stderr, stderr
    finally:
        write_runner_config(cfg, stack.runner.config_path)
        _restart_runner(stack, kill=False)


def _assert_refused_while_draining(exc: grpc.aio.AioRpcError) -> None:
    assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
    assert exc.details() == "the api is shutting down; retry in a moment", exc


def test_a_draining_api_refuses_new_calls_and_keeps_open_streams_until_the_cut(
    slowly_draining_api: Stack, http_server: str
) -> None:
    """SIGTERM: health says NOT_SERVING (to watchers too), new calls (on an open connection
    or a new one) are refused UNAVAILABLE "shutting down" at once, and an open tail goes on
    until ``drain_seconds``, when it is cut with UNAVAILABLE "reconnect to resume"."""
    stack = slowly_draining_api
    [job_id] = _start_waits(stack, 1, http_server)

    async def scenario() -> tuple[float, grpc.aio.AioRpcError]:
        async with channel(stack, "alice") as ch:
            stub: Any = pb_grpc.JobServiceStub(ch)  # type: ignore[no-untyped-call]
            health: Any = health_pb2_grpc.HealthStub(ch)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            tail = stub.TailJobOutput(pb.TailJobOutputRequest(job_id=job_id, follow=True))
            assert (await tail.read()).chunks  # the job's first line; the rest comes later
            status = pb.GetJobStatusRequest(job_id=job_id)
            await stub.GetJobStatus(status)  # served, before the SIGTERM

            began = time.monotonic()
            stack.api.send_signal(signal.SIGTERM)
            update = await asyncio.wait_for(watch.read(), 10)
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
            while True:  # the signal reaches the api's loop a moment after it is sent
                try:
                    await asyncio.wait_for(stub.GetJobStatus(status), 10)
                except grpc.aio.AioRpcError as exc:
                    _assert_refused_while_draining(exc)
                    break
                assert time.monotonic() - began < 10, "a new call was still served"
                await asyncio.sleep(0.01)
            check = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            async with channel(stack, "alice") as fresh:  # a new connection is told too
                fresh_stub: Any = pb_grpc.JobServiceStub(fresh)  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.aio.AioRpcError) as new_connection:
                    await fresh_stub.GetJobStatus(status, timeout=10)
                _assert_refused_while_draining(new_connection.value)
                with pytest.raises(grpc.aio.AioRpcError) as new_tail:
                    request = pb.TailJobOutputRequest(job_id=job_id, follow=True)
                    await fresh_stub.TailJobOutput(request, timeout=10).read()
                _assert_refused_while_draining(new_tail.value)
            still_open = time.monotonic() - began
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async with asyncio.timeout(SLOW_DRAIN_SECONDS + 10):
                    while True:  # the job's next lines, if any, until the cut
                        assert await tail.read() is not grpc.aio.EOF, "the tail ended"
            assert still_open < SLOW_DRAIN_SECONDS, still_open  # the tail was open until now
            return time.monotonic() - began, cut.value

    try:
        cut_after, cut = asyncio.run(scenario())
        assert stack.api.wait(timeout=20) == 0
    finally:
        if stack.api.poll() is not None:  # the stack's teardown stops a running api
            port = int(stack.address.rpartition(":")[2])
            stack.api = start_api(
                stack.tmp / "api.toml", stack.api_log, stack.api_uid, port, stack.api_python
            )
    assert cut.code() is grpc.StatusCode.UNAVAILABLE, cut
    assert "shutting down; reconnect to resume" in (cut.details() or ""), cut
    assert SLOW_DRAIN_SECONDS - 0.1 <= cut_after < SLOW_DRAIN_SECONDS + 10, cut_after


APPEND_SECONDS = 0.05  # how often each job's output grows by LINES_PER_RECORD numbered lines
LINES_PER_RECORD = 20


class _NumberedLines(threading.Thread):
    """Appends numbered lines to running jobs' output files, a record at a time, as their
    monitors would write them (O_APPEND, one whole record per write), until stopped: output
    that keeps coming while the runner and the api restart. (The api offers no job type
    that prints lines without end; the path from the file to the CLI is the same.)"""

    def __init__(self, files: list[Path]) -> None:
        super().__init__()
        self.files = files
        self.lines = 0
        self.halt = threading.Event()

    def run(self) -> None:
        fds = [os.open(f, os.O_WRONLY | os.O_APPEND) for f in self.files]
        try:
            while not self.halt.wait(APPEND_SECONDS):
                numbers = range(self.lines, self.lines + LINES_PER_RECORD)
                data = "".join(f"line {n:07d}\n" for n in numbers).encode()
                for fd in fds:
                    os.write(fd, store.encode_record(time.time_ns(), Stream.STDOUT, data))
                self.lines += LINES_PER_RECORD
        finally:
            for fd in fds:
                os.close(fd)


def test_tails_through_a_runner_kill_and_an_api_restart_mid_output_get_every_line_once(
    draining_api: Stack, http_server: str, tmp_path: Path
) -> None:
    """20 tails of jobs whose output keeps growing by numbered lines while the runner is
    killed and the api restarted: each ends with every line once, in order, and says it
    reconnected after each restart."""
    stack = draining_api
    job_ids = _start_waits(stack, TAILS, http_server)
    outputs = [stack.runner.config.jobs_dir / j / store.OUTPUT_FILE for j in job_ids]
    errs = [tmp_path / f"{job_id}.err" for job_id in job_ids]
    outs = [tmp_path / f"{job_id}.out" for job_id in job_ids]
    writer = _NumberedLines(outputs)
    tails: list[subprocess.Popen[bytes]] = []
    try:
        for i, job_id in enumerate(job_ids):
            with outs[i].open("wb") as out, errs[i].open("wb") as err:
                tails.append(_tail(stack, job_id, out, err))
        wait_for(lambda: all(p.stat().st_size > 0 for p in outs), 60, "every tail's output")
        writer.start()
        wait_for(lambda: writer.lines >= 20 * LINES_PER_RECORD, 30, "lines being added")
        _restart_runner(stack, kill=True)
        wait_for(
            lambda: all(b"reconnecting in" in e.read_bytes() for e in errs),
            60,
            "every tail reconnecting after the runner's restart",
        )
        wait_for(lambda: _runner_connections(stack) > TAILS, 60, "every tail following again")
        _restart_api(stack)
        wait_for(
            lambda: all(e.read_text().count("reconnecting in") >= 2 for e in errs),
            60,
            "every tail reconnecting after the api's restart",
        )
        lines = writer.lines
        wait_for(lambda: writer.lines >= lines + 20 * LINES_PER_RECORD, 30, "more lines")
    finally:
        writer.halt.set()
        writer.join()

    async def stop_all() -> None:
        async with RunnerClient(stack.runner_socket) as client:
            for job_id in job_ids:
                await client.stop("alice", "user", job_id)

    try:
        asyncio.run(stop_all())
        _wait_tails(tails, 90)
    finally:
        _kill_tails(tails)

    numbered = "".join(f"line {n:07d}\n" for n in range(writer.lines)).encode()
    for i, job_id in enumerate(job_ids):
        stderr = errs[i].read_text()
        assert tails[i].returncode == 0, stderr
        saved = _saved_stdout(stack, job_id)
        assert numbered in saved, job_id  # as written: the saved output is whole
        got = outs[i].read_bytes()
        assert got == saved, (job_id, len(got), len(saved), stderr)  # every line once, in order
