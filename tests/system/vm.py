"""A qemu VM of the system test: boot, command channel, port forward, reboot, power-off.

qemu runs with software emulation (no KVM here) and boots the image's own kernel. The guest
writes go to a qcow2 overlay on the cached base; a second, read-only disk carries what a run
hands in (wheels, ``deploy/``, certificates). One Unix socket connection to the guest's agent
lasts the VM's whole life: replies carry the request's id, so a late one is never mistaken for
the answer to another command. :meth:`VM.close` kills qemu by its PID and removes every file of
the run, whatever happened before.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.system.image import AGENT_PORT, GUEST_ADDRESS, BaseImage

MEMORY_MB = 2048
CPUS = 2
BOOT_SECONDS = 180.0  # to the agent's first answer (about 20 s, more on a busy host)


class GuestError(AssertionError):
    """A command in the guest failed (or never answered); the message says which and why."""


@dataclass
class Result:
    rc: int
    out: str


def _short_tmpdir() -> Path:
    """In /tmp: the channel's Unix socket path must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="wn-vm-", dir="/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_disk(source: Path, image: Path) -> None:
    """An ext4 image holding ``source``'s files, sized to fit them."""
    used = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    size_mb = used * 2 // (1 << 20) + 64
    subprocess.run(
        ["mkfs.ext4", "-q", "-L", "wn-payload", "-d", str(source), "-F", str(image), f"{size_mb}M"],
        check=True,
        capture_output=True,
        env=dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"),
    )


@dataclass
class VM:
    """One VM: ``start()``, then :meth:`run` commands in it; ``close()`` always."""

    base: BaseImage
    payload: Path | None = None  # an ext4 image, /dev/vdb in the guest
    forwards: dict[int, int] = field(default_factory=dict)  # host port on 127.0.0.1 -> guest port
    workdir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="wn-vm-", dir="/tmp"))
    )
    process: subprocess.Popen[bytes] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _channel: socket.socket | None = None
    _buffer: bytes = b""
    _replies: dict[int, Result] = field(default_factory=dict)
    _next_id: int = 1

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    def start(self) -> None:
        """Boot, and return once the guest's agent answers."""
        began = time.monotonic()
        overlay = self.workdir / "overlay.qcow2"
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(self.base.disk),
                str(overlay),
            ],
            check=True,
            capture_output=True,
        )
        channel = self.workdir / "channel.sock"
        hostfwd = "".join(
            f",hostfwd=tcp:127.0.0.1:{h}-{GUEST_ADDRESS}:{g}" for h, g in self.forwards.items()
        )
        argv = [
            "qemu-system-x86_64",
            "-accel", "tcg,thread=multi",
            "-m", str(MEMORY_MB),
            "-smp", str(CPUS),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", f"file:{self.console}",
            "-kernel", str(self.base.kernel),
            "-initrd", str(self.base.initrd),
            "-append", "root=/dev/vda rw console=ttyS0 systemd.show_status=1",
            "-drive", f"file={overlay},format=qcow2,if=virtio",
            "-nic", f"user,model=virtio-net-pci,restrict=on{hostfwd}",
            "-device", "virtio-rng-pci",
            "-device", "virtio-serial",
            "-chardev", f"socket,id=wn,path={channel},server=on,wait=off",
            "-device", f"virtserialport,chardev=wn,name={AGENT_PORT}",
        ]  # fmt: skip
        if self.payload is not None:
            argv += ["-drive", f"file={self.payload},format=raw,if=virtio,readonly=on"]
        with (self.workdir / "qemu.log").open("wb") as log:
            self.process = subprocess.Popen(
                # SIGKILL to qemu when the test process dies, however it dies (a killed pytest
                # runs no cleanup); setpriv execs qemu, so the PID stays qemu's.
                ["setpriv", "--pdeathsig", "KILL", "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 10
        while not channel.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise GuestError("qemu did not create its channel socket")
            time.sleep(0.02)
        self._channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._channel.connect(str(channel))
        self.run("true", timeout=BOOT_SECONDS)
        self.timings["boot"] = time.monotonic() - began

    def _check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            qemu_log = (self.workdir / "qemu.log").read_text(errors="replace")
            raise GuestError(f"qemu is not running: {qemu_log[-2000:]}\n{self.console_tail()}")

    def send(self, command: str, timeout: float) -> int:
        """Send ``command`` to the agent; its request id."""
        assert self._channel is not None, "the VM is not started"
        request_id = self._next_id
        self._next_id += 1
        line = json.dumps({"id": request_id, "cmd": command, "timeout": timeout}) + "\n"
        self._channel.sendall(line.encode())
        return request_id

    def wait_reply(self, request_id: int, timeout: float) -> Result | None:
        """The reply to ``request_id``, or None when none came within ``timeout`` seconds."""
        assert self._channel is not None
        deadline = time.monotonic() + timeout
        while request_id not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._channel.settimeout(min(left, 1.0))
            try:
                chunk = self._channel.recv(65536)
            except TimeoutError:
                self._check_alive()
                continue
            if not chunk:
                self._check_alive()
                raise GuestError("the command channel closed")
            self._buffer += chunk
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                reply = json.loads(line)
                self._replies[reply["id"]] = Result(reply["rc"], reply["out"])
        return self._replies.pop(request_id)

    def run(self, command: str, timeout: float = 120.0, check: bool = True) -> Result:
        """Run ``command`` (bash) as root in the guest; its exit status and output."""
        request_id = self.send(command, timeout)
        result = self.wait_reply(request_id, timeout + 10)
        if result is None:
            raise GuestError(f"no answer within {timeout:g} s to: {command}\n{self.console_tail()}")
        if check and result.rc != 0:
            raise GuestError(f"exit status {result.rc} from: {command}\n{result.out}")
        return result

    def boot_id(self) -> str:
        return self.run("cat /proc/sys/kernel/random/boot_id").out.strip()

    def reboot(self) -> None:
        """Reboot the guest; return once the new boot's agent answers."""
        before = self.boot_id()
        began = time.monotonic()
        self.run(_LATER + "systemctl reboot")
        deadline = began + BOOT_SECONDS
        while time.monotonic() < deadline:
            # Requests in flight while the guest goes down may be lost: ask again until the
            # answer comes from a new boot.
            request_id = self.send("cat /proc/sys/kernel/random/boot_id", 10)
            reply = self.wait_reply(request_id, 10)
            if reply is not None and reply.rc == 0 and reply.out.strip() != before:
                self.timings["reboot"] = time.monotonic() - began
                return
            if reply is not None:
                time.sleep(0.5)
        raise GuestError(f"the guest did not come back from a reboot\n{self.console_tail()}")

    def poweroff(self, timeout: float = 60.0) -> None:
        """A clean power-off: systemd stops everything, then qemu exits."""
        assert self.process is not None
        began = time.monotonic()
        self.run(_LATER + "systemctl poweroff")
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"the guest did not power off\n{self.console_tail()}") from None
        self.timings["poweroff"] = time.monotonic() - began

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        return "--- VM console (last lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Kill qemu (by PID) if it still runs; remove the overlay, sockets and logs."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.process is not None:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


# Run a command a second from now, so the agent answers before systemd stops it.
_LATER = "systemd-run --quiet --on-active=1 --timer-property=AccuracySec=100ms "
