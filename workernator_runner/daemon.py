"""``workernator-runner``: serves the job manager on a Unix socket (design sections 2 and 4).

Each connection is checked with SO_PEERCRED against the allowed uids, then speaks the runner
protocol of :mod:`shared.protocol`. Requests on one connection run concurrently; a malformed
frame gets an error frame and closes that connection only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import socket
import stat
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from shared import log, service
from shared import protocol as p
from shared.errors import ErrorCode, WorkernatorError
from shared.model import OutputChunk
from workernator_runner import config as config_mod
from workernator_runner import files, unitstop
from workernator_runner.manager import JobManager

MAX_REQUESTS_PER_CONNECTION = 256
# A job status is at most about 26 KiB on the wire (a 4096-character expression, 64 variables,
# a 4096-character error), so this many always fit in one frame.
JOBS_PER_FRAME = p.MAX_JOBS_PER_FRAME
MAX_CONNECTIONS = 128
TURN_SECONDS = 0.002  # how long one connection's frames may keep the others waiting
SHUTDOWN_CLOSE_SECONDS = 2.0  # at shutdown, how long a peer gets to take what was sent
SOFTWARE = "workernator-runner 0.1"
# struct ucred: pid_t pid (signed), uid_t uid and gid_t gid (unsigned: a uid above 2**31 is
# no negative number, and cannot match one).
_UCRED = struct.Struct("=iII")


def parse_ucred(data: bytes) -> tuple[int, int, int]:
    """(pid, uid, gid) from the bytes of a ``struct ucred``."""
    pid, uid, gid = _UCRED.unpack(data)
    return pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket, from the kernel."""
    return parse_ucred(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


class _Session:
    """One client connection: reads frames, runs requests, writes replies."""

    def __init__(
        self, manager: JobManager, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.manager = manager
        self.reader = reader
        self.writer = writer
        self.conn = p.Connection(p.Role.SERVER)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._write_lock = asyncio.Lock()

    async def send(self, message: p.ServerMessage) -> None:
        """Write one frame once the peer has read what came before: whatever the peer does,
        this connection buffers at most one frame beyond the transport's high-water mark."""
        async with self._write_lock:
            self.writer.write(self.conn.send(message))
            await self.writer.drain()

    async def run(self) -> None:
        await self.send(p.Hello(software=SOFTWARE))
        loop = asyncio.get_running_loop()
        turn_ends = loop.time() + TURN_SECONDS
        try:
            while True:
                data = await self.reader.read(64 * 1024)
                if not data:
                    self.conn.receive_eof()
                    return
                self.conn.receive_data(data)
                while True:
                    try:
                        message = self.conn.next_message()
                    except p.ProtocolError as exc:
                        if exc.request_id is None:
                            raise
                        # A well-framed request with bad arguments: refuse it, keep serving.
                        await self.send(
                            p.ErrorReply(exc.request_id, ErrorCode.INVALID_ARGUMENT, exc.message)
                        )
                        continue
                    if message is None:
                        break
                    await self.dispatch(message)
                    if loop.time() > turn_ends:  # a peer sending many frames at once
                        await asyncio.sleep(0)  # lets the other connections have their turn
                        turn_ends = loop.time() + TURN_SECONDS
        except p.ProtocolError as exc:
            log.warning("protocol error; closing connection", error=exc.message)
            with contextlib.suppress(ConnectionError):
                await self.send(p.ErrorReply(None, ErrorCode.INVALID_ARGUMENT, exc.message))
        finally:
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def dispatch(self, message: p.Message) -> None:
        if isinstance(message, p.Hello):  # the codec checked it is first and of our version
            return
        if isinstance(message, p.Cancel):
            task = self.tasks.get(message.id)
            if task is not None:
                task.cancel()
            return
        if not isinstance(message, p.Request):
            raise p.ProtocolError(f"unexpected {type(message).__name__} message")
        if message.id in self.tasks:
            raise p.ProtocolError(f"request id {message.id} is already in use", message.id)
        if len(self.tasks) >= MAX_REQUESTS_PER_CONNECTION:
            # Waits for the peer to read: a peer that floods and never reads stops being read.
            await self.send(
                p.ErrorReply(
                    message.id,
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"more than {MAX_REQUESTS_PER_CONNECTION} requests in flight",
                )
            )
            return
        task = asyncio.create_task(self.handle(message))
        self.tasks[message.id] = task
        task.add_done_callback(lambda _: self.tasks.pop(message.id, None))

    async def handle(self, request: p.Request) -> None:
        try:
            await self.execute(request)
        except WorkernatorError as exc:
            await self._try_send(p.ErrorReply(request.id, exc.code, exc.message))
        except ConnectionError:
            pass
        except Exception as exc:
            log.error("request failed", op=request.op.value, error=repr(exc))
            await self._try_send(p.ErrorReply(request.id, ErrorCode.INTERNAL, "internal error"))

    async def _try_send(self, message: p.ServerMessage) -> None:
        with contextlib.suppress(ConnectionError):
            await self.send(message)

    async def execute(self, request: p.Request) -> None:
        m, args, rid = self.manager, request.args, request.id
        if isinstance(args, p.StartArgs):
            job = await m.start(args.job_type, args.args, request.caller.user, args.limits)
            await self.send(p.JobReply(rid, job))
        elif isinstance(args, p.JobRef) and request.op is p.Op.STOP:
            job = await m.stop(args.job_id)
            log.job("job stopped", job, by=request.caller.user)
            await self.send(p.JobReply(rid, job))
        elif isinstance(args, p.JobRef) and request.op is p.Op.DELETE:
            job = m.delete(args.job_id)
            log.job("job deleted", job, by=request.caller.user)
            await self.send(p.JobReply(rid, job))
        elif isinstance(args, p.JobRef):
            await self.send(p.JobReply(rid, m.status(args.job_id)))
        elif isinstance(args, p.TypesArgs):
            await self.send(p.TypesReply(rid, [j.spec.describe() for j in m.registry.values()]))
        elif isinstance(args, p.ListArgs):
            # A frame at a time: a reader that wants one page cancels before the rest is read.
            jobs = m.iter_list(owner=args.owner, after=args.after)
            while page := list(itertools.islice(jobs, JOBS_PER_FRAME)):
                await self.send(p.JobsItem(rid, page))
            await self.send(p.End(rid))
        elif isinstance(args, p.TailArgs):
            batches = m.read_output_batches(
                args.job_id, follow=args.follow, from_=args.offset, last=args.last
            )
            await self._stream(rid, batches)

    async def _stream(self, rid: int, batches: AsyncIterator[list[OutputChunk]]) -> None:
        async for batch in batches:
            await self.send(p.OutputItem(rid, batch))
        await self.send(p.End(rid))


class Server:
    """The daemon: a job manager behind a Unix socket."""

    def __init__(self, cfg: config_mod.RunnerConfig, manager: JobManager | None = None) -> None:
        self.config = cfg
        # Resolved with the reason when jobs can no longer start: the runner then exits 1, so
        # that the service manager restarts it (running jobs go on and are re-adopted).
        self.failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.manager = (
            manager if manager is not None else JobManager(cfg, on_launcher_exit=self._fail)
        )
        self.allowed_uids = cfg.peer_uids()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def _fail(self, reason: str) -> None:
        if not self.failed.done():
            self.failed.set_result(f"the launcher exited ({reason}); no job could start")

    async def start(self) -> None:
        path = self.config.socket
        # Checked first (files.UnsafePath): a refusal leaves nothing behind, not even a launcher.
        directory = files.open_dir(path.parent, 0o755)
        try:
            _remove_stale_socket(directory, path)
            await self.manager.open()
            sock = self._listen(directory, path.name)
        finally:
            os.close(directory)
        self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        log.info("runner listening", socket=str(path), allowed_uids=sorted(self.allowed_uids))

    def _listen(self, directory: int, name: str) -> socket.socket:
        """A listening socket named ``name`` in the directory ``directory`` (a descriptor),
        with its final mode and group from the first moment: it is made under a temporary name
        and renamed into place once it listens. Nothing here follows a symbolic link: bind
        refuses a name that exists, and the chown does not follow one."""
        gid = self.config.socket_gid()
        tmp = f".{name}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=directory)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Born with socket_mode; nobody can connect before listen() anyway.
            old_umask = os.umask(0o777 & ~self.config.socket_mode)
            try:
                sock.bind(f"/proc/self/fd/{directory}/{tmp}")  # in that very directory
            finally:
                os.umask(old_umask)
            if gid is not None:
                os.chown(tmp, -1, gid, dir_fd=directory, follow_symlinks=False)
            sock.listen(128)
            os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=directory)
            raise
        return sock

    async def stop(self) -> None:
        log.info("shutting down; running jobs go on")
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.config.socket.unlink()
        await self.manager.close()
        log.info("runner stopped")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # the runner is shutting down; the client sees the connection close
        finally:
            self._connections.discard(task)
            writer.close()
            try:  # a peer that does not read must not hold the runner up
                await asyncio.wait_for(writer.wait_closed(), SHUTDOWN_CLOSE_SECONDS)
            except (TimeoutError, asyncio.CancelledError):
                writer.transport.abort()
            except Exception:  # noqa: S110 - the connection is gone either way
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, _gid = peer_credentials(sock)
        if uid not in self.allowed_uids:
            log.warning("refused connection", peer_pid=pid, peer_uid=uid)
            message = p.ErrorReply(None, ErrorCode.FAILED_PRECONDITION, f"uid {uid} is not allowed")
            writer.write(p.encode_frame(message))
            return
        if len(self._connections) > MAX_CONNECTIONS:
            message = p.ErrorReply(None, ErrorCode.RESOURCE_EXHAUSTED, "too many connections")
            writer.write(p.encode_frame(message))
            return
        await _Session(self.manager, reader, writer).run()


def _remove_stale_socket(directory: int, path: Path) -> None:
    """Remove a socket left at ``path`` (in the directory ``directory``) by a runner that did not
    shut down cleanly; anything else there is an error."""
    try:
        mode = os.stat(path.name, dir_fd=directory, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a socket"
        raise config_mod.ConfigError(f"{path} exists and is {kind}; move it away")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(f"/proc/self/fd/{directory}/{path.name}")
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path.name, dir_fd=directory)
        return
    finally:
        probe.close()
    raise config_mod.ConfigError(f"another runner is already listening on {path}")


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--after-stop",
        metavar="UNIT",
        help="run as the systemd unit's ExecStopPost=: end the running jobs when UNIT is being "
        "stopped (not restarted), unless keep_jobs_on_stop is set; then exit",
    )


def _command(args: argparse.Namespace, cfg: config_mod.RunnerConfig) -> int | None:
    if args.after_stop is None:
        return None  # serve
    return unitstop.after_stop(cfg, args.after_stop)


def main(argv: list[str] | None = None) -> int:
    return service.main(
        prog="workernator-runner",
        description="The Workernator runner: runs jobs for the api over a Unix socket (root).",
        default_path=config_mod.DEFAULT_PATH,
        load=config_mod.load,
        default=config_mod.RunnerConfig,
        service=Server,
        errors=(config_mod.ConfigError, files.UnsafePath),
        argv=argv,
        options=_options,
        command=_command,
    )


if __name__ == "__main__":
    sys.exit(main())
