"""The runner daemon over its Unix socket: protocol, peers, restarts, memory."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from shared import protocol as p
from shared.errors import InvalidArgument, NotFound
from shared.model import JobState
from tests.conftest import Daemon
from tests.helpers import process_gone
from workernator_api.runner_client import RunnerClient, RunnerUnavailable
from workernator_runner import cgroups, store
from workernator_runner.config import RunnerConfig

USER = ("alice", "user")


async def _tail_all(client: RunnerClient, job_id: str) -> bytes:
    out = bytearray()
    async for batch in client.tail(*USER, job_id):
        for chunk in batch:
            out += chunk.data
    return bytes(out)


async def test_start_tail_status_list_types_over_the_socket(daemon: Daemon) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "fib", {"position": 10})
        assert job.owner == "alice"
        out = await _tail_all(client, job.id)
        assert b"[RESULT] 34\n" in out
        status = await client.status(*USER, job.id)
        assert status.state is JobState.COMPLETED
        other = await client.start("bob", "user", "noop", {})
        assert [j.id for j in await client.list_jobs(*USER)] == [job.id, other.id]
        assert [j.id for j in await client.list_jobs(*USER, owner="bob")] == [other.id]
        types = {t["name"]: t for t in await client.types(*USER)}
        assert {"noop", "fib", "eval", "wait"} <= set(types)
        assert types["fib"]["args"][0]["name"] == "position"
        with pytest.raises(InvalidArgument, match="argument 'position'"):
            await client.start(*USER, "fib", {"position": -1})
        with pytest.raises(NotFound):
            await client.status(*USER, "NOPE00")


def _raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def _read_frames(s: socket.socket) -> list[dict[str, object]]:
    """Every frame until the runner closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    frames = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        frames.append(msgpack.unpackb(data[4 : 4 + length]))
        data = data[4 + length :]
    return frames


HELLO = p.encode_frame(p.Hello())


def _frame(obj: object) -> bytes:
    body: bytes = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (struct.pack(">I", 10_000_000), "exceeds"),
        (_frame({"type": "request", "id": 1, "op": "rm", "caller": {}, "args": {}}), "op"),
        (_frame({"type": "request", "id": "one"}), "expected an integer"),
        (_frame([1, 2]), "must hold a map"),
        (struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1", "not valid msgpack"),
        (_frame({"type": "request", "id": 1})[:-2], "middle of a frame"),
    ],
    ids=["oversized", "unknown-op", "wrong-type", "not-a-map", "garbage", "truncated"],
)
async def test_malformed_frames_get_an_error_and_the_daemon_keeps_serving(
    daemon: Daemon, payload: bytes, error: str
) -> None:
    def exchange() -> list[dict[str, object]]:
        with _raw_connect(str(daemon.config.socket)) as s:
            s.sendall(HELLO + payload)
            s.shutdown(socket.SHUT_WR)
            return _read_frames(s)

    frames = await asyncio.to_thread(exchange)
    assert frames[0]["type"] == "hello"
    assert frames[-1]["type"] == "error"
    assert frames[-1]["code"] == "invalid_argument"
    assert error in str(frames[-1]["message"])
    # and the daemon still serves a well-behaved client
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "noop", {})
        assert (await client.status(*USER, job.id)).id == job.id


async def test_many_requests_interleave_on_one_connection(daemon: Daemon) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "drip", {"count": 20, "interval": 0.01})
        tails = [_tail_all(client, job.id) for _ in range(20)]
        statuses = [client.status(*USER, job.id) for _ in range(20)]
        results = await asyncio.gather(*tails, *statuses)
        outputs = results[:20]
        assert len(set(outputs)) == 1
        assert outputs[0] == b"\n".join(b"line %d" % i for i in range(20))


