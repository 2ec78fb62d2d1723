"""The runner protocol codec: every message round-trips; every malformed frame is refused."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import protocol as p
from shared.errors import ErrorCode
from shared.model import JobState, JobStatus, JobUsage, OutputChunk, ResourceLimits, Stream

CALLER = p.Caller("alice", "user")
STATUS = JobStatus(
    id="XE38YM",
    type="eval",
    args={"expression": "2x", "variables": {"x": 2.0}},
    owner="alice",
    state=JobState.FAILED,
    created_ns=1,
    started_ns=2,
    ended_ns=3,
    exit_code=1,
    signal=None,
    error="exited with status 1",
    oom_killed=False,
    usage=JobUsage(cpu_ns=5, peak_memory_bytes=6, read_bytes=7, written_bytes=8),
)

CLIENT_MESSAGES: list[p.ClientMessage] = [
    p.Request(1, p.Op.START, CALLER, p.StartArgs("fib", {"position": 3})),
    p.Request(2, p.Op.STOP, CALLER, p.JobRef("XE38YM")),
    p.Request(3, p.Op.STATUS, CALLER, p.JobRef("XE38YM")),
    p.Request(4, p.Op.LIST, CALLER, p.ListArgs(None)),
    p.Request(5, p.Op.LIST, CALLER, p.ListArgs("bob")),
    p.Request(10, p.Op.LIST, CALLER, p.ListArgs(None, (1795821342201136872, "XE38YM"))),
    p.Request(6, p.Op.TAIL, CALLER, p.TailArgs("XE38YM", True, None, None)),
    p.Request(7, p.Op.TAIL, CALLER, p.TailArgs("XE38YM", False, 1234, None)),
    p.Request(8, p.Op.TAIL, CALLER, p.TailArgs("XE38YM", True, None, 10)),
    p.Request(9, p.Op.TYPES, CALLER, p.TypesArgs()),
    p.Request(11, p.Op.DELETE, CALLER, p.JobRef("XE38YM")),
    p.Cancel(6),
]
SERVER_MESSAGES: list[p.ServerMessage] = [
    p.JobReply(1, STATUS),
    p.TypesReply(9, [{"name": "noop", "title": "No-op", "description": "", "args": []}]),
    p.JobsItem(4, [STATUS, STATUS]),
    p.OutputItem(
        6,
        [
            OutputChunk(0, 20, 10, Stream.STDOUT, b"\xff\x00 not utf-8\n"),
            OutputChunk(20, 30, 11, Stream.STDERR, b"partial"),
        ],
    ),
    p.End(6),
    p.ErrorReply(3, ErrorCode.NOT_FOUND, "job 'XE38YM' not found"),
    p.ErrorReply(None, ErrorCode.INVALID_ARGUMENT, "bad frame"),
]


def _pair() -> tuple[p.Connection, p.Connection]:
    server, client = p.Connection(p.Role.SERVER), p.Connection(p.Role.CLIENT)
    server.receive_data(client.send(p.Hello()))
    assert server.next_message() == p.Hello()
    client.receive_data(server.send(p.Hello(software="runner")))
    assert client.next_message() == p.Hello(software="runner")
    return server, client


@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=lambda m: type(m).__name__)
def test_client_messages_round_trip(message: p.ClientMessage) -> None:
    server, client = _pair()
    server.receive_data(client.send(message))
    assert server.next_message() == message
    assert server.next_message() is None


@pytest.mark.parametrize("message", SERVER_MESSAGES, ids=lambda m: type(m).__name__)
def test_server_messages_round_trip(message: p.ServerMessage) -> None:
    server, client = _pair()
    data = server.send(message)
    for i in range(len(data)):  # byte by byte: framing copes with any split
        client.receive_data(data[i : i + 1])
        got = client.next_message()
        if i < len(data) - 1:
            assert got is None
    assert got == message


def _frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _request(**over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": "request",
        "id": 1,
        "op": "status",
        "caller": {"user": "alice", "role": "user"},
        "args": {"job_id": "XE38YM"},
    }
    msg.update(over)
    return msg


BAD_REQUESTS = [
    (_request(op="exec"), "must be one of"),
    (_request(op=7), "must be one of"),
    (_request(id="1"), "expected an integer"),
    (_request(id=0), "must be in"),
    (_request(args={"job_id": 5}), "expected a string"),
    (_request(args={"job_id": "X", "extra": 1}), "unknown field 'extra'"),
    (_request(args={}), "missing field 'job_id'"),
    (_request(op="delete", args={}), "missing field 'job_id'"),
    (_request(op="delete", args={"job_id": "X" * 65}), "length must be"),
    (_request(op="delete", args={"job_id": "XE38YM", "force": True}), "unknown field 'force'"),
    (_request(caller={"user": "alice"}), "missing field 'role'"),
    (_request(caller={"user": "", "role": "user"}), "length must be"),
    (_request(caller={"user": "a" * 65, "role": "user"}), "length must be"),
    (_request(extra=True), "unknown field 'extra'"),
    (_request(op="tail", args={"job_id": "XE38YM", "follow": "yes"}), "expected a boolean"),
    (_request(op="list", args={"after": [1]}), r"expected \[created_ns, job_id\]"),
    (_request(op="list", args={"after": [-1, "XE38YM"]}), "must be in"),
    (_request(op="tail", args={"job_id": "XE38YM", "follow": True, "last": -1}), "must be in"),
    (_request(op="start", args={"job_type": "fib", "args": {"position": [1]}}), "expected a num"),
    (_request(op="start", args={"job_type": "fib", "args": []}), "expected a map"),
    ({"type": "bogus"}, "unknown message type 'bogus'"),
    ({"type": "hello", "version": 1, "software": "x"}, "hello sent twice"),
    ({"id": 1}, "no string 'type'"),
    ([1, 2], "must hold a map"),
    ("just a string", "must hold a map"),
]


@pytest.mark.parametrize(("obj", "message"), BAD_REQUESTS)
def test_malformed_requests_are_refused_with_a_precise_error(obj: Any, message: str) -> None:
    server, _ = _pair()
    server.receive_data(_frame(obj))
    with pytest.raises(p.ProtocolError, match=message):
        server.next_message()


def test_a_request_error_carries_the_request_id_when_known() -> None:
    server, _ = _pair()
    server.receive_data(_frame(_request(id=42, args={"job_id": 5})))
    with pytest.raises(p.ProtocolError) as exc:
        server.next_message()
    assert exc.value.request_id == 42


def test_oversized_frame_is_refused_before_its_body_arrives() -> None:
    server, _ = _pair()
    server.receive_data(struct.pack(">I", p.MAX_FRAME_SIZE + 1))
    with pytest.raises(p.ProtocolError, match="exceeds"):
        server.next_message()


def test_empty_frame_and_truncated_frame_are_refused() -> None:
    server, _ = _pair()
    server.receive_data(struct.pack(">I", 0))
    with pytest.raises(p.ProtocolError, match="empty frame"):
        server.next_message()
    server, _ = _pair()
    server.receive_data(_frame(_request())[:-3])
    assert server.next_message() is None
    with pytest.raises(p.ProtocolError, match="middle of a frame"):
        server.receive_eof()


def test_garbage_and_trailing_bytes_inside_a_frame_are_refused() -> None:
    server, _ = _pair()
    server.receive_data(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # 0xc1 is never valid
    with pytest.raises(p.ProtocolError, match="not valid msgpack"):
        server.next_message()
    body = msgpack.packb(_request()) + b"\x00"
    server, _ = _pair()
    server.receive_data(struct.pack(">I", len(body)) + body)
    with pytest.raises(p.ProtocolError, match="not valid msgpack"):
        server.next_message()


def test_extension_types_and_bad_utf8_are_refused() -> None:
    server, _ = _pair()
    server.receive_data(_frame(msgpack.ExtType(5, b"x")))
    with pytest.raises(p.ProtocolError, match="extension"):
        server.next_message()
    server, _ = _pair()
    body = b"\x81\xa4type\xa2\xff\xfe"  # {"type": <invalid utf-8 str>}
    server.receive_data(struct.pack(">I", len(body)) + body)
    with pytest.raises(p.ProtocolError):
        server.next_message()


def test_hello_must_come_first_with_the_same_version() -> None:
    server = p.Connection(p.Role.SERVER)
    server.receive_data(_frame(_request()))
    with pytest.raises(p.ProtocolError, match="expected hello first"):
        server.next_message()
    server = p.Connection(p.Role.SERVER)
    server.receive_data(_frame({"type": "hello", "version": 99, "software": "future"}))
    with pytest.raises(p.ProtocolError, match="unsupported protocol version 99"):
        server.next_message()


def test_a_client_refuses_a_request_from_the_server() -> None:
    _, client = _pair()
    client.receive_data(_frame(_request()))
    with pytest.raises(p.ProtocolError, match="unknown message type 'request'"):
        client.next_message()


def test_sending_the_wrong_arguments_for_an_op_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        p.encode_frame(p.Request(1, p.Op.START, CALLER, p.JobRef("X")))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    for role in p.Role:
        conn = p.Connection(role)
        conn.receive_data(p.encode_frame(p.Hello()))
        conn.next_message()
        conn.receive_data(data)
        with contextlib.suppress(p.ProtocolError):
            while conn.next_message() is not None:
                pass


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["type", "id", "op", "caller", "args", "job", "chunks", "code", "x"]),
        MSGPACK_VALUES,
        max_size=6,
    ),
    st.sampled_from(["request", "cancel", "job", "jobs", "output", "types", "end", "error"]),
)
def test_fuzz_structured_maps_only_ever_raise_protocol_error(
    fields: dict[str, Any], kind: str
) -> None:
    fields.setdefault("type", kind)
    for role in p.Role:
        conn = p.Connection(role)
        conn.receive_data(p.encode_frame(p.Hello()))
        conn.next_message()
        conn.receive_data(_frame(fields))
        with contextlib.suppress(p.ProtocolError):
            conn.next_message()


# --- decoder bounds: derived from the schemas, checked before msgpack builds anything ---------


def _values(obj: Any) -> int:
    """How many msgpack values ``obj`` encodes to: containers, map keys and scalars."""
    if isinstance(obj, dict):
        return 1 + sum(1 + _values(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return 1 + sum(_values(v) for v in obj)
    return 1


def _largest_args() -> dict[str, Any]:
    """Job arguments with the most values the schemas allow: every one a full nested map."""
    return {f"a{i}": {f"v{j}": j for j in range(p.MAX_ARG_ENTRIES)} for i in range(p.MAX_JOB_ARGS)}


LARGEST_START = p.Request(
    1, p.Op.START, CALLER, p.StartArgs("eval", _largest_args(), ResourceLimits(*range(1, 8)))
)
LARGEST_STATUS = dataclasses.replace(STATUS, args=_largest_args())


def _server_receives(obj: Any) -> p.Message | None:
    server, _ = _pair()
    server.receive_data(_frame(obj))
    return server.next_message()


def test_the_largest_request_is_exactly_what_the_runner_decodes() -> None:
    limits = p.RECEIVED_LIMITS[p.Role.SERVER]
    wire = p.to_wire(LARGEST_START)
    assert _values(wire) == limits.values
    assert _server_receives(wire) == LARGEST_START
    wire["caller"]["x"] = 1  # one key and one value more, anywhere
    with pytest.raises(p.ProtocolError, match=f"frame holds more than {limits.values} values"):
        _server_receives(wire)


def test_the_largest_list_frame_is_exactly_what_the_api_decodes() -> None:
    limits = p.RECEIVED_LIMITS[p.Role.CLIENT]
    message = p.JobsItem(4, [LARGEST_STATUS] * p.MAX_JOBS_PER_FRAME)
    server, client = _pair()
    data = server.send(message)
    assert len(data) <= p.MAX_FRAME_SIZE
    assert _values(p.to_wire(message)) == limits.values
    client.receive_data(data)
    assert client.next_message() == message
    wire = p.to_wire(message)
    wire["jobs"][0]["usage"]["x"] = 1
    client.receive_data(_frame(wire))
    with pytest.raises(p.ProtocolError, match=f"frame holds more than {limits.values} values"):
        client.next_message()


def test_the_runner_decodes_no_more_than_requests_hold() -> None:
    limits = p.RECEIVED_LIMITS[p.Role.SERVER]
    # A start request nests four maps deep (request, args, job arguments, variables), holds no
    # binary data, no array but list's [created_ns, job_id], maps of at most 64 entries and
    # strings of at most 4096 characters.
    assert (limits.depth, limits.bin_bytes, limits.array_len) == (4, 0, 2)
    assert (limits.map_len, limits.str_bytes) == (64, 4 * 4096)


BEYOND_REQUESTS = [
    (_request(args={"job_id": "X" * (4 * 4096 + 1)}), "a string of 16385 bytes"),
    (_request(args={"job_id": b"XE38YM"}), "binary data of 6 bytes"),
    (_request(caller=[1, 2, 3]), "an array of 3 items; no message has more than 2"),
    (_request(args={f"k{i}": 0 for i in range(65)}), "a map of 65 entries; no message has more"),
    (_request(args={"job_id": {"a": {"b": {"c": 1}}}}), "nests containers more than 4 deep"),
    (_request(op="start", args={"job_type": "eval", "args": {"a": {"b": {}}}}), "more than 4"),
]


@pytest.mark.parametrize(("obj", "message"), BEYOND_REQUESTS)
def test_a_frame_beyond_every_request_is_refused_as_a_whole(obj: Any, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message) as exc:
        _server_receives(obj)
    assert exc.value.request_id is None  # a frame no request could be: the connection closes


def test_strings_are_bounded_in_bytes_by_their_length_in_characters() -> None:
    expression = "\U0001f600" * 4096  # 4096 characters, 16 KiB
    request = p.Request(1, p.Op.START, CALLER, p.StartArgs("eval", {"expression": expression}))
    assert _server_receives(p.to_wire(request)) == request


BAD_MSGPACK = [
    (b"\xc1", "byte 0xc1 at 0"),
    (b"\x92\x01", "ends in the middle of a value"),
    (b"\xcd\x01", "ends in the middle of a value"),  # a uint 16 missing a byte
    (b"\xda\x00", "ends in the middle of a value"),  # a str 16 missing a length byte
    (b"\xa5abc", "ends in the middle of a value"),
    (b"\x81\xa4type\xa1x\x00", "bytes after the message"),
    (b"\xd4\x01\x00", "extension type"),
    (b"\xc7\x01\x05x", "extension type"),
]


@pytest.mark.parametrize(("body", "message"), BAD_MSGPACK)
def test_malformed_msgpack_is_refused_before_it_is_decoded(body: bytes, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.decode_body(body, p.Role.SERVER)


UNBOUNDED = p.Limits(
    depth=900,
    values=1 << 30,
    str_bytes=1 << 30,
    bin_bytes=1 << 30,
    array_len=1 << 30,
    map_len=1 << 30,
)


def _msgpack_accepts(body: bytes) -> bool | None:
    """Whether msgpack decodes ``body`` (extension types refused); None when it cannot say
    because the value is valid msgpack that Python cannot hold (a map as a map key)."""
    try:
        msgpack.unpackb(
            body, raw=True, use_list=False, strict_map_key=False, ext_hook=p._reject_ext
        )
    except TypeError:
        return None
    except Exception:
        return False
    return True


def _scan_accepts(body: bytes) -> bool:
    try:
        p._check_shape(body, UNBOUNDED)
    except p.ProtocolError:
        return False
    return True


def _mangled(data: bytes, cut: int, flip: int) -> bytes:
    data = data[: max(1, len(data) - cut)]
    if flip < len(data):
        data = data[:flip] + bytes([data[flip] ^ 0xFF]) + data[flip + 1 :]
    return data


@settings(max_examples=600, deadline=None)
@given(
    st.one_of(
        st.binary(min_size=1, max_size=64),
        MSGPACK_VALUES.map(lambda v: msgpack.packb(v, use_bin_type=True)),
        st.tuples(
            MSGPACK_VALUES.map(lambda v: msgpack.packb(v, use_bin_type=True)),
            st.integers(0, 8),
            st.integers(0, 64),
        ).map(lambda t: _mangled(*t)),
    )
)
def test_the_shape_check_reads_msgpack_as_msgpack_does(body: bytes) -> None:
    """The check walks the same values msgpack would build, or it would bound the wrong ones."""
    expected = _msgpack_accepts(body)
    if expected is not None:
        assert _scan_accepts(body) == expected


# --- what is sent is what the peer accepts -----------------------------------------------------

NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=p.MAX_NAME)
TEXTS = st.text(st.characters(codec="utf-8"), max_size=p.MAX_MESSAGE + 100)  # longer ones cut
IDS = st.integers(1, p.MAX_ID)
NATURALS = st.integers(0, p.MAX_ID)
SCALARS = (
    st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=p.MAX_MESSAGE)
)
JOB_ARGS = st.dictionaries(
    NAMES,
    SCALARS | st.dictionaries(NAMES, SCALARS, max_size=p.MAX_ARG_ENTRIES),
    max_size=8,
)
LIMITS = st.builds(ResourceLimits, *[NATURALS] * len(dataclasses.fields(ResourceLimits)))
STATUSES = st.builds(
    JobStatus,
    id=NAMES,
    type=NAMES,
    args=JOB_ARGS,
    owner=NAMES,
    state=st.sampled_from(JobState),
    created_ns=NATURALS,
    started_ns=st.none() | NATURALS,
    ended_ns=st.none() | NATURALS,
    exit_code=st.none() | st.integers(-(2**31), 2**31 - 1),
    signal=st.none() | st.integers(0, 255),
    error=TEXTS,
    oom_killed=st.booleans(),
    usage=st.builds(JobUsage, NATURALS, NATURALS, NATURALS, NATURALS),
    limits=LIMITS,
)
CHUNKS = st.builds(
    lambda offset, length, ts, stream, data: OutputChunk(offset, offset + length, ts, stream, data),
    st.integers(0, p.MAX_ID // 2),
    st.integers(1, p.MAX_ID // 2),
    NATURALS,
    st.sampled_from(Stream),
    st.binary(max_size=256),
)
ARG_INFO = st.fixed_dictionaries(
    {
        "name": NAMES,
        "type": NAMES,
        "required": st.booleans(),
        "description": TEXTS.map(lambda t: t[: p.MAX_MESSAGE]),
    },
    optional={
        "min": st.floats(allow_nan=False),
        "max": st.integers(-(2**63), 2**63),
        "max_length": st.integers(0, 2**32 - 1),
    },
)
TYPE_INFO = st.fixed_dictionaries(
    {
        "name": NAMES,
        "title": NAMES,
        "description": TEXTS.map(lambda t: t[: p.MAX_MESSAGE]),
        "args": st.lists(ARG_INFO, max_size=4),
    }
)
SERVER_REPLIES = st.one_of(
    st.builds(p.JobReply, IDS, STATUSES),
    st.builds(p.TypesReply, IDS, st.lists(TYPE_INFO, max_size=3)),
    st.builds(p.JobsItem, IDS, st.lists(STATUSES, max_size=3)),
    st.builds(p.OutputItem, IDS, st.lists(CHUNKS, max_size=8)),
    st.builds(p.End, IDS),
    st.builds(p.ErrorReply, st.none() | IDS, st.sampled_from(ErrorCode), TEXTS),
)


def _as_sent(message: p.ServerMessage) -> p.ServerMessage:
    """``message`` with the texts for people cut to their size, as the wire carries them."""
    if isinstance(message, p.JobReply):
        return dataclasses.replace(message, job=_cut(message.job))
    if isinstance(message, p.JobsItem):
        return dataclasses.replace(message, jobs=[_cut(j) for j in message.jobs])
    if isinstance(message, p.ErrorReply):
        return dataclasses.replace(message, message=message.message[: p.MAX_MESSAGE])
    if isinstance(message, p.TypesReply):  # optional fields arrive as nil
        types = [
            {**t, "args": [{"min": None, "max": None, "max_length": None, **a} for a in t["args"]]}
            for t in message.types
        ]
        return dataclasses.replace(message, types=types)
    return message


def _cut(job: JobStatus) -> JobStatus:
    return dataclasses.replace(job, error=job.error[: p.MAX_MESSAGE])


@settings(max_examples=300, deadline=None)
@given(SERVER_REPLIES)
def test_every_reply_the_runner_can_build_is_one_the_api_accepts(
    message: p.ServerMessage,
) -> None:
    server, client = _pair()
    client.receive_data(server.send(message))
    assert client.next_message() == _as_sent(message)


INVALID_REPLIES = [
    (p.OutputItem(6, [OutputChunk(0, 10, -1, Stream.STDOUT, b"x")]), "timestamp_ns"),
    (p.OutputItem(6, [OutputChunk(10, 10, 1, Stream.STDOUT, b"x")]), "next_offset must be after"),
    (p.JobReply(1, dataclasses.replace(STATUS, owner="")), "owner"),
    (p.JobReply(1, dataclasses.replace(STATUS, args={"x": [1]})), "expected a number"),
    (p.JobsItem(4, [STATUS] * (p.MAX_JOBS_PER_FRAME + 1)), "more than 32 items"),
    (p.TypesReply(9, [{"name": "noop"}]), "missing field"),
]


@pytest.mark.parametrize(("message", "match"), INVALID_REPLIES)
def test_a_reply_the_api_would_refuse_is_never_sent(message: p.ServerMessage, match: str) -> None:
    server, _ = _pair()
    with pytest.raises(ValueError, match=f"refusing to send a {type(message).__name__}.*{match}"):
        server.send(message)


def test_a_request_the_runner_would_refuse_is_never_sent() -> None:
    _, client = _pair()
    with pytest.raises(ValueError, match=r"refusing to send a Request.*job_id"):
        client.send(p.Request(1, p.Op.STATUS, CALLER, p.JobRef("")))
