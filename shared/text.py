"""Text from an untrusted source, made safe to show people: one line, bounded, nothing that
steers a terminal.

A job writes what it likes to its stderr, and the last line of it becomes the failure reason
people read in ``workernator jobs status``, on their terminal. So the runner cuts it short and
writes every character that could move the cursor, clear the screen, set the window title
(escape sequences, carriage returns, backspaces), break the line or reorder what is shown
(bidirectional overrides, zero-width characters) as a visible escape, the way Python's ``repr``
does: ``\\x1b``, ``\\u202e``. The CLI applies :func:`printable` again before printing.
"""

from __future__ import annotations

from shared.model import MAX_FAILURE_REASON

ELLIPSIS = "…"
ERROR_TAG = "[ERROR]"  # how the job runtime marks its error line (workernator_runner.jobs)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str, limit: int) -> str:
    """``text`` with every character that is not printable escaped (:meth:`str.isprintable`:
    controls, format characters such as bidirectional overrides, separators other than the
    space, unassigned and private-use code points), at most ``limit`` characters long: a longer
    result is cut (never inside an escape) and ends with ``…``."""
    pieces: list[str] = []
    size = 0
    for char in text:
        piece = char if char.isprintable() else _escape(char)
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            break
    else:
        return "".join(pieces)
    while size > limit - len(ELLIPSIS):
        size -= len(pieces.pop())
    return "".join(pieces) + ELLIPSIS


def failure_reason(line: bytes) -> str:
    """A failed job's reason from the last line it wrote to stderr: decoded (bytes that are not
    UTF-8 shown as ``\\xNN``), the job runtime's ``[ERROR]`` tag dropped, made
    :func:`printable` within :data:`~shared.model.MAX_FAILURE_REASON` characters."""
    text = line.decode("utf-8", errors="backslashreplace").strip()
    text = text.removeprefix(ERROR_TAG).strip()
    return printable(text, MAX_FAILURE_REASON)
