"""sd_notify without libsystemd: what systemd receives on its datagram socket."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.sdnotify import Notifier


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def test_a_path_socket_receives_one_datagram_of_key_value_lines(receiver: socket.socket) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "notify")
        receiver.bind(path)
        env = {"NOTIFY_SOCKET": path, "OTHER": "x"}
        notifier = Notifier.from_environ(env)
        assert env == {"OTHER": "x"}  # what this process starts never sees systemd's socket
        notifier.notify(READY=1, STATUS="serving")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving\n"


def test_an_abstract_socket_is_named_with_an_at_sign(receiver: socket.socket) -> None:
    name = f"wn-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver.bind("\0" + name)
    Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).notify(STOPPING=1)
    assert receiver.recv(4096) == b"STOPPING=1\n"


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    notifier.notify(READY=1)  # no error, no socket


def test_a_socket_that_is_not_there_is_an_error_not_silence() -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/nonexistent/notify"})
    with pytest.raises(FileNotFoundError):
        notifier.notify(READY=1)
    with pytest.raises(OSError, match="not a socket path"):
        Notifier("vsock:2:1234").notify(READY=1)
