"""Time to a job's first output line: Workernator against sandbox peers, side by side.

    .venv/bin/python bench/sandbox_bench.py [--rounds 100] [--only NAME,NAME] [--json PATH]

A benchmark, not a test: run it as root on an otherwise idle machine. Every contender is
measured from "start" until its first output line is received:

- ``workernator(none)``: ``JobManager.start("fib", {"position": 1})`` in this process, until the
  first chunk of ``read_output`` holding a newline (network mode none);
- ``workernator(egress)``: the same with a ``wait`` job (network mode egress); it prints its
  first line before using the network and is stopped right after it, outside the timed part;
- ``bwrap``: ``bwrap --unshare-all --die-with-parent --ro-bind / / --proc /proc --dev /dev``;
- ``runc``: ``runc run`` of a bundle whose rootfs is a read-only bind of ``/``, read-only,
  no terminal; ``runc delete -f`` after each run, outside the timed part;
- baselines ``python`` (plain) and ``unshare`` (``--fork --pid --net --uts --ipc --mount-proc``).

Each peer runs ``/usr/bin/python3 -c 'print(1)'`` (``python3`` on PATH is a slow pyenv shim) and
is timed from just before ``Popen`` to the first line read from its stdout pipe; it is waited
for outside the timed part. Rounds are interleaved (one sample of each contender per round, the
order rotating from round to round) so machine noise hits all alike; a warm-up round comes
first and is not counted. A contender whose binary is missing, or that fails in the warm-up
(e.g. a runner that refuses egress), is skipped with the reason printed.

Prints p50, p90 and min per contender, the ratios to ``workernator(none)`` and whether the
targets are met. ``--json`` writes the raw samples (ms). Everything created (the runner's state
directory, runc containers, the runc bundle and its bind mount) is removed at exit, Ctrl-C
included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import remove_egress_network, runner_config

from shared.model import JobState
from workernator_runner.jobs import load_registry
from workernator_runner.manager import JobManager

PYTHON = "/usr/bin/python3"
PRINT_ONE = [PYTHON, "-c", "print(1)"]
DEFAULT_ROUNDS = 100
FIRST_LINE_TIMEOUT_SECONDS = 30.0
# It prints its first line, then waits: it is stopped long before it would send anything.
EGRESS_ARGS: Mapping[str, Any] = {"seconds": 3600, "url": "http://192.0.2.1/"}
BENCH_BRIDGE = "wnbench"  # the bench's own egress bridge, removed at the end
BENCH_SUBNET = ipaddress.IPv4Network("10.254.254.0/24")

NONE = "workernator(none)"
EGRESS = "workernator(egress)"

# Issue 10's targets for workernator(none): p50 at most this many ms, and at least this many
# times faster (p50 against p50) than each peer.
TARGET_P50_MS = 3.0
TARGET_SPEEDUPS = {"bwrap": 4.0, "runc": 12.0}


class Skip(Exception):
    """A contender cannot be measured here; the message says why."""


# --- contenders -------------------------------------------------------------------------------


class Contender:
    """One thing to time. ``sample`` returns seconds from start to the first output line."""

    name: str

    async def prepare(self, stack: contextlib.AsyncExitStack) -> None:
        """Check and set up; raise :class:`Skip` if this contender cannot run here."""

    async def sample(self) -> float:
        raise NotImplementedError


class Workernator(Contender):
    def __init__(self, name: str, job_type: str, args: Mapping[str, Any], *, stop: bool) -> None:
        self.name = name
        self.job_type = job_type
        self.args = args
        self.stop = stop  # stop after the first line (instead of letting the job end)
        self.manager: JobManager | None = None
        self.pending: set[str] = set()  # started and not known to have ended

    async def prepare(self, stack: contextlib.AsyncExitStack) -> None:
        self.manager = await shared_manager(stack)
        stack.push_async_callback(self.stop_pending)

    async def stop_pending(self) -> None:
        assert self.manager is not None
        for job_id in list(self.pending):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.manager.stop(job_id), 15)
            self.pending.discard(job_id)

    async def sample(self) -> float:
        m = self.manager
        assert m is not None
        t0 = time.perf_counter()
        try:
            job = await m.start(self.job_type, self.args, "bench")
        except Exception as exc:
            raise Skip(f"the runner refused to start it: {type(exc).__name__}: {exc}") from None
        self.pending.add(job.id)
        first = b""
        async with (
            asyncio.timeout(FIRST_LINE_TIMEOUT_SECONDS),
            contextlib.aclosing(m.read_output(job.id)) as chunks,
        ):
            async for chunk in chunks:
                if b"\n" in chunk.data:
                    first = chunk.data
                    break
        elapsed = time.perf_counter() - t0
        if not first:
            raise Skip(f"the job printed no line: {describe(m, job.id)}")
        if self.stop:
            await m.stop(job.id)
        else:
            async with contextlib.aclosing(m.read_output(job.id)) as chunks:
                async for _ in chunks:  # to the end, so the job has ended
                    pass
        self.pending.discard(job.id)
        return elapsed

    async def check(self) -> None:
        """Run one job fully (or to its first job line) and skip if the runner refused it."""
        m = self.manager
        assert m is not None
        try:
            job = await m.start(self.job_type, self.args, "bench")
        except Exception as exc:
            raise Skip(f"the runner refused to start it: {type(exc).__name__}: {exc}") from None
        self.pending.add(job.id)
        tag = b"[" + self.job_type.upper().encode() + b"]"  # the job's own first line
        seen = b""
        async with (
            asyncio.timeout(FIRST_LINE_TIMEOUT_SECONDS),
            contextlib.aclosing(m.read_output(job.id)) as chunks,
        ):
            async for chunk in chunks:
                seen += chunk.data
                if self.stop and tag in seen:
                    break
        if self.stop:
            await m.stop(job.id)
        self.pending.discard(job.id)
        status = m.status(job.id)
        if tag not in seen or (not self.stop and status.state is not JobState.COMPLETED):
            raise Skip(f"the job did not run: {describe(m, job.id)}; output: {seen[-400:]!r}")


_MANAGER: JobManager | None = None


async def shared_manager(stack: contextlib.AsyncExitStack) -> JobManager:
    """One JobManager for both Workernator contenders, on a temporary state directory."""
    global _MANAGER  # noqa: PLW0603 - one per run, closed by the exit stack
    if _MANAGER is None:
        state_dir = Path(tempfile.mkdtemp(prefix="wn-bench-state-"))
        stack.callback(remove_unless_mounted, state_dir)
        # Removed after the manager closed and its jobs ended.
        stack.callback(remove_egress_network, BENCH_BRIDGE)
        manager = JobManager(runner_config(state_dir, BENCH_BRIDGE, BENCH_SUBNET), load_registry())
        _MANAGER = await stack.enter_async_context(manager)
    return _MANAGER


def describe(m: JobManager, job_id: str) -> str:
    s = m.status(job_id)
    text = f"state {s.state.value}, exit code {s.exit_code}, signal {s.signal}"
    return f"{text}, error {s.error!r}" if s.error else text


class Peer(Contender):
    """A command printing one line: Popen with a stdout pipe, timed to the first line."""

    def __init__(self, name: str, binary: str, argv: Callable[[], list[str]]) -> None:
        self.name = name
        self.binary = binary
        self.argv = argv
        self.after: Callable[[], None] = lambda: None

    async def prepare(self, stack: contextlib.AsyncExitStack) -> None:
        self.setup(stack)

    def setup(self, stack: contextlib.AsyncExitStack) -> None:
        found = shutil.which(self.binary) or shutil.which(self.binary, path="/usr/sbin:/sbin")
        if found is None:
            raise Skip(f"{self.binary} is not installed")
        if not Path(PYTHON).exists():
            raise Skip(f"{PYTHON} is missing")
        self.binary = found

    async def sample(self) -> float:
        # Blocking on purpose: nothing else runs meanwhile, and no thread hop adds to the time.
        return self.run_once()

    def run_once(self) -> float:
        argv = self.argv()
        try:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            elapsed = time.perf_counter() - t0
            rest = proc.stdout.read()
            proc.stdout.close()
            code = proc.wait(FIRST_LINE_TIMEOUT_SECONDS)
        finally:
            self.after()
        if line != b"1\n" or code != 0:
            raise Skip(f"{' '.join(argv)}: first line {line!r}, rest {rest[-200:]!r}, exit {code}")
        return elapsed


def python_peer() -> Peer:
    return Peer("python", PYTHON, lambda: PRINT_ONE)


def unshare_peer() -> Peer:
    peer = Peer("unshare", "unshare", lambda: [])
    flags = ["--fork", "--pid", "--net", "--uts", "--ipc", "--mount-proc"]
    peer.argv = lambda: [peer.binary, *flags, *PRINT_ONE]
    return peer


def bwrap_peer() -> Peer:
    peer = Peer("bwrap", "bwrap", lambda: [])
    flags = ["--unshare-all", "--die-with-parent", "--ro-bind", "/", "/"]
    flags += ["--proc", "/proc", "--dev", "/dev"]
    peer.argv = lambda: [peer.binary, *flags, *PRINT_ONE]
    return peer


class Runc(Peer):
    """``runc run`` of a bundle with a read-only bind of ``/`` as its rootfs.

    The runc state lives in the bundle directory (``runc --root``), so every container this
    creates is found and deleted at exit. ``root.path = "/"`` does not work with runc 1.1.5 on
    hybrid cgroups (mounting cgroup v1 at /sys/fs/cgroup fails), a bind of ``/`` does.
    """

    def __init__(self) -> None:
        super().__init__("runc", "runc", self.next_argv)
        self.after = self.delete_last
        self.bundle = Path()
        self.count = 0
        self.last = ""

    def runc(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.bundle / "state"), *args]

    def next_argv(self) -> list[str]:
        self.count += 1
        self.last = f"wn-bench-{os.getpid()}-{self.count}"
        return self.runc("run", "--bundle", str(self.bundle), self.last)

    def delete_last(self) -> None:
        # A foreground ``runc run`` already removes its container when it ends; this is for
        # one interrupted halfway.
        subprocess.run(self.runc("delete", "-f", self.last), capture_output=True, check=False)

    def setup(self, stack: contextlib.AsyncExitStack) -> None:
        super().setup(stack)
        if os.geteuid() != 0:
            raise Skip("runc needs root here")
        # Not a TemporaryDirectory: its cleanup would walk into the bind of / if the unmount
        # failed. The bundle is taken apart file by file, and the rootfs only by rmdir.
        self.bundle = Path(tempfile.mkdtemp(prefix="wn-bench-runc-"))
        stack.callback(self.cleanup)
        self.rootfs.mkdir()
        for argv in (
            ["mount", "--bind", "/", str(self.rootfs)],
            ["mount", "-o", "remount,bind,ro", str(self.rootfs)],
            self.runc("spec", "--bundle", str(self.bundle)),
        ):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise Skip(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        path = self.bundle / "config.json"
        spec = json.loads(path.read_text())
        spec["root"] = {"path": str(self.rootfs), "readonly": True}
        spec["process"]["terminal"] = False
        spec["process"].pop("consoleSize", None)
        spec["process"]["args"] = PRINT_ONE
        path.write_text(json.dumps(spec, indent=2))

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    def cleanup(self) -> None:
        """Delete every container left in our runc state, unmount the bind of /, remove the
        bundle. Never recursive into the rootfs: it may still be a view of the whole disk."""
        if (self.bundle / "state").is_dir():
            listed = subprocess.run(
                self.runc("list", "-q"), capture_output=True, text=True, check=False
            )
            for cid in listed.stdout.split():
                subprocess.run(self.runc("delete", "-f", cid), capture_output=True, check=False)
            shutil.rmtree(self.bundle / "state", ignore_errors=True)
        for flags in ([], ["-l"]):
            if is_mount_point(self.rootfs):
                subprocess.run(["umount", *flags, str(self.rootfs)], check=False)
        if is_mount_point(self.rootfs):
            print(f"warning: {self.rootfs} is still mounted; unmount it, then remove {self.bundle}")
            return
        (self.bundle / "config.json").unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.rootfs.rmdir()  # fails (and stops the cleanup) unless empty
        self.bundle.rmdir()


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, from /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4]
            # mountinfo escapes space, tab, newline and backslash as octal.
            points.append(point.encode().decode("unicode_escape").encode("latin-1").decode())
    return points


def is_mount_point(path: Path) -> bool:
    """Whether something is mounted on ``path``. Not os.path.ismount: that compares devices
    and misses a bind mount from the same filesystem (such as the bind of / for runc)."""
    return os.path.realpath(path) in mount_points()


def remove_unless_mounted(path: Path) -> None:
    """rmtree ``path``, unless something is mounted in it (a job's bind of the host, left
    behind): then leave it all and say so, rather than delete through the mount."""
    top = os.path.realpath(path)
    inside = [p for p in mount_points() if p == top or p.startswith(top + "/")]
    if inside:
        print(f"warning: not removing {path}: mounts inside it: {', '.join(inside)}")
        return
    shutil.rmtree(path, ignore_errors=True)


def all_contenders() -> list[Contender]:
    return [
        Workernator(NONE, "fib", {"position": 1}, stop=False),
        Workernator(EGRESS, "wait", EGRESS_ARGS, stop=True),
        bwrap_peer(),
        Runc(),
        python_peer(),
        unshare_peer(),
    ]


def alias(name: str) -> str:
    """``workernator(none)`` may be given as ``workernator-none`` (no shell quoting)."""
    return name.replace("(", "-").replace(")", "")


# --- measuring and reporting ------------------------------------------------------------------


async def measure(
    contenders: Sequence[Contender], rounds: int, skipped: dict[str, str]
) -> dict[str, list[float]]:
    """Warm-up round, then ``rounds`` interleaved rounds; samples in ms per contender."""
    active: list[Contender] = []
    for c in contenders:
        try:
            if isinstance(c, Workernator):
                await c.check()  # a full job, so a refusal shows with its reason
            await c.sample()  # the warm-up sample, not counted
        except Exception as exc:  # Skip, or anything else that went wrong: say what
            skipped[c.name] = str(exc) if isinstance(exc, Skip) else repr(exc)
            print(f"skipping {c.name}: {skipped[c.name]}", flush=True)
            continue
        active.append(c)
    samples: dict[str, list[float]] = {c.name: [] for c in active}
    for n in range(rounds):
        shift = n % len(active) if active else 0
        for c in active[shift:] + active[:shift]:  # who goes first rotates
            try:
                samples[c.name].append(await c.sample() * 1000)
            except Exception as exc:
                why = str(exc) if isinstance(exc, Skip) else repr(exc)
                skipped[c.name] = f"failed in round {n + 1}: {why}"
                print(f"dropping {c.name}: {skipped[c.name]}", flush=True)
                active.remove(c)
                del samples[c.name]
        if (n + 1) % 10 == 0:
            print(f"  {n + 1}/{rounds} rounds", file=sys.stderr, flush=True)
    return samples


def p50(values: Sequence[float]) -> float:
    return statistics.median(values)


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def report(samples: Mapping[str, list[float]], skipped: Mapping[str, str], rounds: int) -> None:
    print(f"\nfirst output line, {rounds} interleaved rounds (ms)")
    print(f"  {'contender':<21} {'p50':>7} {'p90':>7} {'min':>7}")
    for name, values in samples.items():
        print(f"  {name:<21} {p50(values):7.2f} {p90(values):7.2f} {min(values):7.2f}")
    for name, why in skipped.items():
        print(f"  {name:<21} skipped: {why}")

    ours = p50(samples[NONE]) if samples.get(NONE) else None
    print("\nratios (p50 / p50)")
    for name in ("bwrap", "runc", EGRESS, "unshare", "python"):
        if ours is not None and samples.get(name):
            print(f"  {name} / {NONE} = {p50(samples[name]) / ours:.1f}x")
        elif name in ("bwrap", "runc", EGRESS):
            print(f"  {name} / {NONE} = n/a")

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else "MET" if ok else "NOT MET"

    print("\ntargets for workernator(none)")
    met = None if ours is None else ours <= TARGET_P50_MS
    print(f"  p50 <= {TARGET_P50_MS:g} ms: {verdict(met)}")
    for name, factor in TARGET_SPEEDUPS.items():
        ok = None
        if ours is not None and samples.get(name):
            ok = p50(samples[name]) / ours >= factor
        print(f"  >= {factor:g}x faster than {name}: {verdict(ok)}")


def write_json(
    path: Path, samples: Mapping[str, list[float]], skipped: Mapping[str, str], rounds: int
) -> None:
    data = {
        "benchmark": "sandbox_bench: start to first output line",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "rounds": rounds,
        "unit": "ms",
        "samples": samples,
        "skipped": skipped,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nraw samples written to {path}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    names = [c.name for c in all_contenders()]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="timed rounds")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated contenders (default all): {', '.join(names)}; "
        "workernator-none and workernator-egress work too",
    )
    parser.add_argument("--json", type=Path, help="write the raw samples here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in names and w not in map(alias, names)]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(names)}")
    return args


def on_sigterm(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt  # so the same cleanup runs as for Ctrl-C


async def run(args: argparse.Namespace) -> None:
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    contenders = [
        c for c in all_contenders() if not wanted or c.name in wanted or alias(c.name) in wanted
    ]
    skipped: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        ready: list[Contender] = []
        for c in contenders:
            try:
                await c.prepare(stack)
            except Skip as exc:
                skipped[c.name] = str(exc)
                print(f"skipping {c.name}: {exc}", flush=True)
                continue
            ready.append(c)
        samples = await measure(ready, args.rounds, skipped)
    report(samples, skipped, args.rounds)
    if args.json:
        write_json(args.json, samples, skipped, args.rounds)
    print(f"(pid {os.getpid()}, load average {os.getloadavg()[0]:.2f} at the end)")


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
