"""The job's side of the launch path: its init (PID 1 of its namespaces) and the job process.

A sandbox is prepared before there is a job for it (a *spare*, see
:mod:`workernator_runner.monitor`), so that starting a job costs no fork and no namespace: the
monitor has unshared the PID namespace for its children and forked :func:`init`, which is PID
1 there. The order of what follows is fixed here, in two phases (design section 7):

Prepare, with no job yet (nothing of anyone is in these processes):

    unshare the mount, network, UTS and IPC namespaces -> loopback up -> private mounts,
    a fresh /proc and /tmp on the template root -> fork the job process, which waits

Per job, once the monitor sent the job (:class:`JobSetup`):

    join the job's cgroup (both processes) -> a cgroup namespace -> hostname, eth0 (egress)
    -> /etc, /workspace, pivot_root into the root and detach the host's tree
    -> the init drops groups, gid, capabilities, uid -> parent-death signal -> no_new_privs
       -> seccomp, as the job process did while it was prepared
    -> the job process runs the job's code; the init reaps orphans, forwards SIGTERM, SIGINT
       and SIGHUP to the job's process group and, when the job's main process ends, tells the
       monitor its wait status and exits.

The init's exit takes down everything left in the namespace: the kernel kills every other
process there, and the monitor's wait for the init returns only once all of them are gone.

Messages on the monitor <-> init socketpair (SOCK_SEQPACKET; one byte of kind, then data):
``P`` prepared, ``J`` + the job (init <- monitor), ``R`` the job runs, ``E`` + text setup
failed, ``S`` + wait status: the job's main process ended. Between the init and the job process,
a socketpair carries ``P`` (or ``E`` + text) once the job process is prepared, then the job's
type and arguments the other way; the job process closes it before the job's code runs.
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
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack

from workernator_runner import launch, linux, network, rootfs, seccomp
from workernator_runner.jobs import Registry, run_job

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
MAX_MESSAGE = 256 * 1024

MSG_PREPARED = b"P"
MSG_JOB = b"J"
MSG_RUNNING = b"R"
MSG_ERROR = b"E"
MSG_STATUS = b"S"


class SetupError(Exception):
    """The sandbox could not be made; the message says why."""


@dataclass(frozen=True)
class Sandbox:
    """What every sandbox of this launcher has in common, fixed at startup."""

    uid: int
    gid: int
    user: str
    template: str  # the prepared root, in the launcher's mount namespace
    tmp_size_mb: int
    seccomp_filter: bytes
    registry: Registry
    resolv_conf: str | None  # egress jobs' /etc/resolv.conf (None: egress is off)
    tmp_binds: tuple[str, ...] = ()  # code under the host's /tmp (rootfs.under_tmp)


@dataclass(frozen=True)
class JobSetup:
    """One job for a prepared sandbox, sent by its monitor as soon as it has one: the init
    checks the arguments itself (the runner did already), so the monitor need not first."""

    job_id: str
    job_type: str
    args: bytes  # as the runner sent them (msgpack)
    address: str = ""  # "10.92.0.2/16" for egress jobs
    gateway: str = ""

    def encode(self) -> bytes:
        body = {
            "id": self.job_id,
            "type": self.job_type,
            "args": self.args,
            "address": self.address,
            "gateway": self.gateway,
        }
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return MSG_JOB + packed

    @classmethod
    def decode(cls, message: bytes) -> JobSetup:
        """From the monitor, which checked the header: a malformed one is a bug."""
        data = msgpack.unpackb(message[1:], raw=False)
        return cls(
            job_id=data["id"],
            job_type=data["type"],
            args=data["args"],
            address=data["address"],
            gateway=data["gateway"],
        )


def init(
    sandbox: Sandbox,
    workspace: str,
    cgroup: list[str],
    out_w: int,
    err_w: int,
    channel: socket.socket,
) -> NoReturn:
    """PID 1 of a sandbox's namespaces; ``workspace`` is its /workspace on the host,
    ``cgroup`` the ``cgroup.procs`` files of its cgroup. Never returns."""
    try:
        # Die with the monitor (nobody else could stop this job or keep its output).
        linux.set_parent_death_signal(signal.SIGKILL)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        linux.close_fds_except({0, 1, 2, out_w, err_w, channel.fileno()})
        _join_cgroup(cgroup)
        linux.unshare(NAMESPACES)
        network.configure_inside(None, None)  # loopback up
        rootfs.prepare(
            sandbox.template,
            sandbox.tmp_size_mb,
            workspace,
            rootfs.common_etc(sandbox.uid, sandbox.gid, sandbox.user),
            sandbox.tmp_binds,
        )
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, *FORWARDED})
        for sig in FORWARDED:  # a handler, so a signal from inside is not discarded
            signal.signal(sig, _ignore)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        job_pid = os.fork()
        if job_pid == 0:
            ours.close()
            _job_process(sandbox, out_w, err_w, theirs)
        theirs.close()
        os.close(out_w)
        os.close(err_w)
        _expect(ours, MSG_PREPARED, "the job process")
        _rehearse_init(sandbox)
        # Emptied now, off the start (one system call per capability): the bounding set only
        # limits what an exec could gain, and the init keeps its effective capabilities for the
        # job's setup until it becomes the job user.
        linux.drop_bounding_set()
        for pid in (0, job_pid):  # prepared: back from the lowest priority (see monitor.spare)
            os.setpriority(os.PRIO_PROCESS, pid, 0)
        channel.send(MSG_PREPARED)
        message = channel.recv(MAX_MESSAGE)
        if not message.startswith(MSG_JOB):  # empty: the monitor is gone
            os._exit(1)
        setup = JobSetup.decode(message)
        args = _check(sandbox, setup)
        _enter(sandbox, setup)
        # The init itself needed root for the mounts until just now: it gives it all up before
        # any of the job runs, so no process of a running job is ever privileged.
        _become_job_user(sandbox.uid, sandbox.gid)
        linux.set_parent_death_signal(signal.SIGKILL)  # the uid change cleared it
        if not _peer_alive(channel):  # the monitor died before the line above
            os._exit(1)
        linux.set_no_new_privs()
        seccomp.load(sandbox.seccomp_filter)
        # The job process has nothing left to do but run: it goes, and the job is running.
        ours.send(msgpack.packb([setup.job_type, args], use_bin_type=True))
        ours.close()
        channel.send(MSG_RUNNING)
    except BaseException as exc:
        try:
            channel.send(MSG_ERROR + f"job setup failed: {_describe(exc)}".encode()[:4000])
        finally:
            os._exit(127)
    _be_init(job_pid, channel)


def _expect(sock: socket.socket, kind: bytes, who: str) -> None:
    answer = sock.recv(4096)
    if answer != kind:
        raise SetupError(answer[1:].decode(errors="replace") or f"{who} died")


def _check(sandbox: Sandbox, setup: JobSetup) -> dict[str, Any]:
    """The job's arguments, checked again against its type (the launch path trusts nobody)."""
    job = sandbox.registry.get(setup.job_type)
    if job is None:
        raise SetupError(f"unknown job type {setup.job_type!r}")
    try:
        return job.spec.validate(launch.decode_args(setup.args))
    except Exception as exc:  # InvalidArgument, MessageError: the runner checked them already
        raise SetupError(f"bad arguments: {exc}") from None


