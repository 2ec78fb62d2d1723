# mypy: ignore-errors
import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_TYPE_NOOP: _ClassVar[JobType]
    JOB_TYPE_FIB: _ClassVar[JobType]
    JOB_TYPE_EVAL: _ClassVar[JobType]
    JOB_TYPE_WAIT: _ClassVar[JobType]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_COMPLETED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_STOPPED: _ClassVar[JobState]

class Stream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_UNSPECIFIED: _ClassVar[Stream]
    STREAM_STDOUT: _ClassVar[Stream]
    STREAM_STDERR: _ClassVar[Stream]
JOB_TYPE_NOOP: JobType
JOB_TYPE_FIB: JobType
JOB_TYPE_EVAL: JobType
JOB_TYPE_WAIT: JobType
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_COMPLETED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_STOPPED: JobState
STREAM_UNSPECIFIED: Stream
STREAM_STDOUT: Stream
STREAM_STDERR: Stream

class NoopArgs(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FibArgs(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class EvalArgs(_message.Message):
    __slots__ = ("expression", "variables")
    class VariablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    expression: str
    variables: _containers.ScalarMap[str, float]
    def __init__(self, expression: _Optional[str] = ..., variables: _Optional[_Mapping[str, float]] = ...) -> None: ...

class WaitArgs(_message.Message):
    __slots__ = ("seconds", "url")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    seconds: _duration_pb2.Duration
    url: str
    def __init__(self, seconds: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., url: _Optional[str] = ...) -> None: ...

class StartJobRequest(_message.Message):
    __slots__ = ("noop", "fib", "eval", "wait", "limits")
    NOOP_FIELD_NUMBER: _ClassVar[int]
    FIB_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    noop: NoopArgs
    fib: FibArgs
    eval: EvalArgs
    wait: WaitArgs
    limits: ResourceLimits
    def __init__(self, noop: _Optional[_Union[NoopArgs, _Mapping]] = ..., fib: _Optional[_Union[FibArgs, _Mapping]] = ..., eval: _Optional[_Union[EvalArgs, _Mapping]] = ..., wait: _Optional[_Union[WaitArgs, _Mapping]] = ..., limits: _Optional[_Union[ResourceLimits, _Mapping]] = ...) -> None: ...

class StartJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobStatus
    def __init__(self, job: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class StopJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class StopJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobStatus
    def __init__(self, job: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobStatus
    def __init__(self, job: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class GetJobStatusRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobStatusResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobStatus
    def __init__(self, job: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class TailJobOutputRequest(_message.Message):
    __slots__ = ("job_id", "follow", "offset", "last_lines")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAST_LINES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    follow: bool
    offset: int
    last_lines: int
    def __init__(self, job_id: _Optional[str] = ..., follow: _Optional[bool] = ..., offset: _Optional[int] = ..., last_lines: _Optional[int] = ...) -> None: ...

class TailJobOutputResponse(_message.Message):
    __slots__ = ("chunks", "next_offset")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[OutputChunk]
    next_offset: int
    def __init__(self, chunks: _Optional[_Iterable[_Union[OutputChunk, _Mapping]]] = ..., next_offset: _Optional[int] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("time", "stream", "data")
    TIME_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    stream: Stream
    data: bytes
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stream: _Optional[_Union[Stream, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "owner", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    owner: str
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., owner: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListJobTypesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobTypesResponse(_message.Message):
    __slots__ = ("types",)
    TYPES_FIELD_NUMBER: _ClassVar[int]
    types: _containers.RepeatedCompositeFieldContainer[JobTypeInfo]
    def __init__(self, types: _Optional[_Iterable[_Union[JobTypeInfo, _Mapping]]] = ...) -> None: ...

class JobTypeInfo(_message.Message):
    __slots__ = ("name", "type", "title", "description", "args")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: JobType
    title: str
    description: str
    args: _containers.RepeatedCompositeFieldContainer[ArgumentInfo]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[JobType, str]] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., args: _Optional[_Iterable[_Union[ArgumentInfo, _Mapping]]] = ...) -> None: ...

class ArgumentInfo(_message.Message):
    __slots__ = ("name", "type", "required", "description", "min", "max", "max_length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    required: bool
    description: str
    min: float
    max: float
    max_length: int
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., required: _Optional[bool] = ..., description: _Optional[str] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., max_length: _Optional[int] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("id", "type", "title", "noop", "fib", "eval", "wait", "owner", "state", "exit_code", "signal", "error", "started_at", "ended_at", "oom_killed", "limits", "usage", "failure_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    NOOP_FIELD_NUMBER: _ClassVar[int]
    FIB_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: JobType
    title: str
    noop: NoopArgs
    fib: FibArgs
    eval: EvalArgs
    wait: WaitArgs
    owner: str
    state: JobState
    exit_code: int
    signal: int
    error: str
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    oom_killed: bool
    limits: ResourceLimits
    usage: ResourceUsage
    failure_reason: str
    def __init__(self, id: _Optional[str] = ..., type: _Optional[_Union[JobType, str]] = ..., title: _Optional[str] = ..., noop: _Optional[_Union[NoopArgs, _Mapping]] = ..., fib: _Optional[_Union[FibArgs, _Mapping]] = ..., eval: _Optional[_Union[EvalArgs, _Mapping]] = ..., wait: _Optional[_Union[WaitArgs, _Mapping]] = ..., owner: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., error: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., oom_killed: _Optional[bool] = ..., limits: _Optional[_Union[ResourceLimits, _Mapping]] = ..., usage: _Optional[_Union[ResourceUsage, _Mapping]] = ..., failure_reason: _Optional[str] = ...) -> None: ...

class ResourceLimits(_message.Message):
    __slots__ = ("cpu_millis", "memory_bytes", "pids", "io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops")
    CPU_MILLIS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    IO_READ_BPS_FIELD_NUMBER: _ClassVar[int]
    IO_WRITE_BPS_FIELD_NUMBER: _ClassVar[int]
    IO_READ_IOPS_FIELD_NUMBER: _ClassVar[int]
    IO_WRITE_IOPS_FIELD_NUMBER: _ClassVar[int]
    cpu_millis: int
    memory_bytes: int
    pids: int
    io_read_bps: int
    io_write_bps: int
    io_read_iops: int
    io_write_iops: int
    def __init__(self, cpu_millis: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., pids: _Optional[int] = ..., io_read_bps: _Optional[int] = ..., io_write_bps: _Optional[int] = ..., io_read_iops: _Optional[int] = ..., io_write_iops: _Optional[int] = ...) -> None: ...

class ResourceUsage(_message.Message):
    __slots__ = ("cpu_time", "peak_memory_bytes", "read_bytes", "written_bytes")
    CPU_TIME_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_time: _duration_pb2.Duration
    peak_memory_bytes: int
    read_bytes: int
    written_bytes: int
    def __init__(self, cpu_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., peak_memory_bytes: _Optional[int] = ..., read_bytes: _Optional[int] = ..., written_bytes: _Optional[int] = ...) -> None: ...
