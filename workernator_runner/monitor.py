"""The job monitor (design sections 2, 5 and 6): one per job, forked by the launcher.

A monitor starts as a *spare*: forked by the launcher before any job exists, it starts its own
session (it outlives the runner and the launcher), unshares the PID namespace for its
children and forks the sandbox's init (:mod:`workernator_runner.sandbox`), which prepares the
namespaces, the root and the job process. Then it waits on the jobs socket shared by all
spares; the one that receives a launch message becomes that job's monitor (and tells the
launcher, which forks the next spare). So a start costs no fork and no namespace.

As the job's monitor it checks the launch message, makes the job's workspace (and, for egress
jobs, its veth), hands the job to the init, and once the job runs records it in ``state.json``
and tells the runner. Then it owns the read ends of the job's stdout and stderr pipes: it
appends output to the job's ``output`` file as it arrives and records the job's end. A SIGTERM
means "stop the job": SIGTERM to the init (which forwards it to the job), the grace period,
then SIGKILL to the init, which takes its whole namespace down.

Nothing here uses asyncio: the monitor is a plain ``selectors`` loop, small enough to follow
line by line, and it never returns into the launcher's code (the launcher ``os._exit``s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import selectors
import shutil
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared import ids
from shared.model import MAX_FAILURE_REASON, JobState, ResourceLimits, Stream
from shared.text import failure_reason
from shared.units import format_size
from workernator_runner import cgroups, files, linux, network, sandbox, store
from workernator_runner import launch as wire
from workernator_runner.jobs import Job, Network

PARTIAL_LINE_FLUSH_SECONDS = 0.05  # a line without its newline yet is written after this long
DRAIN_SECONDS = 2.0  # after the job ended, how long to wait for pipes still held open
READ_SIZE = 64 * 1024
SPARE_NICENESS = 19
SPARE_PREFIX = ".spare-"  # the workspace of a spare sandbox: .spare-<monitor pid>
PID = struct.Struct("=i")
# To the launcher, on a SOCK_SEQPACKET socketpair: kind, the spare's pid, then data.
PREPARED = b"P"  # the sandbox is ready for a job
TOOK = b"T"  # + job id: the spare took that job
FAILED = b"F"  # + text: the sandbox could not be prepared


@dataclass(frozen=True)
class Host:
    """What the launcher fixed at startup, the same for every job."""

    jobs_dir: Path
    workspaces_dir: Path
    sandbox: sandbox.Sandbox
    egress: network.Egress | None
    cgroups: cgroups.Layout
    default_limits: ResourceLimits  # set on a spare's cgroup: most jobs need no write
    max_output_bytes: int = 0  # a job whose output reaches this is stopped (0 = no cap)


class StartFailed(Exception):
    """The job could not start; the message says why (it goes to the user)."""


def spare(host: Host, jobs: socket.socket, notify: socket.socket) -> int:
    """A monitor's life: a prepared sandbox, then one job until its recorded end."""
    os.setsid()
    # Nothing of the runner's: its stderr is, under systemd, a journal stream of that one
    # invocation, which a monitor would keep open (and log under) long after a restart. What
    # a monitor has to say goes to the launcher (a spare's failure) or into the job's state.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    # Preparing spares must not slow down jobs that start meanwhile: at the lowest priority
    # until this sandbox is prepared (the monitor, its init and job process go back to 0 then).
    os.setpriority(os.PRIO_PROCESS, 0, SPARE_NICENESS)
    job = _Job(host)
    pid = PID.pack(os.getpid())
    try:
        job.prepare()
    except BaseException as exc:
        job.abandon()
        with contextlib.suppress(OSError):  # the launcher is gone
            notify.send(FAILED + pid + str(exc).encode()[:4000])
        return 3
    _rehearse(host)
    # Prepared: back to the normal priority while it waits (it uses no CPU then), so that the
    # wake-up of a start is not queued behind every busy process of the host. (The init did the
    # same for itself and the job process.)
    os.setpriority(os.PRIO_PROCESS, 0, 0)
    try:
        notify.send(PREPARED + pid)
    except OSError:  # the launcher is gone: nobody will send a job
        job.abandon()
        return 0

    # Signals reach the loop through a pipe; the handler itself does nothing.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # A file size limit (RLIMIT_FSIZE) makes a write fail with EFBIG instead of killing this:
    # the job's end is still recorded. (Set after the init was forked: it has the default.)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    message = _receive(jobs)
    if message is None:  # the runner is gone: this spare is not needed
        job.abandon()
        return 0
    with contextlib.suppress(BlockingIOError):  # a signal to the spare is not a stop of the job
        os.read(wake_r, 256)
    try:
        header, args_start = wire.decode_launch_header(memoryview(message))
    except wire.MessageError as exc:
        _reply(jobs, wire.START_FAILED, "", str(exc))
        job.abandon()
        return 1
    job_id = header.job_id
    state = store.StateFile(
        state=JobState.RUNNING,
        monitor_pid=os.getpid(),
        monitor_start=job.monitor_start,
        job_pid=job.init_pid,
        job_start=job.init_start,
        boot_id=linux.boot_id(),
        cgroup=job.cgroup.name,
    )
    recorded = False

    def output_lost(problem: str) -> None:
        """Say so while the job runs (if there is room for that: the end has its own)."""
        with contextlib.suppress(OSError):
            store.write_state_at(dir_fd, dataclasses.replace(state, error=problem), durable=False)

    try:
        job.hand_over(header, message[args_start:])  # the init goes on with its part...
        # ...while this takes care of the rest (the runner reads state.json once told).
        job.take_workspace()
        # Every file of the job is named relative to this (made by the runner, checked here).
        dir_fd = os.open(host.jobs_dir / job_id, files.DIR_FLAGS)
        output_fd = os.open(
            store.OUTPUT_FILE,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
            dir_fd=dir_fd,
        )
        state.started_ns = time.time_ns()
        try:  # not synced: lost with the machine anyway
            store.write_state_at(dir_fd, state, durable=False, exclusive=True)
        except FileExistsError:  # a restarted runner recorded this job as failed meanwhile
            raise StartFailed("the runner gave this job up while it was starting") from None
        recorded = True
        # Room for the last state, taken while the init finishes the job's setup.
        last_write = store.reserve(dir_fd, store.STATE_FILE)  # the end is recorded on a full disk
        pump = _Pump(output_fd, output_lost, host.max_output_bytes)
        job.wait_running()
        # What the job printed already (it went on before the init said so) is saved before
        # the runner hears of the start: its first read finds it, without waiting for more.
        job.pump_available(pump)
    except BaseException as exc:
        job.abandon()
        text = str(exc) if isinstance(exc, StartFailed | OSError) else repr(exc)
        if recorded:  # recorded as running: record the truth
            state.state, state.error = JobState.FAILED, f"could not start: {text}"
            with contextlib.suppress(OSError):
                store.write_state_at(dir_fd, state)
        _reply(jobs, wire.START_FAILED, job_id, text)
        _tell(notify, TOOK + pid + job_id.encode())
        return 1
    del message
    _reply(jobs, wire.STARTED, job_id, "")
    _tell(notify, TOOK + pid + job_id.encode())  # now the launcher may fork the next spare
    wait_status = job.supervise(wake_r, pump, state, header.grace_seconds)
    pump.flush_all()
    usage = job.finish()
    job.cleanup()
    _finish(state, wait_status, usage, pump.write_error, header.limits, job.output_stopped)
    if state.state is JobState.FAILED:
        state.failure_reason = failure_reason(pump.stderr_line.result())
    if pump.capped:  # not the user's stop, nor the job's own failure: say what it was
        state.state = JobState.FAILED
        state.error = pump.cap_text + (f"; {state.error}" if state.error else "")
        state.failure_reason = failure_reason(pump.cap_text.encode())
    store.sync_file(dir_fd, store.JOB_FILE)  # written quickly at the start; now for keeps
    store.write_state_at(dir_fd, state, reserve=last_write)
    return 0


