"""The job monitor and the job process (design sections 2, 5 and 6).

The runner forks one monitor per job. The monitor starts its own session (so it outlives the
runner), forks the job, and then owns the read ends of the job's stdout and stderr pipes: it
appends output to the job's ``output`` file as it arrives and records the job's end in
``state.json``. A SIGTERM to the monitor means "stop the job": it sends SIGTERM to the job's
process group, waits the grace period, then kills the group.

Nothing here uses asyncio: the monitor is a plain ``selectors`` loop, small enough to follow
line by line, and it never returns into the runner's code (it leaves with ``os._exit``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from shared.model import JobState, Stream
from workernator_runner import linux, store
from workernator_runner.jobs import Job, JobFailed

PARTIAL_LINE_FLUSH_SECONDS = 0.05  # a line without its newline yet is written after this long
DRAIN_SECONDS = 2.0  # after the job ended, how long to wait for pipes still held open
READ_SIZE = 64 * 1024
JOB_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/",
    "TMPDIR": "/tmp",  # noqa: S108 - the job's own /tmp once it has a private root
}


@dataclass(frozen=True)
class Launch:
    """Everything the monitor needs, handed over in memory across fork()."""

    job_dir: Path
    job: Job
    args: Mapping[str, Any]
    grace_seconds: float


def spawn(launch: Launch, ready_fd: int) -> int:
    """Fork the monitor; returns its pid. It reports start success or failure on ``ready_fd``."""
    pid = os.fork()
    if pid == 0:  # the monitor
        _forget_parent_objects()
        code = 70
        try:
            code = _monitor(launch, ready_fd)
        except BaseException as exc:  # never return into the runner's code
            _report(ready_fd, {"ok": False, "error": f"monitor failed: {exc!r}"})
        finally:
            os._exit(code)
    return pid


def _forget_parent_objects() -> None:
    """Never collect what the parent made: its objects' finalizers would act on descriptors
    this process has closed (or worse, reused), and collecting them would copy shared pages."""
    gc.freeze()


def _report(fd: int, message: dict[str, Any]) -> bool:
    """Tell the runner how the start went; False if it is no longer listening."""
    try:
        os.write(fd, json.dumps(message).encode())
        return True
    except OSError:  # EPIPE: the runner gave up on this start, or died
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _detach(keep: set[int]) -> None:
    """Forget the parent's signal setup and file descriptors, keeping 0-2 and ``keep``."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _monitor(launch: Launch, ready_fd: int) -> int:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    _detach({ready_fd})
    job_dir = launch.job_dir
    output_fd = os.open(job_dir / store.OUTPUT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    # Signals reach the loop through a pipe; the handler itself does nothing.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a closed ready pipe is an error, not death

    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    setup_r, setup_w = os.pipe2(os.O_CLOEXEC)
    monitor_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        _forget_parent_objects()
        _job_process(launch, monitor_pid, out_w, err_w, setup_w)
    for fd in (out_w, err_w, setup_w):
        os.close(fd)
    pidfd = os.pidfd_open(pid)

    # The job closes its end of the setup pipe when it is about to run, or writes why not.
    setup_error = _read_all(setup_r)
    if setup_error:
        os.waitpid(pid, 0)
        _report(ready_fd, {"ok": False, "error": setup_error.decode(errors="replace")})
        return 1

    state = store.StateFile(
        state=JobState.RUNNING,
        monitor_pid=monitor_pid,
        monitor_start=linux.process_start_time(monitor_pid),
        job_pid=pid,
        job_start=linux.process_start_time(pid),  # not reaped yet: /proc/<pid> is still there
        boot_id=linux.boot_id(),
        started_ns=time.time_ns(),
    )
    store.write_state(job_dir, state)
    if not _report(ready_fd, {"ok": True}):
        # Nobody will ever know this job started: end it, leave the cleanup to the runner.
        _killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return 1

    pump = _Pump(output_fd)
    wait_status, rusage = _supervise(pid, pidfd, out_r, err_r, wake_r, pump, launch, state)
    pump.flush_all()
    _finish(state, wait_status, rusage, pump.write_error)
    store.write_state(job_dir, state)
    return 0


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    os.close(fd)
    return data


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


def _supervise(
    pid: int,
    pidfd: int,
    out_r: int,
    err_r: int,
    wake_r: int,
    pump: _Pump,
    launch: Launch,
    state: store.StateFile,
) -> tuple[int, Any]:
    """Pump output until the job ended and its pipes closed; returns (wait status, rusage)."""
    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ, Stream.STDOUT)
    sel.register(err_r, selectors.EVENT_READ, Stream.STDERR)
    sel.register(pidfd, selectors.EVENT_READ, "exit")
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
                # The job's main process ended. Kill what is left of its process group while
                # the leader is a zombie (so the group id cannot be reused), then reap it.
                _killpg(pid, signal.SIGKILL)
                _, wait_status, rusage = os.wait4(pid, 0)
                result = (wait_status, rusage)
                sel.unregister(pidfd)
                os.close(pidfd)
                kill_at = None
                drain_until = time.monotonic() + DRAIN_SECONDS
            elif what == "signal":
                signals = os.read(wake_r, 64)
                if signal.SIGTERM in signals and result is None and not state.stop_requested:
                    state.stop_requested = True
                    _killpg(pid, signal.SIGTERM)
                    kill_at = time.monotonic() + launch.grace_seconds
        now = time.monotonic()
        pump.flush_due(now)
        if kill_at is not None and now >= kill_at:
            _killpg(pid, signal.SIGKILL)
            kill_at = None
        if drain_until is not None and now >= drain_until:
            break  # something outside the process group holds the pipes; stop waiting
    sel.close()
    assert result is not None
    return result


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


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


# --- the job process --------------------------------------------------------------------------


def _job_process(
    launch: Launch, monitor_pid: int, out_w: int, err_w: int, setup_w: int
) -> NoReturn:
    """Set up the job process, tell the monitor, run the job. Never returns."""
    try:
        # Die with the monitor: without it nobody could stop this job or read its output.
        # (Credential changes clear this: set it again after dropping privileges.)
        linux.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != monitor_pid:  # the monitor died before the line above
            os._exit(1)
        os.setsid()  # its own process group: stop signals the whole group
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        _detach({setup_w})
        os.environ.clear()
        os.environ.update(JOB_ENV)
        os.chdir("/")
        # Sandbox: namespaces, cgroup placement, mounts and dropping privileges go here,
        # before the job's code runs (design section 7).
        sys.stdout = open(  # noqa: SIM115 - lives until the process exits
            1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
        )
        sys.stderr = open(  # noqa: SIM115
            2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
        )
    except BaseException as exc:
        try:
            os.write(setup_w, f"job setup failed: {exc}".encode())
        finally:
            os._exit(127)
    os.close(setup_w)
    code = run_job(launch.job, launch.args)
    os._exit(code)


def run_job(job: Job, args: Mapping[str, Any]) -> int:
    """Run ``job`` with its framing lines; returns the exit status."""
    if job.framed:
        print(f"[JOB] Starting job '{job.spec.title}'", flush=True)
    try:
        job.run(args)
    except JobFailed as exc:
        print(f"[ERROR] {exc}", file=sys.stderr, flush=True)
        if job.framed:
            print("[JOB] Failed", flush=True)
        return 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        print(f"[ERROR] The job crashed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if job.framed:
            print("[JOB] Failed", flush=True)
        return 1
    if job.framed:
        print("[JOB] Complete", flush=True)
    sys.stdout.flush()
    return 0
