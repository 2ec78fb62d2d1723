"""The runner <-> launcher messages: valid ones round-trip, anything else is a MessageError."""

from __future__ import annotations

import ipaddress
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import ids
from shared.model import ResourceLimits
from workernator_runner import cgroups, launch
from workernator_runner.sandbox import MSG_JOB, JobSetup

EGRESS = launch.EgressConfig(
    bridge="wn0",
    subnet="10.92.0.0/16",
    resolver="127.0.0.53",
    resolv_conf="nameserver 10.92.0.1\noptions edns0 trust-ad\n",
)
CGROUPS = cgroups.Layout(
    "hybrid",
    {"memory": "/sys/fs/cgroup/memory/workernator/jobs", "unified": "/sys/fs/cgroup/unified/x"},
    ("254:0",),
    "",
)
V2 = cgroups.Layout("v2", {"unified": "/sys/fs/cgroup/workernator/jobs"}, (), "no disk")
INIT = launch.Init(
    runner_pid=4242,
    state_dir="/var/lib/workernator",
    job_modules=("tests.probe_jobs", "extra.jobs"),
    uid=998,
    gid=997,
    user="workernator-job",
    tmp_size_mb=64,
    egress=EGRESS,
    cgroups=CGROUPS,
)
HEADER = launch.LaunchHeader("XE38YM", "fib", 5.0, "10.92.0.2/16")
ARGS: dict[str, Any] = {"position": 3, "nested": {"list": [1, "two", 3.5, None, True]}}
VALID_INIT_BODY: dict[str, Any] = {
    "runner_pid": 1,
    "state_dir": "/s",
    "job_modules": [],
    "uid": 1000,
    "gid": 1000,
    "user": "job",
    "tmp_size_mb": 64,
    "egress": None,
    "cgroups": {
        "version": "v2",
        "jobs": {"unified": "/sys/fs/cgroup/workernator/jobs"},
        "io_devices": [],
        "io_problem": "no disk",
    },
    "default_limits": ResourceLimits().as_dict(),
    "max_output_bytes": 1 << 30,
}
VALID_HEADER_BODY: dict[str, Any] = {
    "id": "XE38YM",
    "type": "noop",
    "grace": 1.0,
    "address": "",
    "limits": ResourceLimits().as_dict(),
}


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _launch_message(header: Any, args: bytes = b"\x80") -> bytes:
    head = _pack(header)
    return launch.LAUNCH + struct.pack(">I", len(head)) + head + args


def _header_error(message: bytes) -> str:
    with pytest.raises(launch.MessageError) as exc:
        launch.decode_launch_header(memoryview(message))
    return str(exc.value)


def _init_error(message: bytes) -> str:
    with pytest.raises(launch.MessageError) as exc:
        launch.decode_init(message)
    return str(exc.value)


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "init",
    [
        INIT,
        launch.Init(1, "/s", (), 1, 1, "u", 1, None, V2),
        launch.Init(2**31, "/s", ("a",), 2**32 - 2, 2**32 - 2, "ü", 1 << 20, EGRESS, V2),
        launch.Init(1, "/s", (), 1, 1, "u", 1, launch.EgressConfig("b", "10.0.0.0/28", "", ""), V2),
    ],
    ids=["full", "no egress", "large values", "egress without resolver"],
)
def test_init_round_trips(init: launch.Init) -> None:
    message = launch.encode_init(init)
    assert message[:1] == launch.INIT
    assert len(message) <= launch.MAX_MESSAGE
    assert launch.decode_init(message) == init


@pytest.mark.parametrize(
    ("header", "args"),
    [
        (HEADER, ARGS),
        (launch.LaunchHeader("000000", "noop", 0.0, ""), {}),
        (launch.LaunchHeader("ZZZZZZ", "t" * 200, launch.MAX_GRACE_SECONDS, "10.0.0.1/32"), {}),
        (launch.LaunchHeader("A1B2C3", "eval", 2.5, "192.168.1.7/24"), {"b": b"\x00\xff"}),
    ],
    ids=["typical", "zero grace no address", "limits", "binary argument"],
)
def test_launch_round_trips(header: launch.LaunchHeader, args: dict[str, Any]) -> None:
    message = launch.encode_launch(header, args)
    assert message[:1] == launch.LAUNCH
    decoded, start = launch.decode_launch_header(memoryview(message))
    assert decoded == header
    assert isinstance(decoded.grace_seconds, float)
    assert launch.decode_args(memoryview(message)[start:]) == args
    assert launch.decode_args(message[start:]) == args


