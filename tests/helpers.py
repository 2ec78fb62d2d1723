"""Helpers for tests that run jobs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from shared import ids
from shared.model import JobStatus, OutputChunk, ResourceLimits, Stream
from workernator_runner import store
from workernator_runner.manager import JobManager


async def collect(m: JobManager, job_id: str, **kw: Any) -> list[OutputChunk]:
    return [chunk async for chunk in m.read_output(job_id, **kw)]


def joined(chunks: list[OutputChunk], stream: Stream | None = Stream.STDOUT) -> bytes:
    return b"".join(c.data for c in chunks if stream is None or c.stream == stream)


async def run_job(
    m: JobManager,
    job_type: str,
    args: Mapping[str, Any] | None = None,
    owner: str = "alice",
    limits: ResourceLimits | None = None,
) -> tuple[JobStatus, bytes, bytes]:
    """Start a job, read its output to the end, and return (final status, stdout, stderr)."""
    started = await m.start(job_type, args or {}, owner, limits or ResourceLimits())
    chunks = await collect(m, started.id)
    return m.status(started.id), joined(chunks), joined(chunks, Stream.STDERR)


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(b")") + 2 :].split()[0] in (b"Z", b"X")


def alive_pids(pids: list[int]) -> list[int]:
    return [pid for pid in pids if not process_gone(pid)]


def is_root() -> bool:
    return os.geteuid() == 0


class PidNamespace:
    """A PID namespace, held open so that its identity (the inode number of
    ``/proc/<pid>/ns/pid``) cannot be given to a new namespace while a test looks for its
    processes (the kernel reuses the numbers of freed namespaces)."""

    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.name = os.readlink(f"/proc/{pid}/ns/pid")

    def __del__(self) -> None:
        os.close(self.fd)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PidNamespace) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def pid_namespace(pid: int) -> PidNamespace:
    return PidNamespace(pid)


def namespace_members(namespace: PidNamespace) -> list[int]:
    """Host pids of the live (not zombie) processes in a PID namespace."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != namespace.name:
                continue
        except OSError:  # gone meanwhile
            continue
        if not process_gone(int(entry)):
            members.append(int(entry))
    return sorted(members)


def job_namespace(m: JobManager, job_id: str) -> PidNamespace:
    """The PID namespace of a running job (from its init's pid in state.json)."""
    state = store.read_state(m.config.jobs_dir / job_id)
    assert state is not None and state.job_pid
    return PidNamespace(state.job_pid)


def job_workspaces(m: JobManager) -> list[str]:
    """The jobs that have a workspace (spare sandboxes have theirs under other names)."""
    return sorted(p.name for p in m.config.workspaces_dir.iterdir() if ids.is_job_id(p.name))
