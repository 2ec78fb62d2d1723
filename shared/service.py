"""What both daemons do alike: read the TOML config, set up logging, serve until signalled,
and tell systemd (``Type=notify``) when they are ready and when they stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from shared import log
from shared.sdnotify import Notifier


class Configured(Protocol):
    @property
    def log_level(self) -> str: ...


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ServiceFailed(Exception):
    """The service can no longer serve (the message says why): it stopped, exit status 1."""


C = TypeVar("C", bound=Configured)


def main(
    *,
    prog: str,
    description: str,
    default_path: Path,
    load: Callable[[Path], C],
    default: Callable[[], C],
    service: Callable[[C], Service],
    errors: tuple[type[Exception], ...],
    argv: list[str] | None = None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
    command: Callable[[argparse.Namespace, C], int | None] | None = None,
) -> int:
    """Run ``service`` until SIGTERM or SIGINT; ``errors`` become one line and exit status 1.

    ``options`` may add command-line options; ``command`` then runs first, with the parsed
    options and the config: an exit status it returns is the program's, and None serves."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML config file (default: {default_path} if it exists)",
    )
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    reported: tuple[type[Exception], ...] = (*errors, OSError, ServiceFailed)
    notifier = Notifier.from_environ()
    try:
        if args.config is not None:
            cfg = load(args.config)
        elif default_path.exists():
            cfg = load(default_path)
        else:
            cfg = default()
        log.setup(cfg.log_level)
        if command is not None:
            status = command(args, cfg)
            if status is not None:
                return status
        asyncio.run(_serve(service, cfg, notifier))
    except reported as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(make: Callable[[C], Service], cfg: C, notifier: Notifier | None = None) -> None:
    """Serve until signalled; a service with a ``failed`` future (a reason, once it can no
    longer serve) also stops when that resolves, and the process exits 1. ``notifier`` hears
    READY=1 once it serves and STOPPING=1 when it stops (none: nobody to tell)."""
    notifier = notifier or Notifier("")
    # Signals first: one that comes while the service starts (its socket may already be there
    # for clients to see) stops it once started, cleanly, instead of killing the process.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = make(cfg)  # inside the event loop: a service may bind loop objects as it is built
    await service.start()
    failed: asyncio.Future[str] | None = getattr(service, "failed", None)
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
    if failed is not None:
        waiters.append(failed)
    try:
        notifier.notify(READY=1, STATUS="serving")  # clients can connect from now on
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiters[0].cancel()
        with contextlib.suppress(OSError):  # the manager is gone: stop all the same
            notifier.notify(STOPPING=1, STATUS="stopping")
        await service.stop()
    if failed is not None and failed.done():
        raise ServiceFailed(failed.result())
