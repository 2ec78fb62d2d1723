"""What a job leaves on disk, and how it is read back.

``<state_dir>/jobs/<id>/`` (0700, root) holds:

- ``job.json``: what was asked (type, arguments, owner, creation time). Written once by the
  runner before the job starts.
- ``state.json``: what happened (state, pids, times, exit status, usage). Written by the job's
  monitor; by the runner only where no monitor can write it (before a monitor existed, or once
  it is gone). The first write creates it only if there is none, so of a restarted runner and a
  monitor that both think they own a job, exactly one does.
- ``output``: the job's output as msgpack records ``[timestamp_ns, stream, bytes]``, appended
  by the monitor as output arrives; a record is there whole or not at all.

The JSON files are always written whole: into a temporary file of a unique name, created
exclusively, then renamed over the old one, so a reader never sees half of one and two
writers never share a temporary file. No name in a job's directory is followed when it is a
symbolic link.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from shared.model import JobState, JobStatus, JobUsage, OutputChunk, ResourceLimits, Stream
from workernator_runner.files import DIR_FLAGS

JOB_FILE = "job.json"
STATE_FILE = "state.json"
OUTPUT_FILE = "output"

MAX_RECORD_DATA = 64 * 1024  # bytes of output in one record
NO_LIMITS = ResourceLimits()
READ_SIZE = 64 * 1024
MAX_BATCH_CHUNKS = 1024  # records in one batch; with the byte limit, a batch fits one frame
RESERVE_BYTES = 16 * 1024  # room a monitor keeps for its job's last state (about 1 KiB)
TEMP_SUFFIX = ".tmp"
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


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


@dataclass(frozen=True)
class Reserve:
    """A temporary file with room already taken on disk, for a write to come."""

    name: str
    fd: int


def write_json_atomic(
    path: Path, data: dict[str, Any], *, durable: bool = True, exclusive: bool = False
) -> None:
    """:func:`write_json_at` in the directory of ``path`` (never through a symbolic link)."""
    dir_fd = os.open(path.parent, DIR_FLAGS)
    try:
        write_json_at(dir_fd, path.name, data, durable=durable, exclusive=exclusive)
    finally:
        os.close(dir_fd)


def write_json_at(
    dir_fd: int,
    name: str,
    data: dict[str, Any],
    *,
    durable: bool = True,
    exclusive: bool = False,
    reserve: Reserve | None = None,
) -> None:
    """Write ``name`` in the directory ``dir_fd`` whole: a reader sees the old or the new
    contents, never a mix. The contents go to a temporary file of a unique name (``reserve``'s,
    when given), renamed over ``name``; with ``exclusive``, only if there is no ``name`` yet
    (FileExistsError otherwise). With ``durable``, they are on disk when this returns (they
    survive a crash). On failure nothing is left but the old file."""
    body = json.dumps(data, sort_keys=True).encode()
    temp, fd = (reserve.name, reserve.fd) if reserve is not None else _create_temp(dir_fd, name)
    try:
        try:
            done = 0
            while done < len(body):
                done += os.pwrite(fd, body[done:], done)
            if reserve is not None:
                os.ftruncate(fd, len(body))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            os.unlink(temp, dir_fd=dir_fd)
        else:
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if durable:
            os.fsync(dir_fd)  # the new name, too
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise


def _create_temp(dir_fd: int, name: str) -> tuple[str, int]:
    """A new file ``.<name>.<random>.tmp``: created exclusively, so neither another writer's
    temporary file nor a planted link is ever reused or followed."""
    while True:
        temp = f".{name}.{os.urandom(6).hex()}{TEMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return temp, os.open(temp, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:  # 2**48 names: only if someone made this one
            continue


def reserve(dir_fd: int, name: str) -> Reserve | None:
    """A temporary file for the next write of ``name`` with :data:`RESERVE_BYTES` already
    allocated, so that it succeeds on a full disk; None when there is no room now either."""
    temp, fd = _create_temp(dir_fd, name)
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        return None
    return Reserve(temp, fd)


def remove_temps(job_dir: Path) -> list[str]:
    """Remove the temporary files a writer that died left in ``job_dir``; only for a caller
    that knows no writer is at work there. Returns their names."""
    dir_fd = os.open(job_dir, DIR_FLAGS)
    try:
        removed = []
        for name in os.listdir(dir_fd):
            if name.startswith((f".{JOB_FILE}.", f".{STATE_FILE}.")) and name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
                    removed.append(name)
        return removed
    finally:
        os.close(dir_fd)


def sync_file(dir_fd: int, name: str) -> None:
    """Make sure the contents of ``name`` in ``dir_fd`` are on disk (written without syncing)."""
    fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    """The whole file, never through a symbolic link."""
    with os.fdopen(os.open(path, _READ_FLAGS), "rb") as f:
        return f.read()


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
    data = json.loads(_read(job_dir / JOB_FILE))
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


def write_state(
    job_dir: Path, state: StateFile, *, durable: bool = True, exclusive: bool = False
) -> None:
    write_json_atomic(job_dir / STATE_FILE, state_json(state), durable=durable, exclusive=exclusive)


def write_state_at(
    dir_fd: int,
    state: StateFile,
    *,
    durable: bool = True,
    exclusive: bool = False,
    reserve: Reserve | None = None,
) -> None:
    write_json_at(
        dir_fd, STATE_FILE, state_json(state), durable=durable, exclusive=exclusive, reserve=reserve
    )


def read_state(job_dir: Path) -> StateFile | None:
    """The job's state, or None when there is no state file yet; ValueError when unreadable."""
    try:
        data = json.loads(_read(job_dir / STATE_FILE))
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
        self._file = os.fdopen(os.open(path, _READ_FLAGS), "rb")
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


