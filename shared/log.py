"""Structured log lines on stderr (logfmt): ``ts=... level=info msg="job started" job=XE38YM``.

Both processes log this way, so one parser reads the journal of either.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from shared.model import JobStatus

logger = logging.getLogger("workernator")


def _quote(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "-_./:@" for c in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"msg={_quote(record.getMessage())}",
        ]
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts.extend(f"{key}={_quote(value)}" for key, value in fields.items())
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup(level: str) -> None:
    """Send the ``workernator`` loggers' records to stderr as logfmt lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def event(level: int, message: str, **fields: object) -> None:
    logger.log(level, message, extra={"fields": fields})


def info(message: str, **fields: object) -> None:
    event(logging.INFO, message, **fields)


def warning(message: str, **fields: object) -> None:
    event(logging.WARNING, message, **fields)


def error(message: str, **fields: object) -> None:
    event(logging.ERROR, message, **fields)


def job_fields(status: JobStatus) -> dict[str, object]:
    """The fields every job event carries, alike in both daemons' journals: the job, its owner
    and type, its state and, once it started, how long it ran (``duration_s``, to its end or to
    now)."""
    fields: dict[str, object] = {
        "job": status.id,
        "owner": status.owner,
        "type": status.type,
        "state": status.state.value,
    }
    if status.started_ns:
        end = status.ended_ns or time.time_ns()
        fields["duration_s"] = f"{max(0, end - status.started_ns) / 1e9:.3f}"
    if status.exit_code is not None:
        fields["exit_code"] = status.exit_code
    if status.signal is not None:
        fields["signal"] = status.signal
    return fields


def job(message: str, status: JobStatus, level: int = logging.INFO, /, **extra: object) -> None:
    """One line for one job event ("job started", "job ended", ...), :func:`job_fields` first."""
    event(level, message, **job_fields(status), **extra)
