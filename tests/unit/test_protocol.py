"""The runner protocol codec: every message round-trips; every malformed frame is refused."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import protocol as p
from shared.errors import ErrorCode
from shared.model import JobState, JobStatus, JobUsage, OutputChunk, Stream

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
