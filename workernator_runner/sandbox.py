"""The job's side of the launch path: its init (PID 1 of its namespaces) and the job process.

The monitor has unshared the PID namespace for its children and forked :func:`init`, which is
PID 1 there. The order of what follows is fixed here, in one function (design section 7):

    join the cgroup -> unshare the other namespaces -> (egress: the monitor adds eth0)
    -> hostname and network -> mounts and pivot_root -> drop groups, gid, capabilities, uid
    -> parent-death signal -> no_new_privs -> seccomp -> fork the job -> be its init

The init then reaps orphans, forwards SIGTERM, SIGINT and SIGHUP to the job's process group and,
when the job's main process ends, tells the monitor its wait status and exits. Its exit takes
down everything left in the namespace: the kernel kills every other process there, and the
monitor's wait for the init returns only once all of them are gone.

Messages to the monitor, on a SOCK_SEQPACKET socketpair (one byte of kind, then data):
``U`` namespaces made (egress: the monitor answers ``G`` once eth0 is in place), ``R`` the job
runs, ``E<text>`` setup failed, ``S<wait status>`` the job's main process ended.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import signal
import socket
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from workernator_runner import linux, network, rootfs, seccomp
from workernator_runner.jobs import Job, run_job

NAMESPACES = (
    linux.CLONE_NEWNS
    | linux.CLONE_NEWNET
    | linux.CLONE_NEWUTS
    | linux.CLONE_NEWIPC
    | linux.CLONE_NEWCGROUP
)  # and CLONE_NEWPID, which the monitor unshared for its children
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
JOB_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/workspace",
    "TMPDIR": "/tmp",  # noqa: S108 - the job's own tmpfs
}
STATUS = struct.Struct("=i")

MSG_UNSHARED = b"U"
MSG_GO = b"G"
MSG_RUNNING = b"R"
MSG_ERROR = b"E"
MSG_STATUS = b"S"


@dataclass(frozen=True)
class Sandbox:
    """Everything the init needs, fixed before it is forked."""

    job_id: str
    uid: int
    gid: int
    root: rootfs.JobRoot
    seccomp_filter: bytes
    address: ipaddress.IPv4Interface | None = None  # egress only
    gateway: ipaddress.IPv4Address | None = None


def init(
    sandbox: Sandbox,
    job: Job,
    args: Mapping[str, Any],
    out_w: int,
    err_w: int,
    channel: socket.socket,
) -> NoReturn:
    """PID 1 of the job's namespaces. Never returns."""
    try:
        # Die with the monitor (nobody else could stop this job or keep its output).
        linux.set_parent_death_signal(signal.SIGKILL)
        linux.close_fds_except({0, 1, 2, out_w, err_w, channel.fileno()})
        _join_cgroup(sandbox)
        linux.unshare(NAMESPACES)
        if sandbox.address is not None:
            channel.send(MSG_UNSHARED)
            if channel.recv(16) != MSG_GO:  # empty: the monitor is gone
                os._exit(1)
        socket.sethostname(sandbox.job_id)
        network.configure_inside(sandbox.address, sandbox.gateway)
        rootfs.enter(sandbox.root)
        _drop_privileges(sandbox.uid, sandbox.gid)
        linux.set_parent_death_signal(signal.SIGKILL)  # the uid change cleared it
        if not _peer_alive(channel):  # the monitor died before the line above
            os._exit(1)
        linux.set_no_new_privs()
        seccomp.load(sandbox.seccomp_filter)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, *FORWARDED})
        for sig in FORWARDED:  # a handler, so a signal from inside is not discarded
            signal.signal(sig, _ignore)
        pid = os.fork()
        if pid == 0:
            _job_process(job, args, out_w, err_w)
        os.close(out_w)
        os.close(err_w)
        channel.send(MSG_RUNNING)
    except BaseException as exc:
        try:
            channel.send(MSG_ERROR + f"job setup failed: {_describe(exc)}".encode()[:4000])
        finally:
            os._exit(127)
    _be_init(pid, channel)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, OSError) and exc.strerror else repr(exc)


def _ignore(signum: int, frame: object) -> None:
    """Installed for forwarded signals; they are taken with sigwaitinfo, never delivered."""


def _join_cgroup(sandbox: Sandbox) -> None:
    """Cgroup placement: the first step, so the job's every process is inside its cgroup
    before any job code runs (the resource-control issue fills this in)."""


def _peer_alive(channel: socket.socket) -> bool:
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLHUP | select.POLLERR | select.POLLRDHUP)
    return not poller.poll(0)


def _drop_privileges(uid: int, gid: int) -> None:
    """Become the job user with no supplementary groups and no capabilities at all."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    linux.drop_bounding_set()  # needs CAP_SETPCAP: before the uid change
    linux.clear_ambient_capabilities()
    os.setresuid(uid, uid, uid)  # clears the permitted and effective sets
    linux.clear_capabilities()  # and the inheritable one


def _be_init(job_pid: int, channel: socket.socket) -> NoReturn:
    """Reap every child, forward signals to the job, and leave when the job's main process
    ends, telling the monitor how it ended."""
    waited = {signal.SIGCHLD, *FORWARDED}
    while True:
        info = signal.sigwaitinfo(waited)
        if info.si_signo != signal.SIGCHLD:
            with contextlib.suppress(ProcessLookupError):  # gone: its end comes next
                os.killpg(job_pid, info.si_signo)
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid == 0:
                break
            if pid == job_pid:
                try:
                    channel.send(MSG_STATUS + STATUS.pack(status))
                finally:
                    os._exit(0)


def _job_process(job: Job, args: Mapping[str, Any], out_w: int, err_w: int) -> NoReturn:
    """The job: its own process group, stdio, a clean environment, then its code."""
    code = 127
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        linux.close_fds_except({0, 1, 2})
        os.environ.clear()
        os.environ.update(JOB_ENV)
        os.chdir("/workspace")
        sys.stdout = open(  # noqa: SIM115 - lives until the process exits
            1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
        )
        sys.stderr = open(  # noqa: SIM115
            2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
        )
        code = run_job(job, args)
    finally:
        os._exit(code)
