"""The generated public API: it imports, its messages round-trip, and its shape is the design's."""

from __future__ import annotations

import importlib
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from shared.model import LIMIT_NAMES
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb

if TYPE_CHECKING:
    from google._upb import _message as upb

# The grpc stubs module is untyped (strict code calling into it would need an ignore on every
# call), so treat it as Any here.
pb_grpc: Any = importlib.import_module("workernator_api._proto.workernator.v1.workernator_pb2_grpc")

ARMS = ("noop", "fib", "eval", "wait")
ARM_TYPES = {
    "noop": pb.JOB_TYPE_NOOP,
    "fib": pb.JOB_TYPE_FIB,
    "eval": pb.JOB_TYPE_EVAL,
    "wait": pb.JOB_TYPE_WAIT,
}


def message_type(
    field: FieldDescriptor | upb.FieldDescriptor,
) -> Descriptor | upb.Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def start_requests() -> list[pb.StartJobRequest]:
    return [
        pb.StartJobRequest(noop=pb.NoopArgs()),
        pb.StartJobRequest(fib=pb.FibArgs(position=100_000)),
        pb.StartJobRequest(
            eval=pb.EvalArgs(expression="2x * 3y + sqrt(z)", variables={"x": 1.5, "y": -2.0})
        ),
        pb.StartJobRequest(
            wait=pb.WaitArgs(
                seconds=duration_pb2.Duration(seconds=5, nanos=250_000_000),
                url="https://hooks.example.test/done?id=1",
            )
        ),
        pb.StartJobRequest(
            fib=pb.FibArgs(position=3),
            limits=pb.ResourceLimits(
                cpu_millis=500,
                memory_bytes=256 << 20,
                pids=64,
                io_read_bps=10 << 20,
                io_write_bps=5 << 20,
                io_read_iops=100,
                io_write_iops=2**64 - 1,
            ),
        ),
    ]


def test_descriptor_names_the_proto_file_and_package() -> None:
    assert pb.DESCRIPTOR.name == "workernator/v1/workernator.proto"
    assert pb.DESCRIPTOR.package == "workernator.v1"
    # The grpc module imports the messages from the package the code lives in.
    assert pb_grpc.workernator_dot_v1_dot_workernator__pb2 is pb


@pytest.mark.parametrize("request_", start_requests(), ids=lambda r: r.WhichOneof("args") or "none")
def test_start_job_request_round_trips(request_: pb.StartJobRequest) -> None:
    data = request_.SerializeToString(deterministic=True)
    back = pb.StartJobRequest.FromString(data)
    assert back == request_
    assert back.WhichOneof("args") == request_.WhichOneof("args")
    assert back.SerializeToString(deterministic=True) == data


def test_each_arm_keeps_its_values() -> None:
    noop, fib, ev, wait, _ = (
        pb.StartJobRequest.FromString(r.SerializeToString()) for r in start_requests()
    )
    assert noop.WhichOneof("args") == "noop"
    assert noop.HasField("noop")
    assert fib.fib.position == 100_000
    assert ev.eval.expression == "2x * 3y + sqrt(z)"
    assert dict(ev.eval.variables) == {"x": 1.5, "y": -2.0}
    assert wait.wait.seconds.ToTimedelta().total_seconds() == 5.25
    assert wait.wait.url == "https://hooks.example.test/done?id=1"


def test_setting_an_arm_clears_the_other() -> None:
    request = pb.StartJobRequest(fib=pb.FibArgs(position=3))
    request.eval.expression = "1 + 1"
    assert request.WhichOneof("args") == "eval"
    assert not request.HasField("fib")


def test_empty_start_request_selects_no_arm() -> None:
    """No arm is the noop job by contract; it also encodes to nothing."""
    request = pb.StartJobRequest()
    assert request.WhichOneof("args") is None
    assert request.SerializeToString() == b""


def test_job_type_zero_value_is_noop() -> None:
    assert pb.JobType.Name(0) == "JOB_TYPE_NOOP"
    assert pb.JOB_TYPE_NOOP == 0
    assert pb.JobType.DESCRIPTOR.values[0].name == "JOB_TYPE_NOOP"
    assert pb.JobStatus().type == pb.JOB_TYPE_NOOP
    assert pb.JobTypeInfo().type == pb.JOB_TYPE_NOOP


