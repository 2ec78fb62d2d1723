"""The four built-in jobs, run for real through the job manager: exact output and end state."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from shared.errors import InvalidArgument
from shared.model import JobState
from tests.helpers import run_job
from tests.nethosts import EgressLab, bridge_host
from workernator_runner.manager import JobManager


def fib_output(position: int, value: str) -> bytes:
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(position % 10, "th")
    if 10 <= position % 100 <= 20:
        suffix = "th"
    return (
        "[JOB] Starting job 'Fibonacci'\n"
        f"[FIB] Calculating the value of the {position}{suffix} value in the Fibonacci sequence\n"
        f"[FIB] Using lookup; value is '{value}'.\n"
        f"[RESULT] {value}\n"
        "[JOB] Complete\n"
    ).encode()


@pytest.mark.parametrize(
    ("position", "value"), [(1, "0"), (2, "1"), (3, "1"), (4, "2"), (10, "34")]
)
async def test_fib_small_positions_exact_output(
    manager: JobManager, position: int, value: str
) -> None:
    status, out, err = await run_job(manager, "fib", {"position": position})
    assert out == fib_output(position, value)
    assert err == b""
    assert status.state is JobState.COMPLETED
    assert status.exit_code == 0


async def test_fib_100000_is_exact(manager: JobManager) -> None:
    status, out, _ = await run_job(manager, "fib", {"position": 100_000})
    a, b = 0, 1  # an independent, plain loop: F(99999)
    for _ in range(99_999):
        a, b = b, a + b
    sys.set_int_max_str_digits(0)
    expected = str(a)
    assert len(expected) == 20_899
    lines = out.decode().splitlines()
    assert lines[1] == "[FIB] Calculating the value of the 100000th value in the Fibonacci sequence"
    assert lines[2] == "[FIB] Using fast doubling; value has 20899 digits."
    assert lines[3] == f"[RESULT] {expected}"
    assert status.state is JobState.COMPLETED


def eval_output(parsed: str, result: str, variables: str | None = None) -> bytes:
    lines = ["[JOB] Starting job 'Evaluate'", f"[EVAL] Parsed expression: {parsed}"]
    if variables:
        lines.append(f"[EVAL] Variables: {variables}")
    lines += [f"[RESULT] {result}", "[JOB] Complete"]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize(
    ("expression", "variables", "parsed", "result", "shown"),
    [
        ("1 + 2", {}, "(1 + 2)", "3", None),
        ("4 / 2", {}, "(4 / 2)", "2", None),
        ("2.3 * 0.2", {}, "(2.3 * 0.2)", "0.46", None),
        ("2x * 3y", {"x": 2, "y": 1.5}, "((2 * x) * (3 * y))", "18", "x = 2, y = 1.5"),
        ("1 + 2 * 3", {}, "(1 + (2 * 3))", "7", None),
        ("2 ^ 3 ^ 2", {}, "(2 ^ (3 ^ 2))", "512", None),
        ("(2 ^ 3) ^ 2", {}, "((2 ^ 3) ^ 2)", "64", None),
        ("-2 ^ 2", {}, "(-(2 ^ 2))", "-4", None),
    ],
)
async def test_eval_exact_output(
    manager: JobManager,
    expression: str,
    variables: dict[str, float],
    parsed: str,
    result: str,
    shown: str | None,
) -> None:
    args: dict[str, object] = {"expression": expression}
    if variables:
        args["variables"] = variables
    status, out, err = await run_job(manager, "eval", args)
    assert out == eval_output(parsed, result, shown)
    assert err == b""
    assert status.state is JobState.COMPLETED


async def test_eval_division_by_zero_fails_with_clear_error(manager: JobManager) -> None:
    status, out, err = await run_job(
        manager, "eval", {"expression": "1 / (x - 2)", "variables": {"x": 2}}
    )
    assert status.state is JobState.FAILED
    assert status.exit_code == 1
    assert err == b"[ERROR] Cannot evaluate: division by zero\n"
    assert out.endswith(b"[JOB] Failed\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"expression": "1 +"}, "expression"),
        ({"expression": "2 * (3"}, "expression"),
        ({"expression": "2x"}, "variable 'x' has no value"),
        ({"expression": "a + b", "variables": {"a": 1}}, "variable 'b' has no value"),
        ({"expression": "1 ? 2"}, "'?'"),
        ({"expression": 12}, "argument 'expression': must be a string"),
        ({}, "argument 'expression' is required"),
    ],
)
async def test_eval_bad_input_rejected_at_start_leaving_nothing(
    manager: JobManager, args: dict[str, object], message: str
) -> None:
    before = set(manager.config.jobs_dir.iterdir())
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace("?", r"\?")):
        await manager.start("eval", args, "alice")
    assert set(manager.config.jobs_dir.iterdir()) == before
    assert manager.list() == []


@pytest.mark.parametrize(
    ("job_type", "args", "message"),
    [
        ("fib", {"position": 0}, "argument 'position': must be between 1 and 1000000, got 0"),
        ("fib", {"position": "3"}, "argument 'position': must be an integer, got str"),
        ("fib", {"position": 2.5}, "argument 'position': must be a whole number"),
        ("fib", {}, "argument 'position' is required"),
        ("fib", {"position": 3, "extra": 1}, "job 'fib' has no argument 'extra'"),
        ("fib", {"position": 10**7}, "'position': must be between 1 and 1000000, got 10000000"),
        (
            "wait",
            {"seconds": -1, "url": "http://x/"},
            "'seconds': must be between 0 and 86400, got -1",
        ),
        ("wait", {"seconds": 86401, "url": "http://x/"}, "'seconds': must be between 0 and 86400"),
        (
            "wait",
            {"seconds": 1, "url": "http://x/" + "a" * 10_000},
            "argument 'url': is 10009 characters long; the most allowed is 2048",
        ),
        (
            "wait",
            {"seconds": 1, "url": "ftp://x/"},
            "argument 'url': must be an http:// or https://",
        ),
        ("wait", {"seconds": 1, "url": "http://"}, "argument 'url': has no host"),
        ("noop", {"x": 1}, "job 'noop' has no argument 'x'"),
        ("rm-rf", {}, "unknown job type 'rm-rf'"),
    ],
)
async def test_bad_arguments_are_rejected_naming_the_argument(
    manager: JobManager, job_type: str, args: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument) as exc:
        await manager.start(job_type, args, "alice")
    assert message in exc.value.message
    assert list(manager.config.jobs_dir.iterdir()) == []


async def test_noop_prints_nothing_and_completes(manager: JobManager) -> None:
    status, out, err = await run_job(manager, "noop")
    assert (out, err) == (b"", b"")
    assert status.state is JobState.COMPLETED


@pytest.fixture
def http_server(egress_lab: EgressLab) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """An HTTP server on a test host on the jobs' bridge, recording the requests it gets
    (jobs cannot reach the runner's own host)."""
    with bridge_host(egress_lab) as host:
        port, proc = host.http_server()
        yield f"http://{host.address}:{port}", proc


async def test_wait_posts_an_empty_body_and_reports_the_status(
    manager: JobManager, http_server: tuple[str, subprocess.Popen[str]]
) -> None:
    base, proc = http_server
    status, out, err = await run_job(manager, "wait", {"seconds": 0.2, "url": f"{base}/ok"})
    assert out.decode().splitlines() == [
        "[JOB] Starting job 'Wait'",
        f"[WAIT] Waiting 0.2 seconds before sending a POST to {base}/ok",
        f"[WAIT] Sending a POST to {base}/ok",
        "[WAIT] Response status: 201 Created",
        "[RESULT] 201",
        "[JOB] Complete",
    ]
    assert err == b""
    assert status.state is JobState.COMPLETED
    assert status.ended_ns is not None and status.started_ns is not None
    assert status.ended_ns - status.started_ns >= 200_000_000
    assert proc.stdout is not None
    request = json.loads(proc.stdout.readline())
    assert (request["method"], request["path"], request["body"]) == ("POST", "/ok", 0)


async def test_wait_reports_a_non_2xx_status(
    manager: JobManager, http_server: tuple[str, subprocess.Popen[str]]
) -> None:
    base, _ = http_server
    status, out, _ = await run_job(manager, "wait", {"seconds": 0, "url": f"{base}/missing"})
    assert b"[WAIT] Response status: 404 Not Found\n[RESULT] 404\n" in out
    assert status.state is JobState.COMPLETED


async def test_wait_request_failure_is_a_clear_error(
    manager: JobManager, http_server: tuple[str, subprocess.Popen[str]]
) -> None:
    base, _ = http_server
    host = base.split("//")[1].split(":")[0]
    url = f"http://{host}:1/"  # the host is there; nothing listens on that port
    status, out, err = await run_job(manager, "wait", {"seconds": 0, "url": url})
    assert status.state is JobState.FAILED
    assert err.startswith(f"[ERROR] Request to {url} failed: ".encode())
    assert b"refused" in err.lower()
    assert out.endswith(b"[JOB] Failed\n")


async def test_a_job_that_raises_fails_with_an_error_line(manager: JobManager) -> None:
    status, _out, err = await run_job(manager, "fail", {"crash": 1})
    assert status.state is JobState.FAILED
    assert err == b"[ERROR] The job crashed: RuntimeError: boom\n"
    assert status.error == "exited with status 1"
    status, _, err = await run_job(manager, "fail", {})
    assert err == b"[ERROR] it went wrong\n"
