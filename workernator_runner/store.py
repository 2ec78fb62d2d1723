"""What a job leaves on disk, and how it is read back.

``<state_dir>/jobs/<id>/`` (0700, root) holds:

- ``job.json``: what was asked (type, arguments, owner, creation time). Written once by the
  runner before the job starts.
- ``state.json``: what happened (state, pids, times, exit status, usage). Written by the job's
  monitor, always whole (temporary file, then rename), so a reader never sees half of it.
- ``output``: the job's output as msgpack records ``[timestamp_ns, stream, bytes]``, appended
  by the monitor as output arrives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from shared.model import JobState, JobStatus, JobUsage, OutputChunk, ResourceLimits, Stream

JOB_FILE = "job.json"
STATE_FILE = "state.json"
OUTPUT_FILE = "output"

MAX_RECORD_DATA = 64 * 1024  # bytes of output in one record
NO_LIMITS = ResourceLimits()
READ_SIZE = 64 * 1024
MAX_BATCH_CHUNKS = 1024  # records in one batch; with the byte limit, a batch fits one frame


@dataclass(frozen=True)
class JobRequest:
    """The contents of ``job.json``."""

    id: str
    type: str
    args: dict[str, Any]
    owner: str
    created_ns: int
    network: str = "none"  # the job type's network mode when the job started
    address: str = ""  # its address with prefix length ("10.92.0.2/16"), egress jobs only
    limits: ResourceLimits = NO_LIMITS  # what it runs under (0 = no limit)


@dataclass
class StateFile:
    """The contents of ``state.json``; the monitor owns it."""

    state: JobState = JobState.RUNNING
    monitor_pid: int = 0
    monitor_start: int = 0  # start time of the monitor in clock ticks since boot (pid reuse)
    job_pid: int = 0  # the job's init (PID 1 of its namespaces), as the host sees it
    job_start: int = 0  # start time of the job's init, like monitor_start
    boot_id: str = ""  # the boot the pids and start times belong to
    started_ns: int | None = None
    ended_ns: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str = ""
    stop_requested: bool = False
    usage: dict[str, int] = field(default_factory=dict)
    cgroup: str = ""  # its cgroup's name in every hierarchy (see cgroups.py)
    oom_killed: bool = False
    failure_reason: str = ""  # a FAILED job's last stderr line, made safe (shared.text)


def write_json_atomic(path: Path, data: dict[str, Any], *, durable: bool = True) -> None:
    """Write ``path`` whole: a reader sees the old or the new contents, never a mix. With
    ``durable``, the contents are on disk before the rename (they survive a crash)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(json.dumps(data, sort_keys=True).encode())
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def sync_file(path: Path) -> None:
    """Make sure ``path``'s contents are on disk (they were written without syncing)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_request(job_dir: Path, request: JobRequest, *, durable: bool = True) -> None:
    write_json_atomic(
        job_dir / JOB_FILE,
        {
            "id": request.id,
            "type": request.type,
            "args": request.args,
            "owner": request.owner,
            "created_ns": request.created_ns,
            "network": request.network,
            "address": request.address,
            "limits": request.limits.as_dict(),
        },
        durable=durable,
    )


def read_request(job_dir: Path) -> JobRequest:
    data = json.loads((job_dir / JOB_FILE).read_bytes())
    return JobRequest(
        id=str(data["id"]),
        type=str(data["type"]),
        args=dict(data["args"]),
        owner=str(data["owner"]),
        created_ns=int(data["created_ns"]),
        network=str(data.get("network", "none")),
        address=str(data.get("address", "")),
        limits=ResourceLimits(**{k: int(v) for k, v in data.get("limits", {}).items()}),
    )


def state_json(state: StateFile) -> dict[str, Any]:
    data = dict(state.__dict__)
    data["state"] = state.state.value
    return data


def write_state(job_dir: Path, state: StateFile, *, durable: bool = True) -> None:
    write_json_atomic(job_dir / STATE_FILE, state_json(state), durable=durable)


def read_state(job_dir: Path) -> StateFile | None:
    """The job's state, or None when there is no state file yet; ValueError when unreadable."""
    try:
        data = json.loads((job_dir / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return None
    try:
        data["state"] = JobState(data["state"])
        return StateFile(**data)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{job_dir / STATE_FILE}: {exc!r}") from None


def to_status(request: JobRequest, state: StateFile) -> JobStatus:
    return JobStatus(
        id=request.id,
        type=request.type,
        args=request.args,
        owner=request.owner,
        state=state.state,
        created_ns=request.created_ns,
        started_ns=state.started_ns,
        ended_ns=state.ended_ns,
        exit_code=state.exit_code,
        signal=state.signal,
        error=state.error,
        oom_killed=state.oom_killed,
        usage=JobUsage(**state.usage),
        limits=request.limits,
        failure_reason=state.failure_reason,
    )


def encode_record(timestamp_ns: int, stream: Stream, data: bytes) -> bytes:
    packed: bytes = msgpack.packb([timestamp_ns, int(stream), data], use_bin_type=True)
    return packed


class RecordReader:
    """Reads records from an output file incrementally, with bounded memory.

    ``read_available()`` returns the complete records now on disk after the current position
    and stops at a record that is still being written. Call it again when the file grows.
    """

    def __init__(self, path: Path, offset: int = 0) -> None:
        self._file = path.open("rb")
        self._file.seek(offset)
        self._start = offset
        self.offset = offset  # position of the next record not yet returned
        self._unpacker = msgpack.Unpacker(raw=True, max_buffer_size=4 * MAX_RECORD_DATA)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_available(
        self, max_bytes: int = 256 * 1024, max_chunks: int = MAX_BATCH_CHUNKS
    ) -> list[OutputChunk]:
        """Complete records from the current position: at most ``max_chunks`` of them, and
        no more once ``max_bytes`` of data is reached (so at most one record beyond it)."""
        chunks: list[OutputChunk] = []
        size = 0
        while size < max_bytes and len(chunks) < max_chunks:
            chunk = self._next()
            if chunk is None:
                break
            chunks.append(chunk)
            size += len(chunk.data)
        return chunks

    def _next(self) -> OutputChunk | None:
        while True:
            try:
                record = self._unpacker.unpack()
            except msgpack.OutOfData:
                data = self._file.read(READ_SIZE)
                if not data:
                    return None
                self._unpacker.feed(data)
                continue
            start = self.offset
            self.offset = self._start + self._unpacker.tell()
            ts, stream, payload = _check_record(record, start)
            return OutputChunk(start, self.offset, ts, stream, payload)


def _check_record(record: Any, offset: int) -> tuple[int, Stream, bytes]:
    if (
        not isinstance(record, list)
        or len(record) != 3
        or not isinstance(record[0], int)
        or record[1] not in (1, 2)
        or not isinstance(record[2], bytes)
    ):
        raise ValueError(f"corrupt output record at offset {offset}")
    return record[0], Stream(record[1]), record[2]


def iter_records(path: Path, offset: int = 0) -> Iterator[OutputChunk]:
    with RecordReader(path, offset) as reader:
        while batch := reader.read_available():
            yield from batch
