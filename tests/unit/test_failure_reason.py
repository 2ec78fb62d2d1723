"""A failed job's reason: picked from its stderr by the monitor, made safe, carried to people.

The end-to-end tests (tests/e2e/test_clear_errors.py) run hostile jobs and servers for real;
these check the pieces on their own, the line picking against a plain reference under every
way the kernel may split the pipe's data.
"""

from __future__ import annotations

import datetime
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import protocol as p
from shared.model import MAX_FAILURE_REASON, JobState, JobStatus
from shared.text import ELLIPSIS, failure_reason, printable
from workernator_api import cli_format, convert
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_runner.monitor import _LastLine


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("division by zero", "division by zero"),
        ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
        ("a\tb\rc\nd\x00e\x7f", "a\\x09b\\x0dc\\x0ad\\x00e\\x7f"),
        ("\x9b31m C1", "\\x9b31m C1"),
        ("left \u202eright\u200b \u2028 \u2029", "left \\u202eright\\u200b \\u2028 \\u2029"),
        ("no\xa0break, wide\u3000space", "no\\xa0break, wide\\u3000space"),
        ("private \U000f0000", "private \\U000f0000"),
        ("café 😀 ∑ 日本", "café 😀 ∑ 日本"),  # visible text stays as it is
    ],
)
def test_printable_escapes_what_is_not_plainly_visible(text: str, shown: str) -> None:
    assert printable(text, 200) == shown
    assert shown.isprintable()


def test_printable_cuts_at_the_limit_never_inside_an_escape() -> None:
    assert printable("a" * 10, 10) == "a" * 10
    assert printable("a" * 11, 10) == "a" * 9 + ELLIPSIS
    assert printable("abcdefgh\x1b", 10) == "abcdefgh" + ELLIPSIS  # the escape would not fit
    assert printable("\x1b" * 5, 12) == "\\x1b\\x1b" + ELLIPSIS
    assert printable("", 10) == ""


@given(st.text(), st.integers(min_value=1, max_value=300))
def test_printable_is_always_printable_and_bounded(text: str, limit: int) -> None:
    shown = printable(text, limit)
    assert len(shown) <= limit
    assert shown.isprintable()


def test_failure_reason_from_a_line() -> None:
    assert failure_reason(b"[ERROR] Cannot evaluate: division by zero") == (
        "Cannot evaluate: division by zero"
    )
    assert failure_reason(b"  ZeroDivisionError: x  \r") == "ZeroDivisionError: x"
    assert failure_reason(b"bad \xff utf-8 \xc3") == "bad \\xff utf-8 \\xc3"
    assert failure_reason(b"") == ""
    many = failure_reason(b"\x1b" * 10_000)
    assert many == "\\x1b" * 49 + ELLIPSIS and len(many) <= MAX_FAILURE_REASON


def _reference(data: bytes) -> bytes:
    """The last line of ``data`` that is not blank, its first MAX_BYTES bytes, stripped."""
    lines = [line for line in data.split(b"\n") if line.strip()]
    return lines[-1][: _LastLine.MAX_BYTES].strip() if lines else b""


@settings(max_examples=300)
@given(
    st.lists(
        st.sampled_from([b"\n", b" ", b"\r\n", b"\t\n\n", b"error", b"x" * 500, b"\xff", b"ok\n"]),
        max_size=40,
    ),
    st.data(),
)
def test_the_last_line_whatever_the_reads_are(pieces: list[bytes], data: st.DataObject) -> None:
    whole = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=10)))
    tracker = _LastLine()
    for start, end in zip([0, *cuts], [*cuts, len(whole)], strict=True):
        tracker.feed(whole[start:end])
    assert tracker.result().strip() == _reference(whole)


def test_the_last_line_stays_bounded() -> None:
    tracker = _LastLine()
    for _ in range(1000):  # 64 MB of one line
        tracker.feed(b"y" * 65536)
    assert tracker.result() == b"y" * _LastLine.MAX_BYTES
    tracker.feed(b"\n" * 65536)
    assert tracker.result() == b"y" * _LastLine.MAX_BYTES
    tracker.feed(b"last\n" + b"\n" * 10)
    assert tracker.result() == b"last"


# --- carried to people ------------------------------------------------------------------------

FAILED = JobStatus(
    id="XE38YM",
    type="eval",
    args={"expression": "1/0"},
    owner="alice",
    state=JobState.FAILED,
    created_ns=1,
    started_ns=2,
    ended_ns=3,
    exit_code=1,
    error="exited with status 1",
    failure_reason="Cannot evaluate: division by zero",
)


def _received(wire: dict[str, Any]) -> p.Message | None:
    """What the api's side of the protocol makes of a runner's frame holding ``wire``."""
    client = p.Connection(p.Role.CLIENT)
    client.receive_data(p.encode_frame(p.Hello()))
    assert client.next_message() == p.Hello()
    body: bytes = msgpack.packb(wire, use_bin_type=True)
    client.receive_data(p.HEADER.pack(len(body)) + body)
    return client.next_message()


def test_the_runner_protocol_carries_it_and_an_older_runner_sends_none() -> None:
    wire = p.to_wire(p.JobReply(1, FAILED))
    assert wire["job"]["failure_reason"] == FAILED.failure_reason
    assert _received(wire) == p.JobReply(1, FAILED)
    del wire["job"]["failure_reason"]  # a runner from before the field
    decoded = _received(wire)
    assert isinstance(decoded, p.JobReply) and decoded.job.failure_reason == ""
    wire["job"]["failure_reason"] = "x" * (MAX_FAILURE_REASON + 1)
    with pytest.raises(p.ProtocolError, match="failure_reason"):
        _received(wire)


def test_the_api_and_the_cli_show_it() -> None:
    job = convert.job_status(FAILED, "Evaluate")
    assert job.failure_reason == "Cannot evaluate: division by zero"
    assert cli_format.job_to_dict(job)["failure_reason"] == job.failure_reason
    lines = cli_format.format_status(job, now=datetime.datetime.now(datetime.UTC)).splitlines()
    assert lines[lines.index("Status:       Failed") + 1 :][:3] == [
        "Reason:       Cannot evaluate: division by zero",
        "Error:        exited with status 1",
        "Exit code:    1",
    ]
    job.failure_reason = "\x1b[2J from a server that did not escape it"
    text = cli_format.format_status(job)
    assert "\x1b" not in text and "Reason:       \\x1b[2J from a server" in text
    job.state = pb.JOB_STATE_STOPPED  # only a failed job has a reason to show
    assert "Reason:" not in cli_format.format_status(job)