def _rehearse(host: Host) -> None:
    """Run the start path's pure code once on a made-up job, while this is a spare at the
    lowest priority. A fresh fork pays for its first write to each page it shares with the
    launcher (copy-on-write, and Python writes reference counts everywhere): this takes most
    of that off a real start. Nothing here has an effect outside this process."""
    job_id = "A" * ids.LENGTH
    message = wire.encode_launch(wire.LaunchHeader(job_id, "noop", 1.0, ""), {})
    header, start = wire.decode_launch_header(memoryview(message))
    sandbox.JobSetup(job_id, header.job_type, message[start:]).encode()
    store.state_json(store.StateFile(started_ns=time.time_ns()))
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        pump = _Pump(null, lambda problem: None)
        pump.feed(Stream.STDOUT, b"[JOB] rehearsal\n")
        pump.flush_all()
    finally:
        os.close(null)


def _receive(jobs: socket.socket) -> bytes | None:
    """One launch message from the runner, or None when the runner has gone away."""
    while True:
        try:
            message, _, flags, _ = jobs.recvmsg(wire.MAX_MESSAGE)
        except InterruptedError:
            continue
        if not message:
            return None
        if flags & socket.MSG_TRUNC:
            _reply(jobs, wire.START_FAILED, "", "launch message too large")
            continue
        return message


