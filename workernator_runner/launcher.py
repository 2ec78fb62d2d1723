"""The launcher: the clean process every job is forked from (design section 2).

The runner starts it (``python -m workernator_runner.launcher --fd N``) before it reads any job
or user data: a fresh interpreter, so it holds none of the runner's memory, with one thread. At
startup it

1. learns its settings from the runner's init message and dies with the runner
   (parent-death signal, and EOF on its socket);
2. imports the job code (the built-in jobs and the configured job modules);
3. sets up the egress bridge and firewall (it may fork ``nft`` now: it has one thread);
4. enters a mount namespace of its own and prepares the template root there
   (:mod:`workernator_runner.rootfs`), invisible to the host;
5. compiles the seccomp filter once;
6. freezes what it has for the garbage collector, so forks share those pages untouched.

Then, per launch message, it forks the job's monitor (:mod:`workernator_runner.monitor`) and
reaps monitors as they exit. It reads only the message's header: the job's arguments stay
bytes in a buffer that is zeroed after each fork, and only the job's own monitor unpacks them.
A cancel message kills that job's monitor (its job dies with it) and removes what it left.
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
from pathlib import Path
from typing import NoReturn

from workernator_runner import launch as wire
from workernator_runner import linux, monitor, network, rootfs, seccomp
from workernator_runner.jobs import Job, Network, Registry, load_registry


class Launcher:
    def __init__(self, sock: socket.socket, init: wire.Init) -> None:
        self.sock = sock
        self.init = init
        self.registry: Registry = load_registry(init.job_modules)
        state_dir = Path(init.state_dir)
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
            except (OSError, FileNotFoundError, TimeoutError) as exc:
                self.egress_error = f"egress networking could not be set up: {exc}"
        template = self._prepare_root(state_dir / "sandbox")
        self.host = monitor.Host(
            jobs_dir=state_dir / "jobs",
            workspaces_dir=state_dir / "workspaces",
            uid=init.uid,
            gid=init.gid,
            user=init.user,
            tmp_size_mb=init.tmp_size_mb,
            template=template,
            seccomp_filter=seccomp.build_filter(),
            egress=self.egress,
        )
        self.children: dict[int, str] = {}  # monitor pid -> job id, until reaped
        self.cancelled: set[str] = set()
        self.buffer = bytearray(wire.MAX_MESSAGE + 1)

    def _prepare_root(self, base: Path) -> str:
        """The template root, in a mount namespace of this process (and its monitors)."""
        linux.unshare(linux.CLONE_NEWNS)
        # Host mounts still propagate in (a state directory mounted later, say); ours never out.
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
        base.mkdir(mode=0o700, exist_ok=True)
        linux.mount("tmpfs", str(base), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0700")
        root = base / "root"
        root.mkdir(mode=0o755)
        rootfs.build_template(str(root), rootfs.python_paths())
        return str(root)

    def serve(self) -> NoReturn:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        gc.collect()
        gc.freeze()  # from here on, forks share these pages and never copy them to collect
        self.sock.send(wire.READY + _pack({"egress_error": self.egress_error}))
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "runner")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        while True:
            for key, _ in sel.select():
                if key.data == "signal":
                    os.read(wake_r, 256)
                    self._reap()
                else:
                    self._receive()

    def _receive(self) -> None:
        view = memoryview(self.buffer)
        try:
            size, _, flags, _ = self.sock.recvmsg_into([view])
        except InterruptedError:
            return
        if size == 0:  # the runner is gone: monitors go on without us
            os._exit(0)
        try:
            if flags & socket.MSG_TRUNC or size > wire.MAX_MESSAGE:
                self._reply(wire.START_FAILED, "", "launch message too large")
                return
            kind = bytes(view[:1])
            if kind == wire.LAUNCH:
                self._launch(view[:size])
            elif kind == wire.CANCEL:
                self._cancel(wire.decode_job_id(view[:size]))
            else:
                self._reply(wire.START_FAILED, "", f"unknown message kind {kind!r}")
        except wire.MessageError as exc:
            self._reply(wire.START_FAILED, "", str(exc))
        finally:
            view[:size] = bytes(size)  # no job's arguments stay in this process
            view.release()

    def _launch(self, message: memoryview) -> None:
        header, args_start = wire.decode_launch_header(message)
        job = self.registry.get(header.job_type)
        if job is None:
            self._reply(wire.START_FAILED, header.job_id, f"unknown job type {header.job_type!r}")
            return
        if job.network is Network.EGRESS and self.egress is None:
            reason = self.egress_error or "egress networking is disabled in the runner's config"
            self._reply(wire.START_FAILED, header.job_id, reason)
            return
        if (job.network is Network.EGRESS) != bool(header.address):
            self._reply(wire.START_FAILED, header.job_id, "address does not fit the network mode")
            return
        try:
            pid = os.fork()
        except OSError as exc:
            self._reply(wire.START_FAILED, header.job_id, f"cannot fork the monitor: {exc}")
            return
        if pid == 0:
            self._monitor(header, job, bytes(message[args_start:]))
        self.children[pid] = header.job_id

    def _monitor(self, header: wire.LaunchHeader, job: Job, args_bytes: bytes) -> NoReturn:
        """In the forked child: become the job's monitor. Never returns."""
        code = 70
        reported = False
        sock = self.sock

        def report(started: bool, error: str) -> None:
            nonlocal reported
            reported = True
            kind = wire.STARTED if started else wire.START_FAILED
            with contextlib.suppress(OSError):
                sock.send(kind + header.job_id.encode() + error.encode()[:8000])
            sock.close()  # the monitor keeps nothing of the launcher's

        try:
            signal.set_wakeup_fd(-1)
            linux.close_fds_except({0, 1, 2, sock.fileno()})
            args = job.spec.validate(wire.decode_args(args_bytes))
            address = ipaddress.IPv4Interface(header.address) if header.address else None
            launch = monitor.Launch(header.job_id, job, args, header.grace_seconds, address)
            code = monitor.run(self.host, launch, report)
        except BaseException as exc:
            if not reported:
                report(False, f"monitor failed: {exc!r}")
        finally:
            os._exit(code)

    def _cancel(self, job_id: str) -> None:
        """Kill the monitor of a start the runner gave up on; its job dies with it (the init's
        parent-death signal). Its files go once it is reaped."""
        for pid, child_job in self.children.items():
            if child_job == job_id:
                self.cancelled.add(job_id)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # our unreaped child: the pid is still its own

    def _reap(self) -> None:
        while self.children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job_id = self.children.pop(pid, None)
            if job_id is not None and job_id in self.cancelled:
                self.cancelled.discard(job_id)
                self._remove_traces(job_id)

    def _remove_traces(self, job_id: str) -> None:
        if self.egress is not None:
            with contextlib.suppress(OSError):
                network.detach(self.egress, job_id)
        for path in (self.host.workspaces_dir / job_id, self.host.jobs_dir / job_id):
            shutil.rmtree(path, ignore_errors=True)

    def _reply(self, kind: bytes, job_id: str, text: str) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(kind + job_id.encode() + text.encode()[:8000])


def _pack(data: object) -> bytes:
    import msgpack  # noqa: PLC0415 - already imported by launch; keeps this module's imports short

    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workernator-launcher")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the runner")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    try:
        init = wire.decode_init(sock.recv(wire.MAX_MESSAGE))
        linux.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != init.runner_pid:  # the runner died before the line above
            return 1
        launcher = Launcher(sock, init)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            sock.send(wire.INIT_FAILED + f"{type(exc).__name__}: {exc}".encode()[:8000])
        return 1
    launcher.serve()


if __name__ == "__main__":
    sys.exit(main())
