"""The CLI's pure helpers: parsing durations and variables, the status block, the list table."""

from __future__ import annotations

import base64
import datetime
import time
from collections.abc import Iterator

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from workernator_api import cli_format as fmt
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb

UTC = datetime.UTC


@pytest.fixture(autouse=True)
def utc_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC in these tests, so the printed times are fixed."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def ts(text: str, nanos: int = 0) -> Timestamp:
    when = datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)
    return Timestamp(seconds=int(when.timestamp()), nanos=nanos)


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


def fib_job(**changes: object) -> pb.JobStatus:
    job = pb.JobStatus(
        id="XE38YM",
        type=pb.JOB_TYPE_FIB,
        title="Fibonacci",
        fib=pb.FibArgs(position=3),
        owner="alice",
        state=pb.JOB_STATE_COMPLETED,
        exit_code=0,
        started_at=ts("2022-07-07 16:34:03", 200_000_000),
        ended_at=ts("2022-07-07 16:34:04", 250_000_000),
    )
    for name, value in changes.items():
        if isinstance(value, Message):
            getattr(job, name).CopyFrom(value)
        else:
            setattr(job, name, value)
    return job


# --- the status block -------------------------------------------------------------------------


def test_status_block_matches_the_transcript() -> None:
    assert fmt.format_status(fib_job(), now=at("2022-07-08 00:00:00")) == (
        "Job XE38YM: Fibonacci\n"
        "Arguments:\n"
        "  Number:   3\n"
        "Status:     Complete\n"
        "Started:    2022-07-07 16:34:03\n"
        "Finished:   2022-07-07 16:34:04\n"
        "Duration:   1 second"
    )


def test_status_block_is_in_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30, no daylight saving
    time.tzset()
    text = fmt.format_status(fib_job())
    assert "Started:    2022-07-07 22:04:03\n" in text
    assert "Finished:   2022-07-07 22:04:04\n" in text


def test_running_job_has_no_finish_time_and_a_duration_so_far() -> None:
    job = fib_job(state=pb.JOB_STATE_RUNNING)
    job.ClearField("ended_at")
    job.ClearField("exit_code")
    text = fmt.format_status(job, now=at("2022-07-07 16:36:08"))
    assert "Status:     Running\n" in text
    assert "Finished:   -\n" in text
    assert text.endswith("Duration:   2 minutes 5 seconds")


def test_failed_job_shows_error_exit_code_and_signal() -> None:
    job = fib_job(state=pb.JOB_STATE_FAILED, exit_code=3, error="exited with status 3")
    text = fmt.format_status(job)
    assert "Status:     Failed\nError:      exited with status 3\nExit code:  3\n" in text
    killed = fib_job(state=pb.JOB_STATE_FAILED, signal=9, oom_killed=True)
    killed.ClearField("exit_code")
    text = fmt.format_status(killed)
    assert "Error:      killed by the kernel's OOM killer (memory limit reached)\n" in text
    assert "Signal:     9 (SIGKILL)\n" in text
    assert "Exit code" not in text
    # The runner's own words about the OOM kill are not repeated.
    said = "killed by signal 9 (SIGKILL); out of memory (its limit is 64 MiB)"
    killed.error = said
    assert f"\nError:      {said}\nSignal:" in fmt.format_status(killed)


def test_stopped_and_complete_jobs_show_no_exit_details() -> None:
    text = fmt.format_status(fib_job(state=pb.JOB_STATE_STOPPED, signal=15))
    assert "Status:     Stopped\n" in text
    assert "Signal" not in text
    assert "Exit code" not in fmt.format_status(fib_job())


def test_eval_arguments_widen_the_value_column_for_every_line() -> None:
    job = pb.JobStatus(
        id="AB12CD",
        type=pb.JOB_TYPE_EVAL,
        title="Evaluate",
        eval=pb.EvalArgs(expression="2x * 3y", variables={"y": 1.5, "x": 2.0}),
        state=pb.JOB_STATE_COMPLETED,
        started_at=ts("2022-07-07 16:34:03"),
        ended_at=ts("2022-07-07 16:34:03", 350_000_000),
    )
    assert fmt.format_status(job) == (
        "Job AB12CD: Evaluate\n"
        "Arguments:\n"
        "  Expression: 2x * 3y\n"
        "  Variables:  x=2, y=1.5\n"
        "Status:       Complete\n"
        "Started:      2022-07-07 16:34:03\n"
        "Finished:     2022-07-07 16:34:03\n"
        "Duration:     350 ms"
    )


