"""The api under many clients, measured side by side in one run (a benchmark, not a test).

    .venv/bin/python bench/api_bench.py [start|status|tail|fanout|all] [--pin] [--rounds N]

It starts a real runner (root) and a real api (as ``nobody`` when it can), with fresh
certificates, in a temporary directory, and measures over mTLS on loopback:

- ``start``: StartJob of ``fib 3`` -> its first output line on a TailJobOutput, against
  ``bwrap --unshare-all ... /usr/bin/python3 -c 'print(1)'`` to its first line, interleaved;
- ``status``: GetJobStatus with 50 concurrent callers against grpc's own Health/Check, same
  channels, alternated: of an ended job (final, so the api answers it from memory for a
  second at a time, ``jobcache.py``) and of a running one (the runner is asked every time).
  ``--pin`` puts the api on CPU 1 and everything else (client processes, runner, launcher) on
  CPU 0, so that the client does not compete with the api for its core;
- ``tail``: one tail of a 20 MB finished job through the api against the same tail read
  straight from the runner socket (``RunnerClient``), alternated, in lines per second;
- ``fanout``: 100 concurrent tails of that job: first byte p50, all identical and complete,
  and the RSS of the api and the runner idle, at their peak and once the tails ended.

The 20 MB job is a ``noop`` job started through the api whose output file is then filled, as
root, with the records its monitor would have written for 20 MB of 101-byte lines: the api
offers no job type that prints that much.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import multiprocessing
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.model import Stream
from tests.conftest import (
    ROOT,
    Daemon,
    build_wheels,
    install_code,
    short_tmpdir,
    write_runner_config,
)
from tests.e2e.conftest import (
    API_USER,
    _free_port,
    make_certs,
    stop_api,
    write_api_config,
)
from tests.e2e.conftest import start_api as launch_api
from tests.nethosts import JOB_USER, ensure_job_user
from workernator_api import certs, server
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api._proto.workernator.v1 import workernator_pb2_grpc as pb_grpc
from workernator_api.config import ApiConfig
from workernator_api.runner_client import RunnerClient
from workernator_api.tls import ServerTls
from workernator_runner import store
from workernator_runner.config import RunnerConfig

PYTHON = "/usr/bin/python3"
RUNUSER = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "runuser"
BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/"]
BWRAP += ["--proc", "/proc", "--dev", "/dev", PYTHON, "-c", "print(1)"]
LINE = b"0123456789" * 10 + b"\n"  # 101 bytes, as the tests' spew job prints
JOB_BYTES = 20 * 1000 * 1000
RECORD_BYTES = 64 * 1024  # the most a monitor puts in one record
CALLERS = 50
TAILS = 100
SECONDS = 2.0  # of each status / health phase
SLOW_FIB = pb.StartJobRequest(
    fib=pb.FibArgs(position=1_000_000), limits=pb.ResourceLimits(cpu_millis=10)
)


# --- the stack --------------------------------------------------------------------------------


@dataclass
class Stack:
    address: str
    certs: Path
    runner: Daemon
    runner_socket: Path
    state: Path
    api: subprocess.Popen[bytes]

    def credentials(self, user: str = "admin") -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            (self.certs / "server-ca.pem").read_bytes(),
            (self.certs / f"{user}-key.pem").read_bytes(),
            (self.certs / f"{user}.pem").read_bytes(),
        )

    def channel(self, user: str = "admin") -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.address, self.credentials(user))


def api_python(user: str, tmp: Path) -> Path:
    """An interpreter ``user`` can run the api's code with: this one when ``user`` can read
    it and the checkout, else a copy of the project installed under ``tmp`` (as the e2e tests
    do: a checkout under /root is not readable by an unprivileged user)."""
    # It must import this checkout's api (the venv's editable install may point at another).
    here = f"import workernator_api.server as s; assert s.__file__.startswith({str(ROOT)!r})"
    probe = subprocess.run(
        [RUNUSER, "-u", user, "--", sys.executable, "-c", here],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=False,
    )
    if probe.returncode == 0:
        return Path(sys.executable)
    wheels = tmp / "wheels"
    if failure := build_wheels(wheels):
        sys.exit(f"cannot build the project's wheels: {failure}")
    install_code(tmp / "venv", wheels)
    return tmp / "venv" / "bin" / "python"


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    """A runner and an api (unprivileged) of the bench's own, removed afterwards."""
    tmp = short_tmpdir("wn-apibench-")
    os.chmod(tmp, 0o755)
    ensure_job_user(JOB_USER)
    api_uid = pwd.getpwnam(API_USER).pw_uid
    python = api_python(API_USER, tmp)
    make_certs(tmp / "certs", api_uid)
    (tmp / "run").mkdir(mode=0o755)
    (tmp / "state").mkdir()
    cfg = RunnerConfig(
        socket=tmp / "run" / "runner.sock",
        socket_group="",
        state_dir=tmp / "state",
        allowed_uids=frozenset({0, api_uid}),
        job_user=JOB_USER,
        egress_bridge="",  # no network: the jobs measured here need none
    )
    write_runner_config(cfg, tmp / "runner.toml")
    runner = Daemon(cfg, tmp / "runner.toml", tmp / "runner.log")
    runner.start()
    api = None
    try:
        os.chown(cfg.socket, -1, pwd.getpwnam(API_USER).pw_gid)
        os.chmod(cfg.socket, 0o660)
        port = _free_port()
        config = write_api_config(tmp / "api.toml", port, tmp / "certs", cfg.socket)
        api = launch_api(config, tmp / "api.log", api_uid, port, python)
        yield Stack(f"127.0.0.1:{port}", tmp / "certs", runner, cfg.socket, cfg.state_dir, api)
    finally:
        if api is not None:
            stop_api(api)
        runner.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def p50(values: Sequence[float]) -> float:
    return statistics.median(values)


