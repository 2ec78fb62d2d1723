"""The seccomp filter in a real process, under the job's conditions.

Each test forks a child that becomes what a job is when the filter loads: an unprivileged user
(uid 65534) with ``no_new_privs``. The child runs one check function, writes its JSON result to
a pipe, and leaves with ``os._exit``; the test reads the result and the child's exit status.
Every refusal is shown twice: without the filter the same call succeeds or fails otherwise
(the control), with it the call fails with EPERM (ENOSYS for clone3).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import platform
import resource
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import pyseccomp
import pytest

from workernator_runner import seccomp

pytestmark = pytest.mark.privileged

NOBODY = 65534
CHILD_SECONDS = 20.0
PR_SET_NO_NEW_PRIVS = 38

# The tests' own handle on libc, so that their argtypes stay theirs.
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
prctl = libc["prctl"]
prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

CLONE_NEWUSER = 0x10000000
KEYCTL_GET_KEYRING_ID = 0
KEY_SPEC_SESSION_KEYRING = -3
PTRACE_TRACEME = 0
BPF_BAD_COMMAND = 9999  # EINVAL from the kernel, EPERM from the filter
PERSONALITY_QUERY = 0xFFFFFFFF


@cache
def program() -> bytes:
    return seccomp.build_filter()


def nr(name: str) -> int:
    number: int = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    assert number >= 0, name
    return number


def syscall(name: str, *args: int) -> tuple[int, str | None]:
    """Call ``name`` directly; returns (result, errno name or None)."""
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr(name)), *(ctypes.c_long(a) for a in args))
    return result, errno.errorcode.get(ctypes.get_errno()) if result == -1 else None


@dataclass
class Child:
    result: Any
    status: int

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None


def in_child(
    check: Callable[[], Any], *, filtered: bool = True, no_new_privs: bool = True
) -> Child:
    """Run ``check`` in a forked child as uid 65534 (with no_new_privs, and the filter, unless
    told otherwise). The child writes the JSON of what ``check`` returned (or of the exception
    it raised) to a pipe and leaves with ``os._exit``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # children killed by SIGSYS
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            if no_new_privs and prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
            if filtered:
                seccomp.load(program())
            message = {"result": check()}
        except BaseException as exc:
            err = exc.errno if isinstance(exc, OSError) else None
            message = {"error": type(exc).__name__, "errno": err, "text": str(exc)}
        try:
            os.write(write_end, json.dumps(message).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = read_all(read_end, pid)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return Child(json.loads(data) if data else None, status)


def read_all(fd: int, pid: int) -> bytes:
    deadline = time.monotonic() + CHILD_SECONDS
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child did not finish in time")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def result_of(child: Child) -> Any:
    assert child.status == 0, f"child ended with status {child.status}"
    assert child.result is not None
    assert "error" not in child.result, child.result
    return child.result["result"]


# -- What a job must not do ----------------------------------------------------------------


def probe_calls() -> dict[str, tuple[int, str | None]]:
    """Try each refused call; each with arguments the kernel itself would accept, or refuse
    with another errno than EPERM, so that only the filter makes it EPERM."""
    out = {}
    child = syscall("clone", CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0)
    if child[0] == 0:  # the new process (no filter): straight out
        os._exit(0)
    if child[0] > 0:
        os.waitpid(child[0], 0)
        child = (0, None)  # a pid differs between runs
    out["clone"] = child
    out["clone3"] = syscall("clone3", 0, 0)  # no arguments: EINVAL from the kernel
    out["mount"] = mount("/nonexistent-workernator")  # ENOENT from the kernel
    out["keyctl"] = syscall("keyctl", KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)
    out["keyctl"] = (min(out["keyctl"][0], 0), out["keyctl"][1])  # a key id differs
    out["bpf"] = syscall("bpf", BPF_BAD_COMMAND, 0, 0)
    out["io_uring_setup"] = syscall("io_uring_setup", 1, 0)  # no params: EFAULT
    out["perf_event_open"] = syscall("perf_event_open", 0, 0, -1, -1, 0)  # no attr: EFAULT
    # Late: in a user namespace of its own this process is no one (no uid map), and then
    # could not make another.
    out["unshare"] = syscall("unshare", CLONE_NEWUSER)
    # Last: once traced by the test process, a signal to this child would stop it.
    out["ptrace"] = syscall("ptrace", PTRACE_TRACEME, 0, 0, 0)
    return out


def mount(target: str) -> tuple[int, str | None]:
    c = ctypes.c_char_p
    ctypes.set_errno(0)
    result = libc.mount(c(b"none"), c(target.encode()), c(b"tmpfs"), ctypes.c_ulong(0), None)
    return result, errno.errorcode.get(ctypes.get_errno()) if result == -1 else None


def test_control_without_the_filter_the_kernel_allows_or_refuses_otherwise() -> None:
    results = result_of(in_child(probe_calls, filtered=False))
    # An unprivileged process may make a user namespace, by unshare or clone, and be traced.
    assert results["unshare"] == [0, None]
    assert results["clone"] == [0, None]
    assert results["ptrace"] == [0, None]
    assert results["keyctl"] == [0, None]
    assert results["clone3"] == [-1, "EINVAL"]
    assert results["mount"] == [-1, "ENOENT"]
    assert results["perf_event_open"] == [-1, "EFAULT"]
    # These two depend on the kernel: before 6.5 an unprivileged bpf() was refused before its
    # command was read, and io_uring can be turned off by a sysctl.
    if kernel_version() >= (6, 5):
        assert results["bpf"] == [-1, "EINVAL"]
    if read_sysctl("kernel/io_uring_disabled") in (None, "0"):
        assert results["io_uring_setup"] == [-1, "EFAULT"]


def test_the_filter_refuses_namespaces_mounts_tracing_and_kernel_interfaces() -> None:
    results = result_of(in_child(probe_calls))
    expected = {name: [-1, "EPERM"] for name in results}
    expected["clone3"] = [-1, "ENOSYS"]  # so that glibc falls back to clone
    assert results == expected


def test_the_filter_refuses_other_denied_calls() -> None:
    def probe() -> dict[str, Any]:
        return {
            "setns": syscall("setns", -1, 0),  # EBADF from the kernel
            "umount2": syscall("umount2", 0, 0),  # EFAULT from the kernel
            "chroot": syscall("chroot", 0),
            "personality_query": syscall("personality", PERSONALITY_QUERY),
            "vsock": socket_errno(socket.AF_VSOCK),
            "process_vm_readv": syscall("process_vm_readv", os.getpid(), 0, 0, 0, 0, 0),
        }

    results = result_of(in_child(probe))
    assert results["vsock"] == "EPERM"
    del results["vsock"]
    assert results == {name: [-1, "EPERM"] for name in results}


def socket_errno(family: int) -> str | None:
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0)
    return None