def test_an_integer_grace_is_sent_as_a_float() -> None:
    message = launch.encode_launch(launch.LaunchHeader("XE38YM", "noop", 7, ""), {})
    header, _ = launch.decode_launch_header(memoryview(message))
    assert header.grace_seconds == 7.0
    assert isinstance(header.grace_seconds, float)


def test_the_launch_header_does_not_read_the_arguments() -> None:
    """The launcher reads the header only: garbage after it is the monitor's to refuse."""
    message = _launch_message(VALID_HEADER_BODY, b"\xc1 not msgpack")
    header, start = launch.decode_launch_header(memoryview(message))
    assert header.job_id == "XE38YM"
    assert message[start:] == b"\xc1 not msgpack"
    with pytest.raises(launch.MessageError, match="not valid msgpack"):
        launch.decode_args(message[start:])


def test_cancel_round_trips() -> None:
    assert launch.encode_cancel("XE38YM") == b"CXE38YM"
    assert launch.decode_job_id(launch.encode_cancel("XE38YM")) == "XE38YM"
    assert launch.decode_job_id(memoryview(b"SAB12CD")) == "AB12CD"
    # a start failure carries its text after the id
    assert launch.decode_job_id(b"EAB12CDno such user") == "AB12CD"


# --- malformed launch messages ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"", "not a launch message"),
        (b"I" + _launch_message(VALID_HEADER_BODY)[1:], "not a launch message"),
        (b"l" + _launch_message(VALID_HEADER_BODY)[1:], "not a launch message"),
        (b"L", "not a launch message"),
        (b"L\x00\x00\x00", "not a launch message"),  # truncated header length
        (b"L\x00\x00\x00\x10\x80", "header length out of bounds"),  # past the end
        (b"L\xff\xff\xff\xff" + b"\x80" * 64, "header length out of bounds"),
        (
            b"L" + struct.pack(">I", launch.MAX_HEADER + 1) + b"\x00" * 70_000,
            "header length out of bounds",
        ),
        (b"L\x00\x00\x00\x00", "not valid msgpack"),  # an empty header
        (b"L\x00\x00\x00\x01\xc1", "not valid msgpack"),  # 0xc1: never used
        (b"L\x00\x00\x00\x02\x80\x80", "not valid msgpack"),  # extra data inside the header
    ],
    ids=[
        "empty",
        "init kind",
        "lowercase kind",
        "kind only",
        "truncated length",
        "length past the end",
        "huge length",
        "over max header",
        "empty header",
        "bad msgpack",
        "trailing bytes in header",
    ],
)
def test_malformed_launch_frames_are_refused(message: bytes, error: str) -> None:
    assert error in _header_error(message)


def test_a_header_of_exactly_max_header_bytes_is_read() -> None:
    body = dict(VALID_HEADER_BODY)
    body["type"] = ""
    filler = launch.MAX_HEADER - len(_pack(body))
    body["type"] = "t" * (filler - 2)  # str8 -> str16 adds two bytes
    assert len(_pack(body)) == launch.MAX_HEADER
    header, start = launch.decode_launch_header(memoryview(_launch_message(body)))
    assert start == 5 + launch.MAX_HEADER
    assert header.job_type == body["type"]
    body["type"] += "t"
    assert "out of bounds" in _header_error(_launch_message(body))


def _header_with(**changes: Any) -> dict[str, Any]:
    body = dict(VALID_HEADER_BODY)
    for key, value in changes.items():
        if value is _MISSING:
            del body[key]
        else:
            body[key] = value
    return body


_MISSING = object()


