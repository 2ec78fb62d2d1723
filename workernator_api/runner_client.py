"""The api's client for the runner's Unix socket (design section 4).

One connection carries many concurrent requests: each gets an id, and replies are routed back
to the waiting caller by that id. Streams (``list``, ``tail``) are async iterators; leaving
one early sends ``cancel`` so the runner stops reading for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

from shared import log
from shared import protocol as p
from shared.errors import Internal, WorkernatorError, error_from_code
from shared.model import JobStatus, OutputChunk, ResourceLimits

QUEUE_DEPTH = 2  # replies buffered per request before the connection stops being read
CONNECT_TIMEOUT_SECONDS = 5.0  # connecting and the hello exchange, together


class RunnerUnavailable(WorkernatorError):
    """The runner socket cannot be reached, refused us, or the connection broke."""


class RunnerClient:
    """One connection to the runner.

    ``max_in_flight`` caps the requests open on it (sent, final reply not yet received; the
    runner allows 256 per connection): further requests wait for one to end. A request whose
    caller gave up keeps its place until the runner answers it, as the runner still counts it.
    """

    def __init__(
        self,
        path: Path | str,
        connect_timeout: float | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.path = str(path)
        self.connect_timeout = (
            CONNECT_TIMEOUT_SECONDS if connect_timeout is None else connect_timeout
        )
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight is not None else None
        self._open: set[int] = set()  # ids of the requests the runner is working on
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._conn = p.Connection(p.Role.CLIENT)
        self._ids = itertools.count(1)
        self._queues: dict[int, asyncio.Queue[p.ServerMessage | Exception]] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._outbox: list[bytes] = []  # frames to write at the end of this loop turn
        self.server_hello: p.Hello | None = None

    async def connect(self) -> None:
        """Connect and exchange hellos, within ``connect_timeout`` seconds.

        Every failure is :class:`RunnerUnavailable`, with the runner's reason when it refused
        the connection (an error frame instead of its hello: a uid it does not allow, too many
        connections), and the socket is closed.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        connected = False
        try:
            async with asyncio.timeout(self.connect_timeout):
                self.server_hello = await self._handshake(sock)
                self._reader, self._writer = await asyncio.open_unix_connection(sock=sock)
            connected = True
        except TimeoutError:
            raise RunnerUnavailable(
                f"the runner at {self.path} did not say hello within {self.connect_timeout:g} s"
            ) from None
        except p.ProtocolError as exc:
            raise RunnerUnavailable(
                f"the runner at {self.path} broke the protocol: {exc.message}"
            ) from None
        except OSError as exc:
            raise RunnerUnavailable(f"cannot reach the runner at {self.path}: {exc}") from None
        finally:
            if not connected:
                if self._writer is not None:
                    self._writer.close()
                sock.close()
        self._reader_task = asyncio.create_task(self._read_loop())

    async def _handshake(self, sock: socket.socket) -> p.Hello:
        """Send our hello and read the runner's first frame, on the bare socket.

        A runner that refuses a connection writes one error frame and closes it, perhaps before
        our hello arrives. Reading the socket directly gets that frame even when sending our
        hello failed or the connection was reset afterwards (the kernel hands out queued data
        before the error), so the caller learns the runner's reason.
        """
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, self.path)
        send_error: OSError | None = None
        try:
            await loop.sock_sendall(sock, self._conn.send(p.Hello(software="workernator-api")))
        except OSError as exc:  # already refused and closed by the runner: read why below
            send_error = exc
        data = bytearray()
        while (body := _first_frame(data)) is None:
            try:
                received = await loop.sock_recv(sock, 64 * 1024)
            except ConnectionError:
                received = b""
            if not received:
                reason = f": {send_error}" if send_error is not None else ""
                raise RunnerUnavailable(
                    f"the runner at {self.path} closed the connection before its hello{reason}"
                )
            data += received
        refusal = _refusal(p.decode_body(body, p.Role.CLIENT))
        if refusal is not None:
            raise RunnerUnavailable(f"the runner refused the connection: {refusal}")
        self._conn.receive_data(bytes(data))  # the codec checks the hello and keeps the rest
        hello = self._conn.next_message()
        if isinstance(hello, p.ErrorReply):
            raise RunnerUnavailable(f"the runner refused the connection: {hello.message}")
        if not isinstance(hello, p.Hello):
            raise RunnerUnavailable(f"the runner at {self.path} did not say hello")
        if send_error is not None:
            raise RunnerUnavailable(f"cannot send to the runner at {self.path}: {send_error}")
        return hello

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def __aenter__(self) -> RunnerClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._reader_task is not None and not self._reader_task.done()

    async def _read_message(self) -> p.Message:
        assert self._reader is not None
        while True:
            message = self._conn.next_message()
            if message is not None:
                return message
            data = await self._reader.read(64 * 1024)
            if not data:
                self._conn.receive_eof()
                raise RunnerUnavailable("the runner closed the connection")
            self._conn.receive_data(data)

    async def _read_loop(self) -> None:
        error: RunnerUnavailable
        try:
            while True:
                message = await self._read_message()
                rid = getattr(message, "id", None)
                if rid is None:  # an error about the connection itself
                    text = getattr(message, "message", "unexpected message")
                    raise RunnerUnavailable(f"the runner closed the connection: {text}")
                if not isinstance(message, (p.JobsItem, p.OutputItem)):
                    self._finished(rid)  # the runner is done with it, even if we are too
                queue = self._queues.get(rid)
                if queue is not None:
                    # A bounded queue: a slow consumer stops this reader, the kernel's socket
                    # buffers fill, and the runner stops reading that job's output for us.
                    await queue.put(message)  # type: ignore[arg-type]
        except RunnerUnavailable as exc:
            error = exc
        except (p.ProtocolError, OSError) as exc:
            error = RunnerUnavailable(f"the connection to the runner broke: {exc}")
        except Exception as exc:  # a bug: fail the waiting requests rather than hang them
            log.logger.error("runner connection failed", exc_info=exc)
            error = RunnerUnavailable("the connection to the runner failed")
        if self._writer is not None:
            self._writer.close()  # a broken connection is never used again
        for rid in list(self._open):
            self._finished(rid)
        for queue in self._queues.values():
            _drain(queue)
            queue.put_nowait(error)

    async def _request(
        self, op: p.Op, user: str, role: str, args: p.OpArgs
    ) -> tuple[int, asyncio.Queue[p.ServerMessage | Exception]]:
        """Send a request, once there is room for it; its replies arrive in the returned
        queue, which the caller must unregister (``del self._queues[rid]``) when done."""
        if self._slots is not None:
            await self._slots.acquire()
        rid = next(self._ids)
        self._open.add(rid)
        queue: asyncio.Queue[p.ServerMessage | Exception] = asyncio.Queue(QUEUE_DEPTH)
        self._queues[rid] = queue
        try:
            if not self.connected or self._writer is None:
                raise RunnerUnavailable("not connected to the runner")
            self._send(self._conn.send(p.Request(rid, op, p.Caller(user, role), args)))
            await self._writer.drain()  # only waits while the runner reads too slowly
        except BaseException as exc:
            del self._queues[rid]
            self._finished(rid)
            if isinstance(exc, ConnectionError):
                raise RunnerUnavailable(f"cannot send to the runner: {exc}") from None
            raise
        return rid, queue

    def _send(self, frame: bytes) -> None:
        """Write ``frame`` at the end of this turn of the event loop, with every other frame
        sent meanwhile: many concurrent calls cost the api one system call, not one each, and
        the runner one read. Frames keep their order."""
        self._outbox.append(frame)
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if self._writer is not None and not self._writer.is_closing():
            self._writer.writelines(frames)

    def _finished(self, rid: int) -> None:
        """The runner no longer works on request ``rid``: its place is free."""
        if rid in self._open:
            self._open.remove(rid)
            if self._slots is not None:
                self._slots.release()

    @staticmethod
    def _check(message: p.ServerMessage | Exception) -> p.ServerMessage:
        if isinstance(message, Exception):
            raise message
        if isinstance(message, p.ErrorReply):
            raise error_from_code(message.code, message.message)
        return message

    async def _unary(self, op: p.Op, user: str, role: str, args: p.OpArgs) -> p.ServerMessage:
        rid, queue = await self._request(op, user, role, args)
        try:
            return self._check(await queue.get())
        finally:
            del self._queues[rid]

    async def _stream(
        self, op: p.Op, user: str, role: str, args: p.OpArgs
    ) -> AsyncGenerator[p.ServerMessage, None]:
        rid, queue = await self._request(op, user, role, args)
        done = False
        try:
            while True:
                message = self._check(await queue.get())
                if isinstance(message, p.End):
                    done = True
                    return
                yield message
        finally:
            del self._queues[rid]
            _drain(queue)  # unblocks the reader if it waits to put into this queue
            if not done and self.connected and self._writer is not None:
                self._send(self._conn.send(p.Cancel(rid)))
                self._finished(rid)  # the runner drops it on reading the cancel

    # --- operations ---------------------------------------------------------------------------

    async def start(
        self,
        user: str,
        role: str,
        job_type: str,
        args: Mapping[str, Any],
        limits: ResourceLimits = p.DEFAULT_LIMITS,
    ) -> JobStatus:
        """Start a job under ``limits`` (a 0 field: the runner's default). The runner refuses
        a limit over its maximum (``InvalidArgument`` naming it) and IO limits it cannot apply
        (``FailedPrecondition``); the job's status carries the limits it got."""
        request = p.StartArgs(job_type, dict(args), limits)
        return _job(await self._unary(p.Op.START, user, role, request))

    async def stop(self, user: str, role: str, job_id: str) -> JobStatus:
        return _job(await self._unary(p.Op.STOP, user, role, p.JobRef(job_id)))

    async def status(self, user: str, role: str, job_id: str) -> JobStatus:
        return _job(await self._unary(p.Op.STATUS, user, role, p.JobRef(job_id)))

    async def types(self, user: str, role: str) -> list[Mapping[str, Any]]:
        reply = await self._unary(p.Op.TYPES, user, role, p.TypesArgs())
        if not isinstance(reply, p.TypesReply):
            raise Internal(f"unexpected reply {type(reply).__name__}")
        return list(reply.types)

    async def iter_jobs(
        self,
        user: str,
        role: str,
        owner: str | None = None,
        after: tuple[int, str] | None = None,
    ) -> AsyncGenerator[JobStatus, None]:
        """The jobs, oldest first by (created_ns, id), after ``after`` if given. Closing the
        iterator early (use ``contextlib.aclosing``) cancels the rest of the list."""
        stream = self._stream(p.Op.LIST, user, role, p.ListArgs(owner, after))
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, p.JobsItem):
                    for job in item.jobs:
                        yield job

    async def list_jobs(self, user: str, role: str, owner: str | None = None) -> list[JobStatus]:
        return [job async for job in self.iter_jobs(user, role, owner)]

    async def tail(
        self,
        user: str,
        role: str,
        job_id: str,
        *,
        follow: bool = True,
        offset: int | None = None,
        last: int | None = None,
    ) -> AsyncGenerator[list[OutputChunk], None]:
        """Batches of output chunks until the job has ended and all was sent."""
        args = p.TailArgs(job_id, follow, offset, last)
        stream = self._stream(p.Op.TAIL, user, role, args)
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, p.OutputItem):
                    yield list(item.chunks)


def _first_frame(data: bytearray) -> bytes | None:
    """The body of the first frame in ``data`` once it is complete, else None."""
    if len(data) < p.HEADER.size:
        return None
    (length,) = p.HEADER.unpack_from(data)
    if not 0 < length <= p.MAX_FRAME_SIZE:
        raise p.ProtocolError(f"first frame has a length of {length} bytes")
    if len(data) < p.HEADER.size + length:
        return None
    return bytes(data[p.HEADER.size : p.HEADER.size + length])


def _refusal(frame: Mapping[str, Any]) -> str | None:
    """The runner's reason when its first frame is an error instead of a hello, else None."""
    if frame.get("type") != "error":
        return None
    message = frame.get("message")
    if not isinstance(message, str) or not message:
        return "no reason given"
    return message[: p.MAX_MESSAGE]


def _drain(queue: asyncio.Queue[p.ServerMessage | Exception]) -> None:
    while not queue.empty():
        queue.get_nowait()


def _job(reply: p.ServerMessage) -> JobStatus:
    if not isinstance(reply, p.JobReply):
        raise Internal(f"unexpected reply {type(reply).__name__}")
    return reply.job
