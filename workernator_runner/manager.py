"""The job manager: start, stop, status, list and read output (design sections 5 and 6).

It is a library: the daemon serves it over the Unix socket, and tests use it in-process.
State lives on disk (see :mod:`workernator_runner.store`); the manager keeps every running
job's status in memory, and of a job that has ended only a small record (id, times, owner,
output size: :class:`store.Ended`), also kept in ``<state_dir>/jobs.index`` so that a start
reads one file, not every job's; an ended job's status is read from its directory when asked
for. Two kernel notifications keep the running jobs' status true without polling:

- a pidfd per running job's monitor: when the monitor exits, the manager re-reads the job's
  state, and a job whose monitor died without recording its end is marked lost;
- inotify on each running job's directory: output appends wake readers, and a rewritten
  ``state.json`` refreshes the status as soon as the monitor records the end.

Both work for monitors that an earlier runner process started, so a restarted runner re-adopts
running jobs.

Finished jobs are kept by the retention policy (``[retention]`` in the config): at most so many,
for at most so long, with at most so much output in all. Beyond any bound the jobs that ended
first are deleted; running jobs never are. The policy is applied at start, whenever a job ends,
and by one timer set for when the oldest finished job expires (an idle runner never polls).

Jobs are not forked from here: :meth:`JobManager.open` starts the launcher (a fork server, see
:mod:`workernator_runner.launcher`) before it reads any job, and every start goes through it.
"""

from __future__ import annotations

import asyncio
import bisect
import builtins
import collections
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import ids, log
from shared.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from shared.model import JobState, JobStatus, JobUsage, OutputChunk, ResourceLimits
from shared.protocol import MAX_CHUNKS_PER_FRAME
from shared.units import format_size
from workernator_runner import cgroups, files, inotify, linux, network, store
from workernator_runner import launch as wire
from workernator_runner.config import RunnerConfig
from workernator_runner.jobs import Network, Registry, load_registry
from workernator_runner.launcher_client import Launcher

START_TIMEOUT_SECONDS = 30.0
NO_LIMITS = ResourceLimits()
STOP_MARGIN_SECONDS = 10.0  # on top of the grace period, for the monitor to record the end
WATCH_MASK = inotify.IN_MODIFY | inotify.IN_MOVED_TO | inotify.IN_ONLYDIR
MAX_BATCH_BYTES = 256 * 1024
# With a disk reserve set, starts are refused below this many free inodes too: a job's files
# take four or five, and the running ones' last states have theirs already (store.reserve).
MIN_FREE_INODES = 1000
ENDED_CACHE = 256  # ended jobs whose record and state are kept read (see _read_ended)
DELETING_PREFIX = ".deleting-"  # a job directory being removed: gone whole, even after a crash


@dataclass
class _Job:
    request: store.JobRequest
    state: store.StateFile
    dir: Path
    wd: int | None = None  # inotify watch on the directory while the job runs
    pidfd: int | None = None  # the monitor, while the job runs
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status(self) -> JobStatus:
        return store.to_status(self.request, self.state)

    def notify(self) -> None:
        """Wake everybody waiting for a change, and arm a fresh event for the next waiters."""
        self.changed.set()
        self.changed = asyncio.Event()


