"""Hostile frames against the real runner socket: what the decoder builds is bounded by the
schemas, and the runner keeps serving everyone else meanwhile."""

from __future__ import annotations

import dataclasses
import struct
import threading
import time
from pathlib import Path

import msgpack
import pytest

from shared import protocol as p
from shared.errors import ErrorCode, Internal
from tests.conftest import Daemon, write_runner_config
from tests.integration import runner_wire as w
from workernator_api.runner_client import RunnerClient
from workernator_runner.config import RunnerConfig

ATTACKS = 5


def _start_head() -> bytes:
    """A start request up to where its ``args`` value begins."""
    envelope = w.request(1, "start", {})
    del envelope["args"]
    fields = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in envelope.items())
    return b"\x85" + fields + bytes(msgpack.packb("args"))


def _start_request_with_args(args_header: bytes, filler: bytes) -> bytes:
    """The body of a start request whose ``args`` is ``args_header`` (of a container with a
    4-byte count) then as many copies of ``filler`` as fit in the largest frame allowed."""
    head = _start_head() + args_header
    count = (p.MAX_FRAME_SIZE - len(head) - 4) // len(filler)
    return head + struct.pack(">I", count) + filler * count


# A million empty maps in one 1 MiB frame: decoded whole, about 73 MiB of dicts.
EMPTY_MAPS = _start_request_with_args(b"\xdd", b"\x80")


def _refused(messages: list[p.Message], match: str) -> str:
    """The error of a frame-level refusal: the runner's hello, then one error about no request."""
    assert len(messages) == 2, messages
    hello, error = messages
    assert isinstance(hello, p.Hello)
    assert isinstance(error, p.ErrorReply), error
    assert (error.id, error.code) == (None, ErrorCode.INVALID_ARGUMENT)
    assert match in error.message, error.message
    return error.message


def test_a_frame_of_a_million_empty_maps_is_refused_before_it_is_built(daemon: Daemon) -> None:
    path = str(daemon.config.socket)
    assert len(EMPTY_MAPS) == p.MAX_FRAME_SIZE
    attack = w.HELLO + w.raw_frame(EMPTY_MAPS)
    peer = w.Peer(path)  # connected before the attack, used during and after it
    try:
        (job,) = peer.call(p.Op.START, p.StartArgs("noop", {}))
        assert isinstance(job, p.JobReply)

        def status_is_right() -> None:
            (reply,) = peer.call(p.Op.STATUS, p.JobRef(job.job.id))
            assert isinstance(reply, p.JobReply) and reply.job.id == job.job.id

        w.exchange(path, attack)  # once first, so that what the runner keeps is allocated
        w.reset_peak(daemon.pid)
        before = w.memory_kib(daemon.pid)
        cpu = w.cpu_seconds(daemon.pid)
        for _ in range(ATTACKS):
            message = _refused(w.exchange(path, attack), "an array of")
            status_is_right()
        cpu = w.cpu_seconds(daemon.pid) - cpu
        peak_kib = w.memory_kib(daemon.pid)["VmHWM"] - before["VmRSS"]

        # The same again while the peer asks for a status without pause: the longest answer
        # is how long the runner's event loop stood still for the attack.
        stalls = []
        for _ in range(ATTACKS):
            done = threading.Event()
            longest = [0.0]

            def ping(done: threading.Event = done, longest: list[float] = longest) -> None:
                while not done.is_set():
                    t0 = time.monotonic()
                    status_is_right()
                    longest[0] = max(longest[0], time.monotonic() - t0)

            pinger = threading.Thread(target=ping)
            pinger.start()
            try:
                _refused(w.exchange(path, attack), "an array of")
            finally:
                done.set()
                pinger.join()
            stalls.append(longest[0])
        status_is_right()
    finally:
        peer.close()
    print(
        f"1 MiB of empty maps x{ATTACKS}: runner peak +{peak_kib / 1024:.1f} MiB, "
        f"CPU {cpu * 1000 / ATTACKS:.0f} ms per frame, longest answer to another peer during "
        f"each: {', '.join(f'{s * 1000:.1f}' for s in stalls)} ms; refusal: {message}"
    )
    # Receiving the frame takes two copies of it (the codec's buffer and the body): the rest
    # is bounded by the schemas, not by what the peer sends.
    assert peak_kib < 8 * 1024, f"the runner grew by {peak_kib / 1024:.1f} MiB"
    assert cpu / ATTACKS < 0.03, f"{cpu * 1000 / ATTACKS:.0f} ms of CPU per frame"
    assert min(stalls) < 0.05, f"the runner stood still for {min(stalls) * 1000:.0f} ms"


