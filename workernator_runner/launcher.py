"""The launcher: the clean process every sandbox is forked from (design section 2).

The runner starts it (``python -m workernator_runner.launcher --control N --jobs M``) before it
reads any job or user data: a fresh interpreter, so it holds none of the runner's memory, with
one thread. At startup it

1. learns its settings from the runner's init message and dies with the runner
   (parent-death signal, and EOF on its control socket);
2. imports the job code (the built-in jobs and the configured job modules);
3. sets up the egress bridge and firewall (it may fork ``nft`` now: it has one thread);
4. enters a mount namespace of its own and prepares the template root there
   (:mod:`workernator_runner.rootfs`), invisible to the host;
5. compiles the seccomp filter once;
6. freezes what it has for the garbage collector, so forks share those pages untouched.

Then it keeps :data:`SPARES` spare sandboxes ready: each is a monitor forked from here with its
init and job process prepared (:mod:`workernator_runner.monitor`), waiting on the jobs socket
that the runner sends launch messages to. The launcher never reads those messages: a spare
takes one and tells the launcher which job it took, and the launcher forks the next spare. It
also reaps every monitor, and kills the monitor of a start the runner gave up on (a cancel on
the control socket), removing what that job left.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import os
import selectors
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import NoReturn

import msgpack

from shared import ids
from workernator_runner import launch as wire
from workernator_runner import linux, monitor, network, rootfs, sandbox, seccomp
from workernator_runner.jobs import load_registry

SPARES = 2  # sandboxes kept ready: a start waits for none unless starts come in bursts
RETRY_SECONDS = 1.0  # after a spare failed to prepare, before the next try
FIRST_SPARE_SECONDS = 30.0  # the first one is part of the launcher's startup
LAUNCHER_NICENESS = 10


class Launcher:
    def __init__(self, control: socket.socket, jobs: socket.socket, init: wire.Init) -> None:
        self.control = control
        self.jobs = jobs
        state_dir = Path(init.state_dir)
        registry = load_registry(init.job_modules)
        self.egress: network.Egress | None = None
        self.egress_error = ""
        if init.egress is not None:
            egress = network.Egress(
                bridge=init.egress.bridge,
                subnet=ipaddress.IPv4Network(init.egress.subnet),
                resolver=ipaddress.IPv4Address(init.egress.resolver)
                if init.egress.resolver
                else None,
                resolv_conf=init.egress.resolv_conf,
            )
            try:
                network.setup_host(egress)
                self.egress = egress
            except (OSError, TimeoutError) as exc:
                self.egress_error = f"egress networking could not be set up: {exc}"
        code = rootfs.python_paths()
        self.host = monitor.Host(
            jobs_dir=state_dir / "jobs",
            workspaces_dir=state_dir / "workspaces",
            sandbox=sandbox.Sandbox(
                uid=init.uid,
                gid=init.gid,
                user=init.user,
                template=self._prepare_root(state_dir / "sandbox", code),
                tmp_size_mb=init.tmp_size_mb,
                seccomp_filter=seccomp.build_filter(),
                registry=registry,
                resolv_conf=self.egress.resolv_conf if self.egress is not None else None,
                tmp_binds=rootfs.under_tmp(code),
            ),
            egress=self.egress,
            cgroups=init.cgroups,
            default_limits=init.default_limits,
            max_output_bytes=init.max_output_bytes,
        )
        _remove_dead_spares(self.host.workspaces_dir)
        self.notices, self.notify = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.spares: set[int] = set()  # pids of monitors that took no job yet
        self.monitors: dict[int, str] = {}  # pid -> job id, until reaped
        self.cancelled: set[str] = set()  # job ids whose start the runner gave up on
        self.retry_at = 0.0

    def _prepare_root(self, base: Path, code: list[str]) -> str:
        """The template root, in a mount namespace of this process (and its monitors)."""
        linux.unshare(linux.CLONE_NEWNS)
        # Host mounts still propagate in (a state directory mounted later, say); ours never out.
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
        base.mkdir(mode=0o700, exist_ok=True)
        linux.mount("tmpfs", str(base), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0700")
        root = base / "root"
        root.mkdir(mode=0o755)
        rootfs.build_template(str(root), code)
        return str(root)

    def serve(self) -> NoReturn:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        linux.boot_id()  # cached before the forks: every monitor records it
        linux.last_capability()  # and every init reads it to drop its capabilities
        gc.collect()
        gc.freeze()  # from here on, forks share these pages and never copy them to collect
        # Below the jobs: forking and preparing spares must not slow down a job that starts.
        os.setpriority(os.PRIO_PROCESS, 0, LAUNCHER_NICENESS)
        self.notices.setblocking(False)
        self._fork_spares()
        first = self._first_notice(wake_r)
        if first[:1] != monitor.PREPARED:
            text = first[1 + monitor.PID.size :].decode(errors="replace") or "it died"
            self.control.send(wire.INIT_FAILED + f"a sandbox could not be made: {text}".encode())
            os._exit(1)
        self.control.send(wire.READY + _pack({"egress_error": self.egress_error}))
        sel = selectors.DefaultSelector()
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        sel.register(self.notices, selectors.EVENT_READ, "notice")
        while True:
            timeout = None
            if len(self.spares) < SPARES:
                timeout = max(0.0, self.retry_at - time.monotonic())
            for key, _ in sel.select(timeout):
                if key.data == "signal":
                    os.read(wake_r, 256)
                    self._reap()
                elif key.data == "notice":
                    self._notice()
                else:
                    self._control()
            self._fork_spares()

    def _first_notice(self, wake_r: int) -> bytes:
        """The first spare's word: prepared, or failed (also when it died without a word)."""
        sel = selectors.DefaultSelector()
        sel.register(self.notices, selectors.EVENT_READ)
        sel.register(wake_r, selectors.EVENT_READ)
        deadline = time.monotonic() + FIRST_SPARE_SECONDS
        try:
            while (left := deadline - time.monotonic()) > 0:
                sel.select(left)
                with contextlib.suppress(BlockingIOError):
                    return self.notices.recv(8192)
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 256)
                for pid in list(self.spares):
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        self.spares.discard(pid)
                        code = os.waitstatus_to_exitcode(status)
                        return (
                            monitor.FAILED
                            + monitor.PID.pack(pid)
                            + (f"its monitor died during setup (exit status {code})".encode())
                        )
            return monitor.FAILED + monitor.PID.pack(0) + b"preparing it took too long"
        finally:
            sel.close()

    def _fork_spares(self) -> None:
        while len(self.spares) < SPARES and time.monotonic() >= self.retry_at:
            try:
                pid = os.fork()
            except OSError as exc:
                _log(f"cannot fork a spare sandbox: {exc}")
                self.retry_at = time.monotonic() + RETRY_SECONDS
                return
            if pid == 0:
                self._be_spare()
            self.spares.add(pid)

    def _be_spare(self) -> NoReturn:
        """In the forked child: a spare sandbox, then a job's monitor. Never returns."""
        code = 70
        try:
            signal.set_wakeup_fd(-1)
            self.control.close()
            self.notices.close()
            linux.close_fds_except({0, 1, 2, self.jobs.fileno(), self.notify.fileno()})
            code = monitor.spare(self.host, self.jobs, self.notify)
        except BaseException as exc:
            _log(f"a monitor failed: {exc!r}")
            with contextlib.suppress(OSError):
                self.notify.send(
                    monitor.FAILED + monitor.PID.pack(os.getpid()) + repr(exc).encode()
                )
        finally:
            os._exit(code)

    def _notice(self) -> None:
        """What spares say: prepared (nothing to do), took a job, or failed to prepare."""
        while True:
            try:
                message = self.notices.recv(8192)
            except (BlockingIOError, InterruptedError):
                return
            kind = message[:1]
            (pid,) = monitor.PID.unpack_from(message, 1)
            data = message[1 + monitor.PID.size :]
            job_id = data.decode(errors="replace")
            if kind == monitor.TOOK and pid in self.spares and ids.is_job_id(job_id):
                self.spares.discard(pid)
                self.monitors[pid] = job_id
                if job_id in self.cancelled:
                    self._kill(pid)
            elif kind == monitor.FAILED:
                _log(f"a spare sandbox could not be prepared: {data.decode(errors='replace')}")

    def _control(self) -> None:
        try:
            message = self.control.recv(wire.MAX_MESSAGE)
        except InterruptedError:
            return
        if not message:  # the runner is gone: monitors (and spares, on their own) go too
            os._exit(0)
        if message[:1] != wire.CANCEL:
            _log(f"unexpected control message {message[:1]!r}")
            return
        try:
            job_id = wire.decode_job_id(message)
        except wire.MessageError:
            return
        self.cancelled.add(job_id)
        for pid, monitor_job in self.monitors.items():
            if monitor_job == job_id:
                self._kill(pid)

    def _kill(self, pid: int) -> None:
        """Kill a monitor the runner gave up on; its job dies with it (the init's parent-death
        signal). Its files go once it is reaped."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # our unreaped child: the pid is still its own

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.spares:  # a spare that never took a job (or a bad message)
                self.spares.discard(pid)
                if os.waitstatus_to_exitcode(status) not in (0, 1):  # it could not prepare
                    self.retry_at = time.monotonic() + RETRY_SECONDS
                continue
            job_id = self.monitors.pop(pid, None)
            if job_id is not None and job_id in self.cancelled:
                self.cancelled.discard(job_id)
                self._remove_traces(job_id)

    def _remove_traces(self, job_id: str) -> None:
        if self.egress is not None:
            with contextlib.suppress(OSError):
                network.detach(self.egress, job_id)
        for path in (self.host.workspaces_dir / job_id, self.host.jobs_dir / job_id):
            shutil.rmtree(path, ignore_errors=True)


def _remove_dead_spares(workspaces: Path) -> None:
    """Workspaces of spare sandboxes whose monitor is gone (killed with an earlier runner)."""
    for path in workspaces.glob(f"{monitor.SPARE_PREFIX}*"):
        pid = path.name.removeprefix(monitor.SPARE_PREFIX)
        if not pid.isdigit() or not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)


def _pack(data: object) -> bytes:
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def _log(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f'level=error msg="{text}" process=launcher\n'.encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workernator-launcher")
    parser.add_argument("--control", type=int, required=True, help="the runner's control socket")
    parser.add_argument("--jobs", type=int, required=True, help="the runner's jobs socket")
    args = parser.parse_args(argv)
    control = socket.socket(fileno=args.control)
    jobs = socket.socket(fileno=args.jobs)
    try:
        init = wire.decode_init(control.recv(wire.MAX_MESSAGE))
        linux.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != init.runner_pid:  # the runner died before the line above
            return 1
        launcher = Launcher(control, jobs, init)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            control.send(wire.INIT_FAILED + f"{type(exc).__name__}: {exc}".encode()[:8000])
        return 1
    launcher.serve()


if __name__ == "__main__":
    sys.exit(main())
