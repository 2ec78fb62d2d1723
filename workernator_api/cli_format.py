"""Pure helpers of the ``workernator`` CLI: parsing what people type, formatting what they read.

Nothing here does I/O or talks to the API, so every function is easy to test on its own: the
status block of ``workernator jobs status``, the table of ``workernator jobs list``, durations
("2 minutes 5 seconds"), the duration syntax of ``wait`` (``1m30s``), ``--var NAME=VALUE``, the
resource limits of ``jobs start`` (``--cpu 0.5``, ``--memory 256M``), and the JSON shapes of
``--output json``.

Times are shown in the local time zone (``TZ``), at one-second resolution.
"""

from __future__ import annotations

import base64
import datetime
import math
import re
import signal
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from shared import catalog, expr, units
from shared.model import MAX_FAILURE_REASON
from shared.text import printable
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb

__all__ = [
    "ARGUMENT_LABELS",
    "MAX_CPU_MILLIS",
    "MAX_LIMIT",
    "MAX_PIDS",
    "STATE_LABELS",
    "TYPE_NAMES",
    "chunk_to_dict",
    "format_bytes",
    "format_duration",
    "format_job_table",
    "format_job_types",
    "format_started",
    "format_status",
    "format_timestamp",
    "format_value",
    "job_duration",
    "job_to_dict",
    "message_to_dict",
    "parse_count",
    "parse_cpu",
    "parse_duration",
    "parse_size",
    "parse_variable",
    "parse_variables",
]

STATE_LABELS: Mapping[int, str] = {
    pb.JOB_STATE_RUNNING: "Running",
    pb.JOB_STATE_COMPLETED: "Complete",
    pb.JOB_STATE_FAILED: "Failed",
    pb.JOB_STATE_STOPPED: "Stopped",
}
"""What people read for each job state."""

TYPE_NAMES: Mapping[int, str] = {
    pb.JOB_TYPE_NOOP: "noop",
    pb.JOB_TYPE_FIB: "fib",
    pb.JOB_TYPE_EVAL: "eval",
    pb.JOB_TYPE_WAIT: "wait",
}
"""The short name of each job type, as ``workernator jobs start NAME`` takes it."""

ARGUMENT_LABELS: Mapping[str, Mapping[str, str]] = {
    "noop": {},
    "fib": {"position": "Number"},
    "eval": {"expression": "Expression", "variables": "Variables"},
    "wait": {"seconds": "Seconds", "url": "URL"},
}
"""The label of each argument in the status block, per job type."""

# How each job type's arguments are typed on the command line (for ``jobs types``).
_CLI_USAGE: Mapping[str, str] = {
    "noop": "",
    "fib": "POSITION",
    "eval": "EXPRESSION [--var NAME=VALUE]...",
    "wait": "SECONDS URL",
}

MAX_LIMIT = 2**63 - 1
"""The largest limit the API takes (it refuses 2^63 and more, which the runner cannot take)."""
MAX_CPU_MILLIS = 2**32 - 1
"""The largest ``cpu_millis`` (a uint32 in the API): about 4.3 million CPUs."""
MAX_PIDS = 2**32 - 1
"""The largest ``pids`` (a uint32 in the API)."""

_VALUE_COLUMN = 12  # "Status:     Complete": values start in this column (or later, see below)
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_WRAP = 88  # width of the descriptions of `jobs types`


# --- parsing ----------------------------------------------------------------------------------