async def test_leaving_a_tail_early_cancels_it_on_the_runner(daemon: Daemon) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "drip", {"count": 1, "interval": 60})
        async for _ in client.tail(*USER, job.id):
            break  # the generator's cleanup sends cancel
        # the connection is still healthy for other requests
        assert (await client.status(*USER, job.id)).state is JobState.RUNNING
        stopped = await client.stop(*USER, job.id)
        assert stopped.state is JobState.STOPPED


@pytest.mark.privileged
async def test_a_peer_whose_uid_is_not_allowed_is_refused(daemon: Daemon) -> None:
    os.chmod(daemon.config.state_dir, 0o755)  # let uid 65534 reach the socket at all
    os.chmod(daemon.config.socket, 0o666)
    read_r, read_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and tries to talk to the runner
        try:
            os.close(read_r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with _raw_connect(str(daemon.config.socket)) as s:
                # send nothing: the runner must refuse before it reads anything
                os.write(read_w, msgpack.packb(_read_frames(s)))
        except BaseException as exc:
            os.write(read_w, msgpack.packb(repr(exc)))
        finally:
            os._exit(0)
    os.close(read_w)
    data = b""
    while chunk := await asyncio.to_thread(os.read, read_r, 65536):
        data += chunk
    os.close(read_r)
    await asyncio.to_thread(os.waitpid, pid, 0)
    frames = msgpack.unpackb(data)
    assert len(frames) == 1  # no hello, no answer to the request: only the refusal
    assert frames[0]["type"] == "error"
    assert frames[0]["message"] == "uid 65534 is not allowed"
    assert b"refused connection" in daemon.log_path.read_bytes()


async def test_status_and_output_survive_a_runner_restart(daemon: Daemon) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        done = await client.start(*USER, "fib", {"position": 4})
        done_out = await _tail_all(client, done.id)
        running = await client.start(*USER, "drip", {"count": 3, "interval": 1.0})
        first_status = await client.status(*USER, done.id)

    daemon.stop()  # the runner goes away; the running job's monitor does not
    with pytest.raises(RunnerUnavailable):
        await RunnerClient(daemon.config.socket).connect()
    daemon.start()

    async with RunnerClient(daemon.config.socket) as client:
        assert await client.status(*USER, done.id) == first_status
        assert await _tail_all(client, done.id) == done_out
        status = await client.status(*USER, running.id)
        assert status.state is JobState.RUNNING  # re-adopted
        out = await _tail_all(client, running.id)  # follows it to its end across the restart
        assert out == b"line 0\nline 1\nline 2"
        final = await client.status(*USER, running.id)
        assert final.state is JobState.COMPLETED


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


async def test_the_runner_exits_1_when_its_launcher_dies_and_jobs_go_on(daemon: Daemon) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "drip", {"count": 2, "interval": 3})
    (launcher,) = _children(daemon.pid)
    os.kill(launcher, signal.SIGKILL)
    assert daemon.process is not None
    assert await asyncio.to_thread(daemon.process.wait, 20) == 1  # for the service manager
    log = daemon.log_path.read_text()
    assert "workernator-runner: the launcher exited (exit status -9); no job could start" in log
    daemon.process = None
    daemon.start()  # as the service manager would
    async with RunnerClient(daemon.config.socket) as client:
        assert (await client.status(*USER, job.id)).state is JobState.RUNNING  # re-adopted
        assert await _tail_all(client, job.id) == b"line 0\nline 1"
        assert (await client.status(*USER, job.id)).state is JobState.COMPLETED


