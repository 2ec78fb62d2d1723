"""Probe jobs for the runner's tests, loaded through the ``job_modules`` config setting."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from shared.catalog import ArgKind, ArgSpec, JobSpec
from workernator_runner.jobs import Job, JobFailed, Network


def _spew(args: Mapping[str, Any]) -> None:
    """Write ``size`` bytes of numbered lines to stdout as fast as possible."""
    size: int = args["size"]
    line = b"0123456789" * 10 + b"\n"  # 101 bytes
    block = line * (1024 * 1024 // len(line))
    out = sys.stdout.buffer
    written = 0
    while written < size:
        piece = block[: size - written]
        out.write(piece)
        written += len(piece)
    out.flush()


def _bytes(args: Mapping[str, Any]) -> None:
    """Write exact bytes (hex-encoded in ``hex``) to stdout, and ``err_hex`` to stderr
    (``err_repeat`` times), then exit with status ``exit`` (a hostile job's last words)."""
    sys.stdout.buffer.write(bytes.fromhex(args["hex"]))
    sys.stdout.flush()
    if "err_hex" in args:
        data = bytes.fromhex(args["err_hex"])
        for _ in range(args.get("err_repeat", 1)):
            sys.stderr.buffer.write(data)
        sys.stderr.flush()
    if args.get("exit"):
        sys.exit(args["exit"])


def _stubborn(args: Mapping[str, Any]) -> None:
    """Ignore SIGTERM and sleep."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"pid {os.getpid()} ignoring SIGTERM", flush=True)
    time.sleep(3600)


def _forker(args: Mapping[str, Any]) -> None:
    """Fork ``children`` sleeping children (and grandchildren), print their pids, then sleep."""
    for _ in range(args["children"]):
        pid = os.fork()
        if pid == 0:
            grandchild = os.fork()
            if grandchild == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                time.sleep(3600)
                os._exit(0)
            print(f"child {grandchild}", flush=True)
            time.sleep(3600)
            os._exit(0)
        print(f"child {pid}", flush=True)
    time.sleep(args.get("seconds", 3600))


def _daemonize(args: Mapping[str, Any]) -> None:
    """Start a daemon the classic way (fork, setsid, fork; it ignores SIGTERM and sleeps),
    print its pid, then sleep ``seconds`` and exit, leaving it behind."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(w, f"daemon {os.getpid()}\n".encode())
            time.sleep(3600)
        os._exit(0)
    os.close(w)
    os.waitpid(middle, 0)  # gone: the daemon is an orphan now, its init's child
    print(os.read(r, 100).decode(), end="", flush=True)
    time.sleep(args["seconds"])


def _drip(args: Mapping[str, Any]) -> None:
    """Print ``count`` numbered lines, one every ``interval`` seconds, the last without newline."""
    for i in range(args["count"]):
        end = "" if i == args["count"] - 1 else "\n"
        print(f"line {i}", end=end, flush=True)
        time.sleep(args["interval"])


def _pieces(args: Mapping[str, Any]) -> None:
    """Print the ``|``-separated pieces of ``text`` one by one, ``interval`` seconds apart."""
    for piece in args["text"].split("|"):
        sys.stdout.write(piece)
        sys.stdout.flush()
        time.sleep(args["interval"])


def _fail(args: Mapping[str, Any]) -> None:
    if args.get("crash"):
        raise RuntimeError("boom")
    raise JobFailed("it went wrong")


JOBS: tuple[Job, ...] = (
    Job(
        JobSpec("spew", "Spew", "prints size bytes", (ArgSpec("size", ArgKind.INT, "bytes"),)),
        _spew,
        framed=False,
    ),
    Job(
        JobSpec(
            "bytes",
            "Bytes",
            "prints exact bytes",
            (
                ArgSpec("hex", ArgKind.STRING, "stdout bytes, hex"),
                ArgSpec("err_hex", ArgKind.STRING, "stderr bytes, hex", required=False),
                ArgSpec("err_repeat", ArgKind.INT, "times", required=False),
                ArgSpec("exit", ArgKind.INT, "exit status", required=False),
            ),
        ),
        _bytes,
        framed=False,
    ),
    Job(JobSpec("stubborn", "Stubborn", "ignores SIGTERM"), _stubborn, framed=False),
    Job(
        JobSpec(
            "forker",
            "Forker",
            "forks children",
            (
                ArgSpec("children", ArgKind.INT, "how many"),
                ArgSpec("seconds", ArgKind.FLOAT, "sleep", required=False),
            ),
        ),
        _forker,
        framed=False,
    ),
    Job(
        JobSpec(
            "daemonize",
            "Daemonize",
            "leaves a daemon behind",
            (ArgSpec("seconds", ArgKind.FLOAT, "sleep"),),
        ),
        _daemonize,
        framed=False,
    ),
    Job(
        JobSpec(
            "drip",
            "Drip",
            "prints lines slowly",
            (ArgSpec("count", ArgKind.INT, "lines"), ArgSpec("interval", ArgKind.FLOAT, "s")),
        ),
        _drip,
        framed=False,
    ),
    Job(
        JobSpec(
            "pieces",
            "Pieces",
            "prints pieces slowly",
            (ArgSpec("text", ArgKind.STRING, "pieces"), ArgSpec("interval", ArgKind.FLOAT, "s")),
        ),
        _pieces,
        framed=False,
    ),
    Job(
        JobSpec("fail", "Fail", "fails", (ArgSpec("crash", ArgKind.INT, "", required=False),)),
        _fail,
    ),
)


# --- sandbox probes: they report what a job can see and do, as one JSON line -----------------


def _try(action: Any) -> str:
    """'ok', or the errno name of the OSError the action raised."""
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def _status_fields() -> dict[str, str]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _write_probe(directory: str) -> str:
    path = os.path.join(directory, f".probe-{os.getpid()}")

    def write() -> None:
        with open(path, "w") as f:
            f.write("x")
        os.unlink(path)

    return _try(write)


def _inspect(args: Mapping[str, Any]) -> None:
    """What the job sees: processes, names, network, identity, files, descriptors."""
    status = _status_fields()
    open_fds = [fd for fd in range(256) if _try(lambda fd=fd: os.fstat(fd)) == "ok"]
    paths = json.loads(args.get("paths", "[]"))
    report = {
        "pid": os.getpid(),
        "proc_pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "hostname": socket.gethostname(),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "uid": os.getresuid(),
        "gid": os.getresgid(),
        "groups": os.getgroups(),
        "caps": {k: status[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "no_new_privs": status["NoNewPrivs"],
        "seccomp": status["Seccomp"],
        "root": sorted(os.listdir("/")),
        "exists": {p: os.path.lexists(p) for p in paths},
        "listed": {p: sorted(os.listdir(p)) if os.path.isdir(p) else None for p in paths},
        "writable": {
            d: _write_probe(d) for d in ("/", "/usr", "/etc", "/tmp", "/workspace", "/dev", "/proc")
        },
        "fds": open_fds,
        "env": dict(os.environ),
        "cwd": os.getcwd(),
    }
    print(json.dumps(report), flush=True)


def _syscalls(args: Mapping[str, Any]) -> None:
    """Calls a job never needs; each result is 'ok' or an errno name."""
    libc = ctypes.CDLL(None, use_errno=True)

    def call(result: int) -> None:
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    clone_newuser = 0x10000000
    report = {
        "unshare_user": _try(lambda: call(libc.unshare(clone_newuser))),
        "unshare_net": _try(lambda: call(libc.unshare(0x40000000))),
        "mount": _try(lambda: call(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))),
        "ptrace": _try(lambda: call(libc.ptrace(0, 0, None, None))),  # PTRACE_TRACEME
        "setuid0": _try(lambda: os.setuid(0)),
        "chroot": _try(lambda: os.chroot("/tmp")),
        "sethostname": _try(lambda: socket.sethostname("other")),
        "raw_socket": _try(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1).close()),
        "mknod": _try(lambda: os.mknod("/tmp/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))),
        "kill_init": _try(lambda: os.kill(1, signal.SIGKILL)),
    }
    print(json.dumps(report), flush=True)


def _run(args: Mapping[str, Any]) -> None:
    """Run a program (argv as JSON) and print its exit status and output."""
    result = subprocess.run(json.loads(args["argv"]), capture_output=True, check=False, timeout=30)
    out = {"code": result.returncode, "out": result.stdout.decode(errors="replace")}
    out["err"] = result.stderr.decode(errors="replace")
    print(json.dumps(out), flush=True)


def _memscan(args: Mapping[str, Any]) -> None:
    """Search this process's readable memory for ``prefix`` followed by 32 hex digits whose
    sha256 is ``digest``: finds a secret without ever holding it. Prints hits and bytes read."""
    prefix = args["prefix"].encode()
    digest = args["digest"]
    hits = 0
    scanned = 0
    candidates = 0
    with open("/proc/self/maps") as f:
        regions = f.read().splitlines()
    for line in regions:
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        name = fields[5] if len(fields) > 5 else ""
        if not fields[1].startswith("r") or name in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
            continue
        try:
            data = ctypes.string_at(start, end - start)
        except Exception:
            continue
        scanned += len(data)
        pos = data.find(prefix)
        while pos >= 0:
            candidate = data[pos + len(prefix) : pos + len(prefix) + 32]
            candidates += 1
            if hashlib.sha256(candidate).hexdigest() == digest:
                hits += 1
            pos = data.find(prefix, pos + 1)
        del data
    print(json.dumps({"hits": hits, "candidates": candidates, "scanned": scanned}), flush=True)


def _secret(args: Mapping[str, Any]) -> None:
    """Hold a secret (as an argument) while sleeping, so another job can look for it."""
    print("holding", flush=True)
    time.sleep(args["seconds"])


def _connect(args: Mapping[str, Any]) -> None:
    """Try TCP connections (JSON list of [host, port]) and name lookups (JSON list of names),
    each bounded by a short timeout; print what happened."""
    results: dict[str, str] = {}
    for host, port in json.loads(args.get("targets", "[]")):
        try:
            with socket.create_connection((host, port), timeout=args.get("timeout", 2.0)) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                results[f"{host}:{port}"] = "connected"
        except TimeoutError:
            results[f"{host}:{port}"] = "timeout"
        except OSError as exc:
            results[f"{host}:{port}"] = errno.errorcode.get(exc.errno or 0, str(exc))
    for name in json.loads(args.get("names", "[]")):
        try:
            results[name] = socket.gethostbyname(name)
        except OSError as exc:
            results[name] = f"error: {exc}"
    print(json.dumps(results), flush=True)


def _listen(args: Mapping[str, Any]) -> None:
    """Listen on a TCP port of every address, print it, then print each peer that connects,
    for ``seconds``."""
    with socket.socket() as server:
        server.bind(("0.0.0.0", 0))
        server.listen(8)
        server.settimeout(0.2)
        print(json.dumps({"port": server.getsockname()[1]}), flush=True)
        deadline = time.monotonic() + args["seconds"]
        while time.monotonic() < deadline:
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            conn.close()
            print(json.dumps({"peer": peer[0]}), flush=True)


def _spin(args: Mapping[str, Any]) -> None:
    """Spin until this process has used ``cpu_seconds`` of CPU; print the wall time it took
    (throttling stretches it; a busy host only ever makes it longer)."""
    start = time.monotonic()
    while time.process_time() < args["cpu_seconds"]:
        pass
    print(json.dumps({"wall": time.monotonic() - start}), flush=True)


def _hog(args: Mapping[str, Any]) -> None:
    """Allocate and touch ``megabytes`` MiB, a MiB at a time, printing progress."""
    held = []
    for i in range(args["megabytes"]):
        held.append(bytearray(1 << 20))  # zeroed: every page is written
        if i % 16 == 15:
            print(f"{i + 1} MiB", flush=True)
    print("allocated all", flush=True)


def _forkbomb(args: Mapping[str, Any]) -> None:
    """Fork sleeping children until fork fails; print how many, then sleep ``seconds``."""
    children = 0
    error = ""
    while children < args["most"]:
        try:
            pid = os.fork()
        except OSError as exc:
            error = errno.errorcode.get(exc.errno or 0, str(exc))
            break
        if pid == 0:
            time.sleep(3600)
            os._exit(0)
        children += 1
    print(json.dumps({"children": children, "error": error}), flush=True)
    time.sleep(args["seconds"])


def _write(args: Mapping[str, Any]) -> None:
    """Write ``megabytes`` MiB to /workspace (O_DIRECT, or buffered then fsync); print the
    seconds it took."""
    block = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT needs
    block.write(b"x" * (1 << 20))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if args["direct"] else 0)
    t0 = time.monotonic()
    fd = os.open("/workspace/data", flags, 0o600)
    try:
        for _ in range(args["megabytes"]):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    print(json.dumps({"seconds": time.monotonic() - t0}), flush=True)


_TEXT = ArgKind.STRING
_CONNECT_ARGS = (
    ArgSpec("targets", _TEXT, "", required=False),
    ArgSpec("names", _TEXT, "", required=False),
    ArgSpec("timeout", ArgKind.FLOAT, "", required=False),
)
JOBS += (
    Job(JobSpec("spin", "Spin", "uses CPU", (ArgSpec("cpu_seconds", ArgKind.FLOAT, ""),)), _spin),
    Job(JobSpec("hog", "Hog", "allocates", (ArgSpec("megabytes", ArgKind.INT, ""),)), _hog),
    Job(
        JobSpec(
            "forkbomb",
            "Fork bomb",
            "forks until it cannot",
            (ArgSpec("most", ArgKind.INT, ""), ArgSpec("seconds", ArgKind.FLOAT, "")),
        ),
        _forkbomb,
        framed=False,
    ),
    Job(
        JobSpec(
            "write",
            "Write",
            "writes to /workspace",
            (ArgSpec("megabytes", ArgKind.INT, ""), ArgSpec("direct", ArgKind.INT, "")),
        ),
        _write,
        framed=False,
    ),
    Job(
        JobSpec(
            "inspect",
            "Inspect",
            "reports the sandbox",
            (ArgSpec("paths", _TEXT, "", required=False),),
        ),
        _inspect,
        framed=False,
    ),
    Job(
        JobSpec("egress-inspect", "Inspect", "reports the sandbox", (ArgSpec("paths", _TEXT, ""),)),
        _inspect,
        framed=False,
        network=Network.EGRESS,
    ),
    Job(JobSpec("syscalls", "Syscalls", "tries forbidden calls"), _syscalls, framed=False),
    Job(
        JobSpec("run", "Run", "runs a program", (ArgSpec("argv", _TEXT, "json"),)),
        _run,
        framed=False,
    ),
    Job(
        JobSpec(
            "memscan",
            "Memscan",
            "looks for a secret in its own memory (holding it too, as a control)",
            (
                ArgSpec("prefix", _TEXT, ""),
                ArgSpec("digest", _TEXT, ""),
                ArgSpec("secret", _TEXT, "", required=False),
            ),
        ),
        _memscan,
        framed=False,
    ),
    Job(
        JobSpec(
            "secret",
            "Secret",
            "holds a secret",
            (ArgSpec("secret", _TEXT, ""), ArgSpec("seconds", ArgKind.FLOAT, "")),
        ),
        _secret,
        framed=False,
    ),
    Job(
        JobSpec(
            "connect",
            "Connect",
            "tries connections (no network)",
            _CONNECT_ARGS,
        ),
        _connect,
        framed=False,
    ),
    Job(
        JobSpec(
            "egress-listen",
            "Listen",
            "accepts connections",
            (ArgSpec("seconds", ArgKind.FLOAT, ""),),
        ),
        _listen,
        framed=False,
        network=Network.EGRESS,
    ),
    Job(
        JobSpec(
            "egress-connect",
            "Egress connect",
            "tries connections (egress)",
            _CONNECT_ARGS,
        ),
        _connect,
        framed=False,
        network=Network.EGRESS,
    ),
)
