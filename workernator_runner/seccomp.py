"""The seccomp filter every job process loads: allow by default, refuse what a job never needs.

Docker's default profile is the reference for the list. Docker allows a list and refuses the
rest; this filter does the opposite (default ALLOW, a deny list), because a job is ordinary
Python and a call missing from an allow list breaks it in ways that are hard to trace. What is
refused is what Docker refuses to a container without extra capabilities (namespaces, mounts,
tracing other processes, kernel modules, keyrings, the clock, ...) plus a few calls Docker
allows that a job never needs and that widen the kernel's attack surface (io_uring, ptrace).

Two phases, so that a job pays for one system call and no libseccomp:

- :func:`build_filter` compiles the filter with libseccomp (through ``pyseccomp``) once, in the
  fork server at startup, and returns the raw BPF program.
- :func:`load` installs those bytes with ``prctl(PR_SET_SECCOMP)`` in the job process, after
  the runner has set up its namespaces and mounts (the filter forbids doing that afterwards)
  and after ``no_new_privs``. The filter binds the calling thread and its future children:
  load it while the process is single-threaded, as the job process is.

Architectures. The program is for the native architecture only. Its first instructions check
``seccomp_data.arch`` and, on x86_64, that the call number is not an x32 one (bit 30 set); any
other calling convention (i386 through ``int 0x80``, x32) would see other call numbers and so
bypass a deny list, so it kills the process instead (``SECCOMP_RET_KILL_PROCESS``).

``DENIED`` lists every call the filter refuses with the reason, for documentation and tests.
All fail with EPERM except: ``clone`` only when its flags ask for a new namespace, ``clone3``
always with ENOSYS (its flags are in memory, which seccomp cannot read; glibc then falls back
to ``clone``), ``socket`` only for ``AF_VSOCK``. Names that the installed libseccomp does not
know, or that do not exist on this architecture, are skipped when building.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Mapping
from types import MappingProxyType

import pyseccomp as seccomp

from workernator_runner.linux import check, libc

PR_GET_NO_NEW_PRIVS = 39
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_MAXINSNS = 4096  # the kernel's limit on a filter's length
SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

AF_VSOCK = 40
# Every CLONE_NEW* flag clone(2) takes. CLONE_NEWTIME shares its bit with the exit signal in
# clone(2) (the kernel rejects it there), so refusing it only keeps the list complete.
CLONE_NEW_FLAGS = {
    "CLONE_NEWTIME": 0x00000080,
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

_MOUNT = "changes the filesystem view the runner built for the job"
_MODULE = "loads or inspects kernel modules"
_CLOCK = "sets the host's clock, which is not namespaced"
_NUMA = "NUMA memory placement; Docker allows it only with CAP_SYS_NICE"
_STUB = "never implemented on Linux; refused like Docker does"

DENIED: Mapping[str, str] = MappingProxyType(
    {
        # Namespaces: a job stays in those the runner made for it.
        "unshare": "creates namespaces (a user namespace hands back every capability)",
        "setns": "joins another namespace",
        "clone": "only with a CLONE_NEW* flag: creates namespaces, like unshare",
        "clone3": "ENOSYS, always: seccomp cannot read its flags; glibc falls back to clone",
        # Mounts and the root directory.
        "mount": _MOUNT,
        "umount": _MOUNT,
        "umount2": _MOUNT,
        "pivot_root": _MOUNT,
        "chroot": _MOUNT,
        "fsopen": _MOUNT,
        "fsconfig": _MOUNT,
        "fsmount": _MOUNT,
        "fspick": _MOUNT,
        "move_mount": _MOUNT,
        "open_tree": _MOUNT,
        "open_tree_attr": _MOUNT,
        "mount_setattr": _MOUNT,
        "quotactl": "administers filesystem quotas",
        "quotactl_fd": "administers filesystem quotas",
        # Other processes' memory and files.
        "ptrace": "traces other processes (and was a way around seccomp before Linux 4.8)",
        "process_vm_readv": "reads another process's memory",
        "process_vm_writev": "writes another process's memory",
        "kcmp": "compares kernel objects of other processes (reveals kernel pointers' order)",
        "pidfd_getfd": "takes a file descriptor out of another process",
        "process_madvise": "advises on another process's memory",
        # Large kernel attack surfaces a job has no use for.
        "bpf": "loads BPF programs and maps into the kernel",
        "perf_event_open": "kernel and hardware performance monitoring; leaks kernel addresses",
        "userfaultfd": "user page-fault handling, a common tool to win kernel races",
        "io_uring_setup": "io_uring: a large kernel surface whose operations seccomp never sees",
        "io_uring_enter": "io_uring: a large kernel surface whose operations seccomp never sees",
        "io_uring_register": "io_uring: a large kernel surface whose operations seccomp never sees",
        "lookup_dcookie": "kernel profiling (oprofile)",
        "fanotify_init": "watches filesystem events system-wide",
        "syslog": "reads or clears the kernel log",
        # The kernel keyring is not namespaced: keys of other users and containers live there.
        "keyctl": "the kernel keyring, which is not namespaced",
        "add_key": "the kernel keyring, which is not namespaced",
        "request_key": "the kernel keyring, which is not namespaced",
        # Kernel modules, another kernel, the machine's power.
        "init_module": _MODULE,
        "finit_module": _MODULE,
        "delete_module": _MODULE,
        "create_module": _MODULE,
        "get_kernel_syms": _MODULE,
        "query_module": _MODULE,
        "kexec_load": "boots another kernel",
        "kexec_file_load": "boots another kernel",
        "reboot": "reboots or halts the machine",
        # Host administration.
        "swapon": "manages the host's swap",
        "swapoff": "manages the host's swap",
        "acct": "switches process accounting for the host",
        "settimeofday": _CLOCK,
        "stime": _CLOCK,
        "clock_settime": _CLOCK,
        "clock_settime64": _CLOCK,
        "clock_adjtime": _CLOCK,
        "clock_adjtime64": _CLOCK,
        "adjtimex": _CLOCK,
        "sethostname": "renames the host (or its UTS namespace)",
        "setdomainname": "renames the host's NIS domain (or its UTS namespace's)",
        "vhangup": "hangs up the controlling terminal",
        "nfsservctl": "the kernel NFS server's old interface (removed in Linux 3.1)",
        "_sysctl": "the old binary sysctl interface (removed in Linux 5.5)",
        "sysfs": "obsolete filesystem-type queries",
        "ustat": "obsolete filesystem statistics",
        "uselib": "loads a.out shared libraries",
        # Hardware and execution modes.
        "iopl": "raw access to I/O ports",
        "ioperm": "raw access to I/O ports",
        "vm86": "virtual 8086 mode",
        "vm86old": "virtual 8086 mode",
        # File handles bypass the directory permissions on the way to a file.
        "open_by_handle_at": "opens any file of a filesystem by handle (the Shocker escape)",
        "name_to_handle_at": "makes the handles open_by_handle_at takes",
        # NUMA placement.
        "mbind": _NUMA,
        "set_mempolicy": _NUMA,
        "set_mempolicy_home_node": _NUMA,
        "get_mempolicy": _NUMA,
        "migrate_pages": _NUMA,
        "move_pages": _NUMA,
        # Execution domain. Docker allows five harmless values; an allow-by-default filter
        # cannot express "refuse all but these" without dozens of bit-pattern rules (libseccomp
        # takes one comparison per argument per rule and no ALLOW rule beside an ALLOW
        # default), and neither Python nor glibc calls it, so it is refused outright.
        "personality": "execution domain flags, e.g. turning off ASLR for programs it runs",
        # Reserved numbers, never implemented.
        "afs_syscall": _STUB,
        "getpmsg": _STUB,
        "putpmsg": _STUB,
        "security": _STUB,
        "tuxcall": _STUB,
        "vserver": _STUB,
        # Network.
        "socket": "only AF_VSOCK: talks to the hypervisor of the virtual machine",
    }
)

# Refused only with some arguments, or with another errno: added by hand in build_filter.
_SPECIAL = frozenset({"clone", "clone3", "socket"})


class _SockFprog(ctypes.Structure):
    """struct sock_fprog: the program's length in instructions and a pointer to them."""

    # A c_char_p points into the bytes object itself: no copy, and no new ctypes array type
    # (making one costs a freshly forked process hundreds of microseconds).
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_char_p))