def _rehearse_init(sandbox: Sandbox) -> None:
    """The init's per-job code, once on a made-up job, before there is one (see
    monitor._rehearse)."""
    setup = JobSetup.decode(JobSetup("AAAAAA", "noop", msgpack.packb({})).encode())
    _check(sandbox, setup)
    rootfs.job_etc(setup.job_id, sandbox.resolv_conf)
    msgpack.packb([setup.job_type, {}], use_bin_type=True)


def _enter(sandbox: Sandbox, setup: JobSetup) -> None:
    """The per-job part of the init's setup, before the job process may go on."""
    socket.sethostname(setup.job_id)
    if setup.address:
        network.configure_inside(
            ipaddress.IPv4Interface(setup.address), ipaddress.IPv4Address(setup.gateway)
        )
    egress = bool(setup.address)
    rootfs.enter(rootfs.job_etc(setup.job_id, sandbox.resolv_conf if egress else None), egress)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, OSError | SetupError) and str(exc) else repr(exc)


def _ignore(signum: int, frame: object) -> None:
    """Installed for forwarded signals; they are taken with sigwaitinfo, never delivered."""


def _join_cgroup(procs_files: list[str]) -> None:
    """Cgroup placement: the first step, so that every process of the sandbox is in its cgroup
    in every hierarchy (and the cgroup namespace made next is rooted there) before any job code
    can run: the job process is forked later, inside."""
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")  # this process
        finally:
            os.close(fd)