def test_wait_and_noop_arguments() -> None:
    wait = pb.JobStatus(
        id="WA1T00",
        type=pb.JOB_TYPE_WAIT,
        wait=pb.WaitArgs(seconds=Duration(seconds=90, nanos=500_000_000), url="http://x/y"),
        state=pb.JOB_STATE_RUNNING,
    )
    text = fmt.format_status(wait)
    assert text.startswith("Job WA1T00: Wait\n")  # title from the catalog when the server sent none
    assert "  Seconds:  1 minute 30.5 seconds\n  URL:      http://x/y\n" in text
    assert "Started:    -\nFinished:   -\nDuration:   -" in text
    noop = pb.JobStatus(id="N0000P", type=pb.JOB_TYPE_NOOP, title="No-op", noop=pb.NoopArgs())
    assert "\nArguments:  none\n" in fmt.format_status(noop)


def test_verbose_status_adds_owner_limits_usage_and_oom() -> None:
    job = fib_job(
        state=pb.JOB_STATE_FAILED,
        signal=9,
        oom_killed=True,
        limits=pb.ResourceLimits(
            cpu_millis=500,
            memory_bytes=256 * 1024**2,
            pids=64,
            io_read_bps=10 * 1024**2,
            io_write_bps=5 * 1024**2,
            io_read_iops=100,
            io_write_iops=200,
        ),
        usage=pb.ResourceUsage(
            cpu_time=Duration(seconds=2, nanos=500_000_000),
            peak_memory_bytes=256 * 1024**2,
            read_bytes=4096,
            written_bytes=1536 * 1024,
        ),
    )
    job.ClearField("exit_code")
    # Every value in one column: one space after the longest label ("  Disk write IOPS:").
    assert fmt.format_status(job, now=at("2022-07-08 00:00:00"), verbose=True) == (
        "Job XE38YM: Fibonacci\n"
        "Arguments:\n"
        "  Number:          3\n"
        "Status:            Failed\n"
        "Error:             killed by the kernel's OOM killer (memory limit reached)\n"
        "Signal:            9 (SIGKILL)\n"
        "Started:           2022-07-07 16:34:03\n"
        "Finished:          2022-07-07 16:34:04\n"
        "Duration:          1 second\n"
        "Owner:             alice\n"
        "Limits:\n"
        "  CPU:             0.5\n"
        "  Memory:          256 MiB\n"
        "  Processes:       64\n"
        "  Disk read:       10 MiB/s\n"
        "  Disk write:      5 MiB/s\n"
        "  Disk read IOPS:  100\n"
        "  Disk write IOPS: 200\n"
        "Usage:\n"
        "  CPU time:        2.5 seconds\n"
        "  Peak memory:     256 MiB\n"
        "  Disk read:       4 KiB\n"
        "  Disk written:    1.5 MiB\n"
        "Out of memory:     yes"
    )


def test_verbose_status_shows_only_the_limits_that_are_set() -> None:
    job = fib_job(
        limits=pb.ResourceLimits(cpu_millis=1500, memory_bytes=512 * 1024**2, pids=64),
        usage=pb.ResourceUsage(cpu_time=Duration(nanos=120_000_000), peak_memory_bytes=3 << 20),
    )
    assert fmt.format_status(job, now=at("2022-07-08 00:00:00"), verbose=True) == (
        "Job XE38YM: Fibonacci\n"
        "Arguments:\n"
        "  Number:       3\n"
        "Status:         Complete\n"
        "Started:        2022-07-07 16:34:03\n"
        "Finished:       2022-07-07 16:34:04\n"
        "Duration:       1 second\n"
        "Owner:          alice\n"
        "Limits:\n"
        "  CPU:          1.5\n"
        "  Memory:       512 MiB\n"
        "  Processes:    64\n"
        "Usage:\n"
        "  CPU time:     120 ms\n"
        "  Peak memory:  3 MiB\n"
        "  Disk read:    0 B\n"
        "  Disk written: 0 B"
    )
    io_only = fmt.format_status(
        fib_job(limits=pb.ResourceLimits(io_write_bps=1 << 20, io_read_iops=50)), verbose=True
    )
    assert "\nLimits:\n  Disk write:     1 MiB/s\n  Disk read IOPS: 50\nUsage:\n" in io_only


def test_verbose_status_without_limits_says_none() -> None:
    text = fmt.format_status(fib_job(), verbose=True)  # no limits, no usage sent at all
    assert "\nOwner:          alice\nLimits:         none\nUsage:\n" in text
    assert text.endswith("  Disk written: 0 B")
    assert "Out of memory" not in text
    assert "CPU:" not in text


