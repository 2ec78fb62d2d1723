"""Start a job at the runner's socket and print how it ended, as JSON (in the system test's VM).

Usage: ``/opt/workernator/bin/python guest_start.py TYPE ARGS_JSON MEMORY_BYTES``, as root
(the runner lets uid 0 in). It speaks the runner's own protocol (``shared.protocol``).
"""

from __future__ import annotations

import json
import socket
import sys
import time

from shared import protocol as p
from shared.model import ResourceLimits

SOCKET = "/run/workernator/runner.sock"
CALLER = p.Caller("system-test", "admin")


def call(op: p.Op, args: p.OpArgs) -> p.Message:
    """One request on a connection of its own; the runner's first answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(SOCKET)
        conn = p.Connection(p.Role.CLIENT)
        s.sendall(conn.send(p.Hello(software="system-test")))
        s.sendall(conn.send(p.Request(1, op, CALLER, args)))
        while True:
            message = conn.next_message()
            if message is None:
                data = s.recv(65536)
                if not data:
                    raise SystemExit("the runner closed the connection")
                conn.receive_data(data)
            elif not isinstance(message, p.Hello):
                return message


def main() -> None:
    job_type, args, memory = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    reply = call(p.Op.START, p.StartArgs(job_type, args, ResourceLimits(memory_bytes=memory)))
    if not isinstance(reply, p.JobReply):
        raise SystemExit(f"start refused: {reply}")
    deadline = time.monotonic() + 240
    while not reply.job.state.finished and time.monotonic() < deadline:
        time.sleep(0.3)
        reply = call(p.Op.STATUS, p.JobRef(reply.job.id))
        assert isinstance(reply, p.JobReply), reply
    job = reply.job
    print(
        json.dumps(
            {
                "state": job.state.value,
                "oom_killed": job.oom_killed,
                "error": job.error,
                "peak_memory_bytes": job.usage.peak_memory_bytes,
            }
        )
    )


if __name__ == "__main__":
    main()
