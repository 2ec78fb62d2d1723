"""The command channel's guest side: runs in the test VM as root (copied into the image).

It reads one JSON request per line from the virtio serial port ``/dev/virtio-ports/wn`` --
``{"id": 7, "cmd": "systemctl is-active x", "timeout": 60}`` -- runs the command with bash, and
writes one JSON line back: ``{"id": 7, "rc": 0, "out": "active\\n"}`` (stdout and stderr
together). Each command runs in a thread of its own, so a slow one does not hold up the rest;
the id pairs a reply with its request. A command that times out answers rc 124.

Standard library only: it runs on the guest's /usr/bin/python3, before anything is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

PORT = "/dev/virtio-ports/wn"


def serve(fd: int) -> None:
    lock = threading.Lock()

    def reply(message: dict[str, object]) -> None:
        data = json.dumps(message).encode() + b"\n"
        with lock:
            while data:  # the write blocks while no host is connected: that is fine
                data = data[os.write(fd, data) :]

    def run(request: dict[str, object]) -> None:
        try:
            done = subprocess.run(
                ["/bin/bash", "-c", str(request["cmd"])],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=float(str(request.get("timeout", 300))),
                check=False,
            )
            rc, out = done.returncode, done.stdout
        except subprocess.TimeoutExpired as exc:
            rc, out = 124, (exc.stdout or b"") + b"\n[agent] command timed out\n"
        reply({"id": request["id"], "rc": rc, "out": out.decode(errors="replace")})

    buffer = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:  # no host connected right now: try again shortly
            time.sleep(0.1)
            continue
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                request = json.loads(line)
                threading.Thread(target=run, args=(request,), daemon=True).start()


def main() -> None:
    serve(os.open(PORT, os.O_RDWR))


if __name__ == "__main__":
    main()
