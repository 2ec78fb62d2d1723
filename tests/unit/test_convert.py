"""The api's translation between the public proto and the runner's model: StartJob's limits on
the way in, a job's limits, usage and OOM kill on the way out."""

from __future__ import annotations

import pytest

from shared.errors import InvalidArgument
from shared.model import JobState, JobStatus, JobUsage, ResourceLimits
from shared.protocol import MAX_LIMIT
from workernator_api import convert
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb

LIMITS = ResourceLimits(
    cpu_millis=500,
    memory_bytes=256 << 20,
    pids=64,
    io_read_bps=10 << 20,
    io_write_bps=5 << 20,
    io_read_iops=100,
    io_write_iops=200,
)


def job(**changes: object) -> JobStatus:
    base = JobStatus("XE38YM", "fib", {"position": 3}, "alice", JobState.RUNNING, 1, 2)
    return JobStatus(**(base.__dict__ | changes))


def test_no_limits_in_the_request_are_the_runners_defaults() -> None:
    assert convert.start_request_limits(pb.StartJobRequest()) == ResourceLimits()
    request = pb.StartJobRequest(fib=pb.FibArgs(position=3), limits=pb.ResourceLimits())
    assert convert.start_request_limits(request) == ResourceLimits()


def test_request_limits_to_the_model() -> None:
    request = pb.StartJobRequest(limits=pb.ResourceLimits(**LIMITS.as_dict()))
    assert convert.start_request_limits(request) == LIMITS
    some = pb.StartJobRequest(limits=pb.ResourceLimits(memory_bytes=1 << 30, io_write_iops=9))
    assert convert.start_request_limits(some) == ResourceLimits(
        memory_bytes=1 << 30, io_write_iops=9
    )


def test_request_limits_up_to_what_the_runner_protocol_carries() -> None:
    """No maximum is checked here (the runner's business), only 2^63 and more, which the runner
    protocol cannot carry (uint64 fields go up to 2^64 - 1)."""
    largest = {name: MAX_LIMIT for name in ("memory_bytes", "io_read_bps", "io_write_iops")}
    request = pb.StartJobRequest(limits=pb.ResourceLimits(**largest, cpu_millis=2**32 - 1))
    assert convert.start_request_limits(request) == ResourceLimits(**largest, cpu_millis=2**32 - 1)
    for name in ("memory_bytes", "io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops"):
        too_large = pb.StartJobRequest(limits=pb.ResourceLimits(**{name: 2**63}))
        with pytest.raises(InvalidArgument, match=f"limit '{name}' is too large: {2**63}"):
            convert.start_request_limits(too_large)


def test_status_limits_usage_and_oom_to_the_proto() -> None:
    usage = JobUsage(cpu_ns=2_500_000_000, peak_memory_bytes=3 << 20, read_bytes=7, written_bytes=9)
    out = convert.job_status(job(limits=LIMITS, usage=usage, oom_killed=True), "Fibonacci")
    assert out.limits == pb.ResourceLimits(**LIMITS.as_dict())
    assert out.oom_killed is True
    assert out.usage.cpu_time.ToNanoseconds() == 2_500_000_000
    assert (out.usage.peak_memory_bytes, out.usage.read_bytes, out.usage.written_bytes) == (
        3 << 20,
        7,
        9,
    )
    plain = convert.job_status(job(), "Fibonacci")
    assert plain.HasField("limits") and plain.HasField("usage")  # present, all zero: no limit
    assert plain.limits == pb.ResourceLimits()
    assert plain.oom_killed is False


def test_limits_round_trip_both_ways() -> None:
    """What a client asks for is what the runner gets, and what it got comes back unchanged."""
    asked = pb.StartJobRequest(limits=pb.ResourceLimits(**LIMITS.as_dict()))
    effective = convert.start_request_limits(asked)
    assert convert.job_status(job(limits=effective), "Fibonacci").limits == asked.limits
    for name in LIMITS.as_dict():
        one = ResourceLimits(**{name: 12345})
        back = convert.job_status(job(limits=one), "Fibonacci").limits
        assert convert.start_request_limits(pb.StartJobRequest(limits=back)) == one


def test_limits_too_large_for_the_proto_are_shown_as_its_largest() -> None:
    """cpu_millis and pids are uint32 in the API; a runner setting beyond that (no limit in
    practice) must not make every status of the job fail."""
    huge = ResourceLimits(cpu_millis=2**40, pids=2**33, memory_bytes=MAX_LIMIT)
    out = convert.job_status(job(limits=huge), "Fibonacci").limits
    assert (out.cpu_millis, out.pids, out.memory_bytes) == (2**32 - 1, 2**32 - 1, MAX_LIMIT)
