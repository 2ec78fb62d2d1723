"""Tell systemd how a ``Type=notify`` service is doing (``sd_notify(3)``), without a dependency.

systemd gives the service ``NOTIFY_SOCKET``: the path of an ``AF_UNIX`` datagram socket, or an
abstract socket name written with a leading ``@``. Each message is one datagram of
``KEY=VALUE`` lines: ``READY=1`` once the service serves, ``STOPPING=1`` when it begins to stop,
``STATUS=...`` for ``systemctl status``. Without ``NOTIFY_SOCKET`` (run by hand, in tests)
nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping


class Notifier:
    """The service manager's notification socket, taken out of the environment once so that
    the processes this one starts (the runner's launcher, monitors and jobs) never see it."""

    def __init__(self, address: str) -> None:
        self.address = address  # "" when there is no service manager to tell

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", ""))

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: object) -> None:
        """Send ``KEY=value`` lines (``notify(READY=1, STATUS="listening")``); a no-op without
        a socket. Raises OSError when the socket is there but the message cannot be sent:
        systemd would otherwise wait for it until its timeout."""
        if not self.address:
            return
        message = "".join(f"{key}={value}\n" for key, value in fields.items())
        target = self.address
        if target.startswith("@"):  # an abstract socket: a NUL byte where the '@' is
            target = "\0" + target[1:]
        elif not target.startswith("/"):
            raise OSError(f"NOTIFY_SOCKET={self.address!r} is not a socket path or @name")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(message.encode())