def test_clone_without_namespace_flags_is_allowed() -> None:
    def probe() -> list[int]:
        pid, err = syscall("clone", signal.SIGCHLD, 0, 0, 0, 0)
        if pid == 0:
            os._exit(3)
        assert err is None, err
        return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]

    assert result_of(in_child(probe)) == [3]


def test_the_process_reports_seccomp_filter_mode() -> None:
    def status() -> dict[str, str]:
        with open("/proc/self/status") as f:
            lines = dict(line.rstrip("\n").split(":", 1) for line in f)
        return {k: lines[k].strip() for k in ("Seccomp", "Seccomp_filters", "NoNewPrivs")}

    assert result_of(in_child(status)) == {
        "Seccomp": "2",
        "Seccomp_filters": "1",
        "NoNewPrivs": "1",
    }
    assert result_of(in_child(status, filtered=False))["Seccomp"] == "0"


# -- What a job still does -----------------------------------------------------------------


def ordinary_work() -> dict[str, Any]:
    out: dict[str, Any] = {}

    box = []
    thread = threading.Thread(target=lambda: box.append(sum(range(10))))
    thread.start()
    thread.join()
    out["thread"] = box

    pid = os.fork()
    if pid == 0:
        os._exit(5)
    out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    out["subprocess"] = subprocess.run(["/bin/true"], check=False).returncode
    out["subprocess_output"] = subprocess.run(
        ["/bin/echo", "hi"], capture_output=True, check=True
    ).stdout.decode()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        out["socket"] = s.family == socket.AF_INET
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"ping")
        out["socketpair"] = right.recv(4).decode()

    fd, path = tempfile.mkstemp()
    try:
        os.write(fd, b"some bytes")
        os.lseek(fd, 0, os.SEEK_SET)
        out["file"] = os.read(fd, 100).decode()
    finally:
        os.close(fd)
        os.unlink(path)

    start = time.monotonic()
    time.sleep(0.01)
    out["sleep"] = time.monotonic() - start >= 0.01
    return out


