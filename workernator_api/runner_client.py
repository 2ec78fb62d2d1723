"""The api's client for the runner's Unix socket (design section 4).

One connection carries many concurrent requests: each gets an id, and replies are routed back
to the waiting caller by that id. Streams (``list``, ``tail``) are async iterators; leaving
one early sends ``cancel`` so the runner stops reading for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from shared import protocol as p
from shared.errors import Internal, WorkernatorError, error_from_code
from shared.model import JobStatus, OutputChunk

QUEUE_DEPTH = 8  # replies buffered per request before the connection stops being read


class RunnerUnavailable(WorkernatorError):
    """The runner socket cannot be reached or the connection broke."""


class RunnerClient:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._conn = p.Connection(p.Role.CLIENT)
        self._ids = itertools.count(1)
        self._queues: dict[int, asyncio.Queue[p.ServerMessage | Exception]] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.server_hello: p.Hello | None = None

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(self.path)
        except OSError as exc:
            raise RunnerUnavailable(f"cannot reach the runner at {self.path}: {exc}") from None
        self._writer.write(self._conn.send(p.Hello(software="workernator-api")))
        hello = await self._read_message()
        if isinstance(hello, p.ErrorReply):
            raise RunnerUnavailable(f"the runner refused the connection: {hello.message}")
        if not isinstance(hello, p.Hello):
            raise RunnerUnavailable("the runner did not say hello")
        self.server_hello = hello
        self._reader_task = asyncio.create_task(self._read_loop())

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
        error: Exception
        try:
            while True:
                message = await self._read_message()
                rid = getattr(message, "id", None)
                if rid is None:  # an error about the connection itself
                    text = getattr(message, "message", "unexpected message")
                    raise RunnerUnavailable(f"the runner closed the connection: {text}")
                queue = self._queues.get(rid)
                if queue is not None:
                    # A bounded queue: a slow consumer stops this reader, the kernel's socket
                    # buffers fill, and the runner stops reading that job's output for us.
                    await queue.put(message)  # type: ignore[arg-type]
        except (p.ProtocolError, OSError, RunnerUnavailable) as exc:
            error = exc if isinstance(exc, RunnerUnavailable) else RunnerUnavailable(str(exc))
        for queue in self._queues.values():
            _drain(queue)
            queue.put_nowait(error)

    async def _request(self, op: p.Op, user: str, role: str, args: p.OpArgs) -> tuple[int, Any]:
        if not self.connected:
            raise RunnerUnavailable("not connected to the runner")
        assert self._writer is not None
        rid = next(self._ids)
        queue: asyncio.Queue[p.ServerMessage | Exception] = asyncio.Queue(QUEUE_DEPTH)
        self._queues[rid] = queue
        self._writer.write(self._conn.send(p.Request(rid, op, p.Caller(user, role), args)))
        await self._writer.drain()
        return rid, queue

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
    ) -> AsyncIterator[p.ServerMessage]:
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
                with contextlib.suppress(ConnectionError):
                    self._writer.write(self._conn.send(p.Cancel(rid)))

    # --- operations ---------------------------------------------------------------------------

    async def start(
        self, user: str, role: str, job_type: str, args: Mapping[str, Any]
    ) -> JobStatus:
        reply = await self._unary(p.Op.START, user, role, p.StartArgs(job_type, dict(args)))
        return _job(reply)

    async def stop(self, user: str, role: str, job_id: str) -> JobStatus:
        return _job(await self._unary(p.Op.STOP, user, role, p.JobRef(job_id)))

    async def status(self, user: str, role: str, job_id: str) -> JobStatus:
        return _job(await self._unary(p.Op.STATUS, user, role, p.JobRef(job_id)))

    async def types(self, user: str, role: str) -> list[Mapping[str, Any]]:
        reply = await self._unary(p.Op.TYPES, user, role, p.TypesArgs())
        if not isinstance(reply, p.TypesReply):
            raise Internal(f"unexpected reply {type(reply).__name__}")
        return list(reply.types)

    async def list_jobs(self, user: str, role: str, owner: str | None = None) -> list[JobStatus]:
        jobs: list[JobStatus] = []
        async for item in self._stream(p.Op.LIST, user, role, p.ListArgs(owner)):
            if isinstance(item, p.JobsItem):
                jobs.extend(item.jobs)
        return jobs

    async def tail(
        self,
        user: str,
        role: str,
        job_id: str,
        *,
        follow: bool = True,
        offset: int | None = None,
        last: int | None = None,
    ) -> AsyncIterator[list[OutputChunk]]:
        """Batches of output chunks until the job has ended and all was sent."""
        args = p.TailArgs(job_id, follow, offset, last)
        async for item in self._stream(p.Op.TAIL, user, role, args):
            if isinstance(item, p.OutputItem):
                yield list(item.chunks)


def _drain(queue: asyncio.Queue[p.ServerMessage | Exception]) -> None:
    while not queue.empty():
        queue.get_nowait()


def _job(reply: p.ServerMessage) -> JobStatus:
    if not isinstance(reply, p.JobReply):
        raise Internal(f"unexpected reply {type(reply).__name__}")
    return reply.job