_DURATION_UNITS: Mapping[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_PLAIN_NUMBER = re.compile(_NUMBER)


def parse_duration(text: str, maximum: float = catalog.MAX_WAIT_SECONDS) -> float:
    """Seconds in ``text``: a plain number of seconds (``5``, ``2.5``) or a sequence of numbers
    with units ``d``, ``h``, ``m``, ``s``, ``ms``, largest first (``1m30s``, ``500ms``,
    ``1h2m3.5s``), at most ``maximum`` (by default the longest wait a job may have). Raise
    :class:`ValueError` with a message for people otherwise."""
    shown = text.strip()
    if shown.startswith("-") and _is_positive_duration(shown[1:]):  # a duration, but negative
        raise ValueError(
            f"{shown!r} is negative: a wait is from 0 seconds to "
            f"{format_duration(maximum, precise=True)} ({maximum:g} seconds)"
        )
    seconds = _parse_duration(text)
    if seconds > maximum:
        raise ValueError(
            f"{text.strip()!r} is too long: at most {format_duration(maximum, precise=True)} "
            f"({maximum:g} seconds)"
        )
    return seconds


def _is_positive_duration(text: str) -> bool:
    try:
        return _parse_duration(text) > 0
    except ValueError:
        return False


def _parse_duration(text: str) -> float:
    value = text.strip().lower()
    if not value:
        raise ValueError("empty duration")
    if _PLAIN_NUMBER.fullmatch(value):
        return _finite(float(value), text)
    total = 0.0
    position = 0
    last_scale = math.inf
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            break
        scale = _DURATION_UNITS[match.group(2)]
        if scale >= last_scale:
            raise ValueError(
                f"{text!r}: units must go from the largest to the smallest, each once (like 1h2m3s)"
            )
        last_scale = scale
        total += float(match.group(1)) * scale
        position = match.end()
    if position != len(value) or position == 0:
        raise ValueError(
            f"{text!r} is not a duration; use seconds (5, 2.5) or units d, h, m, s, ms "
            "(1m30s, 500ms)"
        )
    return _finite(total, text)


def _finite(value: float, text: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is too large")
    return value


def parse_variable(text: str) -> tuple[str, float]:
    """``NAME=VALUE`` (as given to ``--var``) as ``(name, value)``; :class:`ValueError` with a
    message for people when it is not that."""
    name, sep, number = text.partition("=")
    name = name.strip()
    number = number.strip()
    if not sep:
        raise ValueError(f"{text!r} is not NAME=VALUE (for example x=2)")
    if not name:
        raise ValueError(f"{text!r} has no variable name before '='")
    if not expr.is_valid_variable_name(name):
        raise ValueError(
            f"{name!r} is not a valid variable name (letters, digits and _, not starting with a "
            "digit, at most 64 characters, not a function or constant name)"
        )
    if not number:
        raise ValueError(f"variable {name!r} has no value after '='")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"the value of variable {name!r} is not a number: {number!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"the value of variable {name!r} must be a finite number, got {number}")
    return name, value


def parse_variables(texts: Iterable[str]) -> dict[str, float]:
    """Every ``--var NAME=VALUE`` as a map; a name given twice is an error."""
    out: dict[str, float] = {}
    for text in texts:
        name, value = parse_variable(text)
        if name in out:
            raise ValueError(f"variable {name!r} is given more than once")
        out[name] = value
    return out


# --- resource limits --------------------------------------------------------------------------

_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)
_MAX_DIGITS = 40  # longer numbers are refused before they are converted


def parse_size(text: str, maximum: int = MAX_LIMIT) -> int:
    """Bytes in ``text`` (see :func:`shared.units.parse_size`)."""
    return units.parse_size(text, maximum)


def parse_cpu(text: str) -> int:
    """Thousandths of a CPU (``cpu_millis``) in a number of CPUs: ``0.5`` -> 500, ``2`` -> 2000.
    More than 0, at most 3 decimals (``0.001`` is the smallest step), at most
    :data:`MAX_CPU_MILLIS` / 1000 CPUs; :class:`ValueError` with a message for people
    otherwise."""
    shown = text.strip()
    if not _DECIMAL.fullmatch(shown):
        raise ValueError(f"{text!r} is not a number of CPUs (like 0.5 or 2)")
    if len(shown) > _MAX_DIGITS:
        raise ValueError(f"{shown!r} has too many digits")
    millis = Fraction(shown) * 1000
    if millis <= 0:
        raise ValueError(f"{shown!r} must be more than 0")
    if millis.denominator != 1:
        raise ValueError(f"{shown!r} has more than 3 decimals (the smallest step is 0.001 CPU)")
    if millis > MAX_CPU_MILLIS:
        raise ValueError(
            f"{shown!r} is too large: at most {format_value(MAX_CPU_MILLIS / 1000)} CPUs"
        )
    return int(millis)


def parse_count(text: str, maximum: int = MAX_LIMIT) -> int:
    """A whole number more than 0 and at most ``maximum`` (processes, operations per second);
    :class:`ValueError` with a message for people otherwise."""
    shown = text.strip()
    if not shown.isascii() or not shown.isdigit():
        raise ValueError(f"{text!r} is not a whole number")
    if len(shown) > _MAX_DIGITS:
        raise ValueError(f"{shown!r} has too many digits")
    count = int(shown)
    if count <= 0:
        raise ValueError(f"{shown!r} must be more than 0")
    if count > maximum:
        raise ValueError(f"{shown!r} is too large: at most {maximum}")
    return count


# --- values -----------------------------------------------------------------------------------


def _plural(count: int | str, unit: str) -> str:
    if str(count) == "1":
        return f"{count} {unit}"
    return f"{count} {unit}es" if unit.endswith("s") else f"{count} {unit}s"


def format_duration(seconds: float, *, precise: bool = False) -> str:
    """A duration for people: ``350 ms``, ``1 second``, ``2 minutes 5 seconds``,
    ``1 day 3 hours``.

    Under a second it is in whole milliseconds; from a second on, it is rounded to whole
    seconds, unless ``precise``, which keeps up to three decimals of the seconds
    (``2.5 seconds``, ``1 minute 30.25 seconds``). Zero is ``0 seconds``.
    """
    if not math.isfinite(seconds) or seconds <= 0:
        return "0 seconds"
    millis = round(seconds * 1000)
    if millis < 1000:
        return f"{millis} ms"
    if precise:
        whole, frac_millis = divmod(millis, 1000)
    else:
        whole, frac_millis = math.floor(seconds + 0.5), 0
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        _plural(n, unit) for n, unit in ((days, "day"), (hours, "hour"), (minutes, "minute")) if n
    ]
    if frac_millis:
        parts.append(_plural(f"{secs}.{frac_millis:03d}".rstrip("0"), "second"))
    elif secs or not parts:
        parts.append(_plural(secs, "second"))
    return " ".join(parts)


