"""The job manager: start, stop, status, list and read output (design sections 5 and 6).

It is a library: the daemon serves it over the Unix socket, and tests use it in-process.
State lives on disk (see :mod:`workernator_runner.store`); the manager keeps a cache of every
job's status, refreshed when the job's monitor rewrites ``state.json``. inotify tells it when a
job's files change, so readers and stop waiters wake on new data without polling, also for jobs
whose monitors an earlier runner process started.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import ids, log
from shared.errors import Internal, InvalidArgument, NotFound
from shared.model import JobState, JobStatus, OutputChunk
from workernator_runner import inotify, monitor, store
from workernator_runner.config import RunnerConfig
from workernator_runner.jobs import Registry, load_registry

START_TIMEOUT_SECONDS = 30.0
STOP_MARGIN_SECONDS = 10.0  # on top of the grace period, for the monitor to record the end
WATCH_MASK = inotify.IN_MODIFY | inotify.IN_MOVED_TO | inotify.IN_ONLYDIR
MAX_BATCH_BYTES = 256 * 1024


@dataclass
class _Job:
    request: store.JobRequest
    state: store.JobState_
    dir: Path
    wd: int | None = None  # inotify watch while the job runs
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status(self) -> JobStatus:
        return store.to_status(self.request, self.state)

    def notify(self) -> None:
        """Wake everybody waiting for a change, and arm a fresh event for the next waiters."""
        self.changed.set()
        self.changed = asyncio.Event()


class JobManager:
    def __init__(self, config: RunnerConfig, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else load_registry(config.job_modules)
        self._jobs: dict[str, _Job] = {}
        self._by_wd: dict[int, _Job] = {}
        self._children: dict[int, int] = {}  # pidfd -> pid of monitors this process forked
        self._inotify: inotify.Inotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Load every job on disk and re-adopt the running ones."""
        self._loop = asyncio.get_running_loop()
        self.config.jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._inotify = inotify.Inotify()
        self._loop.add_reader(self._inotify.fd, self._on_inotify)
        for job_dir in sorted(self.config.jobs_dir.iterdir()):
            if ids.is_job_id(job_dir.name):
                self._load(job_dir)

    async def close(self) -> None:
        """Stop serving. Running jobs go on: their monitors do not depend on this process."""
        if self._loop is not None:
            for pidfd in list(self._children):
                self._loop.remove_reader(pidfd)
                os.close(pidfd)
            self._children.clear()
            if self._inotify is not None:
                self._loop.remove_reader(self._inotify.fd)
                self._inotify.close()
                self._inotify = None

    async def __aenter__(self) -> JobManager:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _load(self, job_dir: Path) -> None:
        try:
            request = store.read_request(job_dir)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("skipping unreadable job", dir=str(job_dir), error=str(exc))
            return
        state = store.read_state(job_dir)
        if state is None:
            # The runner stopped while this job was starting: it never ran.
            state = store.JobState_(
                state=JobState.FAILED, error="the runner stopped while the job was starting"
            )
            store.write_state(job_dir, state)
        job = _Job(request, state, job_dir)
        self._jobs[request.id] = job
        if state.state is JobState.RUNNING:
            self._watch(job)
            if not _monitor_alive(state):
                self._lost(job)
            else:
                log.info("adopted running job", job=request.id, monitor=state.monitor_pid)

    def _lost(self, job: _Job) -> None:
        """The monitor is gone without recording the end (crash, reboot): end the job FAILED."""
        self._refresh(job)  # it may have recorded the end just before it exited
        if job.state.state.finished:
            return
        # Kill what is left of the job, but only if its pid still names the job's process: after
        # a reboot or a long time it may name anything.
        if _same_process(job.state.job_pid, job.state.job_start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.state.job_pid, signal.SIGKILL)
        job.state.state = JobState.FAILED
        job.state.ended_ns = job.state.ended_ns or time.time_ns()
        job.state.error = "the job's monitor ended unexpectedly; the job was lost"
        store.write_state(job.dir, job.state)
        self._refresh(job)
        log.error("job lost", job=job.request.id)

    # --- inotify ------------------------------------------------------------------------------

    def _watch(self, job: _Job) -> None:
        assert self._inotify is not None
        job.wd = self._inotify.add_watch(str(job.dir), WATCH_MASK)
        self._by_wd[job.wd] = job

    def _unwatch(self, job: _Job) -> None:
        if job.wd is not None and self._inotify is not None:
            self._by_wd.pop(job.wd, None)
            self._inotify.rm_watch(job.wd)
            job.wd = None

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        touched: dict[str, tuple[_Job, bool]] = {}
        for event in self._inotify.read():
            job = self._by_wd.get(event.wd)
            if job is None:
                continue
            state_changed = event.name == store.STATE_FILE and bool(
                event.mask & inotify.IN_MOVED_TO
            )
            previous = touched.get(job.request.id, (job, False))[1]
            touched[job.request.id] = (job, previous or state_changed)
        for job, state_changed in touched.values():
            if state_changed:
                self._refresh(job)
            job.notify()

    def _refresh(self, job: _Job) -> None:
        was_finished = job.state.state.finished
        state = store.read_state(job.dir)
        if state is not None:
            job.state = state
        if job.state.state.finished and not was_finished:
            self._unwatch(job)
            log.info(
                "job ended",
                job=job.request.id,
                state=job.state.state.value,
                exit_code=job.state.exit_code,
                signal=job.state.signal,
            )
        job.notify()

    # --- operations ---------------------------------------------------------------------------

    def _get(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id) if ids.is_job_id(job_id) else None
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    def status(self, job_id: str) -> JobStatus:
        return self._get(job_id).status

    def list(self, owner: str | None = None) -> list[JobStatus]:
        """Jobs in creation order, optionally only those of ``owner``."""
        jobs = sorted(self._jobs.values(), key=lambda j: (j.request.created_ns, j.request.id))
        return [j.status for j in jobs if owner is None or j.request.owner == owner]

    async def start(self, job_type: str, args: Mapping[str, Any], owner: str) -> JobStatus:
        """Start a job; returns once it runs, or raises with nothing left behind."""
        job_spec = self.registry.lookup(job_type)
        clean_args = job_spec.spec.validate(args)
        if not owner:
            raise InvalidArgument("owner must not be empty")
        job_id, job_dir = self._allocate()
        request = store.JobRequest(job_id, job_type, clean_args, owner, time.time_ns())
        job = _Job(request, store.JobState_(), job_dir)
        ready_r = -1
        try:
            store.write_request(job_dir, request)
            os.close(os.open(job_dir / store.OUTPUT_FILE, os.O_CREAT | os.O_EXCL, 0o600))
            self._watch(job)
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            launch = monitor.Launch(job_dir, job_spec, clean_args, self.config.stop_grace_seconds)
            try:
                pid = monitor.spawn(launch, ready_w)
            finally:
                os.close(ready_w)
            self._reap_later(pid)
            report = await asyncio.wait_for(_read_pipe(ready_r), START_TIMEOUT_SECONDS)
            ready_r = -1
            result = json.loads(report or b'{"ok": false, "error": "the monitor died"}')
            if not result.get("ok"):
                raise Internal(f"job could not start: {result.get('error', 'unknown error')}")
        except BaseException:
            if ready_r >= 0:
                os.close(ready_r)
            self._unwatch(job)
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        state = store.read_state(job_dir)
        assert state is not None  # the monitor writes it before it reports success
        job.state = state
        self._jobs[job_id] = job
        if state.state.finished:  # already over (a very short job): no need to watch
            self._unwatch(job)
        log.info("job started", job=job_id, type=job_type, owner=owner, pid=state.job_pid)
        return job.status

    def _allocate(self) -> tuple[str, Path]:
        for _ in range(100):
            job_id = ids.new_job_id()
            job_dir = self.config.jobs_dir / job_id
            try:
                job_dir.mkdir(mode=0o700)
            except FileExistsError:
                continue
            return job_id, job_dir
        raise Internal("could not allocate a job id")

    def _reap_later(self, pid: int) -> None:
        """Reap a monitor this process forked when it exits, without blocking the loop."""
        assert self._loop is not None
        pidfd = os.pidfd_open(pid)
        self._children[pidfd] = pid

        def reap() -> None:
            assert self._loop is not None
            self._loop.remove_reader(pidfd)
            os.close(pidfd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._children.pop(pidfd), 0)

        self._loop.add_reader(pidfd, reap)

    async def stop(self, job_id: str) -> JobStatus:
        """Stop a job and return once it is gone. Stopping a finished job is not an error."""
        job = self._get(job_id)
        if job.state.state.finished:
            return job.status
        if not _signal_monitor(job.state, signal.SIGTERM):
            self._lost(job)
            return job.status
        log.info("stopping job", job=job_id)
        deadline = time.monotonic() + self.config.stop_grace_seconds + STOP_MARGIN_SECONDS
        while not job.state.state.finished:
            changed = job.changed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Internal(f"job {job_id} did not end after it was stopped")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
            if not job.state.state.finished and not _monitor_alive(job.state):
                self._lost(job)
        return job.status

    async def read_output(
        self,
        job_id: str,
        *,
        follow: bool = True,
        from_: int | None = None,
        last: int | None = None,
    ) -> AsyncGenerator[OutputChunk, None]:
        """The job's output from the first byte (or ``from_``, or the ``last`` N lines).

        With ``follow``, waits for more until the job has ended and every byte was read.
        """
        async for batch in self.read_output_batches(job_id, follow=follow, from_=from_, last=last):
            for chunk in batch:
                yield chunk

    async def read_output_batches(
        self,
        job_id: str,
        *,
        follow: bool = True,
        from_: int | None = None,
        last: int | None = None,
        max_bytes: int = MAX_BATCH_BYTES,
    ) -> AsyncGenerator[builtins.list[OutputChunk], None]:
        """Like :meth:`read_output`, in batches of up to about ``max_bytes`` of data."""
        job = self._get(job_id)
        path = job.dir / store.OUTPUT_FILE
        if from_ is not None and last is not None:
            raise InvalidArgument("give either an offset or a number of last lines, not both")
        first: builtins.list[OutputChunk] = []
        if last is not None:
            first, start = _last_lines(path, last)
        else:
            start = from_ or 0
            if start > path.stat().st_size:
                raise InvalidArgument(f"offset {start} is past the end of the output")
        with store.RecordReader(path, start) as reader:
            batch: builtins.list[OutputChunk] = []
            for chunk in first:  # the last lines, in batches like the rest
                batch.append(chunk)
                if sum(len(c.data) for c in batch) >= max_bytes:
                    yield batch
                    batch = []
            if batch:
                yield batch
            while True:
                changed = job.changed  # before reading, so no change can slip in between
                finished = job.state.state.finished
                try:
                    while batch := reader.read_available(max_bytes):
                        yield batch
                except ValueError as exc:
                    raise InvalidArgument(f"cannot read output at offset {start}: {exc}") from None
                if finished or not follow:
                    return
                await changed.wait()