def _tell(notify: socket.socket, message: bytes) -> None:
    with contextlib.suppress(OSError):  # the launcher is gone; the job still runs
        notify.send(message)
    notify.close()


def _reply(jobs: socket.socket, kind: bytes, job_id: str, text: str) -> None:
    """Tell the runner how the start went; this monitor keeps nothing of the jobs socket."""
    with contextlib.suppress(OSError):
        jobs.send(kind + job_id.encode() + text.encode()[:8000])
    if job_id:
        jobs.close()


class _Job:
    """The monitor's side of one sandbox, and then of its job."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.job_id = ""
        self.init_pid = 0
        self.init_start = self.monitor_start = 0
        self.cgroup = host.cgroups.job(f"{cgroups.NAME_PREFIX}{os.getpid()}")
        self.cgroup_made = False
        self.pidfd = -1
        self.out_r = self.err_r = -1
        self.channel: socket.socket | None = None
        self.selector = selectors.DefaultSelector()  # the output pipes and the init's end
        self.workspace: Path | None = None
        self.veth = False
        self.output_stopped = False  # stopped by its monitor: its output could not be saved

    def prepare(self) -> None:
        """Make the sandbox's workspace, fork the init and wait until the sandbox is
        prepared. The workspace takes the job's id when there is a job."""
        host = self.host
        name = f"{SPARE_PREFIX}{os.getpid()}"
        self.workspace = host.workspaces_dir / name
        files.make_dir(host.workspaces_dir, name, 0o700, host.sandbox.uid, host.sandbox.gid)
        self.cgroup.create()
        self.cgroup_made = True
        self.cgroup.set_limits(host.default_limits)
        self.out_r, out_w = os.pipe2(os.O_CLOEXEC)
        self.err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel = ours
        linux.unshare(linux.CLONE_NEWPID)  # for the children only: the next one is PID 1
        pid = os.fork()
        if pid == 0:
            ours.close()
            procs = self.cgroup.procs_files()
            sandbox.init(host.sandbox, str(self.workspace), procs, out_w, err_w, theirs)
        os.close(out_w)
        os.close(err_w)
        theirs.close()
        self.init_pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.selector.register(self.out_r, selectors.EVENT_READ, Stream.STDOUT)
        self.selector.register(self.err_r, selectors.EVENT_READ, Stream.STDERR)
        self.selector.register(self.pidfd, selectors.EVENT_READ, "exit")
        self._expect(sandbox.MSG_PREPARED)
        # What names these processes (with the boot id) in state.json: known before the job.
        self.monitor_start = linux.process_start_time(os.getpid())
        self.init_start = linux.process_start_time(pid)

    def _expect(self, kind: bytes) -> None:
        assert self.channel is not None
        message = self.channel.recv(4096)
        if message == kind:
            return
        if message.startswith(sandbox.MSG_ERROR):
            raise StartFailed(message[1:].decode(errors="replace"))
        if not message:
            _, status = os.waitpid(self.init_pid, 0)
            self.init_pid = 0
            raise StartFailed(f"the job's init ended during setup ({_describe_status(status)})")
        raise StartFailed(f"unexpected message from the job's init: {message[:20]!r}")

    def hand_over(self, header: wire.LaunchHeader, args_data: bytes) -> None:
        """Check the job's type and network, give an egress job its veth, and hand the job to
        the init, which checks the arguments and starts it; raises StartFailed or OSError."""
        host = self.host
        self.job_id = header.job_id
        job: Job | None = host.sandbox.registry.get(header.job_type)
        if job is None:
            raise StartFailed(f"unknown job type {header.job_type!r}")
        egress = job.network is Network.EGRESS
        if egress and host.egress is None:
            raise StartFailed("egress networking is not available in this runner")
        if egress != bool(header.address):
            raise StartFailed("the job's address does not fit its network mode")
        try:  # before the job process may go on; only what differs from the defaults
            self.cgroup.set_limits(header.limits, current=host.default_limits)
        except cgroups.CgroupError as exc:
            raise StartFailed(str(exc)) from None
        gateway = ""
        if host.egress is not None and egress:
            network.attach(host.egress, header.job_id, self.init_pid)
            self.veth = True
            gateway = str(host.egress.gateway.ip)
        setup = sandbox.JobSetup(
            header.job_id, header.job_type, bytes(args_data), header.address, gateway
        )
        assert self.channel is not None
        self.channel.send(setup.encode())

    def take_workspace(self) -> None:
        """The spare's workspace becomes the job's (the mount in the sandbox follows it)."""
        assert self.workspace is not None
        workspace = self.host.workspaces_dir / self.job_id
        os.rename(self.workspace, workspace)
        self.workspace = workspace

    def wait_running(self) -> None:
        """Return once the init says the job runs; raises StartFailed with the reason."""
        self._expect(sandbox.MSG_RUNNING)

    def abandon(self) -> None:
        """After a failed start (or an unused spare): kill the init (its namespace dies with
        it) and clean up."""
        if self.init_pid:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.init_pid, 0)
        self.cleanup()

    def finish(self) -> cgroups.Usage:
        """Once the init is gone: what the cgroup counted, once it is empty (it is by now:
        the init's end took every process of the namespace with it)."""
        if not self.cgroup.wait_empty(5.0):
            self.cgroup.kill()
            self.cgroup.wait_empty(5.0)
        return self.cgroup.usage()

    def cleanup(self) -> None:
        """Remove what the job had on the host: its cgroup, veth and workspace."""
        if self.cgroup_made:
            with contextlib.suppress(OSError):
                self.cgroup.kill()
                self.cgroup.wait_empty(5.0)
            with contextlib.suppress(OSError):
                self.cgroup.remove()
            self.cgroup_made = False
        if self.veth and self.host.egress is not None:
            with contextlib.suppress(OSError):
                network.detach(self.host.egress, self.job_id)
            self.veth = False
        if self.workspace is not None and self.workspace.exists():
            shutil.rmtree(self.workspace, ignore_errors=True)  # fd-based: follows no symlink

    def pump_available(self, pump: _Pump) -> None:
        """Feed ``pump`` what the job's pipes hold now, without waiting (an end of a pipe is
        left for :meth:`supervise`, which sees it again)."""
        for key, _ in self.selector.select(0):
            if isinstance(key.data, Stream):
                data = os.read(key.fd, READ_SIZE)
                if data:
                    pump.feed(key.data, data)

    def supervise(
        self, wake_r: int, pump: _Pump, state: store.StateFile, grace_seconds: float
    ) -> int:
        """Pump output until the job ended and its pipes closed; returns the wait status of the
        job's main process."""
        assert self.channel is not None
        sel = self.selector
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        open_pipes = 2
        result: int | None = None
        kill_at: float | None = None
        drain_until: float | None = None
        capped = False
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
                    _, init_status = os.waitpid(self.init_pid, 0)
                    result = self._job_status(init_status)
                    sel.unregister(self.pidfd)
                    os.close(self.pidfd)
                    kill_at = None
                    drain_until = time.monotonic() + DRAIN_SECONDS
                elif what == "signal":
                    signals = os.read(wake_r, 64)
                    if signal.SIGTERM in signals and result is None and not state.stop_requested:
                        state.stop_requested = True
                        self._signal_init(signal.SIGTERM)  # the init forwards it to the job
                        kill_at = time.monotonic() + grace_seconds
            now = time.monotonic()
            pump.flush_due(now)
            if pump.capped and not capped and result is None:  # stopped, as by a user
                capped = True
                self._signal_init(signal.SIGTERM)
                kill_at = kill_at or now + grace_seconds
            if pump.write_error and result is None and kill_at is None:
                # Its output can no longer be kept: stop it rather than let it run on unheard.
                self.output_stopped = True
                self._signal_init(signal.SIGTERM)
                kill_at = now + grace_seconds
            if kill_at is not None and now >= kill_at:
                self._signal_init(signal.SIGKILL)  # its namespace goes with it...
                with contextlib.suppress(OSError):
                    self.cgroup.kill()  # ...and everything in its cgroup
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

    def __init__(
        self, output_fd: int, on_failure: Callable[[str], None], max_bytes: int = 0
    ) -> None:
        self.fd = output_fd
        self.max_bytes = max_bytes  # 0: no cap
        self.capped = False  # the cap was reached: the job is to be stopped
        self.cap_text = (
            f"its output reached the limit of {format_size(max_bytes)} (max_job_output); "
            "it was stopped and the rest of its output dropped"
        )
        self.end = os.fstat(output_fd).st_size  # where the last whole record ends
        self.on_failure = on_failure
        self.pending = {Stream.STDOUT: bytearray(), Stream.STDERR: bytearray()}
        self.deadline: dict[Stream, float | None] = {Stream.STDOUT: None, Stream.STDERR: None}
        self.write_error = ""
        self.stderr_line = _LastLine()

    def feed(self, stream: Stream, data: bytes) -> None:
        if stream is Stream.STDERR:
            self.stderr_line.feed(data)
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
        """Append one record whole. When it cannot be (a full disk, a file size limit), cut
        the file back to the last whole record and save no more: a reader must never meet half
        a record, nor records after a gap. The record that would pass the cap is replaced by
        a last one on stderr that says so, and nothing more is saved."""
        if self.write_error or self.capped:
            return
        record = store.encode_record(time.time_ns(), stream, data)
        if self.max_bytes and self.end + len(record) > self.max_bytes:
            self.capped = True
            note = f"[workernator] {self.cap_text}\n".encode()
            record = store.encode_record(time.time_ns(), Stream.STDERR, note)
        try:
            left = memoryview(record)
            while left:
                written = os.write(self.fd, left)
                if not written:
                    raise OSError(errno.EIO, "nothing written")
                left = left[written:]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.end)
            self.write_error = (
                f"output could not be saved after byte {self.end} "
                f"({exc.strerror or exc}); what the job printed after that is lost"
            )
            self.on_failure(self.write_error)
        else:
            self.end += len(record)