@pytest.mark.parametrize(
    ("header", "error"),
    [
        ([], "expected exactly the fields"),
        ("XE38YM", "expected exactly the fields"),
        (None, "expected exactly the fields"),
        (_header_with(id=_MISSING), "expected exactly the fields"),
        (_header_with(address=_MISSING), "expected exactly the fields"),
        (_header_with(extra=1), "expected exactly the fields"),
        ({b"id": "XE38YM", "type": "noop", "grace": 1.0, "address": ""}, "exactly the fields"),
        (_header_with(id=123456), "field 'id' has the wrong type"),
        (_header_with(id=b"XE38YM"), "field 'id' has the wrong type"),
        (_header_with(type=None), "field 'type' has the wrong type"),
        (_header_with(grace=5), "field 'grace' has the wrong type"),  # an int, not a float
        (_header_with(grace=True), "field 'grace' has the wrong type"),
        (_header_with(grace="5"), "field 'grace' has the wrong type"),
        (_header_with(address=["10.0.0.2/16"]), "field 'address' has the wrong type"),
        (_header_with(id="xe38ym"), "bad job id"),
        (_header_with(id="XE38Y"), "bad job id"),
        (_header_with(id="XE38YMM"), "bad job id"),
        (_header_with(id="../../"), "bad job id"),
        (_header_with(id="XE38Y\n"), "bad job id"),
        (_header_with(id=""), "bad job id"),
        (_header_with(grace=-0.001), "grace period out of range"),
        (_header_with(grace=launch.MAX_GRACE_SECONDS + 0.001), "grace period out of range"),
        (_header_with(grace=math.inf), "grace period out of range"),
        (_header_with(grace=-math.inf), "grace period out of range"),
        (_header_with(grace=math.nan), "grace period out of range"),
        (_header_with(address="10.92.0.2/33"), "bad address"),
        (_header_with(address="fd00::2/64"), "bad address"),
        (_header_with(address="10.92.0"), "bad address"),
        (_header_with(address="eth0"), "bad address"),
        (_header_with(address=" "), "bad address"),
    ],
)
def test_malformed_launch_headers_are_refused(header: Any, error: str) -> None:
    assert error in _header_error(_launch_message(header))


def test_arguments_must_be_a_map() -> None:
    for value in ([1, 2], "x", 3, None, True, b"map"):
        with pytest.raises(launch.MessageError, match="arguments must be a map"):
            launch.decode_args(_pack(value))
    for data in (b"", b"\x81", b"\xc1", b"\x80\x80"):
        with pytest.raises(launch.MessageError, match="not valid msgpack"):
            launch.decode_args(data)
    with pytest.raises(launch.MessageError, match="not valid msgpack"):
        launch.decode_args(b"\x81\x01\x02")  # an integer key
    assert launch.decode_args(b"\x80") == {}


def test_arguments_over_max_message_are_refused() -> None:
    header = launch.LaunchHeader("XE38YM", "noop", 1.0, "")
    # {"x": <str16 of n>}: fixmap + fixstr "x" + str16 header + n
    fixed = len(launch.encode_launch(header, {"x": ""})) - len(_pack({"x": ""}))
    n = launch.MAX_MESSAGE - fixed - 6
    exact = launch.encode_launch(header, {"x": "a" * n})
    assert len(exact) == launch.MAX_MESSAGE
    assert launch.decode_args(exact[launch.decode_launch_header(memoryview(exact))[1] :]) == {
        "x": "a" * n
    }
    with pytest.raises(launch.MessageError, match=str(launch.MAX_MESSAGE)):
        launch.encode_launch(header, {"x": "a" * (n + 1)})
    with pytest.raises(launch.MessageError):
        launch.encode_launch(header, {"x": b"\x00" * (2 * launch.MAX_MESSAGE)})


def test_a_header_over_max_header_is_refused_when_encoding() -> None:
    with pytest.raises(launch.MessageError):
        launch.encode_launch(launch.LaunchHeader("XE38YM", "t" * launch.MAX_HEADER, 1.0, ""), {})


# --- malformed init messages ------------------------------------------------------------------


def _init_with(**changes: Any) -> bytes:
    body = dict(VALID_INIT_BODY)
    for key, value in changes.items():
        if value is _MISSING:
            del body[key]
        else:
            body[key] = value
    return launch.INIT + _pack(body)