def test_status_without_verbose_shows_no_resources() -> None:
    job = fib_job(oom_killed=True, limits=pb.ResourceLimits(cpu_millis=500))
    text = fmt.format_status(job, now=at("2022-07-08 00:00:00"))
    assert text == fmt.format_status(fib_job(), now=at("2022-07-08 00:00:00"))
    assert "Limits" not in text and "Usage" not in text and "Out of memory" not in text


def test_started_message_matches_the_transcript() -> None:
    assert fmt.format_started(fib_job()) == (
        "Started 'Fibonacci' job, ID: XE38YM\n"
        "Use 'workernator jobs tail XE38YM' to see the output of this job,\n"
        "'workernator jobs stop XE38YM' to stop the job."
    )


# --- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 seconds"),
        (0.0004, "0 ms"),
        (0.35, "350 ms"),
        (0.9996, "1 second"),
        (1, "1 second"),
        (1.4, "1 second"),
        (1.5, "2 seconds"),
        (2, "2 seconds"),
        (60, "1 minute"),
        (125, "2 minutes 5 seconds"),
        (3600, "1 hour"),
        (3661, "1 hour 1 minute 1 second"),
        (86400 * 2 + 7200, "2 days 2 hours"),
        (-3, "0 seconds"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert fmt.format_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2.5, "2.5 seconds"), (90.25, "1 minute 30.25 seconds"), (5, "5 seconds"), (0.5, "500 ms")],
)
def test_format_duration_precise(seconds: float, text: str) -> None:
    assert fmt.format_duration(seconds, precise=True) == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5", 5.0),
        ("2.5", 2.5),
        (".5", 0.5),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1h2m3.5s", 3723.5),
        ("1d", 86400.0),
        ("23h59m59.999s", 86399.999),
        ("1M30S", 90.0),
        (" 10s ", 10.0),
        ("0", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert fmt.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty duration"),
        ("abc", "is not a duration"),
        ("5x", "is not a duration"),
        ("1m30", "is not a duration"),
        ("30s1m", "largest to the smallest"),
        ("1s1s", "largest to the smallest"),
        ("-5", r"'-5' is negative: a wait is from 0 seconds to 1 day \(86400 seconds\)"),
        ("-1m30s", "'-1m30s' is negative"),
        ("-x", "'-x' is not a duration"),
        ("1e999", "is not a duration"),
        ("inf", "is not a duration"),
        ("1" * 400, "too large"),
        ("1d1ms", r"'1d1ms' is too long: at most 1 day \(86400 seconds\)"),
        ("99999999999999999999d", "is too long: at most 1 day"),
        ("1" * 300, "is too long"),
    ],
)
def test_parse_duration_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fmt.parse_duration(text)


def test_parse_duration_maximum() -> None:
    assert fmt.parse_duration("2d", maximum=3 * 86400) == 172800.0
    with pytest.raises(ValueError, match=r"too long: at most 1 minute \(60 seconds\)"):
        fmt.parse_duration("61", maximum=60)


# --- resource limits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("1", 1),
        ("512B", 512),
        ("1K", 1024),
        ("1k", 1024),
        ("1KiB", 1024),
        ("1kib", 1024),
        ("256M", 256 << 20),
        ("256MiB", 256 << 20),
        ("256mib", 256 << 20),
        ("1.5G", 3 << 29),
        ("1.5GiB", 3 << 29),
        ("2T", 2 << 40),
        ("2tib", 2 << 40),
        (".5K", 512),
        ("0.5k", 512),
        ("1.1K", 1126),  # 1126.4: the fraction of a byte is dropped
        (" 10M ", 10 << 20),
        ("10 M", 10 << 20),
        ("8388607T", (2**63 - 1) // 2**40 * 2**40),
        (str(2**63 - 1), 2**63 - 1),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert fmt.parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "'' is not a size: give bytes, or a number with K, M, G or T"),
        ("abc", "'abc' is not a size"),
        ("12Q", "'12Q' is not a size: .* \\(powers of 1024: K = 1024\\), like 256M or 1.5G"),
        ("1GB", "'1GB' is not a size"),  # SI-looking units are not guessed at
        ("1mb", "'1mb' is not a size"),
        ("M", "'M' is not a size"),
        ("-1M", "'-1M' is not a size"),
        ("1e6", "'1e6' is not a size"),
        ("1,5G", "'1,5G' is not a size"),
        ("inf", "'inf' is not a size"),
        ("1.5", "'1.5' is not a whole number of bytes"),
        ("0", "'0' must be more than 0"),
        ("0K", "'0K' must be more than 0"),
        ("0.0001K", "'0.0001K' must be more than 0"),
        ("8388608T", "'8388608T' is too large: at most 9223372036854775807 bytes"),
        (str(2**63), "is too large"),
        ("9" * 41, "has too many digits"),
        ("\u0661\u0662M", "is not a size"),  # Arabic-Indic digits
    ],
)
def test_parse_size_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fmt.parse_size(text)


