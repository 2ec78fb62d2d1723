"""The runner protocol (design section 4), sans-IO.

Frames are a 4-byte big-endian length followed by one msgpack map. This module only turns bytes
into validated messages and messages into bytes, like h11 does for HTTP: the socket code around
it is thin, and the codec can be tested and fuzzed on its own.

Every frame is checked against an explicit schema before anything uses it: unknown message
types, unknown keys, wrong types and oversized values are errors, never ignored. Even before
msgpack builds anything from a frame, the frame is checked against the most those schemas
allow (:func:`_check_shape`), so what decoding builds is bounded by the protocol, not by what
the peer sends. A :class:`ProtocolError` means the peer is broken or hostile; the socket code
answers it with an error frame and closes that connection. What a side sends is checked with
its peer's schemas first (:meth:`Connection.send`).

Conversation::

    client -> runner   hello    {version, software}
    runner -> client   hello    {version, software}
    client -> runner   request  {id, op, caller: {user, role}, args: {...}}
    runner -> client   job      {id, job}            start, stop, status, delete
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
import functools
import operator
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

import msgpack

from shared import catalog
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
MAX_JOB_ARGS = 64  # arguments of one job, and argument descriptions of one job type
MAX_ARG_ENTRIES = catalog.MAX_VARIABLES  # entries of a map argument (eval's variables)
MAX_TYPES = 256  # job types in a "types" reply
MAX_JOBS_PER_FRAME = 32  # job statuses in one "jobs" frame: the largest ones fit
MAX_CHUNKS_PER_FRAME = 1024  # output chunks in one "output" frame
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
    DELETE = "delete"  # a finished job: its record, output and workspace


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
    """Arguments of ``stop``, ``status`` and ``delete``."""

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


# --- schemas ----------------------------------------------------------------------------------
# A schema checks one decoded value (and returns the value to use) and knows the most such a
# value can hold on the wire. The decoder refuses a frame that no message its side receives
# could be before msgpack builds anything from it (see _check_shape): the bounds of the
# decoder are derived here, from the same schemas that check the messages, never set apart.


@dataclass(frozen=True)
class Limits:
    """The most a value holds on the wire, which bounds what decoding it builds."""

    depth: int = 0  # containers inside each other: a scalar 0, a map of scalars 1
    values: int = 1  # msgpack values in all: containers, map keys and scalars
    str_bytes: int = 0  # the longest string (UTF-8)
    bin_bytes: int = 0  # the longest binary data
    array_len: int = 0  # items of the longest array
    map_len: int = 0  # entries of the largest map

    def __or__(self, other: Limits) -> Limits:
        """What admits a value of either."""
        return Limits(*(max(getattr(self, f), getattr(other, f)) for f in _LIMIT_FIELDS))


_LIMIT_FIELDS = tuple(Limits.__dataclass_fields__)
SCALAR = Limits()


def _union(limits: Iterable[Limits]) -> Limits:
    return functools.reduce(operator.or_, limits, Limits(values=0))


def _container(members: Sequence[Limits], *, array_len: int = 0, map_len: int = 0) -> Limits:
    """A container of ``members``: an array's items, or a map's keys and values."""
    inner = _union(members) | Limits(values=0, array_len=array_len, map_len=map_len)
    return replace(inner, depth=inner.depth + 1, values=1 + sum(m.values for m in members))


def _str_limits(max_chars: int) -> Limits:
    return Limits(str_bytes=4 * max_chars)  # UTF-8 takes up to 4 bytes a character


def _map_limits(fields: Mapping[str, Limits]) -> Limits:
    members = [m for key, value in fields.items() for m in (_str_limits(len(key)), value)]
    return _container(members, map_len=len(fields))


@dataclass(frozen=True)
class Schema:
    """A check of one decoded value, which returns the value to use, and the most such a value
    holds on the wire."""

    check: Callable[[Any, str], Any]
    limits: Limits

    def __call__(self, value: Any, path: str) -> Any:
        return self.check(value, path)


def _fail(path: str, what: str) -> ProtocolError:
    return ProtocolError(f"{path}: {what}")


def _type_name(value: object) -> str:
    return "nil" if value is None else type(value).__name__


def t_str(max_len: int = MAX_NAME, min_len: int = 0) -> Schema:
    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _fail(path, f"expected a string, got {_type_name(value)}")
        if not min_len <= len(value) <= max_len:
            raise _fail(path, f"length must be {min_len}..{max_len}, got {len(value)}")
        return value

    return Schema(check, _str_limits(max_len))


def t_int(lo: int = 0, hi: int = MAX_ID) -> Schema:
    def check(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, f"expected an integer, got {_type_name(value)}")
        if not lo <= value <= hi:
            raise _fail(path, f"must be in {lo}..{hi}, got {value}")
        return value

    return Schema(check, SCALAR)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected a boolean, got {_type_name(value)}")
    return value


t_bool = Schema(_bool, SCALAR)


def t_bytes(max_len: int) -> Schema:
    def check(value: Any, path: str) -> bytes:
        if not isinstance(value, bytes):
            raise _fail(path, f"expected bytes, got {_type_name(value)}")
        if len(value) > max_len:
            raise _fail(path, f"longer than {max_len} bytes")
        return value

    return Schema(check, Limits(bin_bytes=max_len))


def t_optional(inner: Schema) -> Schema:
    def check(value: Any, path: str) -> Any:
        return None if value is None else inner(value, path)

    return Schema(check, inner.limits)


def t_list(item: Schema, max_items: int) -> Schema:
    def check(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise _fail(path, f"expected a list, got {_type_name(value)}")
        if len(value) > max_items:
            raise _fail(path, f"more than {max_items} items")
        return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]

    return Schema(check, _container([item.limits] * max_items, array_len=max_items))


def t_tuple(**items: Schema) -> Schema:
    """An array of exactly these items, in this order; they are named in messages only."""
    description = f"[{', '.join(items)}]"

    def check(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list) or len(value) != len(items):
            raise _fail(path, f"expected {description}")
        pairs = zip(items.items(), value, strict=True)
        return [item(v, f"{path}.{name}") for (name, item), v in pairs]

    return Schema(check, _container([i.limits for i in items.values()], array_len=len(items)))


def t_enum(kind: type[enum.Enum]) -> Schema:
    allowed = {m.value: m for m in kind}

    def check(value: Any, path: str) -> Any:
        if isinstance(value, bool) or value not in allowed:
            choices = ", ".join(repr(v) for v in allowed)
            raise _fail(path, f"must be one of {choices}, got {value!r}")
        return allowed[value]

    names = [len(v) for v in allowed if isinstance(v, str)]
    return Schema(check, _str_limits(max(names, default=0)))


def t_record(
    required: Mapping[str, Schema], optional: Mapping[str, Schema] | None = None
) -> Schema:
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

    fields = {**required, **optional}
    return Schema(check, _map_limits({k: s.limits for k, s in fields.items()}))


def _scalar(value: Any, path: str) -> Any:
    if isinstance(value, str):
        return _SHORT_TEXT(value, path)
    if isinstance(value, bool | int | float):
        return value
    raise _fail(path, f"expected a number, string or boolean, got {_type_name(value)}")


_SHORT_TEXT = t_str(MAX_MESSAGE)
t_scalar = Schema(_scalar, _SHORT_TEXT.limits)
_ARG_NAME = t_str(MAX_NAME, 1)


def _job_args(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, f"expected a map, got {_type_name(value)}")
    if len(value) > MAX_JOB_ARGS:
        raise _fail(path, f"more than {MAX_JOB_ARGS} arguments")
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = _ARG_NAME(key, f"{path} key")
        if isinstance(item, dict):
            if len(item) > MAX_ARG_ENTRIES:
                raise _fail(f"{path}.{name}", f"more than {MAX_ARG_ENTRIES} entries")
            out[name] = {
                _ARG_NAME(k, f"{path}.{name} key"): _scalar(v, f"{path}.{name}.{k}")
                for k, v in item.items()
            }
        else:
            out[name] = _scalar(item, f"{path}.{name}")
    return out


_NESTED_ARGS = _container(
    [_ARG_NAME.limits, t_scalar.limits] * MAX_ARG_ENTRIES, map_len=MAX_ARG_ENTRIES
)
# Job arguments: name -> scalar, or name -> map of name -> scalar (eval's variables). This checks
# only shape and size; the job catalog checks meaning.
t_job_args = Schema(
    _job_args,
    _container(
        [_ARG_NAME.limits, t_scalar.limits | _NESTED_ARGS] * MAX_JOB_ARGS, map_len=MAX_JOB_ARGS
    ),
)


_CALLER = t_record({"user": t_str(MAX_NAME, 1), "role": t_str(MAX_NAME, 1)})
_JOB_ID = t_str(MAX_NAME, 1)
_TIME = t_optional(t_int(0, MAX_ID))

MAX_LIMIT = 2**63 - 1
_LIMITS = t_record({name: t_int(0, MAX_LIMIT) for name in LIMIT_NAMES})

_AFTER = t_tuple(created_ns=t_int(), job_id=t_str(MAX_NAME, 1))

_OP_ARGS: dict[Op, Schema] = {
    Op.START: t_record(
        {"job_type": t_str(MAX_NAME, 1), "args": t_job_args}, {"limits": t_optional(_LIMITS)}
    ),
    Op.STOP: t_record({"job_id": _JOB_ID}),
    Op.STATUS: t_record({"job_id": _JOB_ID}),
    Op.LIST: t_record(
        {},
        {
            "owner": t_optional(t_str(MAX_NAME, 1)),
            "after": t_optional(Schema(lambda v, p: tuple(_AFTER(v, p)), _AFTER.limits)),
        },
    ),
    Op.TAIL: t_record(
        {"job_id": _JOB_ID, "follow": t_bool},
        {
            "offset": t_optional(t_int(0, MAX_ID)),
            "last": t_optional(t_int(0, MAX_TAIL_LINES)),
        },
    ),
    Op.TYPES: t_record({}),
    Op.DELETE: t_record({"job_id": _JOB_ID}),
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


def _status_from_wire(value: Any, path: str) -> JobStatus:
    d = _JOB_STATUS(value, path)
    d["usage"] = JobUsage(**d["usage"])
    d["limits"] = ResourceLimits(**d["limits"])
    d["failure_reason"] = d["failure_reason"] or ""  # optional: a runner before it sent none
    return JobStatus(**d)


_CHUNK = t_tuple(
    offset=t_int(),
    next_offset=t_int(),
    timestamp_ns=t_int(),
    stream=t_enum(Stream),
    data=t_bytes(MAX_CHUNK_DATA),
)


def _chunk_from_wire(value: Any, path: str) -> OutputChunk:
    # The common case first, in one step: a tail's frames hold up to 1024 chunks each.
    if type(value) is list and len(value) == 5:
        offset, next_offset, timestamp_ns, stream, data = value
        if (
            type(offset) is int
            and type(next_offset) is int
            and type(timestamp_ns) is int
            and 0 <= offset < next_offset <= MAX_ID
            and 0 <= timestamp_ns <= MAX_ID
            and type(data) is bytes
            and len(data) <= MAX_CHUNK_DATA
            and type(stream) is int
            and stream in (1, 2)
        ):
            return OutputChunk(offset, next_offset, timestamp_ns, Stream(stream), data)
    chunk = OutputChunk(*_CHUNK(value, path))  # the slow way, which says what is wrong
    if chunk.next_offset <= chunk.offset:
        raise _fail(path, "next_offset must be after offset")
    return chunk


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
                    "min": t_optional(t_scalar),
                    "max": t_optional(t_scalar),
                    "max_length": t_optional(t_int(0, 2**32 - 1)),
                },
            ),
            MAX_JOB_ARGS,
        ),
    }
)

_TYPE = t_str()  # every message's "type"; which ones exist is checked by kind
_HELLO = t_record({"type": _TYPE, "version": t_int(0, 2**31), "software": t_str(MAX_MESSAGE)})
_REQUEST = t_record(
    {
        "type": _TYPE,
        "id": t_int(1),
        "op": t_enum(Op),
        "caller": _CALLER,
        # checked per op once the op is known; it holds no more than the largest of them
        "args": Schema(lambda v, p: v, _union(s.limits for s in _OP_ARGS.values())),
    }
)
_CANCEL = t_record({"type": _TYPE, "id": t_int(1)})

# What the runner sends, by "type".
_SERVER_MESSAGES: dict[str, Schema] = {
    "job": t_record(
        {"type": _TYPE, "id": t_int(1), "job": Schema(_status_from_wire, _JOB_STATUS.limits)}
    ),
    "types": t_record({"type": _TYPE, "id": t_int(1), "types": t_list(_TYPE_INFO, MAX_TYPES)}),
    "jobs": t_record(
        {
            "type": _TYPE,
            "id": t_int(1),
            "jobs": t_list(Schema(_status_from_wire, _JOB_STATUS.limits), MAX_JOBS_PER_FRAME),
        }
    ),
    "output": t_record(
        {
            "type": _TYPE,
            "id": t_int(1),
            "chunks": t_list(Schema(_chunk_from_wire, _CHUNK.limits), MAX_CHUNKS_PER_FRAME),
        }
    ),
    "end": t_record({"type": _TYPE, "id": t_int(1)}),
    "error": t_record(
        {
            "type": _TYPE,
            "id": t_optional(t_int(1)),
            "code": t_enum(ErrorCode),
            "message": t_str(MAX_MESSAGE),
        }
    ),
}
_SERVER_MESSAGE_TYPES: dict[str, Callable[[dict[str, Any]], ServerMessage]] = {
    "job": lambda r: JobReply(r["id"], r["job"]),
    "types": lambda r: TypesReply(r["id"], r["types"]),
    "jobs": lambda r: JobsItem(r["id"], r["jobs"]),
    "output": lambda r: OutputItem(r["id"], r["chunks"]),
    "end": lambda r: End(r["id"]),
    "error": lambda r: ErrorReply(r["id"], r["code"], r["message"]),
}


class Role(enum.Enum):
    CLIENT = "client"  # the api
    SERVER = "server"  # the runner

    @property
    def peer(self) -> Role:
        return Role.SERVER if self is Role.CLIENT else Role.CLIENT


# The most a frame received by each side can hold: the largest message it may receive.
RECEIVED_LIMITS: dict[Role, Limits] = {
    Role.SERVER: _union(s.limits for s in (_HELLO, _REQUEST, _CANCEL)),
    Role.CLIENT: _union(s.limits for s in (_HELLO, *_SERVER_MESSAGES.values())),
}


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
        "error": job.error[:MAX_MESSAGE],  # text for people: a longer one is cut, not refused
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
    Op.DELETE: lambda d: JobRef(**d),
}

_ARGS_TYPE: dict[Op, type] = {
    Op.START: StartArgs,
    Op.STOP: JobRef,
    Op.STATUS: JobRef,
    Op.LIST: ListArgs,
    Op.TAIL: TailArgs,
    Op.TYPES: TypesArgs,
    Op.DELETE: JobRef,
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


def _message_from_wire(receiver: Role, d: dict[str, Any]) -> Message:
    """The message in ``d`` as ``receiver`` checks it; whether it may come now is not checked."""
    kind = d["type"]
    if kind == "hello":
        return Hello(**{k: v for k, v in _HELLO(d, "hello").items() if k != "type"})
    if receiver is Role.SERVER:
        if kind == "request":
            return _request_from_wire(d)
        if kind == "cancel":
            return Cancel(_CANCEL(d, "cancel")["id"])
    elif kind in _SERVER_MESSAGES:
        return _SERVER_MESSAGE_TYPES[kind](_SERVER_MESSAGES[kind](d, kind))
    raise ProtocolError(f"unknown message type {kind!r}")


# --- framing ----------------------------------------------------------------------------------


def encode_frame(message: Message) -> bytes:
    body: bytes = msgpack.packb(to_wire(message), use_bin_type=True)
    if len(body) > MAX_FRAME_SIZE:
        raise ValueError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME_SIZE}-byte limit")
    return HEADER.pack(len(body)) + body


_SCALAR, _STR, _BIN, _ARRAY, _MAP = range(5)  # what a msgpack value is, for _check_shape
_KIND_NAMES = {_STR: "a string", _BIN: "binary data", _ARRAY: "an array", _MAP: "a map"}
_KIND_UNITS = {_STR: "bytes", _BIN: "bytes", _ARRAY: "items", _MAP: "entries"}


def _header_table() -> list[tuple[int, int, int] | None]:
    """For each first byte of a msgpack value: its kind, how many bytes after it hold its
    length, and its length when none do (for a scalar: how many bytes after it hold it). None
    for what frames may not hold: the unused byte 0xc1 and extension types."""
    table: list[tuple[int, int, int] | None] = [None] * 256
    for first in (*range(0x00, 0x80), *range(0xE0, 0x100), 0xC0, 0xC2, 0xC3):
        table[first] = (_SCALAR, 0, 0)  # small integers, nil, false, true
    for n in range(16):
        table[0x80 + n] = (_MAP, 0, n)
        table[0x90 + n] = (_ARRAY, 0, n)
    for n in range(32):
        table[0xA0 + n] = (_STR, 0, n)
    table[0xCA], table[0xCB] = (_SCALAR, 0, 4), (_SCALAR, 0, 8)  # floats
    for i in range(4):
        table[0xCC + i] = table[0xD0 + i] = (_SCALAR, 0, 1 << i)  # integers of 1..8 bytes
    for i in range(3):
        table[0xC4 + i] = (_BIN, 1 << i, 0)
        table[0xD9 + i] = (_STR, 1 << i, 0)
    for i in range(2):
        table[0xDC + i] = (_ARRAY, 2 << i, 0)
        table[0xDE + i] = (_MAP, 2 << i, 0)
    return table


_HEADERS = _header_table()


def _check_shape(body: bytes, limits: Limits) -> None:
    """Refuse a frame that holds more than any message its receiver accepts, before msgpack
    builds anything from it: too deep, too many values, an array, map, string or binary too
    long. Reads value headers only (string and binary contents are skipped), so this takes at
    most ``limits.values`` steps, whatever the frame holds."""
    maxima = (0, limits.str_bytes, limits.bin_bytes, limits.array_len, limits.map_len)
    end = len(body)
    pending = [1]  # values still to come in each open container, the outermost first
    pos = values = 0
    while pending:
        if not pending[-1]:
            pending.pop()
            continue
        pending[-1] -= 1
        values += 1
        if values > limits.values:
            raise ProtocolError(
                f"frame holds more than {limits.values} values; no message has more"
            )
        if pos >= end:
            raise ProtocolError("frame is not valid msgpack: it ends in the middle of a value")
        header = _HEADERS[body[pos]]
        if header is None:
            if body[pos] == 0xC1:
                raise ProtocolError(f"frame is not valid msgpack: byte 0xc1 at {pos}")
            raise ProtocolError("frame holds a msgpack extension type, which is not allowed")
        kind, width, length = header
        pos += 1
        if width:
            length = int.from_bytes(body[pos : pos + width])
            pos += width
        if kind == _SCALAR:
            pos += length
            continue
        if length > maxima[kind]:
            raise ProtocolError(
                f"frame holds {_KIND_NAMES[kind]} of {length} {_KIND_UNITS[kind]}; "
                f"no message has more than {maxima[kind]}"
            )
        if kind <= _BIN:  # a string or binary data: skip it
            pos += length
        elif len(pending) > limits.depth:
            raise ProtocolError(
                f"frame nests containers more than {limits.depth} deep; no message does"
            )
        else:
            pending.append(length if kind == _ARRAY else 2 * length)
    if pos != end:
        where = "it ends in the middle of a value" if pos > end else "bytes after the message"
        raise ProtocolError(f"frame is not valid msgpack: {where}")


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def decode_body(body: bytes, receiver: Role) -> dict[str, Any]:
    """Decode one frame body that ``receiver`` got to a map with a string ``type``; the
    message's schema is not checked yet, only that the frame holds no more than the largest
    message ``receiver`` accepts."""
    limits = RECEIVED_LIMITS[receiver]
    _check_shape(body, limits)
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            use_list=True,
            max_str_len=limits.str_bytes,
            max_bin_len=limits.bin_bytes,
            max_array_len=limits.array_len,
            max_map_len=limits.map_len,
            max_ext_len=0,
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


class Connection:
    """One side of a connection: feed it bytes, take validated messages out.

    The first message each way must be ``hello`` with the same protocol version. What this side
    sends is checked as its peer will check it, so that a bug here fails one request with an
    error instead of sending a frame that makes the peer drop the whole connection.
    """

    def __init__(self, role: Role, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self.role = role
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self.peer_hello: Hello | None = None
        self._closed = False

    def send(self, message: Message) -> bytes:
        """Bytes to write for ``message``; ValueError if the peer would refuse them."""
        frame = encode_frame(message)
        try:
            _message_from_wire(self.role.peer, decode_body(frame[HEADER.size :], self.role.peer))
        except ProtocolError as exc:
            raise ValueError(
                f"refusing to send a {type(message).__name__} the peer would refuse: {exc.message}"
            ) from None
        return frame

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
        return self._parse(decode_body(body, self.role))

    def _parse(self, d: dict[str, Any]) -> Message:
        kind = d["type"]
        if self.peer_hello is None:
            if kind != "hello":
                raise ProtocolError(f"expected hello first, got {kind!r}")
            hello = _message_from_wire(self.role, d)
            assert isinstance(hello, Hello)
            if hello.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"unsupported protocol version {hello.version}; "
                    f"this side speaks {PROTOCOL_VERSION}"
                )
            self.peer_hello = hello
            return hello
        if kind == "hello":
            raise ProtocolError("hello sent twice")
        return _message_from_wire(self.role, d)
