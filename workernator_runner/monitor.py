"""The job monitor (design sections 2, 5 and 6): one per job, forked by the launcher.

The monitor starts its own session (it outlives the runner and the launcher), makes the job's
workspace, unshares the PID namespace for its children and forks the job's init
(:mod:`workernator_runner.sandbox`), which builds the rest of the sandbox. Egress jobs get their
``eth0`` from the monitor, which stays in the host's namespaces. Once the job runs, the monitor
records it in ``state.json``, tells the runner, and then owns the read ends of the job's stdout
and stderr pipes: it appends output to the job's ``output`` file as it arrives and records the
job's end. A SIGTERM to the monitor means "stop the job": SIGTERM to the init (which forwards it
to the job), the grace period, then SIGKILL to the init, which takes its whole namespace down.

Nothing here uses asyncio: the monitor is a plain ``selectors`` loop, small enough to follow
line by line, and it never returns into the launcher's code (the launcher ``os._exit``s).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import selectors
import shutil
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.model import JobState, Stream
from workernator_runner import linux, network, rootfs, sandbox, store
from workernator_runner.jobs import Job, Network

PARTIAL_LINE_FLUSH_SECONDS = 0.05  # a line without its newline yet is written after this long
DRAIN_SECONDS = 2.0  # after the job ended, how long to wait for pipes still held open
READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Host:
    """What the launcher fixed at startup, the same for every job."""

    jobs_dir: Path
    workspaces_dir: Path
    uid: int
    gid: int
    user: str
    tmp_size_mb: int
    template: str  # the prepared root, in the launcher's mount namespace
    seccomp_filter: bytes
    egress: network.Egress | None


@dataclass(frozen=True)
class Launch:
    """One job to start, from a checked launch message."""

    job_id: str
    job: Job
    args: Mapping[str, Any]
    grace_seconds: float
    address: ipaddress.IPv4Interface | None  # egress jobs only


Report = Callable[[bool, str], None]  # (started, error) to the runner


def run(host: Host, launch: Launch, report: Report) -> int:
    """The monitor's life, from the fork in the launcher to the job's recorded end."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    job_dir = host.jobs_dir / launch.job_id
    output_fd = os.open(job_dir / store.OUTPUT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    # Signals reach the loop through a pipe; the handler itself does nothing.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    workspace = host.workspaces_dir / launch.job_id
    job = _Job(host, launch, workspace)
    try:
        job.start()
    except BaseException as exc:
        job.abandon()
        report(False, str(exc) or repr(exc))
        return 1

    state = store.StateFile(
        state=JobState.RUNNING,
        monitor_pid=os.getpid(),
        monitor_start=linux.process_start_time(os.getpid()),
        job_pid=job.init_pid,
        job_start=linux.process_start_time(job.init_pid),  # unreaped: /proc/<pid> is there
        boot_id=linux.boot_id(),
        started_ns=time.time_ns(),
    )
    store.write_state(job_dir, state, durable=False)  # lost with the machine anyway
    report(True, "")

    pump = _Pump(output_fd)
    wait_status, rusage = job.supervise(wake_r, pump, state)
    pump.flush_all()
    job.cleanup()
    _finish(state, wait_status, rusage, pump.write_error)
    store.write_state(job_dir, state)
    return 0


class _Job:
    """The monitor's side of one sandboxed job."""

    def __init__(self, host: Host, launch: Launch, workspace: Path) -> None:
        self.host = host
        self.launch = launch
        self.workspace = workspace
        self.init_pid = 0
        self.pidfd = -1
        self.out_r = self.err_r = -1
        self.channel: socket.socket | None = None
        self.veth = False

    def start(self) -> None:
        """Fork the init, wait until the job runs in its sandbox; raises with the reason."""
        host, launch = self.host, self.launch
        egress = host.egress if launch.job.network is Network.EGRESS else None
        if launch.job.network is Network.EGRESS and (egress is None or launch.address is None):
            raise OSError("egress networking is not available")
        os.mkdir(self.workspace, 0o700)
        os.chown(self.workspace, host.uid, host.gid)
        box = sandbox.Sandbox(
            job_id=launch.job_id,
            uid=host.uid,
            gid=host.gid,
            root=rootfs.JobRoot(
                template=host.template,
                workspace=str(self.workspace),
                tmp_size_mb=host.tmp_size_mb,
                etc=rootfs.etc_files(
                    launch.job_id,
                    host.uid,
                    host.gid,
                    host.user,
                    egress.resolv_conf if egress is not None else None,
                ),
                egress_files=rootfs.EGRESS_FILES if egress is not None else (),
            ),
            seccomp_filter=host.seccomp_filter,
            address=launch.address if egress is not None else None,
            gateway=egress.gateway.ip if egress is not None else None,
        )
        self.out_r, out_w = os.pipe2(os.O_CLOEXEC)
        self.err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel = ours
        linux.unshare(linux.CLONE_NEWPID)  # for the children only: the next one is PID 1
        pid = os.fork()
        if pid == 0:
            ours.close()
            sandbox.init(box, launch.job, launch.args, out_w, err_w, theirs)
        os.close(out_w)
        os.close(err_w)
        theirs.close()
        self.init_pid = pid
        self.pidfd = os.pidfd_open(pid)
        while True:
            message = ours.recv(4096)
            if message == sandbox.MSG_UNSHARED and egress is not None and not self.veth:
                network.attach(egress, launch.job_id, pid)
                self.veth = True
                ours.send(sandbox.MSG_GO)
            elif message == sandbox.MSG_RUNNING:
                return
            elif message.startswith(sandbox.MSG_ERROR):
                raise OSError(message[1:].decode(errors="replace"))
            elif not message:
                _, status = os.waitpid(pid, 0)
                self.init_pid = 0
                raise OSError(f"the job's init ended during setup ({_describe_status(status)})")
            else:
                raise OSError(f"unexpected message from the job's init: {message[:20]!r}")

    def abandon(self) -> None:
        """After a failed start: kill the init (its namespace dies with it) and clean up."""
        if self.init_pid:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.init_pid, 0)
        self.cleanup()

    def cleanup(self) -> None:
        """Remove what the job had on the host: its veth and its workspace."""
        if self.veth and self.host.egress is not None:
            with contextlib.suppress(OSError):
                network.detach(self.host.egress, self.launch.job_id)
            self.veth = False
        if self.workspace.exists():
            shutil.rmtree(self.workspace, ignore_errors=True)  # fd-based: no symlink is followed

    def supervise(self, wake_r: int, pump: _Pump, state: store.StateFile) -> tuple[int, Any]:
        """Pump output until the job ended and its pipes closed; returns (wait status, rusage)
        of the job's main process (the rusage covers every process the job had)."""
        assert self.channel is not None
        sel = selectors.DefaultSelector()
        sel.register(self.out_r, selectors.EVENT_READ, Stream.STDOUT)
        sel.register(self.err_r, selectors.EVENT_READ, Stream.STDERR)
        sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        open_pipes = 2
        result: tuple[int, Any] | None = None
        kill_at: float | None = None
        drain_until: float | None = None
        while open_pipes or result is None:
            deadlines = [d for d in (pump.next_deadline(), kill_at, drain_until) if d is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, _ in sel.select(timeout):
                what = key.data
                if isinstance(what, Stream):
                    data = os.read(key.fd, READ_SIZE)
                    if data:
                        pump.feed(what, data)
                    else:
                        sel.unregister(key.fd)
                        os.close(key.fd)
                        pump.flush(what)
                        open_pipes -= 1
                elif what == "exit":
                    # The init is gone, and with it every process of the job.
                    _, init_status, rusage = os.wait4(self.init_pid, 0)
                    result = (self._job_status(init_status), rusage)
                    sel.unregister(self.pidfd)
                    os.close(self.pidfd)
                    kill_at = None
                    drain_until = time.monotonic() + DRAIN_SECONDS
                elif what == "signal":
                    signals = os.read(wake_r, 64)
                    if signal.SIGTERM in signals and result is None and not state.stop_requested:
                        state.stop_requested = True
                        self._signal_init(signal.SIGTERM)  # the init forwards it to the job
                        kill_at = time.monotonic() + self.launch.grace_seconds
            now = time.monotonic()
            pump.flush_due(now)
            if kill_at is not None and now >= kill_at:
                self._signal_init(signal.SIGKILL)
                kill_at = None
            if drain_until is not None and now >= drain_until:
                break  # something outside the job holds the pipes; stop waiting
        sel.close()
        assert result is not None
        return result

    def _signal_init(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, sig)

    def _job_status(self, init_status: int) -> int:
        """The wait status of the job's main process, as the init reported it; the init's own
        when it could not report (it was killed: then so was the job)."""
        assert self.channel is not None
        self.channel.setblocking(False)
        try:
            message = self.channel.recv(64)
        except BlockingIOError:
            message = b""
        if message.startswith(sandbox.MSG_STATUS) and len(message) == 1 + sandbox.STATUS.size:
            status: int = sandbox.STATUS.unpack(message[1:])[0]
            return status
        return init_status


class _Pump:
    """Turns pipe reads into output records that end on line boundaries."""

    def __init__(self, output_fd: int) -> None:
        self.fd = output_fd
        self.pending = {Stream.STDOUT: bytearray(), Stream.STDERR: bytearray()}
        self.deadline: dict[Stream, float | None] = {Stream.STDOUT: None, Stream.STDERR: None}
        self.write_error = ""

    def feed(self, stream: Stream, data: bytes) -> None:
        buf = self.pending[stream]
        buf += data
        while len(buf) >= store.MAX_RECORD_DATA:  # a very long line goes out in pieces
            cut = buf.rfind(b"\n", 0, store.MAX_RECORD_DATA) + 1 or store.MAX_RECORD_DATA
            self._write(stream, bytes(buf[:cut]))
            del buf[:cut]
        cut = buf.rfind(b"\n") + 1
        if cut:
            self._write(stream, bytes(buf[:cut]))
            del buf[:cut]
        if not buf:
            self.deadline[stream] = None
        elif self.deadline[stream] is None:
            self.deadline[stream] = time.monotonic() + PARTIAL_LINE_FLUSH_SECONDS

    def flush_due(self, now: float) -> None:
        for stream, deadline in self.deadline.items():
            if deadline is not None and deadline <= now:
                self.flush(stream)

    def flush(self, stream: Stream) -> None:
        buf = self.pending[stream]
        if buf:
            self._write(stream, bytes(buf))
            buf.clear()
        self.deadline[stream] = None

    def flush_all(self) -> None:
        for stream in Stream:
            self.flush(stream)

    def next_deadline(self) -> float | None:
        deadlines = [d for d in self.deadline.values() if d is not None]
        return min(deadlines) if deadlines else None

    def _write(self, stream: Stream, data: bytes) -> None:
        record = store.encode_record(time.time_ns(), stream, data)
        try:
            written = os.write(self.fd, record)
            if written != len(record):  # only on a full disk; the record is unusable
                raise OSError(f"short write ({written} of {len(record)} bytes)")
        except OSError as exc:
            self.write_error = self.write_error or f"output could not be saved: {exc}"


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _finish(state: store.StateFile, wait_status: int, rusage: Any, write_error: str) -> None:
    state.ended_ns = time.time_ns()
    state.usage = {
        "cpu_ns": int((rusage.ru_utime + rusage.ru_stime) * 1e9),
        "peak_memory_bytes": rusage.ru_maxrss * 1024,
        "read_bytes": rusage.ru_inblock * 512,
        "written_bytes": rusage.ru_oublock * 512,
    }
    if os.WIFSIGNALED(wait_status):
        state.signal = os.WTERMSIG(wait_status)
        detail = f"killed by signal {state.signal} ({signal.Signals(state.signal).name})"
    else:
        state.exit_code = os.WEXITSTATUS(wait_status)
        detail = f"exited with status {state.exit_code}"
    if state.stop_requested:
        state.state = JobState.STOPPED
        state.error = f"stopped by request; {detail}"
    elif state.exit_code == 0:
        state.state = JobState.COMPLETED
    else:
        state.state = JobState.FAILED
        state.error = detail
    if write_error:
        state.error = f"{state.error}; {write_error}" if state.error else write_error
