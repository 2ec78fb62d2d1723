"""Talking to a real runner's socket frame by frame, and watching the runner while it listens.

For tests that send what the api never would. Every frame read back goes through the api's own
codec (``Connection(Role.CLIENT)``), so whatever the runner answers must also be valid by the
api's schemas.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

import msgpack

from shared import protocol as p

CALLER = {"user": "alice", "role": "user"}
HELLO = p.encode_frame(p.Hello(software="test"))


def frame(obj: Any) -> bytes:
    """One frame holding ``obj``, whatever it is: no schema check on the way out."""
    return raw_frame(msgpack.packb(obj, use_bin_type=True))


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def request(rid: int, op: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "request", "id": rid, "op": op, "caller": CALLER, "args": args}


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def exchange(path: str, data: bytes, timeout: float = 10.0) -> list[p.Message]:
    """Send ``data`` on a new connection, close our side, and return every message the runner
    sends until it closes the connection (a ProtocolError if any frame of it is invalid)."""
    with connect(path, timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the runner refused and closed before taking everything: read why
        return read_until_closed(s)


def read_until_closed(s: socket.socket) -> list[p.Message]:
    conn = p.Connection(p.Role.CLIENT)
    messages: list[p.Message] = []
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            conn.receive_eof()
            return messages
        conn.receive_data(data)
        while (message := conn.next_message()) is not None:
            messages.append(message)


class Peer:
    """A well-behaved connection of its own, for checking the runner still answers correctly."""

    def __init__(self, path: str) -> None:
        self.sock = connect(path)
        self.conn = p.Connection(p.Role.CLIENT)
        self.sock.sendall(HELLO)
        assert isinstance(self._next(), p.Hello)
        self._ids = iter(range(1, 1 << 30))

    def _next(self) -> p.Message:
        while (message := self.conn.next_message()) is None:
            data = self.sock.recv(65536)
            assert data, "the runner closed the connection"
            self.conn.receive_data(data)
        return message

    def call(self, op: p.Op, args: p.OpArgs) -> list[p.Message]:
        """The replies to one request, up to its last (a stream's ``end``, or the one reply)."""
        rid = next(self._ids)
        self.sock.sendall(self.conn.send(p.Request(rid, op, p.Caller("alice", "user"), args)))
        replies: list[p.Message] = []
        while True:
            message = self._next()
            assert getattr(message, "id", None) == rid, f"reply to another request: {message}"
            replies.append(message)
            if not isinstance(message, (p.JobsItem, p.OutputItem)):
                return replies

    def close(self) -> None:
        self.sock.close()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since the last :func:`reset_peak`) of ``pid``, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> None:
    """Start measuring ``pid``'s peak memory from now (``VmHWM`` back to the current RSS)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` used so far, user and system."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(predicate: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