@pytest.mark.parametrize(
    ("text", "millis"),
    [
        ("0.5", 500),
        ("1", 1000),
        ("2", 2000),
        ("1.", 1000),
        (".25", 250),
        ("+0.5", 500),
        ("0.001", 1),
        ("1.234", 1234),
        ("0.5000", 500),  # trailing zeros are not finer than a thousandth
        (" 3 ", 3000),
        ("4294967.295", 2**32 - 1),
    ],
)
def test_parse_cpu(text: str, millis: int) -> None:
    assert fmt.parse_cpu(text) == millis


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "'0' must be more than 0"),
        ("0.000", "'0.000' must be more than 0"),
        ("-0.5", "'-0.5' must be more than 0"),
        ("0.0005", r"'0.0005' has more than 3 decimals \(the smallest step is 0.001 CPU\)"),
        ("1.2345", "has more than 3 decimals"),
        ("abc", r"'abc' is not a number of CPUs \(like 0.5 or 2\)"),
        ("", "is not a number of CPUs"),
        ("1/2", "is not a number of CPUs"),
        ("50%", "is not a number of CPUs"),
        ("1e3", "is not a number of CPUs"),
        ("nan", "is not a number of CPUs"),
        ("inf", "is not a number of CPUs"),
        ("4294967.296", "'4294967.296' is too large: at most 4294967.295 CPUs"),
        ("9" * 41, "has too many digits"),
    ],
)
def test_parse_cpu_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fmt.parse_cpu(text)


def test_parse_count() -> None:
    assert fmt.parse_count("64") == 64
    assert fmt.parse_count(" 1 ") == 1
    assert fmt.parse_count(str(2**63 - 1)) == 2**63 - 1
    assert fmt.parse_count("4294967295", fmt.MAX_PIDS) == 2**32 - 1
    for text, message in [
        ("0", "'0' must be more than 0"),
        ("-1", "'-1' is not a whole number"),
        ("1.5", "'1.5' is not a whole number"),
        ("1e3", "'1e3' is not a whole number"),
        ("10K", "'10K' is not a whole number"),
        ("", "'' is not a whole number"),
        ("\u0661", "is not a whole number"),
        (str(2**63), "is too large: at most 9223372036854775807"),
        ("9" * 41, "has too many digits"),
    ]:
        with pytest.raises(ValueError, match=message):
            fmt.parse_count(text)
    with pytest.raises(ValueError, match="'4294967296' is too large: at most 4294967295"):
        fmt.parse_count("4294967296", fmt.MAX_PIDS)


# --- variables --------------------------------------------------------------------------------