class _LastLine:
    """The last non-blank line of a stream, its first :data:`MAX_BYTES` bytes: a failed job's
    reason. Each read costs a few scans in C and memory stays bounded, whatever the job
    writes (one huge line, or nothing but newlines)."""

    MAX_BYTES = 4 * MAX_FAILURE_REASON  # enough for the most characters a reason shows

    def __init__(self) -> None:
        self.partial = b""  # the start of the line being written
        self.last = b""  # the last complete line that was not blank

    def feed(self, data: bytes) -> None:
        newline = data.rfind(b"\n")
        if newline < 0:
            self.partial = (self.partial + data[: self.MAX_BYTES])[: self.MAX_BYTES]
            return
        complete = data[:newline].rstrip()  # the lines this read ends, trailing blanks dropped
        start = complete.rfind(b"\n") + 1
        line = complete[start:] if start else self.partial + complete[: self.MAX_BYTES]
        if line.strip():
            self.last = line[: self.MAX_BYTES]
        self.partial = data[newline + 1 : newline + 1 + self.MAX_BYTES]

    def result(self) -> bytes:
        """The last line, the one still being written when it is not blank."""
        return self.partial if self.partial.strip() else self.last


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _finish(
    state: store.StateFile,
    wait_status: int,
    usage: cgroups.Usage,
    write_error: str,
    limits: ResourceLimits,
    output_stopped: bool = False,
) -> None:
    """Record how the job ended. A job whose output could not all be saved (a full disk, a file
    size limit) FAILED, whatever its exit status, with that reason first: its lines were lost."""
    state.ended_ns = time.time_ns()
    state.usage = {
        "cpu_ns": usage.cpu_ns,
        "peak_memory_bytes": usage.peak_memory_bytes,
        "read_bytes": usage.read_bytes,
        "written_bytes": usage.written_bytes,
    }
    state.oom_killed = usage.oom_killed
    if os.WIFSIGNALED(wait_status):
        state.signal = os.WTERMSIG(wait_status)
        detail = f"killed by signal {state.signal} ({signal.Signals(state.signal).name})"
    else:
        state.exit_code = os.WEXITSTATUS(wait_status)
        detail = f"exited with status {state.exit_code}"
    if usage.oom_killed:
        detail += f"; out of memory (its limit is {format_size(limits.memory_bytes)})"
    if state.stop_requested:
        state.state = JobState.STOPPED
        state.error = f"stopped by request; {detail}"
        if write_error:
            state.error += f"; {write_error}"
    elif write_error:
        state.state = JobState.FAILED
        stopped = "so its monitor stopped it; " if output_stopped else ""
        state.error = f"{write_error}; {stopped}{detail}"
    elif state.exit_code == 0 and not usage.oom_killed:
        state.state = JobState.COMPLETED
    else:
        state.state = JobState.FAILED
        state.error = detail