async def test_a_running_job_can_be_stopped_by_a_restarted_runner(daemon: Daemon) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "stubborn", {})
    daemon.stop()
    daemon.start()
    async with RunnerClient(daemon.config.socket) as client:
        stopped = await client.stop(*USER, job.id)
    assert stopped.state is JobState.STOPPED
    assert stopped.signal == 9


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_job_printing_200_mb_keeps_the_runner_memory_flat(daemon: Daemon) -> None:
    size = 200 * 1024 * 1024
    async with RunnerClient(daemon.config.socket) as client:
        warm = await client.start(*USER, "spew", {"size": 1024 * 1024})
        await _tail_all(client, warm.id)
        before = _rss_kib(daemon.pid)
        job = await client.start(*USER, "spew", {"size": size})
        received = 0
        peak = before
        t0 = time.monotonic()
        async for batch in client.tail(*USER, job.id):
            received += sum(len(c.data) for c in batch)
            peak = max(peak, _rss_kib(daemon.pid))
        elapsed = time.monotonic() - t0
        status = await client.status(*USER, job.id)
    assert status.state is JobState.COMPLETED
    assert received == size
    growth_mib = (peak - before) / 1024
    print(
        f"200 MB tailed in {elapsed:.1f}s; runner RSS {before // 1024} MiB, +{growth_mib:.1f} MiB"
    )
    assert growth_mib < 32, f"runner grew by {growth_mib:.1f} MiB"
    assert (daemon.config.jobs_dir / job.id / "output").stat().st_size > size


async def test_shutdown_leaves_running_jobs_running(daemon: Daemon) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "stubborn", {})
        status = await client.status(*USER, job.id)
    daemon.stop()
    state = (daemon.config.jobs_dir / job.id / "state.json").read_text()
    assert '"RUNNING"' in state
    job_pid = int(state.split('"job_pid": ')[1].split(",")[0])
    assert not process_gone(job_pid)
    daemon.start()
    async with RunnerClient(daemon.config.socket) as client:
        assert (await client.stop(*USER, job.id)).state is JobState.STOPPED
    assert process_gone(job_pid)
    assert status.state is JobState.RUNNING


@pytest.mark.privileged
def test_the_socket_is_created_0660_with_the_configured_group(
    runner_config: RunnerConfig, state_dir: Path
) -> None:
    import dataclasses
    import grp
    import stat

    from tests.conftest import write_runner_config

    group = grp.getgrnam("daemon")
    cfg = dataclasses.replace(runner_config, socket_group="daemon")
    write_runner_config(cfg, state_dir / "runner.toml")
    runner = Daemon(cfg, state_dir / "runner.toml", state_dir / "runner.log")
    runner.start()
    try:
        st = cfg.socket.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == group.gr_gid
    finally:
        runner.stop()
    assert not cfg.socket.exists()  # removed on clean shutdown


async def test_a_request_with_bad_arguments_does_not_close_the_connection(daemon: Daemon) -> None:
    def exchange() -> list[dict[str, object]]:
        with _raw_connect(str(daemon.config.socket)) as s:
            bad = {
                "type": "request",
                "id": 7,
                "op": "status",
                "caller": CALLER,
                "args": {"job_id": ""},
            }
            good = {"type": "request", "id": 8, "op": "list", "caller": CALLER, "args": {}}
            s.sendall(HELLO + _frame(bad) + _frame(good))
            s.shutdown(socket.SHUT_WR)
            return _read_frames(s)

    frames = await asyncio.to_thread(exchange)
    assert [f["type"] for f in frames] == ["hello", "error", "end"]
    assert frames[1]["id"] == 7 and "length must be" in str(frames[1]["message"])
    assert frames[2]["id"] == 8


CALLER = {"user": "alice", "role": "user"}


async def test_long_lists_and_long_last_lines_fit_in_frames(daemon: Daemon) -> None:
    names = [f"v{i:02d}" + "x" * 61 for i in range(64)]  # the longest names, as many as allowed
    expression = " + ".join(names[:60])  # about 4000 characters, 59 operators deep
    variables = {name: float(i) for i, name in enumerate(names)}
    async with RunnerClient(daemon.config.socket) as client:
        started = await asyncio.gather(
            *(
                client.start(*USER, "eval", {"expression": expression, "variables": variables})
                for _ in range(200)  # about 1.1 MB of statuses: more than one frame holds
            )
        )
        jobs = await client.list_jobs(*USER)
        assert {j.id for j in jobs} == {j.id for j in started}
        spew = await client.start(*USER, "spew", {"size": 3 * 1024 * 1024})
        await _tail_all(client, spew.id)
        received = 0
        async for batch in client.tail(*USER, spew.id, last=1_000_000):
            received += sum(len(c.data) for c in batch)
        assert received == 3 * 1024 * 1024