def test_other_enums_have_unspecified_zero_values() -> None:
    assert pb.JobState.Name(0) == "JOB_STATE_UNSPECIFIED"
    assert pb.Stream.Name(0) == "STREAM_UNSPECIFIED"
    assert [v.name for v in pb.JobState.DESCRIPTOR.values] == [
        "JOB_STATE_UNSPECIFIED",
        "JOB_STATE_RUNNING",
        "JOB_STATE_COMPLETED",
        "JOB_STATE_FAILED",
        "JOB_STATE_STOPPED",
    ]
    assert [v.name for v in pb.Stream.DESCRIPTOR.values] == [
        "STREAM_UNSPECIFIED",
        "STREAM_STDOUT",
        "STREAM_STDERR",
    ]


def test_job_types_match_the_args_arms() -> None:
    """JOB_TYPE_<ARM> for each arm, and the same arms in StartJobRequest and JobStatus."""
    assert [v.name for v in pb.JobType.DESCRIPTOR.values] == [
        f"JOB_TYPE_{arm.upper()}" for arm in ARMS
    ]
    assert [pb.JobType.Name(t) for t in ARM_TYPES.values()] == [
        f"JOB_TYPE_{arm.upper()}" for arm in ARM_TYPES
    ]
    for message in (pb.StartJobRequest, pb.JobStatus):
        oneof = message.DESCRIPTOR.oneofs_by_name["args"]
        assert [f.name for f in oneof.fields] == list(ARMS)
        assert [message_type(f).name for f in oneof.fields] == [
            "NoopArgs",
            "FibArgs",
            "EvalArgs",
            "WaitArgs",
        ]


def test_argument_types() -> None:
    fields = pb.FibArgs.DESCRIPTOR.fields_by_name
    assert fields["position"].type == FieldDescriptor.TYPE_UINT64
    ev = pb.EvalArgs.DESCRIPTOR.fields_by_name
    assert ev["expression"].type == FieldDescriptor.TYPE_STRING
    variables = message_type(ev["variables"])
    assert variables.GetOptions().map_entry
    assert variables.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING
    assert variables.fields_by_name["value"].type == FieldDescriptor.TYPE_DOUBLE
    wait = pb.WaitArgs.DESCRIPTOR.fields_by_name
    assert message_type(wait["seconds"]).full_name == "google.protobuf.Duration"
    assert wait["url"].type == FieldDescriptor.TYPE_STRING


def test_resource_limits_shape() -> None:
    """The runner's ResourceLimits fields, by the same names, in the same order, numbered 1..7;
    cpu_millis and pids are uint32, the others uint64. StartJobRequest.limits is field 5."""
    fields = pb.ResourceLimits.DESCRIPTOR.fields
    assert tuple(f.name for f in fields) == LIMIT_NAMES
    assert [f.number for f in fields] == list(range(1, 8))
    u32, u64 = FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64
    assert [f.type for f in fields] == [u32, u64, u32, u64, u64, u64, u64]
    limits = pb.StartJobRequest.DESCRIPTOR.fields_by_name["limits"]
    assert limits.number == 5
    assert limits.containing_oneof is None
    assert message_type(limits).full_name == "workernator.v1.ResourceLimits"
    assert message_type(pb.JobStatus.DESCRIPTOR.fields_by_name["limits"]) is message_type(limits)
    assert not pb.StartJobRequest(fib=pb.FibArgs(position=3)).HasField("limits")


def test_service_shape() -> None:
    service = pb.DESCRIPTOR.services_by_name["JobService"]
    assert service.full_name == "workernator.v1.JobService"
    methods = {m.name: m for m in service.methods}
    assert sorted(methods) == sorted(
        [
            "StartJob",
            "StopJob",
            "DeleteJob",
            "GetJobStatus",
            "TailJobOutput",
            "ListJobs",
            "ListJobTypes",
        ]
    )
    for name, method in methods.items():
        assert method.input_type.name == f"{name}Request"
        assert method.output_type.name == f"{name}Response"
        assert not method.client_streaming
        assert method.server_streaming == (name == "TailJobOutput")
    for attr in ("JobServiceStub", "JobServiceServicer", "add_JobServiceServicer_to_server"):
        assert hasattr(pb_grpc, attr)


