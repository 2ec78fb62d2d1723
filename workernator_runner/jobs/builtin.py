"""The four built-in jobs: noop, fib, eval and wait (design section 1)."""

from __future__ import annotations

import http.client
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from shared import catalog, expr
from workernator_runner.jobs import Job, JobFailed

REQUEST_TIMEOUT_SECONDS = 30.0


def say(tag: str, text: str) -> None:
    print(f"[{tag}] {text}", flush=True)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# --- noop -------------------------------------------------------------------------------------


def run_noop(args: Mapping[str, Any]) -> None:
    """Does nothing."""


# --- fib --------------------------------------------------------------------------------------

_LOOKUP = (0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181)


def fibonacci(n: int) -> int:
    """F(n) with F(0) = 0, F(1) = 1, exactly, by fast doubling: O(log n) multiplications."""
    a, b = 0, 1  # F(k), F(k+1) for k = the bits of n read so far
    for bit in bin(n)[2:]:
        c = a * (2 * b - a)  # F(2k)
        d = a * a + b * b  # F(2k+1)
        a, b = (d, c + d) if bit == "1" else (c, d)
    return a


def run_fib(args: Mapping[str, Any]) -> None:
    position: int = args["position"]
    say("FIB", f"Calculating the value of the {ordinal(position)} value in the Fibonacci sequence")
    index = position - 1  # 1-indexed from 0: position 1 is F(0)
    if index < len(_LOOKUP):
        value = _LOOKUP[index]
        say("FIB", f"Using lookup; value is '{value}'.")
        say("RESULT", str(value))
        return
    value = fibonacci(index)
    # Python refuses to print ints of more than 4300 digits by default (CVE-2020-10735): the
    # limit protects parsers, and this number is ours, bounded by MAX_FIB_POSITION.
    sys.set_int_max_str_digits(0)
    text = str(value)
    say("FIB", f"Using fast doubling; value has {len(text)} digits.")
    say("RESULT", text)


# --- eval -------------------------------------------------------------------------------------


def run_eval(args: Mapping[str, Any]) -> None:
    parsed = expr.parse(args["expression"])
    variables: Mapping[str, float] = args.get("variables", {})
    say("EVAL", f"Parsed expression: {parsed}")
    used = sorted(parsed.variables())
    if used:
        values = ", ".join(f"{name} = {expr.format_number(variables[name])}" for name in used)
        say("EVAL", f"Variables: {values}")
    try:
        result = parsed.evaluate(variables)
    except expr.EvaluationError as exc:
        raise JobFailed(f"Cannot evaluate: {exc}") from None
    say("RESULT", expr.format_number(result))


# --- wait -------------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    text = f"{value:g}"
    return f"{text} second" if value == 1 else f"{text} seconds"


def run_wait(args: Mapping[str, Any]) -> None:
    seconds: float = args["seconds"]
    url: str = args["url"]
    say("WAIT", f"Waiting {_seconds(seconds)} before sending a POST to {url}")
    time.sleep(seconds)
    say("WAIT", f"Sending a POST to {url}")
    request = urllib.request.Request(url, data=b"", method="POST")  # noqa: S310 - http(s) only
    context = ssl.create_default_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(  # noqa: S310 - the catalog allows http and https only
            request, timeout=REQUEST_TIMEOUT_SECONDS, context=context
        ) as response:
            status, reason = response.status, response.reason
    except urllib.error.HTTPError as exc:  # an answer, just not a 2xx one
        status, reason = exc.code, exc.reason
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JobFailed(f"Request to {url} failed: {reason}") from None
    say("WAIT", f"Response status: {status} {reason}".rstrip())
    say("RESULT", str(status))


JOBS = (
    Job(catalog.NOOP, run_noop, framed=False),  # noop prints nothing at all
    Job(catalog.FIB, run_fib),
    Job(catalog.EVAL, run_eval),
    Job(catalog.WAIT, run_wait),
)