def _peer_alive(channel: socket.socket) -> bool:
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLHUP | select.POLLERR | select.POLLRDHUP)
    return not poller.poll(0)


def _drop_privileges(uid: int, gid: int) -> None:
    """Become the job user with no supplementary groups and no capabilities at all."""
    linux.drop_bounding_set()  # needs CAP_SETPCAP: before the uid change
    _become_job_user(uid, gid)


def _become_job_user(uid: int, gid: int) -> None:
    """The rest of :func:`_drop_privileges`, for a process whose bounding set is empty."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
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


def _job_process(sandbox: Sandbox, out_w: int, err_w: int, init: socket.socket) -> NoReturn:
    """The job process: prepared down to its last privilege while there is no job (it sits
    in the host's mount tree until the init pivots, running nothing of anyone), it waits for
    its job and runs it. Never returns."""
    code = 127
    try:
        os.setsid()
        os.chdir("/")  # the init's pivot_root moves this to the job's root
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        linux.close_fds_except({0, 1, 2, init.fileno()})
        _drop_privileges(sandbox.uid, sandbox.gid)
        linux.set_parent_death_signal(signal.SIGKILL)
        linux.set_no_new_privs()
        seccomp.load(sandbox.seccomp_filter)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        _job_stdio()
        _rehearse_job(sandbox)
        init.send(MSG_PREPARED)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            init.send(MSG_ERROR + f"job process setup failed: {_describe(exc)}".encode()[:4000])
        os._exit(code)
    try:
        message = init.recv(MAX_MESSAGE)
        init.close()
        if not message:  # the sandbox was never used
            os._exit(0)
        job_type, args = msgpack.unpackb(message, raw=False)
        os.chdir("/workspace")
        code = run_job(sandbox.registry[job_type], args)
    except BaseException as exc:  # nothing of the job ran: say so where its user looks
        with contextlib.suppress(OSError):
            os.write(2, f"[ERROR] The job could not start: {_describe(exc)}\n".encode())
    finally:
        os._exit(code)


def _rehearse_job(sandbox: Sandbox) -> None:
    """The job path's first touches, off the start (see monitor._rehearse): unpacking a job,
    and printing a line (to /dev/null)."""
    msgpack.unpackb(msgpack.packb(["noop", {}]), raw=False)
    with open(os.devnull, "w", buffering=1, encoding="utf-8") as devnull:
        run_job(sandbox.registry["noop"], {})
        print("[JOB] rehearsal", file=devnull, flush=True)


def _job_stdio() -> None:
    """The job's environment, and its sys.stdout and sys.stderr on the output pipes."""
    os.environ.clear()
    os.environ.update(JOB_ENV)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = open(  # noqa: SIM115 - lives until the process exits
            fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
        )
        stream.write("")  # writes nothing: the first touches of the path, off the start
        stream.flush()
        setattr(sys, name, stream)
