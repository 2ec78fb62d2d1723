"""The job model both processes agree on: states, status records and output chunks."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class JobState(enum.StrEnum):
    """Lifecycle states of design section 5."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"  # exited 0
    FAILED = "FAILED"  # non-zero exit, killed by a signal, or could not start
    STOPPED = "STOPPED"  # stopped by a user

    @property
    def finished(self) -> bool:
        return self is not JobState.RUNNING


class Stream(enum.IntEnum):
    STDOUT = 1
    STDERR = 2


@dataclass(frozen=True)
class JobUsage:
    cpu_ns: int = 0
    peak_memory_bytes: int = 0
    read_bytes: int = 0
    written_bytes: int = 0


@dataclass(frozen=True)
class ResourceLimits:
    """A job's cgroup limits. In a status 0 means no limit; in a start request 0 means "the
    runner's default". CPU is in thousandths of a CPU; IO is on the disk behind /workspace."""

    cpu_millis: int = 0
    memory_bytes: int = 0
    pids: int = 0
    io_read_bps: int = 0
    io_write_bps: int = 0
    io_read_iops: int = 0
    io_write_iops: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


LIMIT_NAMES = tuple(ResourceLimits.__dataclass_fields__)

MAX_FAILURE_REASON = 200
"""The most characters of a failed job's ``failure_reason`` (see :mod:`shared.text`)."""


@dataclass(frozen=True)
class JobStatus:
    id: str
    type: str
    args: Mapping[str, Any]
    owner: str
    state: JobState
    created_ns: int
    started_ns: int | None = None
    ended_ns: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str = ""  # how it ended, in the runner's words ("exited with status 1")
    oom_killed: bool = False
    usage: JobUsage = field(default_factory=JobUsage)
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    # Why a FAILED job failed, in its own words: the last line it wrote to stderr, made safe
    # to print by the runner (shared.text.failure_reason). Empty otherwise.
    failure_reason: str = ""


@dataclass(frozen=True)
class OutputChunk:
    """One record of a job's output file.

    ``offset`` is where the record starts in the file and ``next_offset`` where the next one
    starts: a reader that reconnects resumes from the ``next_offset`` of the last chunk it saw.
    """

    offset: int
    next_offset: int
    timestamp_ns: int
    stream: Stream
    data: bytes
