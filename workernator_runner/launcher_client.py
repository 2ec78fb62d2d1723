"""The runner's side of the launcher: start it, hand it jobs, hear how they started.

The launcher is started with fork + exec of a fresh interpreter (``subprocess``, whose child
runs no Python before ``exec``), so it inherits nothing of the runner's memory, and that is the
runner's only fork. Its death is noticed through a pidfd: starts then fail, and the owner of
this object is told (the daemon exits, so the service manager restarts the runner; running
jobs go on and are re-adopted).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from shared import log
from shared.errors import Internal
from workernator_runner import launch as wire

START_SECONDS = 60.0  # the launcher's own startup: an interpreter, imports, the template root
CLOSE_SECONDS = 5.0


class Launcher:
    """A running launcher process and the socket to it."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        control: socket.socket,
        jobs: socket.socket,
        on_exit: Callable[[str], None] | None,
    ) -> None:
        self.process = process
        self.control = control  # init, ready, cancel: to and from the launcher
        self.sock = jobs  # launch messages to spare sandboxes, and their answers
        self.on_exit = on_exit
        self.egress_error = ""
        self.exit_reason = ""  # set once the launcher is gone
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[str] = self._loop.create_future()
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._send_lock = asyncio.Lock()
        self._exited = asyncio.Event()
        self._pidfd = os.pidfd_open(process.pid)
        self._loop.add_reader(self.sock.fileno(), self._on_message)
        self._loop.add_reader(self.control.fileno(), self._on_control)
        self._loop.add_reader(self._pidfd, self._on_exit)

    @classmethod
    async def spawn(cls, init: wire.Init, on_exit: Callable[[str], None] | None = None) -> Launcher:
        """Start the launcher and wait until it is ready; raises Internal if it cannot start."""
        control, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        jobs, jobs_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs = (control_theirs.fileno(), jobs_theirs.fileno())
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            # The runner's own import path: the launcher imports the same code, the same way.
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isabs(p)),
        }
        try:
            process = subprocess.Popen(  # noqa: ASYNC220 - a spawn; it does not wait
                [
                    sys.executable,
                    "-s",
                    "-m",
                    "workernator_runner.launcher",
                    "--control",
                    str(theirs[0]),
                    "--jobs",
                    str(theirs[1]),
                ],
                pass_fds=theirs,
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        finally:
            control_theirs.close()
            jobs_theirs.close()
        control.setblocking(False)
        jobs.setblocking(False)
        launcher = cls(process, control, jobs, on_exit)
        try:
            control.send(wire.encode_init(init))
            launcher.egress_error = await asyncio.wait_for(launcher._ready, START_SECONDS)
        except BaseException:
            await launcher.close()
            raise
        return launcher

    @property
    def alive(self) -> bool:
        return not self.exit_reason

    async def launch(
        self, header: wire.LaunchHeader, args: Mapping[str, Any], seconds: float
    ) -> None:
        """Have the job started; returns once it runs in its sandbox. On any failure (its
        own, a timeout, cancellation) nothing of the job is left running."""
        if not self.alive:
            raise Internal(f"the launcher is gone ({self.exit_reason}); restart the runner")
        message = wire.encode_launch(header, args)
        done: asyncio.Future[None] = self._loop.create_future()
        self._pending[header.job_id] = done
        try:
            async with asyncio.timeout(seconds):
                # One sender at a time: a socket has one writer callback in the event loop. A
                # full socket means every spare is busy; the next one takes the next message.
                async with self._send_lock:
                    await self._loop.sock_sendall(self.sock, message)
                await asyncio.shield(done)
        except TimeoutError:
            self.cancel(header.job_id)
            raise Internal(f"the job did not start within {seconds:g} s") from None
        except BaseException:
            if not done.done():  # no answer yet: the monitor may be half-way
                self.cancel(header.job_id)
            raise
        finally:
            self._pending.pop(header.job_id, None)

    def cancel(self, job_id: str) -> None:
        """Kill the monitor of a start that has not answered, and remove its files."""
        with contextlib.suppress(OSError):
            self.control.send(wire.encode_cancel(job_id))

    def _on_control(self) -> None:
        try:
            message = self.control.recv(wire.MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("launcher control socket failed", error=str(exc))
            message = b""
        if not message:  # the launcher is gone; its exit is handled through the pidfd
            self._loop.remove_reader(self.control.fileno())
            return
        kind = message[:1]
        if kind == wire.READY and not self._ready.done():
            data = msgpack.unpackb(message[1:], raw=False)
            self._ready.set_result(str(data.get("egress_error", "")))
        elif kind == wire.INIT_FAILED and not self._ready.done():
            text = message[1:].decode(errors="replace")
            self._ready.set_exception(Internal(f"the runner cannot start jobs: {text}"))

    def _on_message(self) -> None:
        """An answer from a monitor: its job runs, or could not start."""
        try:
            message = self.sock.recv(wire.MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("jobs socket failed", error=str(exc))
            return
        if not message:
            self._loop.remove_reader(self.sock.fileno())
            return
        kind = message[:1]
        try:
            job_id = wire.decode_job_id(message)
        except wire.MessageError:
            job_id = ""
        text = message[1 + len(job_id) :].decode(errors="replace")
        future = self._pending.get(job_id)
        if future is None or future.done():
            if kind == wire.START_FAILED and not job_id:
                log.error("the launcher refused a message", error=text)
            return
        if kind == wire.STARTED:
            future.set_result(None)
        else:
            future.set_exception(Internal(f"job could not start: {text}"))

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        status = self.process.wait()  # it has exited: this only reaps it
        self.exit_reason = f"exit status {status}"
        self._exited.set()
        error = Internal(f"the launcher exited ({self.exit_reason})")
        if not self._ready.done():
            self._ready.set_exception(error)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
                future.add_done_callback(_retrieved)  # whoever gave up on it hears nothing
        if self.on_exit is not None:
            self.on_exit(self.exit_reason)

    async def close(self) -> None:
        """Stop the launcher (it exits when its socket closes); monitors go on."""
        for sock in (self.sock, self.control):
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        if self.alive:
            self.on_exit = None  # an exit we asked for
            try:
                await asyncio.wait_for(self._exited.wait(), CLOSE_SECONDS)
            except TimeoutError:
                log.error("the launcher did not exit; killing it", pid=self.process.pid)
                self.process.kill()
                await self._exited.wait()
        os.close(self._pidfd)


def _retrieved(future: asyncio.Future[None]) -> None:
    future.exception()
