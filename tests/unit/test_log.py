"""The journal lines of job events: the same fields, in the same order, from either daemon."""

from __future__ import annotations

import io
import logging

from shared import log
from shared.model import JobState, JobStatus


def _line(message: str, status: JobStatus, **extra: str) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(log.LogfmtFormatter())
    log.logger.handlers[:] = [handler]
    log.logger.setLevel(logging.INFO)
    log.job(message, status, **extra)
    return out.getvalue().strip()


def _status(**kw: object) -> JobStatus:
    base: dict[str, object] = {
        "id": "D55T3V", "type": "fib", "args": {}, "owner": "alice",
        "state": JobState.RUNNING, "created_ns": 1,
    }  # fmt: skip
    return JobStatus(**(base | kw))  # type: ignore[arg-type]


def test_an_ended_job_says_who_what_how_and_how_long() -> None:
    status = _status(
        state=JobState.FAILED, started_ns=1_000_000_000, ended_ns=3_500_000_000, exit_code=2
    )
    line = _line("job ended", status)
    fields = line.split(' msg="job ended" ', 1)[1]
    assert fields == "job=D55T3V owner=alice type=fib state=FAILED duration_s=2.500 exit_code=2"


def test_a_stopped_job_has_its_signal_and_who_stopped_it() -> None:
    status = _status(state=JobState.STOPPED, started_ns=10, ended_ns=10, signal=15)
    line = _line("job stopped", status, by="bob")
    assert line.endswith("state=STOPPED duration_s=0.000 signal=15 by=bob")


def test_a_job_that_never_started_has_no_duration() -> None:
    line = _line("job lost", _status(state=JobState.FAILED))
    assert line.endswith("job=D55T3V owner=alice type=fib state=FAILED")


def test_an_owner_with_spaces_is_quoted() -> None:
    line = _line("job started", _status(owner="Alice Smith", started_ns=1))
    assert 'owner="Alice Smith" type=fib' in line