# A prototype of our own (indexing makes a new function object), so that argtypes set on
# libc.prctl elsewhere cannot change how the pointer is passed.
_prctl = libc["prctl"]
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int


def _syscall_number(name: str) -> int | None:
    """The native number of ``name``, or None when libseccomp does not know it or this
    architecture has no such call (libseccomp then answers with a negative pseudo-number)."""
    nr: int = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
    return nr if nr >= 0 else None


def build_filter() -> bytes:
    """Compile the filter once (in the fork server at startup): returns the raw BPF program,
    the bytes of the struct sock_filter array, for the native architecture."""
    f = seccomp.SyscallFilter(seccomp.ALLOW)
    # libseccomp's default for another architecture is KILL, which is SECCOMP_RET_KILL_THREAD:
    # in a threaded job the other threads would go on. Kill the whole process instead.
    f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    # Look call numbers up in a binary tree rather than a list (libseccomp 2.5 and later).
    # Calls whose outcome needs no argument the kernel answers from a cache without running
    # the program; but it builds that cache at load() by running the program for every call
    # number, and the tree halves load()'s time. It also shortens the run for clone and socket.
    with contextlib.suppress(OSError):
        f.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)
    eperm = seccomp.ERRNO(errno.EPERM)
    for name in DENIED:
        if name not in _SPECIAL and (nr := _syscall_number(name)) is not None:
            f.add_rule(eperm, nr)

    if (clone := _syscall_number("clone")) is not None:
        # One rule a flag: libseccomp has no "any of these bits" comparison, and rules OR.
        # s390 passes the stack first and the flags second.
        flags_arg = 1 if seccomp.system_arch() in (seccomp.Arch.S390, seccomp.Arch.S390X) else 0
        for bit in CLONE_NEW_FLAGS.values():
            f.add_rule(eperm, clone, seccomp.Arg(flags_arg, seccomp.MASKED_EQ, bit, bit))
    if (clone3 := _syscall_number("clone3")) is not None:
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), clone3)
    if (socket := _syscall_number("socket")) is not None:
        # The domain is an int: the kernel ignores the register's upper half, so must we
        # (a plain EQ would also require it to be zero, and garbage there would get through).
        f.add_rule(eperm, socket, seccomp.Arg(0, seccomp.MASKED_EQ, 0xFFFFFFFF, AF_VSOCK))

    # libseccomp writes the program to a file descriptor: an in-memory file.
    fd = os.memfd_create("workernator-seccomp", os.MFD_CLOEXEC)
    with open(fd, "w+b") as out:
        f.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % SOCK_FILTER_SIZE:
        raise RuntimeError(f"libseccomp exported a malformed program ({len(program)} bytes)")
    return program


def load(program: bytes) -> None:
    """Install a program from :func:`build_filter` in the calling thread and its future
    children: one prctl, no libseccomp.

    Requires ``no_new_privs`` to be set already (raises OSError otherwise, even as root):
    the filter is meant for processes that can never gain privileges again.
    """
    count, rest = divmod(len(program), SOCK_FILTER_SIZE)
    if rest or not 0 < count <= BPF_MAXINSNS:
        raise ValueError(f"not a seccomp BPF program: {len(program)} bytes")
    if check(_prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0), "prctl(PR_GET_NO_NEW_PRIVS)") != 1:
        raise OSError(
            errno.EACCES,
            "cannot load the seccomp filter: no_new_privs is not set "
            "(call prctl(PR_SET_NO_NEW_PRIVS, 1) first)",
        )
    fprog = _SockFprog(count, program)  # the kernel copies the program
    check(
        _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
        "prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)",
    )