def check_record_start(path: Path, offset: int) -> None:
    """ValueError unless a record of ``path`` starts at ``offset`` (or the records end there).

    Read from inside a record, a job's own bytes would pass for records: a job can print whole
    records. One pass over the records before ``offset``, skipping over their data.
    """
    unpacker = msgpack.Unpacker(max_buffer_size=4 * MAX_RECORD_DATA)
    previous = position = 0
    with path.open("rb") as f:
        while position < offset:
            try:
                unpacker.skip()
            except msgpack.OutOfData:
                data = f.read(READ_SIZE)
                if not data:
                    break
                unpacker.feed(data)
                continue
            except Exception as exc:  # msgpack raises many types for bad input
                raise ValueError(f"corrupt output record at offset {position}: {exc}") from None
            previous, position = position, unpacker.tell()
    if position > offset:
        where = f"it is inside the record at {previous}..{position}"
    elif position < offset:
        where = f"the records written so far end at {position}"
    else:
        return
    raise ValueError(f"offset {offset} is not where a record starts: {where}")


# --- the index of ended jobs ------------------------------------------------------------------

INDEX_FILE = "jobs.index"  # in the state directory, next to jobs/


@dataclass(frozen=True, slots=True)
class Ended:
    """What the runner keeps in memory of a job that has ended: enough to order, filter and
    apply retention without reading its files (its status is read when asked for)."""

    id: str
    created_ns: int
    ended_ns: int
    owner: str
    output_bytes: int


def index_line(entry: Ended | str) -> bytes:
    """One line of the index: an ended job, or (a bare id) a job deleted."""
    if isinstance(entry, str):
        return json.dumps(["D", entry]).encode() + b"\n"
    fields = ["E", entry.id, entry.created_ns, entry.ended_ns, entry.owner, entry.output_bytes]
    return json.dumps(fields).encode() + b"\n"


def read_index(state_dir: Path) -> dict[str, Ended]:
    """The index's ended jobs, later lines overriding earlier ones. It is a cache of what the
    jobs' directories hold, rebuilt whole at every start: a line a crash cut short (or any
    line that does not parse) is skipped, and the job it named is read from its directory."""
    entries: dict[str, Ended] = {}
    try:
        data = _read(state_dir / INDEX_FILE)
    except FileNotFoundError:
        return entries
    for line in data.splitlines():
        try:
            fields = json.loads(line)
            if fields[0] == "D" and len(fields) == 2:
                entries.pop(str(fields[1]), None)
                continue
            kind, job_id, created, ended, owner, size = fields
            if kind != "E" or not all(type(n) is int for n in (created, ended, size)):
                continue
            entries[str(job_id)] = Ended(str(job_id), created, ended, str(owner), size)
        except (ValueError, TypeError, IndexError, KeyError):
            continue
    return entries


def write_index(state_dir: Path, entries: Iterator[Ended] | list[Ended]) -> None:
    """Replace the index whole (see :func:`write_json_at` for how)."""
    body = b"".join(index_line(e) for e in entries)
    dir_fd = os.open(state_dir, DIR_FLAGS)
    try:
        temp, fd = _create_temp(dir_fd, INDEX_FILE)
        try:
            try:
                done = 0
                while done < len(body):
                    done += os.write(fd, body[done:])
            finally:
                os.close(fd)
            os.rename(temp, INDEX_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


def open_index(state_dir: Path) -> int:
    """The index, for appending."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(state_dir / INDEX_FILE, flags, 0o600)
