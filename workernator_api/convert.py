"""Translation between the public protobuf API and the runner's job model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from shared.errors import InvalidArgument
from shared.model import LIMIT_NAMES, JobState, JobStatus, OutputChunk, ResourceLimits, Stream
from shared.protocol import MAX_LIMIT
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb

JOB_TYPES: dict[str, pb.JobType] = {
    "noop": pb.JOB_TYPE_NOOP,
    "fib": pb.JOB_TYPE_FIB,
    "eval": pb.JOB_TYPE_EVAL,
    "wait": pb.JOB_TYPE_WAIT,
}
STATES: dict[JobState, pb.JobState] = {
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.COMPLETED: pb.JOB_STATE_COMPLETED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.STOPPED: pb.JOB_STATE_STOPPED,
}
STATE_NAMES: dict[pb.JobState, JobState] = {v: k for k, v in STATES.items()}
STREAMS: dict[Stream, pb.Stream] = {
    Stream.STDOUT: pb.STREAM_STDOUT,
    Stream.STDERR: pb.STREAM_STDERR,
}
# The largest value of each ResourceLimits field of the proto (cpu_millis and pids are uint32).
_PROTO_LIMIT_MAX = {
    field.name: 2**32 - 1 if field.type == field.TYPE_UINT32 else 2**64 - 1
    for field in pb.ResourceLimits.DESCRIPTOR.fields
}


def start_request_args(request: pb.StartJobRequest) -> tuple[str, dict[str, Any]]:
    """(job type, argument map) of a StartJobRequest; no arm set means noop.

    Proto3 cannot tell an unset scalar from its zero value, so a zero or empty value is passed
    on as missing and the catalog reports it as required (or out of range) by name.
    """
    arm = request.WhichOneof("args")
    if arm is None or arm == "noop":
        return "noop", {}
    if arm == "fib":
        return "fib", {"position": request.fib.position}
    if arm == "eval":
        args: dict[str, Any] = {"expression": request.eval.expression or None}
        if request.eval.variables:
            args["variables"] = dict(request.eval.variables)
        return "eval", args
    wait = request.wait
    seconds = wait.seconds.seconds + wait.seconds.nanos / 1e9 if wait.HasField("seconds") else None
    return "wait", {"seconds": seconds, "url": wait.url or None}


def start_request_limits(request: pb.StartJobRequest) -> ResourceLimits:
    """The limits a StartJobRequest asks for; a zero field (or no limits) is the runner's default.

    Only what the runner protocol cannot carry is refused here (a value of 2^63 or more, like an
    offset); the runner checks its own maxima and names the limit when it refuses one.
    """
    values = {name: getattr(request.limits, name) for name in LIMIT_NAMES}
    for name, value in values.items():
        if value > MAX_LIMIT:
            raise InvalidArgument(f"limit '{name}' is too large: {value} (at most 2^63-1)")
    return ResourceLimits(**values)


def resource_limits(limits: ResourceLimits) -> pb.ResourceLimits:
    """A job's effective limits (0: no limit) for the API. A value too large for its proto field
    (only possible for cpu_millis and pids, from a runner setting) is shown as the largest one,
    which is no limit in practice, rather than failing every status of the job."""
    return pb.ResourceLimits(
        **{name: min(value, _PROTO_LIMIT_MAX[name]) for name, value in limits.as_dict().items()}
    )


def _timestamp(ns: int | None) -> Timestamp | None:
    if ns is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _duration_ns(ns: int) -> Duration:
    d = Duration()
    d.FromNanoseconds(ns)
    return d


def job_status(job: JobStatus, title: str) -> pb.JobStatus:
    out = pb.JobStatus(
        id=job.id,
        type=JOB_TYPES.get(job.type, pb.JOB_TYPE_NOOP),
        title=title,
        owner=job.owner,
        state=STATES[job.state],
        error=job.error,
        failure_reason=job.failure_reason,
        oom_killed=job.oom_killed,
        usage=pb.ResourceUsage(
            cpu_time=_duration_ns(job.usage.cpu_ns),
            peak_memory_bytes=job.usage.peak_memory_bytes,
            read_bytes=job.usage.read_bytes,
            written_bytes=job.usage.written_bytes,
        ),
        limits=resource_limits(job.limits),
    )
    if job.exit_code is not None:
        out.exit_code = job.exit_code
    if job.signal is not None:
        out.signal = job.signal
    started, ended = _timestamp(job.started_ns), _timestamp(job.ended_ns)
    if started is not None:
        out.started_at.CopyFrom(started)
    if ended is not None:
        out.ended_at.CopyFrom(ended)
    _set_args(out, job.type, job.args)
    return out


def _set_args(out: pb.JobStatus, job_type: str, args: Mapping[str, Any]) -> None:
    if job_type == "noop":
        out.noop.SetInParent()
    elif job_type == "fib":
        out.fib.position = int(args["position"])
    elif job_type == "eval":
        out.eval.expression = str(args["expression"])
        out.eval.variables.update({k: float(v) for k, v in args.get("variables", {}).items()})
    elif job_type == "wait":
        out.wait.seconds.FromNanoseconds(round(float(args["seconds"]) * 1e9))
        out.wait.url = str(args["url"])


def tail_response(chunks: Sequence[OutputChunk]) -> pb.TailJobOutputResponse:
    response = pb.TailJobOutputResponse(next_offset=chunks[-1].next_offset if chunks else 0)
    for chunk in chunks:
        item = response.chunks.add(stream=STREAMS[chunk.stream], data=chunk.data)
        item.time.FromNanoseconds(chunk.timestamp_ns)
    return response


def job_type_info(description: Mapping[str, Any]) -> pb.JobTypeInfo | None:
    """The API's description of a runner job type; None for types the API does not offer."""
    name = description["name"]
    if name not in JOB_TYPES:
        return None
    info = pb.JobTypeInfo(
        name=name,
        type=JOB_TYPES[name],
        title=description["title"],
        description=description["description"],
    )
    for arg in description["args"]:
        item = info.args.add(
            name=arg["name"],
            type=arg["type"],
            required=arg["required"],
            description=arg["description"],
        )
        if arg.get("min") is not None:
            item.min = float(arg["min"])
        if arg.get("max") is not None:
            item.max = float(arg["max"])
        if arg.get("max_length") is not None:
            item.max_length = int(arg["max_length"])
    return info
