"""After the runner's unit stopped (its ``ExecStopPost=``): end the running jobs, but only when
the unit is being *stopped*.

The unit has ``KillMode=process``: systemd signals the runner alone, so jobs and their
monitors outlive the runner, as they must across a restart (the next runner adopts them) or a
crash (systemd restarts it). A stop is different: the operator, or the machine going down,
wants the service gone. systemd runs ``ExecStopPost=`` in every case; what tells them apart is
the job systemd is carrying out for the unit: ``stop`` for ``systemctl stop``, ``restart`` for
``systemctl restart``, none when the runner crashed. Only ``stop`` ends the jobs, and not even
that with ``keep_jobs_on_stop = true``.

Each job is stopped as ``workernator jobs stop`` would: SIGTERM to its monitor, which gives the
job its grace period and records the end. A job still there after the grace and a margin has
its init killed (its whole PID namespace goes with it), then its monitor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared import ids, log
from workernator_runner import linux, store
from workernator_runner.config import RunnerConfig

SYSTEMCTL = "systemctl"  # found on PATH: systemd gives services a standard one
MARGIN_SECONDS = 10.0  # beyond the grace period, for a monitor to record the end
KILL_WAIT_SECONDS = 5.0


def queued_job(unit: str) -> str:
    """The type of the job systemd is carrying out for ``unit`` ("stop", "restart", ...), or ""
    when there is none (the runner crashed and systemd will restart it). Raises OSError when
    systemd cannot be asked."""
    try:
        result = subprocess.run(
            [SYSTEMCTL, "list-jobs", "--no-legend", "--plain", "--no-pager", "--full", unit],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OSError(f"cannot ask systemd about {unit}: {exc}") from None
    if result.returncode != 0:
        raise OSError(f"systemctl list-jobs {unit} failed: {result.stderr.strip()}")
    for line in result.stdout.splitlines():
        fields = line.split()  # JOB UNIT TYPE STATE
        if len(fields) >= 3 and fields[1] == unit:
            return fields[2]
    return ""


def after_stop(cfg: RunnerConfig, unit: str, ask: Callable[[str], str] = queued_job) -> int:
    """What ``workernator-runner --after-stop UNIT`` does; the exit status."""
    try:
        kind = ask(unit)
    except OSError as exc:  # keep the jobs: losing them cannot be undone, ending them can
        log.warning("cannot tell a stop from a restart; running jobs go on", error=str(exc))
        return 0
    if kind != "stop":
        log.info("runner unit restarting; running jobs go on", unit=unit, systemd_job=kind or "-")
        return 0
    if cfg.keep_jobs_on_stop:
        log.info("runner unit stopped; running jobs go on (keep_jobs_on_stop)", unit=unit)
        return 0
    ended, left = end_jobs(cfg)
    log.info("runner unit stopped; running jobs ended", unit=unit, ended=ended, left=left)
    return 1 if left else 0


@dataclass
class _Running:
    job_dir: Path
    state: store.StateFile
    pidfd: int


def end_jobs(cfg: RunnerConfig) -> tuple[int, int]:
    """Stop every running job and wait for its monitor to record the end: (how many ended,
    how many could not be made to end)."""
    running = _running_jobs(cfg)
    try:
        for job in running:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(job.pidfd, signal.SIGTERM)
        left = _wait(running, cfg.stop_grace_seconds + MARGIN_SECONDS)
        for job in left:  # its monitor records the kill, if it still can
            if linux.same_process(job.state.job_pid, job.state.job_start, job.state.boot_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(job.state.job_pid, signal.SIGKILL)
        left = _wait(left, KILL_WAIT_SECONDS)
        for job in left:  # the next runner marks these lost
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(job.pidfd, signal.SIGKILL)
        left = _wait(left, KILL_WAIT_SECONDS)
        for job in running:
            _log_end(job)
        return len(running) - len(left), len(left)
    finally:
        for job in running:
            os.close(job.pidfd)


def _running_jobs(cfg: RunnerConfig) -> list[_Running]:
    """The jobs recorded as running whose monitor is still the process that recorded it, each
    with a pidfd of that monitor (taken before the check: a reused pid cannot slip in)."""
    found = []
    for job_dir in sorted(cfg.jobs_dir.iterdir()):
        if not ids.is_job_id(job_dir.name):
            continue
        try:
            state = store.read_state(job_dir)
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable job", dir=str(job_dir), error=str(exc))
            continue
        if state is None or state.state.finished:
            continue
        try:
            pidfd = os.pidfd_open(state.monitor_pid)
        except (ProcessLookupError, ValueError):
            continue
        if linux.same_process(state.monitor_pid, state.monitor_start, state.boot_id):
            found.append(_Running(job_dir, state, pidfd))
        else:
            os.close(pidfd)
    return found


def _wait(jobs: list[_Running], seconds: float) -> list[_Running]:
    """Wait up to ``seconds`` for the jobs' monitors to exit; those still there."""
    deadline = time.monotonic() + seconds
    left = list(jobs)
    with select.epoll() as poll:
        for job in left:
            poll.register(job.pidfd, select.EPOLLIN)
        while left and (remaining := deadline - time.monotonic()) > 0:
            done = {fd for fd, _ in poll.poll(remaining)}
            left = [job for job in left if job.pidfd not in done]
            for fd in done:
                poll.unregister(fd)
    return left


def _log_end(job: _Running) -> None:
    """The journal line the runner would have written for this job's end."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        request = store.read_request(job.job_dir)
        state = store.read_state(job.job_dir) or job.state
        status = store.to_status(request, state)
        level = logging.INFO if status.state.finished else logging.ERROR
        log.job("job ended" if status.state.finished else "job not ended", status, level)