_EGRESS_BODY = {"bridge": "wn0", "subnet": "10.92.0.0/16", "resolver": "", "resolv_conf": ""}


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"", "expected the init message first"),
        (b"L" + _pack(VALID_INIT_BODY), "expected the init message first"),
        (b"I", "not valid msgpack"),
        (b"I\xc1", "not valid msgpack"),
        (_init_with()[:-1], "not valid msgpack"),  # truncated
        (_init_with() + b"\x00", "not valid msgpack"),  # trailing bytes
        (b"I" + _pack([1, 2]), "expected exactly the fields"),
        (_init_with(uid=_MISSING), "expected exactly the fields"),
        (_init_with(egress=_MISSING), "expected exactly the fields"),
        (_init_with(extra="x"), "expected exactly the fields"),
        (_init_with(runner_pid="1"), "field 'runner_pid' has the wrong type"),
        (_init_with(runner_pid=1.0), "field 'runner_pid' has the wrong type"),
        (_init_with(uid=True), "field 'uid' has the wrong type"),
        (_init_with(gid=False), "field 'gid' has the wrong type"),
        (_init_with(tmp_size_mb=True), "field 'tmp_size_mb' has the wrong type"),
        (_init_with(tmp_size_mb=64.0), "field 'tmp_size_mb' has the wrong type"),
        (_init_with(state_dir=b"/s"), "field 'state_dir' has the wrong type"),
        (_init_with(user=None), "field 'user' has the wrong type"),
        (_init_with(job_modules="tests.probe_jobs"), "field 'job_modules' has the wrong type"),
        (_init_with(job_modules=("a", 1)), "job_modules must be strings"),
        (_init_with(job_modules=[b"a"]), "job_modules must be strings"),
        (_init_with(egress=[]), "field 'egress' has the wrong type"),
        (_init_with(egress=False), "field 'egress' has the wrong type"),
        (_init_with(uid=0), "must not be root"),
        (_init_with(gid=0), "must not be root"),
        (_init_with(uid=0, gid=0), "must not be root"),
        (_init_with(uid=-1), "must not be root"),
        (_init_with(egress={}), "init egress: expected exactly the fields"),
        (_init_with(egress={**_EGRESS_BODY, "x": ""}), "init egress: expected exactly"),
        (_init_with(egress={**_EGRESS_BODY, "bridge": None}), "field 'bridge' has the wrong"),
        (_init_with(egress={**_EGRESS_BODY, "resolver": 1}), "field 'resolver' has the wrong"),
        (_init_with(max_output_bytes=-1), "max_output_bytes out of range"),
        (_init_with(max_output_bytes="1G"), "field 'max_output_bytes' has the wrong"),
    ],
)
def test_malformed_init_messages_are_refused(message: bytes, error: str) -> None:
    assert error in _init_error(message)


def test_the_valid_init_body_used_above_is_valid() -> None:
    """The malformed cases above are one change away from this one, which decodes."""
    init = launch.decode_init(_init_with())
    assert init == launch.Init(
        1, "/s", (), 1000, 1000, "job", 64, None, V2, max_output_bytes=1 << 30
    )
    assert launch.decode_init(_init_with(egress=_EGRESS_BODY)).egress == launch.EgressConfig(
        "wn0", "10.92.0.0/16", "", ""
    )
    header, _ = launch.decode_launch_header(memoryview(_launch_message(VALID_HEADER_BODY)))
    assert header == launch.LaunchHeader("XE38YM", "noop", 1.0, "")


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"C",
        b"CXE38Y",
        b"Cxe38ym",
        b"C\xff\xfe\xfd\xfc\xfb\xfa",
        b"C../../",
        b"C XE38Y",
        b"XE38YM",
    ],
)
def test_garbage_job_ids_are_refused(message: bytes) -> None:
    with pytest.raises(launch.MessageError, match="bad job id"):
        launch.decode_job_id(message)
    with pytest.raises(launch.MessageError, match="bad job id"):
        launch.decode_job_id(memoryview(message))


# --- fuzzing ----------------------------------------------------------------------------------


def _check_header(message: bytes) -> None:
    try:
        header, start = launch.decode_launch_header(memoryview(message))
    except launch.MessageError:
        return
    assert 5 <= start <= len(message)
    assert ids.is_job_id(header.job_id)
    assert isinstance(header.job_type, str)
    assert isinstance(header.grace_seconds, float)
    assert 0 <= header.grace_seconds <= launch.MAX_GRACE_SECONDS
    assert header.address == "" or ipaddress.IPv4Interface(header.address)
    again, _ = launch.decode_launch_header(memoryview(launch.encode_launch(header, {})))
    assert again == header


def _check_init(message: bytes) -> None:
    try:
        init = launch.decode_init(message)
    except launch.MessageError:
        return
    assert type(init.uid) is int
    assert type(init.gid) is int
    assert init.uid > 0
    assert init.gid > 0
    assert all(isinstance(m, str) for m in init.job_modules)
    assert type(init.runner_pid) is int
    assert type(init.tmp_size_mb) is int
    assert type(init.state_dir) is str
    assert type(init.user) is str
    if init.egress is not None:
        assert all(type(v) is str for v in vars(init.egress).values())
    assert launch.decode_init(launch.encode_init(init)) == init


