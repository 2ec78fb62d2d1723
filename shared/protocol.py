"""The runner protocol (design section 4), sans-IO.

Frames are a 4-byte big-endian length followed by one msgpack map. This module only turns bytes
into validated messages and messages into bytes, like h11 does for HTTP: the socket code around
it is thin, and the codec can be tested and fuzzed on its own.

Every frame is checked against an explicit schema before anything uses it: unknown message
types, unknown keys, wrong types and oversized values are errors, never ignored. A
:class:`ProtocolError` means the peer is broken or hostile; the socket code answers it with an
error frame and closes that connection.

Conversation::

    client -> runner   hello    {version, software}
    runner -> client   hello    {version, software}
    client -> runner   request  {id, op, caller: {user, role}, args: {...}}
    runner -> client   job      {id, job}            start, stop, status
                       types    {id, types}          types
                       jobs     {id, jobs}           list   (a stream; ends with "end")
                       output   {id, chunks}         tail   (a stream; ends with "end")
                       end      {id}
                       error    {id, code, message}  any request; id is nil when the error is
                                                     not about one request (a bad frame)
    client -> runner   cancel   {id}                 ends a stream early
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

from shared.errors import ErrorCode
from shared.model import (
    LIMIT_NAMES,
    MAX_FAILURE_REASON,
    JobState,
    JobStatus,
    JobUsage,
    OutputChunk,
    ResourceLimits,
    Stream,
)

PROTOCOL_VERSION = 1
MAX_FRAME_SIZE = 1 << 20  # bytes of one frame body; checked before the body is read
HEADER = struct.Struct(">I")

MAX_ID = (1 << 63) - 1
MAX_NAME = 64  # user names, roles, job types, argument names
MAX_MESSAGE = 4096  # error messages, software strings
MAX_ITEMS = 4096  # list entries in one frame
MAX_CHUNK_DATA = MAX_FRAME_SIZE // 2  # data of one output chunk
MAX_TAIL_LINES = 1_000_000


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class Op(enum.StrEnum):
    START = "start"
    STOP = "stop"
    STATUS = "status"
    LIST = "list"
    TAIL = "tail"
    TYPES = "types"


STREAMING_OPS = frozenset({Op.LIST, Op.TAIL})


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    version: int = PROTOCOL_VERSION
    software: str = "workernator"


@dataclass(frozen=True)
class Caller:
    """The identity the api authenticated: certificate CN (user) and O (role)."""

    user: str
    role: str


DEFAULT_LIMITS = ResourceLimits()


@dataclass(frozen=True)
class StartArgs:
    job_type: str
    args: Mapping[str, Any]
    limits: ResourceLimits = DEFAULT_LIMITS  # 0: the runner's default


@dataclass(frozen=True)
class JobRef:
    """Arguments of ``stop`` and ``status``."""

    job_id: str


@dataclass(frozen=True)
class ListArgs:
    owner: str | None = None
    # Only jobs after this one in the list's order, (created_ns, id): where a page ended.
    after: tuple[int, str] | None = None


@dataclass(frozen=True)
class TailArgs:
    job_id: str
    follow: bool = True
    offset: int | None = None  # resume from this byte position of the output file
    last: int | None = None  # start with the last N lines


@dataclass(frozen=True)
class TypesArgs:
    pass


OpArgs: TypeAlias = StartArgs | JobRef | ListArgs | TailArgs | TypesArgs


@dataclass(frozen=True)
class Request:
    id: int
    op: Op
    caller: Caller
    args: OpArgs


@dataclass(frozen=True)
class Cancel:
    id: int


@dataclass(frozen=True)
class JobReply:
    id: int
    job: JobStatus


@dataclass(frozen=True)
class TypesReply:
    id: int
    types: Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class JobsItem:
    id: int
    jobs: Sequence[JobStatus]


@dataclass(frozen=True)
class OutputItem:
    id: int
    chunks: Sequence[OutputChunk]


@dataclass(frozen=True)
class End:
    id: int


@dataclass(frozen=True)
class ErrorReply:
    id: int | None
    code: ErrorCode
    message: str


ClientMessage: TypeAlias = Hello | Request | Cancel
ServerMessage: TypeAlias = Hello | JobReply | TypesReply | JobsItem | OutputItem | End | ErrorReply
Message: TypeAlias = ClientMessage | ServerMessage


# --- schema checks ----------------------------------------------------------------------------
# A check takes the decoded value and a path for messages, and returns the value to use.

Check: TypeAlias = Callable[[Any, str], Any]


def _fail(path: str, what: str) -> ProtocolError:
    return ProtocolError(f"{path}: {what}")


def _type_name(value: object) -> str:
    return "nil" if value is None else type(value).__name__


def t_str(max_len: int = MAX_NAME, min_len: int = 0) -> Check:
    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _fail(path, f"expected a string, got {_type_name(value)}")
        if not min_len <= len(value) <= max_len:
            raise _fail(path, f"length must be {min_len}..{max_len}, got {len(value)}")
        return value

    return check


def t_int(lo: int = 0, hi: int = MAX_ID) -> Check:
    def check(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, f"expected an integer, got {_type_name(value)}")
        if not lo <= value <= hi:
            raise _fail(path, f"must be in {lo}..{hi}, got {value}")
        return value

    return check


def t_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected a boolean, got {_type_name(value)}")
    return value


def t_bytes(max_len: int) -> Check:
    def check(value: Any, path: str) -> bytes:
        if not isinstance(value, bytes):
            raise _fail(path, f"expected bytes, got {_type_name(value)}")
        if len(value) > max_len:
            raise _fail(path, f"longer than {max_len} bytes")
        return value

    return check


def t_optional(inner: Check) -> Check:
    def check(value: Any, path: str) -> Any:
        return None if value is None else inner(value, path)

    return check


def t_list(item: Check, max_items: int = MAX_ITEMS) -> Check:
    def check(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise _fail(path, f"expected a list, got {_type_name(value)}")
        if len(value) > max_items:
            raise _fail(path, f"more than {max_items} items")
        return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]

    return check


def t_enum(kind: type[enum.Enum]) -> Check:
    allowed = {m.value: m for m in kind}

    def check(value: Any, path: str) -> Any:
        if isinstance(value, bool) or value not in allowed:
            choices = ", ".join(repr(v) for v in allowed)
            raise _fail(path, f"must be one of {choices}, got {value!r}")
        return allowed[value]

    return check


def t_record(required: Mapping[str, Check], optional: Mapping[str, Check] | None = None) -> Check:
    """A map with exactly these keys: every required one, any of the optional ones, no others."""
    optional = optional or {}

    def check(value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _fail(path, f"expected a map, got {_type_name(value)}")
        for key in value:
            if key not in required and key not in optional:
                raise _fail(path, f"unknown field {key!r}")
        out: dict[str, Any] = {}
        for key, field_check in required.items():
            if key not in value:
                raise _fail(path, f"missing field {key!r}")
            out[key] = field_check(value[key], f"{path}.{key}")
        for key, field_check in optional.items():
            out[key] = field_check(value.get(key), f"{path}.{key}")
        return out

    return check


def _t_after(value: Any, path: str) -> tuple[int, str]:
    if not isinstance(value, list) or len(value) != 2:
        raise _fail(path, "expected [created_ns, job_id]")
    return t_int()(value[0], f"{path}[0]"), t_str(MAX_NAME, 1)(value[1], f"{path}[1]")


def _scalar(value: Any, path: str) -> Any:
    if isinstance(value, str):
        return t_str(MAX_MESSAGE)(value, path)
    if isinstance(value, bool | int | float):
        return value
    raise _fail(path, f"expected a number, string or boolean, got {_type_name(value)}")


def t_job_args(value: Any, path: str) -> dict[str, Any]:
    """Job arguments: name -> scalar, or name -> map of name -> scalar (eval's variables).

    This checks only shape and size; the job catalog checks meaning.
    """
    if not isinstance(value, dict):
        raise _fail(path, f"expected a map, got {_type_name(value)}")
    if len(value) > 64:
        raise _fail(path, "more than 64 arguments")
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = t_str(MAX_NAME, 1)(key, f"{path} key")
        if isinstance(item, dict):
            if len(item) > 256:
                raise _fail(f"{path}.{name}", "more than 256 entries")
            out[name] = {
                t_str(MAX_NAME, 1)(k, f"{path}.{name} key"): _scalar(v, f"{path}.{name}.{k}")
                for k, v in item.items()
            }
        else:
            out[name] = _scalar(item, f"{path}.{name}")
    return out


_CALLER = t_record({"user": t_str(MAX_NAME, 1), "role": t_str(MAX_NAME, 1)})
_JOB_ID = t_str(MAX_NAME, 1)
_TIME = t_optional(t_int(0, MAX_ID))

MAX_LIMIT = 2**63 - 1
_LIMITS = t_record({name: t_int(0, MAX_LIMIT) for name in LIMIT_NAMES})

_OP_ARGS: dict[Op, Check] = {
    Op.START: t_record(
        {"job_type": t_str(MAX_NAME, 1), "args": t_job_args}, {"limits": t_optional(_LIMITS)}
    ),
    Op.STOP: t_record({"job_id": _JOB_ID}),
    Op.STATUS: t_record({"job_id": _JOB_ID}),
    Op.LIST: t_record(
        {},
        {"owner": t_optional(t_str(MAX_NAME, 1)), "after": t_optional(_t_after)},
    ),
    Op.TAIL: t_record(
        {"job_id": _JOB_ID, "follow": t_bool},
        {
            "offset": t_optional(t_int(0, MAX_ID)),
            "last": t_optional(t_int(0, MAX_TAIL_LINES)),
        },
    ),
    Op.TYPES: t_record({}),
}

_USAGE = t_record(
    {
        "cpu_ns": t_int(),
        "peak_memory_bytes": t_int(),
        "read_bytes": t_int(),
        "written_bytes": t_int(),
    }
)

_JOB_STATUS = t_record(
    {
        "id": _JOB_ID,
        "type": t_str(MAX_NAME, 1),
        "args": t_job_args,
        "owner": t_str(MAX_NAME, 1),
        "state": t_enum(JobState),
        "created_ns": t_int(),
        "started_ns": _TIME,
        "ended_ns": _TIME,
        "exit_code": t_optional(t_int(-(2**31), 2**31 - 1)),
        "signal": t_optional(t_int(0, 255)),
        "error": t_str(MAX_MESSAGE),
        "oom_killed": t_bool,
        "usage": _USAGE,
        "limits": _LIMITS,
    },
    {"failure_reason": t_optional(t_str(MAX_FAILURE_REASON))},
)


def _t_chunk(value: Any, path: str) -> OutputChunk:
    if not isinstance(value, list) or len(value) != 5:
        raise _fail(path, "expected [offset, next_offset, timestamp_ns, stream, data]")
    offset = t_int()(value[0], f"{path}.offset")
    next_offset = t_int()(value[1], f"{path}.next_offset")
    if next_offset <= offset:
        raise _fail(path, "next_offset must be after offset")
    return OutputChunk(
        offset=offset,
        next_offset=next_offset,
        timestamp_ns=t_int()(value[2], f"{path}.timestamp_ns"),
        stream=t_enum(Stream)(value[3], f"{path}.stream"),
        data=t_bytes(MAX_CHUNK_DATA)(value[4], f"{path}.data"),
    )


_TYPE_INFO = t_record(
    {
        "name": t_str(MAX_NAME, 1),
        "title": t_str(MAX_NAME, 1),
        "description": t_str(MAX_MESSAGE),
        "args": t_list(
            t_record(
                {
                    "name": t_str(MAX_NAME, 1),
                    "type": t_str(MAX_NAME, 1),
                    "required": t_bool,
                    "description": t_str(MAX_MESSAGE),
                },
                {
                    "min": t_optional(_scalar),
                    "max": t_optional(_scalar),
                    "max_length": t_optional(t_int(0, 2**32 - 1)),
                },
            ),
            64,
        ),
    }
)

_HELLO = t_record({"type": t_str(), "version": t_int(0, 2**31), "software": t_str(MAX_MESSAGE)})
_REQUEST = t_record(
    {
        "type": t_str(),
        "id": t_int(1),
        "op": t_enum(Op),
        "caller": _CALLER,
        "args": lambda v, p: v,  # checked per op below, once the op is known
    }
)
_CANCEL = t_record({"type": t_str(), "id": t_int(1)})


# --- message <-> wire map ---------------------------------------------------------------------


def _status_to_wire(job: JobStatus) -> dict[str, Any]:
    return {
        "id": job.id,
        "type": job.type,
        "args": dict(job.args),
        "owner": job.owner,
        "state": job.state.value,
        "created_ns": job.created_ns,
        "started_ns": job.started_ns,
        "ended_ns": job.ended_ns,
        "exit_code": job.exit_code,
        "signal": job.signal,
        "error": job.error,
        "oom_killed": job.oom_killed,
        "usage": {
            "cpu_ns": job.usage.cpu_ns,
            "peak_memory_bytes": job.usage.peak_memory_bytes,
            "read_bytes": job.usage.read_bytes,
            "written_bytes": job.usage.written_bytes,
        },
        "limits": job.limits.as_dict(),
        "failure_reason": job.failure_reason,
    }


def _status_from_wire(value: Any, path: str) -> JobStatus:
    d = _JOB_STATUS(value, path)
    d["usage"] = JobUsage(**d["usage"])
    d["limits"] = ResourceLimits(**d["limits"])
    d["failure_reason"] = d["failure_reason"] or ""  # optional: a runner before it sent none
    return JobStatus(**d)


def _start_from_wire(d: dict[str, Any]) -> StartArgs:
    limits = d.pop("limits", None)
    return StartArgs(**d, limits=ResourceLimits(**limits) if limits else ResourceLimits())


def _args_to_wire(args: OpArgs) -> dict[str, Any]:
    if isinstance(args, StartArgs):
        return {"job_type": args.job_type, "args": dict(args.args), "limits": args.limits.as_dict()}
    if isinstance(args, JobRef):
        return {"job_id": args.job_id}
    if isinstance(args, ListArgs):
        return {"owner": args.owner, "after": None if args.after is None else list(args.after)}
    if isinstance(args, TailArgs):
        return {
            "job_id": args.job_id,
            "follow": args.follow,
            "offset": args.offset,
            "last": args.last,
        }
    return {}


_ARGS_FROM_WIRE: dict[Op, Callable[[dict[str, Any]], OpArgs]] = {
    Op.START: _start_from_wire,
    Op.STOP: lambda d: JobRef(**d),
    Op.STATUS: lambda d: JobRef(**d),
    Op.LIST: lambda d: ListArgs(**d),
    Op.TAIL: lambda d: TailArgs(**d),
    Op.TYPES: lambda d: TypesArgs(),
}

_ARGS_TYPE: dict[Op, type] = {
    Op.START: StartArgs,
    Op.STOP: JobRef,
    Op.STATUS: JobRef,
    Op.LIST: ListArgs,
    Op.TAIL: TailArgs,
    Op.TYPES: TypesArgs,
}


def to_wire(message: Message) -> dict[str, Any]:
    """The msgpack map of a message."""
    match message:
        case Hello(version, software):
            return {"type": "hello", "version": version, "software": software}
        case Request(id_, op, caller, args):
            if not isinstance(args, _ARGS_TYPE[op]):
                raise TypeError(f"{op} takes {_ARGS_TYPE[op].__name__}, not {type(args).__name__}")
            return {
                "type": "request",
                "id": id_,
                "op": op.value,
                "caller": {"user": caller.user, "role": caller.role},
                "args": _args_to_wire(args),
            }
        case Cancel(id_):
            return {"type": "cancel", "id": id_}
        case JobReply(id_, job):
            return {"type": "job", "id": id_, "job": _status_to_wire(job)}
        case TypesReply(id_, types):
            return {"type": "types", "id": id_, "types": [dict(t) for t in types]}
        case JobsItem(id_, jobs):
            return {"type": "jobs", "id": id_, "jobs": [_status_to_wire(j) for j in jobs]}
        case OutputItem(id_, chunks):
            return {
                "type": "output",
                "id": id_,
                "chunks": [
                    [c.offset, c.next_offset, c.timestamp_ns, int(c.stream), c.data] for c in chunks
                ],
            }
        case End(id_):
            return {"type": "end", "id": id_}
        case ErrorReply(id_, code, text):
            return {"type": "error", "id": id_, "code": code.value, "message": text[:MAX_MESSAGE]}
    raise TypeError(f"not a protocol message: {message!r}")


def _request_from_wire(d: dict[str, Any]) -> Request:
    base = _REQUEST(d, "request")
    op: Op = base["op"]
    try:
        args = _OP_ARGS[op](base["args"], f"request.args({op.value})")
    except ProtocolError as exc:
        raise ProtocolError(exc.message, base["id"]) from None
    caller = Caller(**base["caller"])
    return Request(base["id"], op, caller, _ARGS_FROM_WIRE[op](args))


def _server_message_from_wire(kind: str, d: dict[str, Any]) -> ServerMessage:
    if kind == "job":
        r = t_record({"type": t_str(), "id": t_int(1), "job": _status_from_wire})(d, kind)
        return JobReply(r["id"], r["job"])
    if kind == "types":
        r = t_record({"type": t_str(), "id": t_int(1), "types": t_list(_TYPE_INFO, 256)})(d, kind)
        return TypesReply(r["id"], r["types"])
    if kind == "jobs":
        r = t_record({"type": t_str(), "id": t_int(1), "jobs": t_list(_status_from_wire)})(d, kind)
        return JobsItem(r["id"], r["jobs"])
    if kind == "output":
        r = t_record({"type": t_str(), "id": t_int(1), "chunks": t_list(_t_chunk)})(d, kind)
        return OutputItem(r["id"], r["chunks"])
    if kind == "end":
        r = t_record({"type": t_str(), "id": t_int(1)})(d, kind)
        return End(r["id"])
    if kind == "error":
        r = t_record(
            {
                "type": t_str(),
                "id": t_optional(t_int(1)),
                "code": t_enum(ErrorCode),
                "message": t_str(MAX_MESSAGE),
            }
        )(d, kind)
        return ErrorReply(r["id"], r["code"], r["message"])
    raise ProtocolError(f"unknown message type {kind!r}")


# --- framing ----------------------------------------------------------------------------------


def encode_frame(message: Message) -> bytes:
    body: bytes = msgpack.packb(to_wire(message), use_bin_type=True)
    if len(body) > MAX_FRAME_SIZE:
        raise ValueError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME_SIZE}-byte limit")
    return HEADER.pack(len(body)) + body


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body to a map with a string ``type``; no schema check yet."""
    try:
        value = msgpack.unpackb(
            body, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types for bad input; all mean the same here
        raise ProtocolError(f"frame is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"frame must hold a map, got {_type_name(value)}")
    kind = value.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("frame has no string 'type' field")
    return value


class Role(enum.Enum):
    CLIENT = "client"  # the api
    SERVER = "server"  # the runner


class Connection:
    """One side of a connection: feed it bytes, take validated messages out.

    The first message each way must be ``hello`` with the same protocol version.
    """

    def __init__(self, role: Role, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self.role = role
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self.peer_hello: Hello | None = None
        self._closed = False

    def send(self, message: Message) -> bytes:
        """Bytes to write for ``message``."""
        return encode_frame(message)

    def receive_data(self, data: bytes) -> None:
        if self._closed:
            raise ProtocolError("data after end of stream")
        self._buffer += data

    def receive_eof(self) -> None:
        """The peer closed its side; an unfinished frame is an error."""
        self._closed = True
        if self._buffer:
            raise ProtocolError(
                f"connection closed in the middle of a frame ({len(self._buffer)} bytes pending)"
            )

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive."""
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length == 0:
            raise ProtocolError("empty frame")
        if length > self.max_frame_size:
            raise ProtocolError(
                f"frame of {length} bytes exceeds the {self.max_frame_size}-byte limit"
            )
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return self._parse(decode_body(body))

    def _parse(self, d: dict[str, Any]) -> Message:
        kind = d["type"]
        if self.peer_hello is None:
            if kind != "hello":
                raise ProtocolError(f"expected hello first, got {kind!r}")
            hello = Hello(**{k: v for k, v in _HELLO(d, "hello").items() if k != "type"})
            if hello.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"unsupported protocol version {hello.version}; "
                    f"this side speaks {PROTOCOL_VERSION}"
                )
            self.peer_hello = hello
            return hello
        if kind == "hello":
            raise ProtocolError("hello sent twice")
        if self.role is Role.SERVER:
            if kind == "request":
                return _request_from_wire(d)
            if kind == "cancel":
                return Cancel(_CANCEL(d, "cancel")["id"])
            raise ProtocolError(f"unknown message type {kind!r}")
        return _server_message_from_wire(kind, d)
