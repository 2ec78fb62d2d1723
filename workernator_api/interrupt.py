"""Ctrl-C in the CLI: exit status 130 and no output, wherever the program is.

- Importing this module makes an uncaught ``KeyboardInterrupt`` exit 130 quietly instead of
  printing a traceback. The ``workernator_api`` package imports it first thing, so this holds
  while the CLI's slow imports (grpc, cryptography) load.
- :func:`install` (called by the CLI's ``main``) replaces the SIGINT handler with one that
  records the interrupt and raises :class:`Interrupted`, a ``BaseException`` that click does
  not turn into "Aborted!" (exit 1) as it does ``KeyboardInterrupt``.
- Within :func:`deferred`, the handler only records the interrupt. The CLI waits on gRPC there,
  polling :func:`requested`: an exception raised in the middle of grpc's own code could leave a
  lock taken, so cancelling the call or closing the channel afterwards could hang. Leaving the
  block raises :class:`Interrupted` if an interrupt came meanwhile.
"""

from __future__ import annotations

# The excepthook goes in first, before the imports further down (signal, threading and typing
# are not loaded yet when the CLI starts; these four always are).
import contextlib
import os
import sys
from types import FrameType, TracebackType

EXIT_INTERRUPTED = 130


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _quiet_keyboard_interrupt(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        _flush()
        os._exit(EXIT_INTERRUPTED)  # the interpreter would print it and re-raise SIGINT
    _previous_excepthook(kind, value, tb)


_previous_excepthook = sys.excepthook
sys.excepthook = _quiet_keyboard_interrupt

import signal  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import NoReturn  # noqa: E402

POLL_SECONDS = 0.1
"""How often deferred waits look for an interrupt: how late Ctrl-C may take effect there."""


class Interrupted(BaseException):
    """The user interrupted the CLI (SIGINT, Ctrl-C)."""


_requested = threading.Event()
_deferring = 0


def requested() -> bool:
    """Has the user interrupted the CLI?"""
    return _requested.is_set()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _requested.set()
    if not _deferring:
        raise Interrupted


def install() -> None:
    """Handle SIGINT as described above, from now on (main thread only)."""
    signal.signal(signal.SIGINT, _on_sigint)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block in which Ctrl-C raises nothing; it raises :class:`Interrupted` on leaving."""
    global _deferring  # noqa: PLW0603 - one process-wide state, like the signal handler itself
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and requested():
            raise Interrupted


def exit_quietly() -> NoReturn:
    """Exit 130 with nothing more printed. A second Ctrl-C from here on ends the process."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _flush()
    sys.exit(EXIT_INTERRUPTED)