def pin(pid: int, cpus: set[int]) -> None:
    """``pid`` and all its threads on ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def pin_tree(pid: int, cpus: set[int]) -> None:
    """``pid``, its threads and every descendant (the runner's launcher, spares) on ``cpus``."""
    pin(pid, cpus)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        for child in children.read_text().split():
            pin_tree(int(child), cpus)


# --- start -> first line ----------------------------------------------------------------------


async def first_line(stub: Any) -> float:
    """StartJob of fib 3, then a tail of it until its first complete line."""
    t0 = time.perf_counter()
    job = (await stub.StartJob(pb.StartJobRequest(fib=pb.FibArgs(position=3)))).job
    seen = b""
    async for response in stub.TailJobOutput(pb.TailJobOutputRequest(job_id=job.id, follow=True)):
        seen += b"".join(c.data for c in response.chunks)
        if b"\n" in seen:
            elapsed = time.perf_counter() - t0
            break
    else:
        raise RuntimeError(f"job {job.id} printed no line")
    return elapsed


def bwrap_first_line() -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(BWRAP, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - t0
    proc.stdout.read()
    proc.stdout.close()
    if proc.wait() != 0 or line != b"1\n":
        raise RuntimeError(f"bwrap printed {line!r}")
    return elapsed


async def bench_start(s: Stack, rounds: int) -> dict[str, float]:
    async with s.channel() as channel:
        stub: Any = pb_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]
        await first_line(stub)  # warm-up
        bwrap_first_line()
        ours: list[float] = []
        theirs: list[float] = []
        for n in range(rounds):
            pair: list[Callable[[], Awaitable[float]]] = [
                lambda: first_line(stub),
                lambda: asyncio.to_thread(bwrap_first_line),
            ]
            for run in pair if n % 2 else pair[::-1]:
                result = await run()
                (ours if run is pair[0] else theirs).append(result * 1000)
    print(f"\nstart -> first line, {rounds} alternated rounds (ms), load {load()}")
    print(f"  api over mTLS (StartJob fib 3 + tail) p50 {p50(ours):6.2f}  min {min(ours):6.2f}")
    print(f"  bwrap + python print               p50 {p50(theirs):6.2f}  min {min(theirs):6.2f}")
    ratio = p50(theirs) / p50(ours)
    print(f"  bwrap / api = {ratio:.2f}x (target >= 2x: {'MET' if ratio >= 2 else 'NOT MET'})")
    return {"api_ms": p50(ours), "bwrap_ms": p50(theirs), "ratio": ratio}


# --- GetJobStatus against Health/Check --------------------------------------------------------


def _rate_client(
    address: str,
    creds: tuple[bytes, bytes, bytes],
    job_id: str,
    kind: str,
    callers: int,
    seconds: float,
    cpus: list[int] | None,
) -> int:
    """In a client process of its own: calls completed by ``callers`` loops in ``seconds``."""
    if cpus:
        os.sched_setaffinity(0, set(cpus))

    async def run() -> int:
        channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(*creds))
        async with channel:
            jobs: Any = pb_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]
            health: Any = health_pb2_grpc.HealthStub(channel)
            status_request = pb.GetJobStatusRequest(job_id=job_id)
            check_request = health_pb2.HealthCheckRequest()
            await jobs.GetJobStatus(status_request)
            await health.Check(check_request)
            count = 0
            deadline = 0.0

            async def loop() -> None:
                nonlocal count
                while time.perf_counter() < deadline:
                    if kind == "status":
                        await jobs.GetJobStatus(status_request)
                    else:
                        await health.Check(check_request)
                    count += 1

            deadline = time.perf_counter() + seconds
            await asyncio.gather(*(loop() for _ in range(callers)))
            return count

    return asyncio.run(run())