def _status_request_with_caller(caller: object) -> bytes:
    envelope = w.request(1, "status", {"job_id": "XE38YM"})
    envelope["caller"] = caller
    return bytes(msgpack.packb(envelope, use_bin_type=True))


def _deep(levels: int) -> bytes:
    """A start request whose arguments nest maps ``levels`` deep: {"a": {"a": ...}}."""
    return _start_head() + b"\x81\xa1a" * levels + b"\xc0"


# Each is within the frame size, and each goes beyond what any message to the runner holds in
# one way; msgpack alone would have built all of it before the schema check could refuse it.
HOSTILE_BODIES = {
    "empty-arrays": (_start_request_with_args(b"\xdd", b"\x90"), "an array of"),
    "map-of-maps": (_start_request_with_args(b"\xdf", b"\xa1a\x80"), "a map of"),
    "nils": (_start_request_with_args(b"\xdd", b"\xc0"), "an array of"),
    "deep": (_deep(100_000), "nests containers more than 4 deep"),
    "many-values": (
        _status_request_with_caller(
            {
                f"k{i}": {f"j{j}": {f"m{m}": 0 for m in range(64)} for j in range(64)}
                for i in range(4)
            }
        ),
        "frame holds more than",
    ),
    "long-string": (
        _status_request_with_caller({"user": "x" * 100_000, "role": "user"}),
        "a string of",
    ),
    "binary": (_status_request_with_caller({"user": b"alice", "role": "user"}), "binary data of"),
    "extension": (
        _status_request_with_caller({"user": msgpack.ExtType(1, b"alice"), "role": "user"}),
        "extension type",
    ),
}


@pytest.mark.parametrize(("body", "match"), HOSTILE_BODIES.values(), ids=HOSTILE_BODIES.keys())
def test_frames_beyond_every_message_are_refused_and_the_runner_serves_on(
    daemon: Daemon, body: bytes, match: str
) -> None:
    path = str(daemon.config.socket)
    assert len(body) <= p.MAX_FRAME_SIZE
    peer = w.Peer(path)
    try:
        _refused(w.exchange(path, w.HELLO + w.raw_frame(body)), match)
        (reply,) = peer.call(p.Op.LIST, p.ListArgs())  # opened before, still served
        assert isinstance(reply, p.End)
    finally:
        peer.close()


@pytest.mark.privileged
async def test_a_reply_the_api_would_refuse_is_not_sent_and_the_connection_carries_on(
    runner_config: RunnerConfig, state_dir: Path
) -> None:
    modules = (*runner_config.job_modules, "tests.integration.odd_jobs")
    cfg = dataclasses.replace(runner_config, job_modules=modules)
    write_runner_config(cfg, state_dir / "odd.toml")
    runner = Daemon(cfg, state_dir / "odd.toml", state_dir / "odd.log")
    runner.start()
    try:
        async with RunnerClient(cfg.socket) as client:
            with pytest.raises(Internal, match="internal error"):
                await client.types("alice", "user")  # its frame would break the connection
            job = await client.start("alice", "user", "noop", {})  # the connection carries on
            assert (await client.status("alice", "user", job.id)).id == job.id
    finally:
        runner.stop()
    log = runner.log_path.read_text()
    assert "refusing to send a TypesReply the peer would refuse" in log
    assert "types[" in log and "length must be 1..64, got 65" in log
