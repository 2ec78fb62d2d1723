"""A minimal inotify binding (ctypes, standard library only).

The runner uses it to wake output readers and stop waiters when a job's files change, without
polling, including for jobs whose monitor was started by an earlier runner process.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

from workernator_runner.linux import check as _check
from workernator_runner.linux import libc as _libc

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_Q_OVERFLOW = 0x00004000  # events were lost (wd is -1)
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len

_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    name: str


class Inotify:
    """A non-blocking inotify instance; register :attr:`fd` with an event loop."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC), "inotify_init1")

    def add_watch(self, path: str, mask: int) -> int:
        return _check(
            _libc.inotify_add_watch(self.fd, os.fsencode(path), mask), f"inotify_add_watch {path}"
        )

    def rm_watch(self, wd: int) -> None:
        # EINVAL: the watch is already gone (its directory was removed); that is fine.
        _libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> list[Event]:
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        events = []
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size
            name = data[pos : pos + length].rstrip(b"\0").decode(errors="replace")
            pos += length
            events.append(Event(wd, mask, name))
        return events

    def close(self) -> None:
        os.close(self.fd)