def rates(s: Stack, job_id: str, kind: str, processes: int, cpus: list[int] | None) -> float:
    creds = (
        (s.certs / "server-ca.pem").read_bytes(),
        (s.certs / "admin-key.pem").read_bytes(),
        (s.certs / "admin.pem").read_bytes(),
    )
    ctx = multiprocessing.get_context("spawn")
    per = CALLERS // processes
    args = [(s.address, creds, job_id, kind, per, SECONDS, cpus)] * processes
    with ctx.Pool(processes) as pool:
        counts = pool.starmap(_rate_client, args)
    return sum(counts) / SECONDS


async def bench_status(s: Stack, rounds: int, pinned: bool) -> dict[str, float]:
    async with s.channel() as channel:
        stub: Any = pb_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]
        ended = (await stub.StartJob(pb.StartJobRequest())).job
        setups: list[tuple[str, int, list[int] | None]] = [
            ("same cores, 1 client process", 1, None)
        ]
        if pinned:
            setups.append(("api on CPU 1, 2 client processes + runner on CPU 0", 2, [0]))
        results: dict[str, float] = {}
        for setup in setups:
            # Running for minutes at 1% of a CPU: the largest fib, 0.7 s of CPU time.
            running = (await stub.StartJob(SLOW_FIB)).job
            try:
                results |= await _status_rates(s, rounds, setup, ended.id, running.id)
            finally:
                await stub.StopJob(pb.StopJobRequest(job_id=running.id))
        return results


