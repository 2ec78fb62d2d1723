"""The few Linux calls the standard library lacks, through ctypes on libc.

Everything here is a thin wrapper: one system call, its errno turned into :class:`OSError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from functools import cache

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MNT_DETACH = 0x2

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# pivot_root has no glibc wrapper: its system call number, per architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def check(result: int, what: str) -> int:
    """Raise OSError with errno when a libc call returned a negative result."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _prctl(option: int, arg: int, what: str) -> int:
    return check(libc.prctl(option, arg, 0, 0, 0), what)


def set_parent_death_signal(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent thread exits.

    The setting is cleared when the process changes credentials, so set it after any setuid.
    """
    _prctl(PR_SET_PDEATHSIG, sig, "prctl(PR_SET_PDEATHSIG)")


def set_no_new_privs() -> None:
    """From now on, execve never grants privileges (setuid bits, file capabilities)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


def set_dumpable(dumpable: bool) -> None:
    _prctl(PR_SET_DUMPABLE, int(dumpable), "prctl(PR_SET_DUMPABLE)")


def drop_bounding_set() -> None:
    """Empty the capability bounding set (needs CAP_SETPCAP: call before changing uid)."""
    for cap in range(last_capability() + 1):
        _prctl(PR_CAPBSET_DROP, cap, f"prctl(PR_CAPBSET_DROP, {cap})")


def clear_ambient_capabilities() -> None:
    check(
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
        "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
    )


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


# Made once, at import (in the launcher, so every fork shares them): the init calls
# clear_capabilities on the start path and cannot rehearse it (it would drop its own
# capabilities), and a first ctypes array type, instance and symbol lookup in a process
# cost 0.1 to 0.2 ms there.
_CapDataV3 = _CapData * 2
_NO_CAPABILITIES = _CapDataV3()  # all zero
_CAP_HEADER = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)  # 0: this thread
libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable capability sets of this thread."""
    check(libc.capset(ctypes.byref(_CAP_HEADER), _NO_CAPABILITIES), "capset")


@cache
def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def close_fds_except(keep: set[int]) -> None:
    """Close every file descriptor of this process but ``keep``.

    (os.closerange is never called with an empty range here: CPython passes ``high - 1`` to
    close_range(2), and ``closerange(0, 0)`` would close every descriptor.)"""
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else os.fsencode(value)

    check(
        libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
        f"mount {source or fstype or ''} on {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    check(libc.umount2(os.fsencode(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(f"pivot_root: unsupported architecture {platform.machine()}")
    check(
        libc.syscall(ctypes.c_long(number), os.fsencode(new_root), os.fsencode(put_old)),
        "pivot_root",
    )


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
