"""Probe jobs for the runner's tests, loaded through the ``job_modules`` config setting."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

from shared.catalog import ArgKind, ArgSpec, JobSpec
from workernator_runner.jobs import Job, JobFailed


def _spew(args: Mapping[str, Any]) -> None:
    """Write ``size`` bytes of numbered lines to stdout as fast as possible."""
    size: int = args["size"]
    line = b"0123456789" * 10 + b"\n"  # 101 bytes
    block = line * (1024 * 1024 // len(line))
    out = sys.stdout.buffer
    written = 0
    while written < size:
        piece = block[: size - written]
        out.write(piece)
        written += len(piece)
    out.flush()


def _bytes(args: Mapping[str, Any]) -> None:
    """Write exact bytes (hex-encoded in ``hex``) to stdout, and ``err_hex`` to stderr."""
    sys.stdout.buffer.write(bytes.fromhex(args["hex"]))
    sys.stdout.flush()
    if "err_hex" in args:
        sys.stderr.buffer.write(bytes.fromhex(args["err_hex"]))
        sys.stderr.flush()


def _stubborn(args: Mapping[str, Any]) -> None:
    """Ignore SIGTERM and sleep."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"pid {os.getpid()} ignoring SIGTERM", flush=True)
    time.sleep(3600)


def _forker(args: Mapping[str, Any]) -> None:
    """Fork ``children`` sleeping children (and grandchildren), print their pids, then sleep."""
    for _ in range(args["children"]):
        pid = os.fork()
        if pid == 0:
            grandchild = os.fork()
            if grandchild == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                time.sleep(3600)
                os._exit(0)
            print(f"child {grandchild}", flush=True)
            time.sleep(3600)
            os._exit(0)
        print(f"child {pid}", flush=True)
    time.sleep(args.get("seconds", 3600))


def _drip(args: Mapping[str, Any]) -> None:
    """Print ``count`` numbered lines, one every ``interval`` seconds, the last without newline."""
    for i in range(args["count"]):
        end = "" if i == args["count"] - 1 else "\n"
        print(f"line {i}", end=end, flush=True)
        time.sleep(args["interval"])


def _pieces(args: Mapping[str, Any]) -> None:
    """Print the ``|``-separated pieces of ``text`` one by one, ``interval`` seconds apart."""
    for piece in args["text"].split("|"):
        sys.stdout.write(piece)
        sys.stdout.flush()
        time.sleep(args["interval"])


def _fail(args: Mapping[str, Any]) -> None:
    if args.get("crash"):
        raise RuntimeError("boom")
    raise JobFailed("it went wrong")


JOBS = (
    Job(
        JobSpec("spew", "Spew", "prints size bytes", (ArgSpec("size", ArgKind.INT, "bytes"),)),
        _spew,
        framed=False,
    ),
    Job(
        JobSpec(
            "bytes",
            "Bytes",
            "prints exact bytes",
            (
                ArgSpec("hex", ArgKind.STRING, "stdout bytes, hex"),
                ArgSpec("err_hex", ArgKind.STRING, "stderr bytes, hex", required=False),
            ),
        ),
        _bytes,
        framed=False,
    ),
    Job(JobSpec("stubborn", "Stubborn", "ignores SIGTERM"), _stubborn, framed=False),
    Job(
        JobSpec(
            "forker",
            "Forker",
            "forks children",
            (
                ArgSpec("children", ArgKind.INT, "how many"),
                ArgSpec("seconds", ArgKind.FLOAT, "sleep", required=False),
            ),
        ),
        _forker,
        framed=False,
    ),
    Job(
        JobSpec(
            "drip",
            "Drip",
            "prints lines slowly",
            (ArgSpec("count", ArgKind.INT, "lines"), ArgSpec("interval", ArgKind.FLOAT, "s")),
        ),
        _drip,
        framed=False,
    ),
    Job(
        JobSpec(
            "pieces",
            "Pieces",
            "prints pieces slowly",
            (ArgSpec("text", ArgKind.STRING, "pieces"), ArgSpec("interval", ArgKind.FLOAT, "s")),
        ),
        _pieces,
        framed=False,
    ),
    Job(
        JobSpec("fail", "Fail", "fails", (ArgSpec("crash", ArgKind.INT, "", required=False),)),
        _fail,
    ),
)