def test_ordinary_work_still_functions_under_the_filter() -> None:
    assert result_of(in_child(ordinary_work)) == {
        "thread": [45],
        "fork": 5,
        "subprocess": 0,
        "subprocess_output": "hi\n",
        "socket": True,
        "socketpair": "ping",
        "file": "some bytes",
        "sleep": True,
    }


def test_children_and_threads_inherit_the_filter() -> None:
    def probe() -> dict[str, Any]:
        in_thread: list[Any] = []
        thread = threading.Thread(target=lambda: in_thread.append(syscall("unshare", 0)))
        thread.start()
        thread.join()
        script = (
            "import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
            "libc.unshare(0); print(ctypes.get_errno())"
        )
        exec_errno = subprocess.run(
            ["/usr/bin/env", "python3", "-c", script], capture_output=True, check=True
        ).stdout.decode()
        return {"thread": in_thread[0], "exec": int(exec_errno)}

    results = result_of(in_child(probe))
    assert results == {"thread": [-1, "EPERM"], "exec": errno.EPERM}


# -- Loading -------------------------------------------------------------------------------


def test_loading_without_no_new_privs_raises_a_clear_error() -> None:
    child = in_child(lambda: None, no_new_privs=False)
    assert child.status == 0
    assert child.result["error"] == "PermissionError"
    assert child.result["errno"] == errno.EACCES
    assert "no_new_privs is not set" in child.result["text"]


def test_without_no_new_privs_nothing_is_loaded() -> None:
    def attempt() -> str:
        with contextlib.suppress(OSError):
            seccomp.load(program())
        with open("/proc/self/status") as f:
            return next(line.split()[1] for line in f if line.startswith("Seccomp:"))

    assert result_of(in_child(attempt, filtered=False, no_new_privs=False)) == "0"


# -- Other calling conventions -------------------------------------------------------------

# mov eax, 20 (getpid in the i386 table); int 0x80; ret
I386_GETPID = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])
X32_SYSCALL_BIT = 0x40000000
X86_64_GETPID = 39

x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 conventions")


def i386_getpid() -> list[int]:
    """getpid through the i386 entry (int 0x80), from a page of machine code."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(I386_GETPID)
    function = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    return [function(), os.getpid()]


@x86_64_only
def test_control_the_i386_entry_works_without_the_filter() -> None:
    child = in_child(i386_getpid, filtered=False)
    if child.signal is not None:
        pytest.skip(f"no i386 emulation in this kernel (signal {child.signal})")
    pid_i386, pid = result_of(child)
    assert pid_i386 == pid


@x86_64_only
def test_the_i386_entry_kills_the_process_under_the_filter() -> None:
    # An i386 call number means another call (20 is getpid there, but i386 mount is 21, ...):
    # the filter checks the arch first, so a deny list cannot be bypassed that way.
    child = in_child(i386_getpid)
    assert child.signal == signal.SIGSYS
    assert child.result is None


@x86_64_only
def test_x32_call_numbers_kill_the_process_under_the_filter() -> None:
    def x32_getpid() -> list[Any]:
        return list(syscall_number(X32_SYSCALL_BIT | X86_64_GETPID))

    control = result_of(in_child(x32_getpid, filtered=False))
    assert control[0] != -1 or control[1] == "ENOSYS"  # a kernel without x32 says ENOSYS
    child = in_child(x32_getpid)
    assert child.signal == signal.SIGSYS


def syscall_number(number: int) -> tuple[int, str | None]:
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number))
    return result, errno.errorcode.get(ctypes.get_errno()) if result == -1 else None


def read_sysctl(name: str) -> str | None:
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