def _duration_seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _timestamp_seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def format_timestamp(ts: Timestamp) -> str:
    """A timestamp in local time, to the second: ``2022-07-07 16:34:03``."""
    return (
        datetime.datetime.fromtimestamp(ts.seconds, datetime.UTC)
        .astimezone()
        .strftime(_TIME_FORMAT)
    )


def format_value(value: float) -> str:
    """A number as people write it: ``2``, ``1.5``, ``1e+20``."""
    return expr.format_number(value) if math.isfinite(value) else str(value)


def format_bytes(count: int) -> str:
    """A size in binary units: ``512 B``, ``4 KiB``, ``1.5 MiB``."""
    return units.format_size(count)


def job_duration(job: pb.JobStatus, now: datetime.datetime) -> float | None:
    """How long the job ran, or has run so far while it runs; None when unknown."""
    if not job.HasField("started_at"):
        return None
    if job.HasField("ended_at"):
        end = _timestamp_seconds(job.ended_at)
    elif job.state == pb.JOB_STATE_RUNNING:
        end = now.timestamp()
    else:
        return None
    return max(0.0, end - _timestamp_seconds(job.started_at))


def _job_title(job: pb.JobStatus) -> str:
    if job.title:
        return job.title
    name = TYPE_NAMES.get(job.type)
    spec = catalog.BUILTIN.get(name) if name else None
    return spec.title if spec is not None else f"job type {job.type}"


def _state_label(state: int) -> str:
    return STATE_LABELS.get(state, f"Unknown ({state})")


def _signal_name(number: int) -> str:
    try:
        return f"{number} ({signal.Signals(number).name})"
    except ValueError:
        return str(number)


def _argument_lines(job: pb.JobStatus) -> list[tuple[str, str]]:
    arm = job.WhichOneof("args")
    labels = ARGUMENT_LABELS.get(TYPE_NAMES.get(job.type, ""), {})
    if arm == "fib":
        return [(labels.get("position", "Position"), str(job.fib.position))]
    if arm == "eval":
        names = sorted(job.eval.variables)
        variables = ", ".join(f"{n}={format_value(job.eval.variables[n])}" for n in names)
        return [
            (labels.get("expression", "Expression"), job.eval.expression),
            (labels.get("variables", "Variables"), variables or "none"),
        ]
    if arm == "wait":
        seconds = _duration_seconds(job.wait.seconds)
        return [
            (labels.get("seconds", "Seconds"), format_duration(seconds, precise=True)),
            (labels.get("url", "URL"), job.wait.url),
        ]
    return []


def _limit_lines(limits: pb.ResourceLimits) -> list[tuple[str, str]]:
    """The limits that are set (0 is no limit), in the order of the proto."""
    values: list[tuple[str, int, Callable[[int], str]]] = [
        ("CPU", limits.cpu_millis, lambda n: format_value(n / 1000)),
        ("Memory", limits.memory_bytes, format_bytes),
        ("Processes", limits.pids, str),
        ("Disk read", limits.io_read_bps, lambda n: f"{format_bytes(n)}/s"),
        ("Disk write", limits.io_write_bps, lambda n: f"{format_bytes(n)}/s"),
        ("Disk read IOPS", limits.io_read_iops, str),
        ("Disk write IOPS", limits.io_write_iops, str),
    ]
    return [(label, show(value)) for label, value, show in values if value]


