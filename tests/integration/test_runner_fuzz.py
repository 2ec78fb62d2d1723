"""Fuzzing the live runner socket: random, truncated, oversized, deeply nested, bloated and
mistyped frames, each on a connection of its own.

Whatever comes in, the runner answers with frames the api accepts (errors among them) and
closes that connection; its memory stays bounded; and a connection opened before the fuzzing
gets correct answers after every example and at the end.
"""

from __future__ import annotations

import copy
import struct
from typing import Any

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared import protocol as p
from tests.conftest import Daemon
from tests.integration import runner_wire as w

JOB_ID = "XE38YM"  # replaced by a real job's id in the requests below
VALID_REQUESTS: list[dict[str, Any]] = [
    w.request(1, "status", {"job_id": JOB_ID}),
    w.request(2, "list", {"owner": "alice", "after": None}),
    w.request(3, "tail", {"job_id": JOB_ID, "follow": False, "offset": 0}),
    w.request(4, "types", {}),
    w.request(5, "start", {"job_type": "noop", "args": {}}),
    w.request(6, "start", {"job_type": "eval", "args": {"expression": "x", "variables": {"x": 1}}}),
    {"type": "cancel", "id": 3},
]

MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=30),
    lambda children: (
        st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=8), children, max_size=8)
    ),
    max_leaves=60,
)


def _fields(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every map field in ``value``, nested ones too."""
    if not isinstance(value, dict):
        return []
    return [q for k, v in value.items() for q in [(*path, k), *_fields(v, (*path, k))]]


@st.composite
def mistyped(draw: st.DrawFn) -> bytes:
    """A valid request with one field, at any depth, given a random value or removed, or with
    a field added."""
    message = copy.deepcopy(draw(st.sampled_from(VALID_REQUESTS)))
    *parents, key = draw(st.sampled_from(_fields(message)))
    target = message
    for parent in parents:
        target = target[parent]
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if action == "replace":
        target[key] = draw(MSGPACK_VALUES)
    elif action == "remove":
        del target[key]
    else:
        target[draw(st.text(max_size=8))] = draw(MSGPACK_VALUES)
    return w.HELLO + w.frame(message)


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    data = w.HELLO + b"".join(w.frame(m) for m in draw(st.lists(st.sampled_from(VALID_REQUESTS))))
    return data[: draw(st.integers(0, len(data)))]


MOST = p.MAX_FRAME_SIZE - 64  # bytes of small values in a frame, leaving room for the rest
START: bytes = msgpack.packb({"type": "request", "id": 1, "op": "start", "caller": w.CALLER})
ARGS: bytes = msgpack.packb("args")


def _in_request(args: bytes) -> bytes:
    """A start request whose arguments are the msgpack value ``args``."""
    return bytes([START[0] + 1]) + START[1:] + ARGS + args


def _bloat(header: bytes, filler: bytes, size: int, in_request: bool = False) -> bytes:
    count = size // len(filler)
    container = header + struct.pack(">I", count) + filler * count
    return _in_request(container) if in_request else container


@st.composite
def bloated(draw: st.DrawFn) -> bytes:
    """A frame of up to 1 MiB of small values: one big container, or one in the arguments of a
    valid request."""
    header = draw(st.sampled_from([b"\xdd", b"\xdf"]))  # array 32, map 32
    filler = draw(st.sampled_from([b"\x80", b"\x90", b"\x91\x80", b"\xc0", b"\x00", b"\xa1a\x80"]))
    size = draw(st.integers(1, MOST) | st.sampled_from([MOST // 4, MOST]))
    return w.HELLO + w.raw_frame(_bloat(header, filler, size, draw(st.booleans())))


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """Containers nested up to 3000 deep, alone or as a valid request's arguments."""
    level = draw(st.sampled_from([b"\x91", b"\x81\xa1a"]))  # [...] or {"a": ...}
    value = level * draw(st.integers(1, 3000)) + b"\xc0"
    return w.HELLO + w.raw_frame(_in_request(value) if draw(st.booleans()) else value)


PAYLOADS = st.one_of(
    st.binary(max_size=2048),  # no hello, just bytes
    st.binary(max_size=2048).map(lambda b: w.HELLO + b),
    st.lists(st.binary(max_size=512).map(w.raw_frame), max_size=4).map(
        lambda frames: w.HELLO + b"".join(frames)
    ),
    MSGPACK_VALUES.map(lambda v: w.HELLO + w.frame(v)),
    st.integers(p.MAX_FRAME_SIZE + 1, 2**32 - 1).map(
        lambda n: w.HELLO + struct.pack(">I", n) + b"\x80" * 64
    ),
    truncated(),
    mistyped(),
    bloated(),
    nested(),
)


def test_fuzzing_the_live_socket_leaves_the_runner_bounded_and_serving(daemon: Daemon) -> None:
    path = str(daemon.config.socket)
    peer = w.Peer(path)  # opened before the fuzzing
    (started,) = peer.call(p.Op.START, p.StartArgs("fib", {"position": 10}))
    assert isinstance(started, p.JobReply)
    job_id = started.job.id
    w.wait_until(lambda: _status(peer, job_id).state.finished)
    expected = _status(peer, job_id)
    for request in VALID_REQUESTS:
        if request.get("args", {}).get("job_id") == JOB_ID:
            request["args"]["job_id"] = job_id
    w.exchange(path, w.HELLO + w.raw_frame(b"\xdd" + b"\xff" * 4 + b"\x80" * 1000))  # warm up
    w.reset_peak(daemon.pid)
    before = w.memory_kib(daemon.pid)["VmRSS"]
    examples = 0

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(PAYLOADS)
    @example(w.HELLO + w.raw_frame(_bloat(b"\xdd", b"\x80", MOST)))  # the worst, always tried
    @example(w.HELLO + w.raw_frame(_bloat(b"\xdd", b"\x90", MOST, in_request=True)))
    def fuzz(payload: bytes) -> None:
        nonlocal examples
        examples += 1
        messages = w.exchange(path, payload)  # every frame valid by the api's schemas
        assert messages, "the runner sent nothing, not even its hello"
        assert isinstance(messages[0], p.Hello)
        assert all(not isinstance(m, p.Hello) for m in messages[1:])
        assert _status(peer, job_id) == expected  # during: the other connection is served

    fuzz()
    growth_mib = (w.memory_kib(daemon.pid)["VmHWM"] - before) / 1024
    print(f"{examples} fuzzed connections: runner peak +{growth_mib:.1f} MiB")
    assert growth_mib < 10, f"the runner grew by {growth_mib:.1f} MiB"
    # after: the same connection still answers every kind of request correctly
    assert _status(peer, job_id) == expected
    (types,) = peer.call(p.Op.TYPES, p.TypesArgs())
    assert isinstance(types, p.TypesReply) and "noop" in {t["name"] for t in types.types}
    *items, end = peer.call(p.Op.TAIL, p.TailArgs(job_id, follow=False))
    assert isinstance(end, p.End)
    output = b"".join(
        c.data for item in items if isinstance(item, p.OutputItem) for c in item.chunks
    )
    assert b"[RESULT] 34\n" in output
    peer.close()


def _status(peer: w.Peer, job_id: str) -> Any:
    (reply,) = peer.call(p.Op.STATUS, p.JobRef(job_id))
    assert isinstance(reply, p.JobReply), reply
    return reply.job