async def _status_rates(
    s: Stack, rounds: int, setup: tuple[str, int, list[int] | None], ended: str, running: str
) -> dict[str, float]:
    """GetJobStatus of an ended job (its status is final: the api may answer it from memory),
    of a running one (the runner is asked each time), and Health/Check, alternated."""
    results: dict[str, float] = {}
    name, processes, cpus = setup
    calls = {"ended": ("status", ended), "running": ("status", running), "health": ("health", "")}
    if cpus:
        pin(s.api.pid, {1})
        pin_tree(s.runner.pid, {0})
    rate: dict[str, list[float]] = {which: [] for which in calls}
    for n in range(rounds):
        order = list(calls) if n % 2 else list(calls)[::-1]
        for which in order:
            kind, job_id = calls[which]
            got = await asyncio.to_thread(rates, s, job_id or ended, kind, processes, cpus)
            rate[which].append(got)
    if cpus:
        pin(s.api.pid, {0, 1})
        pin_tree(s.runner.pid, {0, 1})
    health = p50(rate["health"])
    print(
        f"\n{CALLERS} concurrent callers, {name}, {rounds} rounds of {SECONDS:g} s, load {load()}"
    )
    labels = {
        "ended": "GetJobStatus, ended job",
        "running": "GetJobStatus, running job",
        "health": "Health/Check",
    }
    for which, label in labels.items():
        rounds_text = ", ".join(f"{r:.0f}" for r in rate[which])
        print(f"  {label:26s} {p50(rate[which]):7.0f} calls/s   (rounds: {rounds_text})")
    for which in ("ended", "running"):
        ratio = p50(rate[which]) / health
        print(
            f"  {labels[which]} / Health = {ratio:.2f}x (target >= 0.8x: "
            f"{'MET' if ratio >= 0.8 else 'NOT MET'})"
        )
    if cpus:
        for which in ("ended", "running"):
            met = "MET" if p50(rate[which]) >= 5000 else "NOT MET"
            print(f"  {labels[which]} >= 5000 calls/s: {met}")
    key = "pinned" if cpus else "shared"
    results |= {f"{key}_{which}": p50(values) for which, values in rate.items()}
    return results


# --- tails ------------------------------------------------------------------------------------


async def big_job(s: Stack) -> tuple[str, bytes]:
    """A finished noop job whose output file holds JOB_BYTES of 101-byte lines; its bytes."""
    async with s.channel() as channel:
        stub: Any = pb_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]
        job = (await stub.StartJob(pb.StartJobRequest())).job
        while job.state == pb.JOB_STATE_RUNNING:
            await asyncio.sleep(0.01)
            job = (await stub.GetJobStatus(pb.GetJobStatusRequest(job_id=job.id))).job
    lines = RECORD_BYTES // len(LINE)
    record = LINE * lines
    count = max(1, JOB_BYTES // len(record))
    with (s.state / "jobs" / job.id / "output").open("ab") as f:
        for _ in range(count):
            f.write(store.encode_record(time.time_ns(), Stream.STDOUT, record))
    return job.id, record * count


async def tail_api(stub: Any, job_id: str) -> tuple[bytes, float]:
    """The whole output through the api, and the seconds to its first byte."""
    t0 = time.perf_counter()
    first = 0.0
    parts: list[bytes] = []
    async for response in stub.TailJobOutput(pb.TailJobOutputRequest(job_id=job_id, follow=True)):
        if not first:
            first = time.perf_counter() - t0
        parts.extend(c.data for c in response.chunks)
    return b"".join(parts), first


async def tail_runner(s: Stack, job_id: str) -> bytes:
    async with RunnerClient(s.runner_socket) as runner:
        parts: list[bytes] = []
        async for batch in runner.tail("admin", "admin", job_id, follow=True):
            parts.extend(c.data for c in batch)
    return b"".join(parts)


async def bench_tail(s: Stack, rounds: int, job_id: str, expected: bytes) -> dict[str, float]:
    lines = expected.count(b"\n")
    async with s.channel() as channel:
        stub: Any = pb_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]
        ours: list[float] = []
        theirs: list[float] = []
        for n in range(rounds + 1):
            for which in ("api", "runner") if n % 2 else ("runner", "api"):
                t0 = time.perf_counter()
                if which == "api":
                    got, _ = await tail_api(stub, job_id)
                else:
                    got = await tail_runner(s, job_id)
                rate = lines / (time.perf_counter() - t0)
                if got != expected:
                    raise RuntimeError(f"{which} tail got {len(got)} bytes, not the output")
                if n:  # the first round warms up
                    (ours if which == "api" else theirs).append(rate)
    ratio = p50(ours) / p50(theirs)
    print(
        f"\none tail of a {JOB_BYTES / 1e6:g} MB job ({lines} lines), {rounds} alternated "
        f"rounds, load {load()}"
    )
    print(f"  through the api   {p50(ours) / 1e6:6.2f} M lines/s")
    print(f"  runner socket     {p50(theirs) / 1e6:6.2f} M lines/s")
    print(f"  api / runner = {ratio:.2f}x (target >= 0.9x: {'MET' if ratio >= 0.9 else 'NOT MET'})")
    return {"api_lines_s": p50(ours), "runner_lines_s": p50(theirs), "ratio": ratio}