def _usage_lines(usage: pb.ResourceUsage) -> list[tuple[str, str]]:
    return [
        ("CPU time", format_duration(_duration_seconds(usage.cpu_time), precise=True)),
        ("Peak memory", format_bytes(usage.peak_memory_bytes)),
        ("Disk read", format_bytes(usage.read_bytes)),
        ("Disk written", format_bytes(usage.written_bytes)),
    ]


def _block(heading: str, lines: Sequence[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """``Heading:`` and its lines indented under it, or ``Heading:  none`` without lines."""
    if not lines:
        return [(f"{heading}:", "none")]
    return [(f"{heading}:", None), *((f"  {label}:", value) for label, value in lines)]


def _resource_rows(job: pb.JobStatus) -> list[tuple[str, str | None]]:
    rows: list[tuple[str, str | None]] = [("Owner:", job.owner or "-")]
    rows += _block("Limits", _limit_lines(job.limits))
    rows += _block("Usage", _usage_lines(job.usage))
    if job.oom_killed:
        rows.append(("Out of memory:", "yes"))
    return rows


def _aligned(rows: Sequence[tuple[str, str | None]]) -> list[str]:
    """Label/value rows with every value in the same column: column :data:`_VALUE_COLUMN`, or
    one space after the longest label. A row whose value is None is a heading."""
    width = max([_VALUE_COLUMN] + [len(label) + 1 for label, value in rows if value is not None])
    out = []
    for label, value in rows:
        out.append(label if value is None else f"{label:<{width}}{value}".rstrip())
    return out


def format_status(
    job: pb.JobStatus, *, now: datetime.datetime | None = None, verbose: bool = False
) -> str:
    """The status block of ``workernator jobs status`` (no trailing newline)::

        Job XE38YM: Fibonacci
        Arguments:
          Number:   3
        Status:     Complete
        Started:    2022-07-07 16:34:03
        Finished:   2022-07-07 16:34:04
        Duration:   1 second

    A failed job adds ``Reason:`` (why, in the job's words: its last stderr line), ``Error:``
    (how it ended, in the runner's), ``Exit code:`` and ``Signal:`` lines when it has them; a
    running job shows ``Finished:   -`` and its duration so far.

    ``verbose`` adds ``Owner:``; a ``Limits:`` block with the limits that are set (``CPU: 0.5``,
    ``Memory: 256 MiB``, ``Processes: 64``, ``Disk read: 10 MiB/s``, ``Disk write:``,
    ``Disk read IOPS:``, ``Disk write IOPS:``), or ``Limits: none``; a ``Usage:`` block (CPU
    time, peak memory, bytes read from and written to disk); and ``Out of memory: yes`` when the
    kernel's OOM killer killed a process of the job. Every value is in the same column, as
    above, so a long label moves the column of the whole block.
    """
    now = now if now is not None else datetime.datetime.now(datetime.UTC)
    rows: list[tuple[str, str | None]] = []
    rows += _block("Arguments", _argument_lines(job))
    rows.append(("Status:", _state_label(job.state)))
    if job.state == pb.JOB_STATE_FAILED:
        if job.failure_reason:  # the runner made it safe; made so again, cheaply
            rows.append(("Reason:", printable(job.failure_reason, MAX_FAILURE_REASON)))
        errors = [job.error] if job.error else []
        if job.oom_killed and "out of memory" not in job.error.lower():  # unless it says so
            errors.append("killed by the kernel's OOM killer (memory limit reached)")
        if errors:
            rows.append(("Error:", "; ".join(errors)))
        if job.HasField("exit_code"):
            rows.append(("Exit code:", str(job.exit_code)))
        if job.HasField("signal"):
            rows.append(("Signal:", _signal_name(job.signal)))
    rows.append(
        ("Started:", format_timestamp(job.started_at) if job.HasField("started_at") else "-")
    )
    rows.append(("Finished:", format_timestamp(job.ended_at) if job.HasField("ended_at") else "-"))
    duration = job_duration(job, now)
    rows.append(("Duration:", format_duration(duration) if duration is not None else "-"))
    if verbose:
        rows += _resource_rows(job)
    return "\n".join([f"Job {job.id}: {_job_title(job)}", *_aligned(rows)])


def format_started(job: pb.JobStatus, *, prog: str = "workernator") -> str:
    """What ``workernator jobs start`` prints (no trailing newline)."""
    return (
        f"Started '{_job_title(job)}' job, ID: {job.id}\n"
        f"Use '{prog} jobs tail {job.id}' to see the output of this job,\n"
        f"'{prog} jobs stop {job.id}' to stop the job."
    )


def format_job_table(jobs: Sequence[pb.JobStatus], *, now: datetime.datetime | None = None) -> str:
    """The table of ``workernator jobs list`` (no trailing newline): ID, TYPE, STATE, OWNER,
    STARTED, DURATION, columns two spaces apart."""
    now = now if now is not None else datetime.datetime.now(datetime.UTC)
    rows = [("ID", "TYPE", "STATE", "OWNER", "STARTED", "DURATION")]
    for job in jobs:
        duration = job_duration(job, now)
        rows.append(
            (
                job.id,
                TYPE_NAMES.get(job.type, str(job.type)),
                _state_label(job.state),
                job.owner or "-",
                format_timestamp(job.started_at) if job.HasField("started_at") else "-",
                format_duration(duration) if duration is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _argument_summary(arg: pb.ArgumentInfo) -> str:
    parts = [arg.type or "value", "required" if arg.required else "optional"]

    def bound(value: float) -> str:
        return (
            format_duration(value, precise=True)
            if arg.type == "duration"
            else (format_value(value))
        )

    has_min, has_max = arg.HasField("min"), arg.HasField("max")
    if has_min and has_max:
        parts.append(f"from {bound(arg.min)} to {bound(arg.max)}")
    elif has_min:
        parts.append(f"at least {bound(arg.min)}")
    elif has_max:
        parts.append(f"at most {bound(arg.max)}")
    if arg.HasField("max_length"):
        parts.append(f"at most {arg.max_length} characters")
    return ", ".join(parts)


def format_job_types(types: Sequence[pb.JobTypeInfo], *, prog: str = "workernator") -> str:
    """What ``workernator jobs types`` prints: each type, how to start it, its arguments."""
    blocks = []
    for info in types:
        lines = [f"{info.name} - {info.title}" if info.title else info.name]
        if info.description:
            lines += textwrap.wrap(
                info.description, _WRAP, initial_indent="  ", subsequent_indent="  "
            )
        usage = _CLI_USAGE.get(info.name)
        if usage is not None:
            lines.append(f"  Usage: {prog} jobs start {info.name} {usage}".rstrip())
        if info.args:
            lines.append("  Arguments:")
            for arg in info.args:
                lines.append(f"    {arg.name} ({_argument_summary(arg)})")
                if arg.description:
                    lines += textwrap.wrap(
                        arg.description, _WRAP, initial_indent=" " * 8, subsequent_indent=" " * 8
                    )
        else:
            lines.append("  Arguments: none")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# --- JSON -------------------------------------------------------------------------------------


def message_to_dict(message: Message) -> dict[str, Any]:
    """The JSON shape of ``--output json``: the protobuf JSON mapping with the proto field names
    (``job_id``, ``started_at``), enum names (``JOB_STATE_RUNNING``), every scalar field even
    when zero, timestamps as RFC 3339 strings, 64-bit integers as strings, bytes as base64."""
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def job_to_dict(job: pb.JobStatus) -> dict[str, Any]:
    """The JSON shape of a job: :func:`message_to_dict`, with ``limits`` and ``usage`` always
    there (all zero when the server sent none), like ``oom_killed``."""
    out = pb.JobStatus()
    out.CopyFrom(job)
    out.limits.SetInParent()
    out.usage.cpu_time.SetInParent()
    return message_to_dict(out)


def chunk_to_dict(chunk: pb.OutputChunk, next_offset: int | None = None) -> dict[str, Any]:
    """One JSON line of ``jobs tail --output json``: ``time``, ``stream`` (``stdout`` or
    ``stderr``), ``data`` (base64 of the exact bytes) and, on the last chunk of each batch the
    server sent, ``next_offset`` (an integer to pass to ``--offset`` to resume after it)."""
    stream = {pb.STREAM_STDOUT: "stdout", pb.STREAM_STDERR: "stderr"}.get(chunk.stream, "unknown")
    out: dict[str, Any] = {
        "time": chunk.time.ToJsonString() if chunk.HasField("time") else None,
        "stream": stream,
        "data": base64.b64encode(chunk.data).decode("ascii"),
    }
    if next_offset is not None:
        out["next_offset"] = next_offset
    return out