def _last_lines(path: Path, count: int) -> tuple[list[OutputChunk], int]:
    """The records holding the last ``count`` lines (the first one trimmed), and where to go on."""
    window: deque[tuple[OutputChunk, int]] = deque()
    lines_in_window = 0
    end = 0
    for chunk in store.iter_records(path):
        end = chunk.next_offset
        if count == 0:
            continue
        lines = chunk.data.count(b"\n") + (0 if chunk.data.endswith(b"\n") else 1)
        window.append((chunk, lines))
        lines_in_window += lines
        while window and lines_in_window - window[0][1] >= count:
            lines_in_window -= window.popleft()[1]
    chunks = [c for c, _ in window]
    if chunks and lines_in_window > count:
        head = chunks[0]
        keep = head.data.split(b"\n")  # a trailing "" after the final newline is not a line
        extra = lines_in_window - count
        data = b"\n".join(keep[extra:])
        chunks[0] = OutputChunk(head.offset, head.next_offset, head.timestamp_ns, head.stream, data)
    return chunks, end


async def _read_pipe(fd: int) -> bytes:
    """Read ``fd`` to EOF without blocking the loop, then close it."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    data = bytearray()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        if chunk:
            data.extend(chunk)
        elif not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return bytes(data)


def _same_process(pid: int, start_time: int) -> bool:
    """Is ``pid`` still the process that started at ``start_time``? False when unknown."""
    if not pid or not start_time:
        return False
    try:
        return monitor.process_start_time(pid) == start_time
    except (OSError, ValueError, IndexError):
        return False


def _monitor_alive(state: store.JobState_) -> bool:
    return bool(state.monitor_pid) and _same_process(state.monitor_pid, state.monitor_start)


def _signal_monitor(state: store.JobState_, sig: int) -> bool:
    """Signal the job's monitor, making sure the pid still names it; False if it is gone."""
    try:
        pidfd = os.pidfd_open(state.monitor_pid)
    except ProcessLookupError:
        return False
    try:
        # The pidfd names one process: if the pid was reused before pidfd_open, the start time
        # differs; if the process ends after this check, the signal fails instead of reaching
        # a newcomer.
        if not _same_process(state.monitor_pid, state.monitor_start):
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