async def test_a_tail_ends_with_an_error_not_a_clean_end_when_the_runner_stops(
    daemon: Daemon,
) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "drip", {"count": 1, "interval": 60})
        tail = client.tail(*USER, job.id)
        assert [c.data for c in await anext(tail)] == [b"line 0"]
        await asyncio.to_thread(daemon.stop)
        with pytest.raises(RunnerUnavailable):
            await anext(tail)
    daemon.start()


def test_a_job_module_that_cannot_be_imported_is_a_one_line_error(
    runner_config: RunnerConfig, state_dir: Path
) -> None:
    import dataclasses
    import subprocess
    import sys

    from tests.conftest import ROOT, write_runner_config

    cfg = dataclasses.replace(runner_config, job_modules=("no_such_module_wn",))
    write_runner_config(cfg, state_dir / "bad.toml")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "workernator_runner.daemon",
            "--config",
            str(state_dir / "bad.toml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "workernator-runner: job module 'no_such_module_wn' cannot be imported: "
        "ModuleNotFoundError(\"No module named 'no_such_module_wn'\")"
    ]


async def test_a_peer_that_stops_reading_cannot_hold_up_shutdown(daemon: Daemon) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "spew", {"size": 50 * 1024 * 1024})
        await _tail_all(client, job.id)
    with _raw_connect(str(daemon.config.socket)) as s:
        request = {
            "type": "request",
            "id": 1,
            "op": "tail",
            "caller": CALLER,
            "args": {"job_id": job.id, "follow": True},
        }
        s.sendall(HELLO + _frame(request))
        await asyncio.sleep(0.5)  # the runner fills the socket buffers, then waits on us
        t0 = time.monotonic()
        await asyncio.to_thread(daemon.stop)
        assert time.monotonic() - t0 < 10


async def test_a_runner_killed_and_restarted_keeps_running_jobs_cgroups_only(
    daemon: Daemon,
) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        kept = await client.start(*USER, "drip", {"count": 1, "interval": 60})
        lost = await client.start(*USER, "drip", {"count": 1, "interval": 60})
    kept_state = store.read_state(daemon.config.jobs_dir / kept.id)
    lost_state = store.read_state(daemon.config.jobs_dir / lost.id)
    assert kept_state is not None and lost_state is not None
    layout = cgroups.detect(daemon.config.workspaces_dir)
    kept_cgroup, lost_cgroup = layout.job(kept_state.cgroup), layout.job(lost_state.cgroup)
    assert daemon.process is not None
    daemon.process.kill()  # no clean shutdown
    await asyncio.to_thread(daemon.process.wait)
    daemon.process = None
    os.kill(lost_state.monitor_pid, signal.SIGKILL)  # this job dies meanwhile, uncleanly
    await _until(lambda: not lost_cgroup.populated())
    assert _cgroup_exists(lost_cgroup)  # nobody removed it
    daemon.start()
    async with RunnerClient(daemon.config.socket) as client:
        assert (await client.status(*USER, lost.id)).state is JobState.FAILED
        assert not _cgroup_exists(lost_cgroup)  # removed at start
        assert (await client.status(*USER, kept.id)).state is JobState.RUNNING
        assert kept_cgroup.populated()  # kept, with its processes
        await client.stop(*USER, kept.id)
    assert not _cgroup_exists(kept_cgroup)


def _cgroup_exists(cgroup: cgroups.JobCgroup) -> bool:
    return any(os.path.exists(path) for path in cgroup.dirs.values())


async def _until(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
