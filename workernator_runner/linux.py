"""The few Linux calls the standard library lacks, through ctypes on libc."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

PR_SET_PDEATHSIG = 1

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def check(result: int, what: str) -> int:
    """Raise OSError with errno when a libc call returned a negative result."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def set_parent_death_signal(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent thread exits.

    The setting is cleared when the process changes credentials, so set it after any setuid.
    """
    check(libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


@cache
def boot_id() -> str:
    """This boot's random id: a pid and start time recorded under another boot name nothing."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def process_start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks after boot: with the pid and the boot, it names one
    process. Raises FileNotFoundError when there is no such process."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def same_process(pid: int, start_time: int, boot: str) -> bool:
    """Is ``pid`` still the process that started at ``start_time`` during boot ``boot``?

    False when it is gone or when any of the three is unknown; other errors (out of file
    descriptors, say) are raised rather than taken to mean "gone".
    """
    if not pid or not start_time or boot != boot_id():
        return False
    try:
        return process_start_time(pid) == start_time
    except (FileNotFoundError, ProcessLookupError):
        return False