def _check_args(data: bytes) -> None:
    try:
        args = launch.decode_args(data)
    except launch.MessageError:
        return
    assert isinstance(args, dict)
    packed = _pack(args)  # compared packed: NaN != NaN
    assert _pack(launch.decode_args(packed)) == packed


def _check_job_id(data: bytes) -> None:
    try:
        job_id = launch.decode_job_id(data)
    except launch.MessageError:
        return
    assert launch.decode_job_id(launch.encode_cancel(job_id)) == job_id


def _check_all(data: bytes) -> None:
    _check_header(data)
    _check_init(data)
    _check_args(data)
    _check_args(data[1:])
    _check_job_id(data)


VALID_MESSAGES = [
    launch.encode_init(INIT),
    launch.encode_init(launch.Init(1, "/s", (), 1, 1, "u", 1, None, V2)),
    launch.encode_launch(HEADER, ARGS),
    launch.encode_launch(launch.LaunchHeader("000000", "noop", 0.0, ""), {}),
    launch.encode_cancel("XE38YM"),
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_only_ever_raise_message_error(data: bytes) -> None:
    _check_all(data)
    for kind in (launch.INIT, launch.LAUNCH, launch.CANCEL):
        _check_all(kind + data)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(VALID_MESSAGES),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4),
    st.one_of(st.none(), st.integers(min_value=0)),
)
def test_fuzz_mutated_valid_messages_only_ever_raise_message_error(
    message: bytes, flips: list[tuple[int, int]], cut: int | None
) -> None:
    mutated = bytearray(message)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    if cut is not None:
        mutated = mutated[: cut % (len(mutated) + 1)]
    _check_all(bytes(mutated))


_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["XE38YM", "10.92.0.2/16", "", "wn0", "127.0.0.53"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            key: _MSGPACK_VALUES
            for key in [*VALID_INIT_BODY, *VALID_HEADER_BODY, "bridge", "subnet", "resolver"]
        },
    ),
    st.dictionaries(st.sampled_from(list(_EGRESS_BODY)), _MSGPACK_VALUES, max_size=5),
)
def test_fuzz_structured_maps_only_ever_raise_message_error(
    body: dict[str, Any], egress: dict[str, Any]
) -> None:
    """Maps with (some of) the right keys and values of any type reach the field checks."""
    _check_init(launch.INIT + _pack(body))
    _check_init(launch.INIT + _pack({**VALID_INIT_BODY, **body}))
    _check_init(launch.INIT + _pack({**VALID_INIT_BODY, "egress": egress}))
    _check_header(_launch_message(body))
    _check_header(_launch_message({**VALID_HEADER_BODY, **body}))
    _check_args(_pack(body))


_FIELD_VALUES = _MSGPACK_VALUES | st.lists(_MSGPACK_VALUES, max_size=3)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([*VALID_INIT_BODY, *(f"egress.{k}" for k in _EGRESS_BODY), *VALID_HEADER_BODY]),
    _FIELD_VALUES,
)
def test_fuzz_one_field_changed_only_ever_raises_message_error(key: str, value: Any) -> None:
    """A valid message with one field of any value: each field's own check decides."""
    if key in VALID_HEADER_BODY:
        _check_header(_launch_message({**VALID_HEADER_BODY, key: value}))
    elif key.startswith("egress."):
        egress = {**_EGRESS_BODY, key.removeprefix("egress."): value}
        _check_init(launch.INIT + _pack({**VALID_INIT_BODY, "egress": egress}))
    if key in VALID_INIT_BODY:
        _check_init(launch.INIT + _pack({**VALID_INIT_BODY, key: value}))


# --- the monitor -> sandbox job message -------------------------------------------------------


@pytest.mark.parametrize(
    "setup",
    [
        JobSetup("AAAAAA", "noop", msgpack.packb({})),
        JobSetup(
            "XE38YM",
            "wait",
            msgpack.packb({"url": "https://example.com/", "seconds": 2.5}),
            "10.92.0.2/16",
            "10.92.0.1",
        ),
    ],
    ids=["minimal", "egress"],
)
def test_job_setup_round_trips(setup: JobSetup) -> None:
    message = setup.encode()
    assert message[:1] == MSG_JOB
    decoded = JobSetup.decode(message)
    assert decoded == setup