def test_job_status_presence_and_round_trip() -> None:
    status = pb.JobStatus(
        id="XE38YM",
        type=pb.JOB_TYPE_FIB,
        title="Fibonacci",
        fib=pb.FibArgs(position=10),
        owner="alice",
        state=pb.JOB_STATE_COMPLETED,
        exit_code=0,
        limits=pb.ResourceLimits(
            cpu_millis=500,
            memory_bytes=256 << 20,
            pids=64,
            io_read_bps=10 << 20,
            io_write_bps=5 << 20,
            io_read_iops=1000,
            io_write_iops=500,
        ),
        oom_killed=True,
        usage=pb.ResourceUsage(
            cpu_time=duration_pb2.Duration(nanos=12_000_000),
            peak_memory_bytes=9 << 20,
            read_bytes=1,
            written_bytes=2,
        ),
    )
    status.started_at.FromSeconds(1_700_000_000)
    status.ended_at.FromSeconds(1_700_000_001)
    back = pb.JobStatus.FromString(status.SerializeToString())
    assert back == status
    assert back.WhichOneof("args") == "fib"
    # exit_code 0 is present (the job exited), signal is absent (no signal killed it).
    assert back.HasField("exit_code")
    assert back.exit_code == 0
    assert not back.HasField("signal")
    assert not pb.JobStatus().HasField("exit_code")
    assert not pb.JobStatus().HasField("ended_at")


def test_tail_request_start_positions() -> None:
    request = pb.TailJobOutputRequest(job_id="XE38YM")
    assert request.WhichOneof("start") is None  # from the first byte
    assert request.follow is False  # proto3 default; the CLI sets it
    request.offset = 0
    assert request.WhichOneof("start") == "offset"  # an explicit 0 is still "set"
    request.last_lines = 10
    assert request.WhichOneof("start") == "last_lines"
    back = pb.TailJobOutputRequest.FromString(request.SerializeToString())
    assert back.last_lines == 10
    assert not back.HasField("offset")


def test_tail_response_round_trips_arbitrary_bytes() -> None:
    chunk = pb.OutputChunk(stream=pb.STREAM_STDERR, data=b"\xff\xfe not utf-8\n\x00")
    chunk.time.FromNanoseconds(1_700_000_000_123_456_789)
    response = pb.TailJobOutputResponse(chunks=[chunk, chunk], next_offset=4096)
    back = pb.TailJobOutputResponse.FromString(response.SerializeToString())
    assert back == response
    assert back.chunks[0].data == b"\xff\xfe not utf-8\n\x00"
    assert back.chunks[0].time.ToNanoseconds() == 1_700_000_000_123_456_789


def test_list_job_types_and_argument_info() -> None:
    info = pb.ArgumentInfo(name="position", type="int", required=True, min=1)
    assert info.HasField("min")
    assert not info.HasField("max")
    response = pb.ListJobTypesResponse(
        types=[pb.JobTypeInfo(name="fib", type=pb.JOB_TYPE_FIB, title="Fibonacci", args=[info])]
    )
    assert pb.ListJobTypesResponse.FromString(response.SerializeToString()) == response


def test_generated_service_works_over_a_channel() -> None:
    """The rewritten import in the grpc module is the one that works: serve and call."""

    class Servicer(pb_grpc.JobServiceServicer):  # type: ignore[misc]
        def StartJob(
            self, request: pb.StartJobRequest, context: grpc.ServicerContext
        ) -> pb.StartJobResponse:
            arm = request.WhichOneof("args") or "noop"
            return pb.StartJobResponse(job=pb.JobStatus(id="ABC123", type=ARM_TYPES[arm]))

        def TailJobOutput(
            self, request: pb.TailJobOutputRequest, context: grpc.ServicerContext
        ) -> Any:
            for i in range(3):
                yield pb.TailJobOutputResponse(
                    chunks=[pb.OutputChunk(stream=pb.STREAM_STDOUT, data=b"line %d\n" % i)],
                    next_offset=i + 1,
                )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_JobServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        options = [("grpc.enable_http_proxy", 0)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = pb_grpc.JobServiceStub(channel)
            started = stub.StartJob(
                pb.StartJobRequest(eval=pb.EvalArgs(expression="1")), timeout=10
            )
            assert started.job.type == pb.JOB_TYPE_EVAL
            empty = stub.StartJob(pb.StartJobRequest(), timeout=10)
            assert empty.job.type == pb.JOB_TYPE_NOOP
            stream = stub.TailJobOutput(pb.TailJobOutputRequest(job_id="ABC123"), timeout=10)
            assert [r.chunks[0].data for r in stream] == [b"line 0\n", b"line 1\n", b"line 2\n"]
            with pytest.raises(grpc.RpcError) as info:
                stub.ListJobs(pb.ListJobsRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None).wait()