def test_parse_variables() -> None:
    assert fmt.parse_variables(["x=2", "y = 1.5", "_z1=-3e2"]) == {"x": 2.0, "y": 1.5, "_z1": -300}
    assert fmt.parse_variables([]) == {}


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["x"], "is not NAME=VALUE"),
        (["=2"], "no variable name"),
        (["x="], "has no value"),
        (["x=abc"], "is not a number: 'abc'"),
        (["x=nan"], "must be a finite number"),
        (["x=inf"], "must be a finite number"),
        (["1x=2"], "is not a valid variable name"),
        (["pi=3"], "is not a valid variable name"),
        (["x=1", "x=2"], "given more than once"),
    ],
)
def test_parse_variables_errors(texts: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fmt.parse_variables(texts)


# --- the list table, types, JSON --------------------------------------------------------------


def test_job_table() -> None:
    running = pb.JobStatus(
        id="RUN123",
        type=pb.JOB_TYPE_WAIT,
        owner="bob",
        state=pb.JOB_STATE_RUNNING,
        started_at=ts("2022-07-07 16:35:00"),
    )
    table = fmt.format_job_table([fib_job(), running], now=at("2022-07-07 16:35:30"))
    assert table.splitlines() == [
        "ID      TYPE  STATE     OWNER  STARTED              DURATION",
        "XE38YM  fib   Complete  alice  2022-07-07 16:34:03  1 second",
        "RUN123  wait  Running   bob    2022-07-07 16:35:00  30 seconds",
    ]


def test_job_table_without_jobs_is_the_header() -> None:
    assert fmt.format_job_table([]) == "ID  TYPE  STATE  OWNER  STARTED  DURATION"


def test_job_types() -> None:
    types = [
        pb.JobTypeInfo(name="noop", type=pb.JOB_TYPE_NOOP, title="No-op", description="Nothing."),
        pb.JobTypeInfo(
            name="fib",
            type=pb.JOB_TYPE_FIB,
            title="Fibonacci",
            description="Fibonacci numbers.",
            args=[
                pb.ArgumentInfo(
                    name="position", type="int", required=True, description="Which", min=1, max=10
                )
            ],
        ),
        pb.JobTypeInfo(
            name="wait",
            title="Wait",
            args=[pb.ArgumentInfo(name="seconds", type="duration", required=True, max=86400)],
        ),
    ]
    assert fmt.format_job_types(types) == (
        "noop - No-op\n"
        "  Nothing.\n"
        "  Usage: workernator jobs start noop\n"
        "  Arguments: none\n"
        "\n"
        "fib - Fibonacci\n"
        "  Fibonacci numbers.\n"
        "  Usage: workernator jobs start fib POSITION\n"
        "  Arguments:\n"
        "    position (int, required, from 1 to 10)\n"
        "        Which\n"
        "\n"
        "wait - Wait\n"
        "  Usage: workernator jobs start wait SECONDS URL\n"
        "  Arguments:\n"
        "    seconds (duration, required, at most 1 day)"
    )


def test_message_to_dict_uses_proto_names_and_keeps_zero_fields() -> None:
    data = fmt.message_to_dict(fib_job())
    assert data["id"] == "XE38YM"
    assert data["state"] == "JOB_STATE_COMPLETED"
    assert data["fib"] == {"position": "3"}  # uint64 as a string, per the protobuf JSON mapping
    assert data["started_at"] == "2022-07-07T16:34:03.200Z"
    assert data["error"] == ""
    assert data["exit_code"] == 0
    assert "signal" not in data  # unset optional field


def test_job_to_dict_always_has_limits_usage_and_oom_killed() -> None:
    bare = fmt.job_to_dict(fib_job())  # a server that sent neither limits nor usage
    assert bare["oom_killed"] is False
    assert bare["limits"] == {
        "cpu_millis": 0,
        "memory_bytes": "0",
        "pids": 0,
        "io_read_bps": "0",
        "io_write_bps": "0",
        "io_read_iops": "0",
        "io_write_iops": "0",
    }
    assert bare["usage"] == {
        "cpu_time": "0s",
        "peak_memory_bytes": "0",
        "read_bytes": "0",
        "written_bytes": "0",
    }
    assert "limits" not in fmt.message_to_dict(fib_job())  # what job_to_dict adds
    job = fib_job(
        oom_killed=True,
        limits=pb.ResourceLimits(cpu_millis=500, memory_bytes=256 << 20, io_write_iops=7),
        usage=pb.ResourceUsage(cpu_time=Duration(nanos=120_000_000), written_bytes=10),
    )
    data = fmt.job_to_dict(job)
    assert data["oom_killed"] is True
    assert data["limits"]["cpu_millis"] == 500  # uint32: a number; uint64: a string
    assert data["limits"]["memory_bytes"] == str(256 << 20)
    assert data["limits"]["io_write_iops"] == "7"
    assert data["usage"]["cpu_time"] == "0.120s"
    assert data["usage"]["written_bytes"] == "10"
    assert data == fmt.message_to_dict(job) | {"usage": data["usage"]}
    assert not fib_job().HasField("limits")  # the job itself is left as it was


def test_chunk_to_dict() -> None:
    chunk = pb.OutputChunk(
        time=ts("2022-07-07 16:34:03"), stream=pb.STREAM_STDERR, data=b"\xffoops\n"
    )
    assert fmt.chunk_to_dict(chunk) == {
        "time": "2022-07-07T16:34:03Z",
        "stream": "stderr",
        "data": base64.b64encode(b"\xffoops\n").decode(),
    }
    assert fmt.chunk_to_dict(chunk, 42)["next_offset"] == 42


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (5 * 1024**3, "5 GiB")],
)
def test_format_bytes(count: int, text: str) -> None:
    assert fmt.format_bytes(count) == text