class JobManager:
    def __init__(
        self,
        config: RunnerConfig,
        registry: Registry | None = None,
        *,
        on_launcher_exit: Callable[[str], None] | None = None,
        use_freezer: bool = False,
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else load_registry(config.job_modules)
        self.egress: network.Egress | None = None
        self.egress_error = ""  # why egress jobs cannot start, when they cannot
        self._on_launcher_exit = on_launcher_exit
        self._use_freezer = use_freezer  # kill as on a v1-only host (tests of hybrid hosts)
        self.cgroups: cgroups.Layout | None = None
        self._launcher: Launcher | None = None
        self._jobs: dict[str, _Job] = {}  # running jobs (and, briefly, one that just ended)
        self._finished: dict[str, store.Ended] = {}  # in the order they ended: first goes first
        self._finished_bytes = 0  # their output in all
        self._order: builtins.list[tuple[int, str]] = []  # every job's (created_ns, id), sorted
        self._index_fd: int | None = None  # jobs/index, appended to as jobs end or go
        self._index_lines = 0
        self._loaded = False  # the policy applies once every job is known
        self._expiry: asyncio.TimerHandle | None = None  # when the oldest one expires
        self._removals: set[asyncio.Future[None]] = set()  # retention's, in worker threads
        self._ended_cache: collections.OrderedDict[str, _Job] = collections.OrderedDict()
        self._by_wd: dict[int, _Job] = {}
        self._addresses: dict[ipaddress.IPv4Interface, str] = {}  # of running egress jobs
        self._last_address: ipaddress.IPv4Interface | None = None  # the next is after it
        self._inotify: inotify.Inotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the launcher, then load every job on disk and re-adopt the running ones."""
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        uid, gid = cfg.job_ids()
        # Made, or checked that nobody but root could have changed them (files.UnsafePath).
        for path in (cfg.state_dir, cfg.jobs_dir, cfg.workspaces_dir, cfg.sandbox_dir):
            os.close(files.open_dir(path, 0o700))
        # Before the launcher, which gets the layout.
        self.cgroups = cgroups.detect(cfg.workspaces_dir, use_freezer=self._use_freezer)
        log.info(
            "runner starting",
            cgroups=self.cgroups.describe(),
            io_limits="on " + ",".join(self.cgroups.io_devices)
            if self.cgroups.io_devices
            else f"unavailable: {self.cgroups.io_problem}",
        )
        egress = self._egress_plan()
        init = wire.Init(
            runner_pid=os.getpid(),
            state_dir=str(cfg.state_dir),
            job_modules=cfg.job_modules,
            uid=uid,
            gid=gid,
            user=cfg.job_user,
            tmp_size_mb=cfg.tmp_size_mb,
            egress=None
            if egress is None
            else wire.EgressConfig(
                egress.bridge,
                str(egress.subnet),
                str(egress.resolver) if egress.resolver is not None else "",
                egress.resolv_conf,
            ),
            cgroups=self.cgroups,
            default_limits=cfg.limits.effective(NO_LIMITS),
            max_output_bytes=cfg.max_job_output,
        )
        # Before any job is read: the launcher must never have seen anyone's data.
        self._launcher = await Launcher.spawn(init, self._launcher_exited)
        if egress is not None and self._launcher.egress_error:
            self.egress_error = self._launcher.egress_error
            log.error("egress jobs cannot run", reason=self.egress_error)
        elif egress is not None:
            self.egress = egress
        self._inotify = inotify.Inotify()
        self._loop.add_reader(self._inotify.fd, self._on_inotify)
        self._load_all()
        self._remove_leftovers()
        self._apply_retention()

    def _load_all(self) -> None:
        """Every job: those the index names from it, the others (running, or ended while no
        runner ran) from their directories. Then the index is written anew from what is on
        disk, so nothing it said about a job directory that is gone survives."""
        jobs_dir = self.config.jobs_dir
        indexed = store.read_index(self.config.state_dir)
        for name in sorted(os.listdir(jobs_dir)):
            if not ids.is_job_id(name):
                continue
            entry = indexed.get(name)
            if entry is not None:
                self._finished[name] = entry
                self._finished_bytes += entry.output_bytes
            else:
                self._load(jobs_dir / name)
        ended = sorted(self._finished.values(), key=lambda e: (e.ended_ns, e.id))
        self._finished = {e.id: e for e in ended}
        self._ended_cache.clear()  # what an earlier open read: the files may have changed since
        self._order = sorted(
            [(e.created_ns, e.id) for e in ended]
            + [(j.request.created_ns, j.request.id) for j in self._jobs.values()]
        )
        try:
            store.write_index(self.config.state_dir, ended)
            self._index_fd = store.open_index(self.config.state_dir)
        except OSError as exc:  # a full disk, say: the next start reads every job instead
            self._index_failed(exc)
        self._index_lines = len(ended)
        self._loaded = True

    def _index_append(self, entry: store.Ended | str) -> None:
        """Add a line to the index; rewrite it whole when most of its lines are outdated."""
        if self._index_fd is None:
            return
        try:
            if self._index_lines > 2 * len(self._finished) + 1000:
                os.close(self._index_fd)
                self._index_fd = None
                store.write_index(self.config.state_dir, builtins.list(self._finished.values()))
                self._index_fd = store.open_index(self.config.state_dir)
                self._index_lines = len(self._finished)
            else:
                os.write(self._index_fd, store.index_line(entry))
                self._index_lines += 1
        except OSError as exc:
            self._index_failed(exc)

    def _index_failed(self, exc: OSError) -> None:
        """An index that missed a change must not be trusted: it goes (an unlink works on a
        full disk), and the next start reads every job's directory and writes it anew."""
        log.error("the job index cannot be written; it is removed", error=str(exc))
        if self._index_fd is not None:
            os.close(self._index_fd)
            self._index_fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.config.state_dir / store.INDEX_FILE)

    def _egress_plan(self) -> network.Egress | None:
        cfg = self.config
        if not cfg.egress_bridge:
            self.egress_error = "egress networking is disabled (egress_bridge is empty)"
            return None
        try:
            resolv_conf = cfg.resolv_conf.read_text()
        except OSError as exc:
            log.warning(
                "egress jobs get no name servers", resolv_conf=str(cfg.resolv_conf), error=str(exc)
            )
            resolv_conf = ""
        return network.plan(cfg.egress_bridge, cfg.egress_subnet, resolv_conf)

    def _launcher_exited(self, reason: str) -> None:
        log.error("the launcher exited; no job can start until the runner restarts", reason=reason)
        if self._on_launcher_exit is not None:
            self._on_launcher_exit(reason)

    def _remove_leftovers(self) -> None:
        """Remove what jobs that no longer run left behind (a crash, say): workspaces, veths."""
        running = {job_id for job_id, job in self._jobs.items() if not job.state.state.finished}
        for path in self.config.jobs_dir.iterdir():
            if path.name.startswith(DELETING_PREFIX):  # a deletion a crash interrupted
                shutil.rmtree(path, ignore_errors=True)
        for path in self.config.state_dir.iterdir():
            if path.name.startswith(f".{store.INDEX_FILE}.") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # an index rewrite a crash interrupted
        for path in self.config.workspaces_dir.iterdir():
            if ids.is_job_id(path.name) and path.name not in running:  # spares: the launcher's
                log.info("removing a leftover workspace", path=str(path))
                shutil.rmtree(path, ignore_errors=True)
        if self.egress is not None:
            for name in network.remove_leftovers(self.egress, running):
                log.info("removed a leftover veth", link=name)
        assert self.cgroups is not None
        kept = {job.state.cgroup for job in self._jobs.values() if not job.state.state.finished}
        for name in self.cgroups.names():
            pid = name.removeprefix(cgroups.NAME_PREFIX)
            if name not in kept and not (pid.isdigit() and os.path.exists(f"/proc/{pid}")):
                log.info("removing a leftover cgroup", cgroup=name)
                self._remove_cgroup(name, kill=True)

    def _remove_cgroup(self, name: str, *, kill: bool) -> None:
        """Kill what is left in a job's cgroup (a lost job's) and remove it; logs a failure."""
        if not name or self.cgroups is None:
            return
        try:
            cgroup = self.cgroups.job(name)
            if kill and cgroup.populated():  # (a half-removed one may lack the freezer)
                cgroup.kill()
                cgroup.wait_empty(5.0)
            cgroup.remove()
        except (OSError, ValueError) as exc:
            log.error("cannot remove a cgroup", cgroup=name, error=str(exc))

    async def close(self) -> None:
        """Stop serving. Running jobs go on: their monitors do not depend on this process."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._removals:  # what retention deleted is gone when this returns
            await asyncio.gather(*self._removals)
        if self._index_fd is not None:
            os.close(self._index_fd)
            self._index_fd = None
        for job in self._jobs.values():
            self._unwatch(job)
        if self._loop is not None and self._inotify is not None:
            self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
        if self._launcher is not None:
            await self._launcher.close()
            self._launcher = None

    async def __aenter__(self) -> JobManager:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _load(self, job_dir: Path) -> None:
        try:
            request = store.read_request(job_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("skipping unreadable job", dir=str(job_dir), error=str(exc))
            return
        job = _Job(request, store.StateFile(), job_dir)
        self._jobs[request.id] = job
        self._watch(job)  # before reading the state, so an end recorded meanwhile is seen
        try:
            state = store.read_state(job_dir)
        except ValueError as exc:  # replaced whole by every writer: corrupt, not half-written
            log.error("unreadable job state", job=request.id, error=str(exc))
            state = store.StateFile(
                state=JobState.FAILED, error=f"the job's state was unreadable: {exc}"
            )
            try:
                store.write_state(job_dir, state)
            except OSError as write_exc:  # it is served from memory until the next start
                log.error("job state not replaced", job=request.id, error=str(write_exc))
        if state is None:
            # The runner stopped while this job was starting.
            state = store.StateFile(
                state=JobState.FAILED, error="the job's state was lost while it was starting"
            )
            try:  # unless its monitor, which may still be starting it, recorded it meanwhile
                store.write_state(job_dir, state, exclusive=True)
            except FileExistsError:
                state = store.read_state(job_dir) or state
        job.state = state
        if state.state.finished:
            self._unwatch(job)
            self._ended(job, apply=False)  # the policy applies once all are read
            return
        self._hold_address(job)
        if self._watch_monitor(job):
            log.job("adopted running job", job.status, monitor=state.monitor_pid)

    # --- watching monitors and directories ----------------------------------------------------

    def _watch(self, job: _Job) -> None:
        assert self._inotify is not None
        job.wd = self._inotify.add_watch(str(job.dir), WATCH_MASK)
        self._by_wd[job.wd] = job

    def _unwatch(self, job: _Job) -> None:
        """Stop watching a finished job: no inotify watch, no pidfd, its address free."""
        if job.wd is not None and self._inotify is not None:
            self._by_wd.pop(job.wd, None)
            self._inotify.rm_watch(job.wd)
        job.wd = None
        self._close_pidfd(job)
        if job.request.address:
            address = ipaddress.IPv4Interface(job.request.address)
            if self._addresses.get(address) == job.request.id:
                del self._addresses[address]

    def _close_pidfd(self, job: _Job) -> None:
        if job.pidfd is not None and self._loop is not None:
            self._loop.remove_reader(job.pidfd)
            os.close(job.pidfd)
        job.pidfd = None

    def _watch_monitor(self, job: _Job) -> bool:
        """Learn when the job's monitor exits; False (and the job lost) if it already has."""
        assert self._loop is not None
        pid = job.state.monitor_pid
        try:
            pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, ValueError):
            pidfd = -1
        # The pidfd names one process: if the pid was reused before pidfd_open, the start time
        # differs. (The launcher reaps monitors, so even a fresh one may be gone already.)
        if pidfd < 0 or not linux.same_process(pid, job.state.monitor_start, job.state.boot_id):
            if pidfd >= 0:
                os.close(pidfd)
            self._lost(job)
            return False
        job.pidfd = pidfd

        def exited() -> None:
            self._close_pidfd(job)  # a pidfd stays readable: never leave it registered
            self._refresh(job)
            if not job.state.state.finished:
                self._lost(job)

        self._loop.add_reader(pidfd, exited)
        return True

    def _hold_address(self, job: _Job) -> None:
        if job.request.address:
            self._addresses[ipaddress.IPv4Interface(job.request.address)] = job.request.id

    def _allocate_address(self, job_id: str) -> ipaddress.IPv4Interface:
        assert self.egress is not None
        for address in self.egress.addresses(after=self._last_address):
            if address not in self._addresses:
                self._addresses[address] = job_id
                self._last_address = address
                return address
        raise FailedPrecondition(f"no free address in the egress subnet {self.egress.subnet}")

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        touched: dict[str, tuple[_Job, bool]] = {}
        for event in self._inotify.read():
            if event.mask & inotify.IN_Q_OVERFLOW:  # events were lost: look at everything
                for watched in list(self._by_wd.values()):
                    touched[watched.request.id] = (watched, True)
                continue
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
        """Re-read the job's state from disk and wake its waiters."""
        was_finished = job.state.state.finished
        try:
            state = store.read_state(job.dir)
        except (OSError, ValueError) as exc:  # keep what we knew; the monitor rewrites it whole
            log.error("unreadable job state", job=job.request.id, error=str(exc))
            state = None
        if state is not None:
            job.state = state
        if job.state.state.finished:
            self._unwatch(job)
        if job.state.state.finished and not was_finished and job.request.id in self._jobs:
            log.job("job ended", job.status)
        if job.state.state.finished:
            self._ended(job)
        job.notify()

    def _lost(self, job: _Job) -> None:
        """The monitor is gone without recording the end (crash, reboot): end the job FAILED."""
        self._refresh(job)  # it may have recorded the end just before it exited
        if job.state.state.finished:
            return
        _kill_job_init(job.state)
        self._remove_cgroup(job.state.cgroup, kill=True)
        shutil.rmtree(self.config.workspaces_dir / job.request.id, ignore_errors=True)
        if self.egress is not None and job.request.address:
            with contextlib.suppress(OSError):
                network.detach(self.egress, job.request.id)
        job.state.state = JobState.FAILED
        job.state.ended_ns = job.state.ended_ns or time.time_ns()
        job.state.error = "the job's monitor ended unexpectedly; the job was lost"
        log.job("job lost", job.status, logging.ERROR)
        try:  # its monitor, the only other writer, is gone: what it left half-made goes too
            store.remove_temps(job.dir)
            store.write_state(job.dir, job.state)
        except OSError as exc:  # a full disk, say: the end is known here until a restart
            log.error("cannot record the end of a lost job", job=job.request.id, error=str(exc))
            self._unwatch(job)
            job.notify()
            self._ended(job)
            return
        self._refresh(job)
        self._ended(job)

    # --- retention ----------------------------------------------------------------------------

    def _ended(self, job: _Job, *, apply: bool = True) -> None:
        """A job has ended: keep only its small record (once), then apply the policy."""
        job_id = job.request.id
        if self._jobs.get(job_id) is not job:
            return
        del self._jobs[job_id]
        try:
            size = os.stat(job.dir / store.OUTPUT_FILE).st_size
        except OSError:  # it never started, or it is unreadable: nothing to count
            size = 0
        ended_ns = job.state.ended_ns or job.request.created_ns
        entry = store.Ended(job_id, job.request.created_ns, ended_ns, job.request.owner, size)
        self._finished[job_id] = entry
        self._finished_bytes += size
        self._index_append(entry)
        if apply and self._loaded:
            self._apply_retention()

    def _apply_retention(self) -> None:
        """Delete the finished jobs beyond the policy, those that ended first first; the one
        that ended last is kept whatever its output's size. Then set the timer for the next
        expiry."""
        policy = self.config.retention
        max_age_ns = int(policy.max_age_seconds * 1e9)
        now = time.time_ns()
        while self._finished:
            oldest = next(iter(self._finished.values()))
            over = len(self._finished) > policy.max_jobs or (
                len(self._finished) > 1 and self._finished_bytes > policy.max_output_bytes
            )
            if not over and oldest.ended_ns + max_age_ns > now:
                break
            log.info("deleting job (retention)", job=oldest.id, owner=oldest.owner)
            self._remove(oldest, background=True)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._finished and self._loop is not None:
            oldest = next(iter(self._finished.values()))
            delay = (oldest.ended_ns + max_age_ns - now) / 1e9
            self._expiry = self._loop.call_later(max(delay, 0.0), self._apply_retention)

    def _remove(self, entry: store.Ended, *, background: bool = False) -> None:
        """Forget an ended job and remove what it has on disk. The directory is renamed
        first, so a crash halfway leaves no half job: :meth:`open` removes the rest. With
        ``background``, the files go in a worker thread (retention: a sharp cut of ``max_jobs``
        deletes thousands, which must not hold up the event loop); :meth:`close` waits."""
        job_id = entry.id
        del self._finished[job_id]
        self._ended_cache.pop(job_id, None)
        self._finished_bytes -= entry.output_bytes
        where = bisect.bisect_left(self._order, (entry.created_ns, job_id))
        if where < len(self._order) and self._order[where] == (entry.created_ns, job_id):
            del self._order[where]
        self._index_append(job_id)
        job_dir = self.config.jobs_dir / job_id
        doomed = job_dir.with_name(f"{DELETING_PREFIX}{job_id}")
        try:
            os.rename(job_dir, doomed)
        except FileNotFoundError:
            doomed = job_dir
        paths = (doomed, self.config.workspaces_dir / job_id)
        if not background or self._loop is None:
            _remove_trees(paths)
            return
        removal = self._loop.run_in_executor(None, _remove_trees, paths)
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)

    def _read_ended(self, entry: store.Ended) -> _Job:
        """An ended job as its directory has it (the last ENDED_CACHE read are kept: an ended
        job's record and state never change, and status calls come in bursts)."""
        cached = self._ended_cache.get(entry.id)
        if cached is not None:
            self._ended_cache.move_to_end(entry.id)
            return cached
        job = self._read_ended_files(entry)
        self._ended_cache[entry.id] = job
        if len(self._ended_cache) > ENDED_CACHE:
            self._ended_cache.popitem(last=False)
        return job

    def _read_ended_files(self, entry: store.Ended) -> _Job:
        job_dir = self.config.jobs_dir / entry.id
        try:
            request = store.read_request(job_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise Internal(f"job {entry.id}: its record cannot be read: {exc}") from None
        try:
            state = store.read_state(job_dir)
        except OSError as exc:
            raise Internal(f"job {entry.id}: its state cannot be read: {exc}") from None
        except ValueError as exc:  # replaced whole by every writer: corrupt, not half-written
            log.error("unreadable job state", job=entry.id, error=str(exc))
            state = store.StateFile(
                state=JobState.FAILED,
                ended_ns=entry.ended_ns,
                error=f"the job's state was unreadable: {exc}",
            )
            try:
                store.write_state(job_dir, state)
            except OSError as write_exc:
                log.error("job state not replaced", job=entry.id, error=str(write_exc))
        if state is None or not state.state.finished:
            raise Internal(f"job {entry.id}: its state says it has not ended")
        return _Job(request, state, job_dir)

    # --- operations ---------------------------------------------------------------------------

    def _get(self, job_id: str) -> _Job:
        if ids.is_job_id(job_id):
            job = self._jobs.get(job_id)
            if job is not None:
                return job
            entry = self._finished.get(job_id)
            if entry is not None:
                return self._read_ended(entry)
        raise NotFound(f"job {job_id!r} not found")

    def status(self, job_id: str) -> JobStatus:
        """The job's status; a running job's usage is read from its cgroup now (lists show
        what was recorded: the usage of jobs that ended)."""
        job = self._get(job_id)
        status = job.status
        if status.state.finished or not job.state.cgroup or self.cgroups is None:
            return status
        try:
            usage = self.cgroups.job(job.state.cgroup).usage()
        except (OSError, ValueError):  # it has just ended: what it recorded comes next
            return status
        return dataclasses.replace(
            status,
            usage=JobUsage(
                usage.cpu_ns, usage.peak_memory_bytes, usage.read_bytes, usage.written_bytes
            ),
            oom_killed=usage.oom_killed,
        )

    def list(
        self, owner: str | None = None, after: tuple[int, str] | None = None
    ) -> list[JobStatus]:
        """Jobs oldest first by (created_ns, id); only those of ``owner`` if given, and only
        those after the job ``after`` names by its (created_ns, id) if given."""
        return builtins.list(self.iter_list(owner, after))

    def iter_list(
        self, owner: str | None = None, after: tuple[int, str] | None = None
    ) -> Iterator[JobStatus]:
        """:meth:`list`, one job at a time: a page costs its own jobs' reads, wherever it is
        in the history. Jobs deleted meanwhile are left out."""
        start = 0 if after is None else bisect.bisect_right(self._order, after)
        for _, job_id in self._order[start:]:
            job = self._jobs.get(job_id)
            if job is not None:
                if owner is None or job.request.owner == owner:
                    yield job.status
                continue
            entry = self._finished.get(job_id)
            if entry is None or (owner is not None and entry.owner != owner):
                continue
            try:
                yield self._read_ended(entry).status
            except Internal as exc:  # one damaged job does not hide all the others
                if job_id in self._finished:
                    log.error("job left out of a list", job=job_id, error=exc.message)

    async def start(
        self,
        job_type: str,
        args: Mapping[str, Any],
        owner: str,
        limits: ResourceLimits = NO_LIMITS,
    ) -> JobStatus:
        """Start a job under ``limits`` (0: the default); returns once it runs in its sandbox,
        or raises with nothing left behind (no process, directory, workspace, veth, cgroup)."""
        job_spec = self.registry.lookup(job_type)
        clean_args = job_spec.spec.validate(args)
        if not owner:
            raise InvalidArgument("owner must not be empty")
        effective = self.config.limits.effective(limits)
        assert self.cgroups is not None
        if _has_io_limits(effective) and not self.cgroups.io_devices:
            raise FailedPrecondition(f"IO limits cannot apply: {self.cgroups.io_problem}")
        egress = job_spec.network is Network.EGRESS
        if egress and self.egress is None:
            raise FailedPrecondition(
                f"job type {job_type!r} needs network access, which this runner cannot give: "
                f"{self.egress_error}"
            )
        launcher = self._launcher
        if launcher is None or not launcher.alive:
            raise Internal("the runner cannot start jobs: its launcher is not running")
        self._check_free_space()
        job_id, job_dir = self._allocate()
        address = self._allocate_address(job_id) if egress else None
        request = store.JobRequest(
            job_id,
            job_type,
            clean_args,
            owner,
            time.time_ns(),
            network=job_spec.network.value,
            address=str(address) if address is not None else "",
            limits=effective,
        )
        job = _Job(request, store.StateFile(), job_dir)
        key = (request.created_ns, job_id)
        header = wire.LaunchHeader(
            job_id, job_type, self.config.stop_grace_seconds, request.address, effective
        )
        try:
            try:  # not synced to disk now: the monitor does that when the job ends
                store.write_request(job_dir, request, durable=False)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceExhausted(
                        f"the runner cannot record a new job: {exc.strerror} "
                        f"on the filesystem of {self.config.jobs_dir}"
                    ) from None
                raise Internal(f"the runner cannot record a new job: {exc.strerror}") from None
            self._watch(job)  # the monitor creates the output file
            try:
                await launcher.launch(header, clean_args, START_TIMEOUT_SECONDS)
            except wire.MessageError as exc:
                raise InvalidArgument(str(exc)) from None
            job.state = _expect_state(job_dir)
        except BaseException:
            # Failed, timed out or cancelled. The monitor removed its own traces when it
            # failed; if it never answered, the launcher kills it and removes them.
            self._unwatch(job)
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        self._jobs[job_id] = job
        bisect.insort(self._order, key)
        log.job("job started", job.status, pid=job.state.job_pid)
        if job.state.state.finished:  # a very short job may have ended already
            self._unwatch(job)
            log.job("job ended", job.status)
            self._ended(job)
        else:  # an end recorded from now on is seen: the directory was watched before
            self._watch_monitor(job)
        return job.status

    def _check_free_space(self) -> None:
        """Refuse a start while the jobs' filesystem is below the reserve, of bytes or of
        inodes: the room left is for the jobs that run (asked each time, so starts resume once
        space is back)."""
        reserve = self.config.min_free_bytes
        if not reserve:
            return
        try:
            fs = os.statvfs(self.config.jobs_dir)
        except OSError as exc:
            raise Internal(f"the runner cannot check its free space: {exc.strerror}") from None
        free = fs.f_bavail * fs.f_frsize
        if free < reserve:
            log.warning("start refused: disk nearly full", free_bytes=free, reserve_bytes=reserve)
            raise ResourceExhausted(
                f"the runner's disk is nearly full: {format_size(free)} free on the filesystem "
                f"of {self.config.jobs_dir}, below the reserve of {format_size(reserve)} "
                "(runner.min_free_bytes); no job starts until space is freed"
            )
        # f_files is 0 where a filesystem has no fixed number of inodes (btrfs, for one).
        if fs.f_files and fs.f_favail < MIN_FREE_INODES:
            log.warning("start refused: out of inodes", free_inodes=fs.f_favail)
            raise ResourceExhausted(
                f"the runner's disk is out of inodes: {fs.f_favail} free on the filesystem of "
                f"{self.config.jobs_dir}, below the reserve of {MIN_FREE_INODES} (kept with "
                "runner.min_free_bytes); no job starts until files are removed"
            )

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

    async def stop(self, job_id: str) -> JobStatus:
        """Stop a job and return once it is gone. Stopping a finished job is not an error."""
        job = self._get(job_id)
        if job.state.state.finished:
            return job.status
        if job.pidfd is None:
            self._lost(job)
            return job.status
        with contextlib.suppress(ProcessLookupError):  # it has just exited: nothing to stop
            signal.pidfd_send_signal(job.pidfd, signal.SIGTERM)
        log.job("stopping job", job.status)
        deadline = time.monotonic() + self.config.stop_grace_seconds + STOP_MARGIN_SECONDS
        while not job.state.state.finished:
            changed = job.changed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Internal(f"job {job_id} did not end after it was stopped")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return job.status

    def delete(self, job_id: str) -> JobStatus:
        """Delete a finished job: its record, output and workspace. Returns its last status;
        FailedPrecondition for a running job (stop it first)."""
        job = self._get(job_id)
        if not job.state.state.finished:
            raise FailedPrecondition(
                f"job {job_id} is still running: stop it first, then delete it"
            )
        self._ended(job, apply=False)  # if its end is known but not counted yet
        status = job.status
        self._remove(self._finished[job_id])
        return status

    async def read_output(
        self,
        job_id: str,
        *,
        follow: bool = True,
        from_: int | None = None,
        last: int | None = None,
    ) -> AsyncGenerator[OutputChunk, None]:
        """The job's output from the first byte (or ``from_``, or the ``last`` N lines).

        ``from_`` must be where a record starts (a chunk's ``offset`` or ``next_offset``), else
        InvalidArgument: every chunk returned is a record the job's monitor wrote. With
        ``follow``, waits for more until the job has ended and every byte was read.
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
        """Like :meth:`read_output`, in batches of up to about ``max_bytes`` of data and at most
        ``MAX_CHUNKS_PER_FRAME`` chunks: each batch fits one frame."""
        job = self._get(job_id)
        path = job.dir / store.OUTPUT_FILE
        if from_ is not None and last is not None:
            raise InvalidArgument("give either an offset or a number of last lines, not both")
        head: OutputChunk | None = None
        if last is not None:
            # A scan of the whole file: in a thread, so the runner goes on serving meanwhile.
            head, start = await asyncio.to_thread(_last_lines, path, last)
        else:
            start = from_ or 0
            if start > path.stat().st_size:
                raise InvalidArgument(f"offset {start} is past the end of the output")
            if start:  # read from inside a record, a job's bytes could pass for records
                try:
                    await asyncio.to_thread(store.check_record_start, path, start)
                except ValueError as exc:
                    raise InvalidArgument(str(exc)) from None
        with store.RecordReader(path, start) as reader:
            if head is not None:
                yield [head]
            while True:
                changed = job.changed  # before reading, so no change can slip in between
                finished = job.state.state.finished
                try:
                    while batch := reader.read_available(max_bytes, MAX_CHUNKS_PER_FRAME):
                        yield batch
                except ValueError as exc:
                    raise InvalidArgument(f"cannot read output at offset {start}: {exc}") from None
                if finished or not follow:
                    return
                await changed.wait()


def _last_lines(path: Path, count: int) -> tuple[OutputChunk | None, int]:
    """Where the last ``count`` lines begin: the rest of the record they begin in (or None),
    and the offset to read on from. Two passes over the file, constant memory.

    Lines end with a newline, whichever stream wrote them; output that does not end with a
    newline counts as one more line.
    """
    newlines = 0
    ends_open = False
    end = 0
    for chunk in store.iter_records(path):
        newlines += chunk.data.count(b"\n")
        ends_open = not chunk.data.endswith(b"\n")
        end = chunk.next_offset
    skip = newlines + ends_open - count  # lines before the ones wanted
    if skip <= 0:
        return None, 0
    if skip > newlines:  # no lines wanted (count is 0): only what comes next
        return None, end
    seen = 0
    for chunk in store.iter_records(path):
        here = chunk.data.count(b"\n")
        if seen + here >= skip:
            cut = -1
            for _ in range(skip - seen):  # the newline that ends the last skipped line
                cut = chunk.data.index(b"\n", cut + 1)
            rest = chunk.data[cut + 1 :]
            head = (
                OutputChunk(chunk.offset, chunk.next_offset, chunk.timestamp_ns, chunk.stream, rest)
                if rest
                else None
            )
            return head, chunk.next_offset
        seen += here
    raise AssertionError("the output shrank while it was read")


def _remove_trees(paths: Iterable[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _expect_state(job_dir: Path) -> store.StateFile:
    state = store.read_state(job_dir)
    if state is None:
        raise Internal("the job's monitor reported a start but recorded no state")
    return state


def _has_io_limits(limits: ResourceLimits) -> bool:
    return bool(
        limits.io_read_bps or limits.io_write_bps or limits.io_read_iops or limits.io_write_iops
    )


def _kill_job_init(state: store.StateFile) -> None:
    """SIGKILL the init of a job whose monitor is gone (its whole namespace dies with it), but
    only if the recorded pid still names that init in this boot: after a reboot or a long time
    it may name anything."""
    if linux.same_process(state.job_pid, state.job_start, state.boot_id):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(state.job_pid, signal.SIGKILL)