def _tail_client(
    address: str, creds: tuple[bytes, bytes, bytes], job_id: str, tails: int, start_at: float
) -> list[tuple[float, str]]:
    """In a client process of its own: ``tails`` concurrent tails from ``start_at`` (wall
    clock), each as (ms to its first byte, sha256 of all it got)."""

    async def run() -> list[tuple[float, str]]:
        channels = [
            grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(*creds))
            for _ in range(max(1, tails // 10))
        ]
        stubs: list[Any] = [pb_grpc.JobServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
        for stub in stubs:  # connected before the clock starts: handshakes are not tails
            await stub.GetJobStatus(pb.GetJobStatusRequest(job_id=job_id))
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def one(stub: Any) -> tuple[float, str]:
            t0 = time.perf_counter()
            first = 0.0
            digest = hashlib.sha256()
            request = pb.TailJobOutputRequest(job_id=job_id, follow=True)
            async for response in stub.TailJobOutput(request):
                if not first:
                    first = time.perf_counter() - t0
                for chunk in response.chunks:
                    digest.update(chunk.data)
            return first * 1000, digest.hexdigest()

        results = await asyncio.gather(*(one(stubs[i % len(stubs)]) for i in range(tails)))
        for channel in channels:
            await channel.close()
        return list(results)

    return asyncio.run(run())


async def bench_fanout(s: Stack, job_id: str, expected: bytes, processes: int) -> dict[str, float]:
    await asyncio.sleep(1)
    idle_api, idle_runner = rss_mb(s.api.pid), rss_mb(s.runner.pid)
    peak = {"api": idle_api, "runner": idle_runner}
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            peak["api"] = max(peak["api"], rss_mb(s.api.pid))
            peak["runner"] = max(peak["runner"], rss_mb(s.runner.pid))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    creds = [
        (
            (s.certs / "server-ca.pem").read_bytes(),
            (s.certs / f"{user}-key.pem").read_bytes(),
            (s.certs / f"{user}.pem").read_bytes(),
        )
        for user in ("admin", "carol")  # the job's owner, and a viewer
    ]
    start_at = time.time() + 3 + processes  # every client process connected by then
    args = [
        (s.address, creds[i % 2], job_id, TAILS // processes, start_at) for i in range(processes)
    ]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        per_process = await asyncio.to_thread(pool.starmap, _tail_client, args)
    total = time.time() - start_at
    done.set()
    await watcher
    results = [result for part in per_process for result in part]
    want = hashlib.sha256(expected).hexdigest()
    identical = len(results) == TAILS and all(digest == want for _, digest in results)
    firsts = [first for first, _ in results]
    after: dict[str, float] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # memory is given back shortly after the tails end
        after = {"api": rss_mb(s.api.pid), "runner": rss_mb(s.runner.pid)}
        if after["api"] - idle_api <= 32 and after["runner"] - idle_runner <= 32:
            break
        await asyncio.sleep(0.2)
    print(
        f"\n{TAILS} concurrent tails of the {JOB_BYTES / 1e6:g} MB job from {processes} client "
        f"processes, load {load()}"
    )
    print(
        f"  first byte p50 {p50(firsts):6.1f} ms, max {max(firsts):6.1f} ms "
        f"(target p50 <= 50 ms: {'MET' if p50(firsts) <= 50 else 'NOT MET'})"
    )
    print(f"  all {TAILS} identical and complete: {identical}; all done in {total:.2f} s")
    for name, idle in (("api", idle_api), ("runner", idle_runner)):
        back = after[name] - idle <= 32
        print(
            f"  {name:<7} RSS idle {idle:6.1f} MB, peak {peak[name]:6.1f} MB, after "
            f"{after[name]:6.1f} MB (within 32 MB of idle: {'MET' if back else 'NOT MET'})"
        )
    return {"first_byte_ms": p50(firsts), "identical": float(identical)}


def per_call_us(action: Callable[[], object], calls: int = 5000) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        action()
    return (time.perf_counter() - start) / calls * 1e6


async def bench_costs(s: Stack) -> None:
    """What the parts of a GetJobStatus cost the api, measured in this process."""
    cfg = ApiConfig(
        cert=s.certs / "server.pem",
        key=s.certs / "server-key.pem",
        client_ca=s.certs / "client-ca.pem",
    )
    server_tls = ServerTls(cfg)
    auth = {
        "ssl_tls_version": [b"TLSv1.3"],
        "x509_pem_cert": [(s.certs / "admin.pem").read_bytes()],
    }
    cert = server_tls.authenticate(auth)
    async with RunnerClient(s.runner_socket, max_in_flight=200) as runner:
        job = await runner.start("admin", "admin", "noop", {})
        job = await runner.status("admin", "admin", job.id)
        rounds = []
        for _ in range(2000):
            t0 = time.perf_counter()
            await runner.status("admin", "admin", job.id)
            rounds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(40):
            await asyncio.gather(*(runner.status("admin", "admin", job.id) for _ in range(50)))
        concurrent = (time.perf_counter() - t0) / 2000
    costs = {
        "certificate check (interceptor)": per_call_us(lambda: server_tls.authenticate(auth)),
        "identity from the certificate (cached)": per_call_us(lambda: server._identity(cert)),
        "identity, parsed (before: every call)": per_call_us(
            lambda: certs.identity_from_cert(cert)
        ),
        "runner status -> protobuf (convert)": per_call_us(lambda: server._status(job)),
        "runner round trip, one at a time (p50)": p50(rounds) * 1e6,
        "runner round trip, 50 at a time (per call)": concurrent * 1e6,
    }
    print(f"\nwhat a GetJobStatus costs beyond a Health/Check, per call, load {load()}")
    for name, value in costs.items():
        print(f"  {name:<44} {value:8.1f} us")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "target",
        nargs="?",
        default="all",
        choices=["start", "status", "costs", "tail", "fanout", "all"],
    )
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default per target)")
    parser.add_argument(
        "--pin", action="store_true", help="also measure status with the api alone on CPU 1"
    )
    parser.add_argument(
        "--clients", type=int, default=4, help="client processes of the fan-out (default 4)"
    )
    parser.add_argument(
        "--megabytes", type=float, default=20, help="output of the tailed job (default 20)"
    )
    args = parser.parse_args()
    global JOB_BYTES  # noqa: PLW0603 - one setting for the whole run
    JOB_BYTES = int(args.megabytes * 1e6)
    if os.geteuid() != 0:
        sys.exit("api_bench.py runs a real runner: run it as root")
    if shutil.which("bwrap") is None and args.target in ("start", "all"):
        sys.exit("bwrap is not installed (apt-get install bubblewrap)")
    print(f"{os.cpu_count()} CPUs, load {load()}")
    with stack() as s:
        if args.target in ("start", "all"):
            await bench_start(s, args.rounds or 100)
        if args.target in ("status", "all"):
            await bench_status(s, args.rounds or 3, args.pin)
        if args.target in ("costs", "all"):
            await bench_costs(s)
        if args.target in ("tail", "fanout", "all"):
            job_id, expected = await big_job(s)
            if args.target in ("tail", "all"):
                await bench_tail(s, args.rounds or 5, job_id, expected)
            if args.target in ("fanout", "all"):
                await bench_fanout(s, job_id, expected, args.clients)


if __name__ == "__main__":
    asyncio.run(main())
