"""Cgroups: one per sandbox, with the job's limits, its accounting and kill (design section 7).

Three layouts, detected at start (:func:`detect`):

- **v2** (unified, what most hosts run): one hierarchy with the ``cpu``, ``memory``, ``pids``
  and ``io`` controllers.
- **hybrid**: v1 hierarchies for the controllers (``cpu``, ``cpuacct``, ``memory``, ``pids``,
  ``blkio``) and a cgroup2 mount without controllers, used for membership, ``cgroup.kill`` and
  the ``populated`` state.
- **v1**: v1 hierarchies only; killing uses the ``freezer`` (freeze, SIGKILL each, thaw).

Every job's processes are in one cgroup per hierarchy, named alike under a ``jobs`` directory:
``workernator/jobs/<name>`` at the root of each hierarchy, under systemd too. Not under the
runner unit's own cgroup (``Delegate=yes``): on v2 that cgroup would then have controllers
enabled for its children, and no process may join such a cgroup, so systemd (before 254's
``DelegateSubgroup=``) could not start the runner again while a job runs: a restart would
fail (status 219/CGROUP) instead of adopting the running jobs.

A cgroup is made per *sandbox*, before its job exists (``sb-<monitor pid>``), and the
sandbox's init joins it before it unshares its namespaces (the cgroup namespace is rooted
there): so nothing of a job ever runs outside its cgroup. The name is recorded in the job's
``state.json``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.model import ResourceLimits

CPU_PERIOD_US = 100_000
NAME_PREFIX = "sb-"
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio")
V2_CONTROLLERS = ("cpu", "memory", "pids", "io")
FREEZE_SECONDS = 5.0


class CgroupError(OSError):
    """Cgroups cannot be used as needed; the message says why."""


@dataclass(frozen=True)
class Usage:
    cpu_ns: int = 0
    peak_memory_bytes: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    oom_killed: bool = False


@dataclass(frozen=True)
class Layout:
    """Where the job cgroups live: ``jobs`` directories, by controller (v1) or for all (v2)."""

    version: str  # "v2", "hybrid" or "v1"
    jobs: dict[str, str]  # controller (or "unified") -> the jobs directory
    io_devices: tuple[str, ...] = ()  # "MAJ:MIN" of the disks behind the workspaces
    io_problem: str = ""  # why IO limits cannot apply, when they cannot

    @property
    def unified(self) -> str | None:
        return self.jobs.get("unified")

    def describe(self) -> str:
        names = {"v2": "cgroup v2", "hybrid": "cgroup v1 with v2 membership (hybrid)"}
        return names.get(self.version, "cgroup v1")

    def job(self, name: str) -> JobCgroup:
        if not name.startswith(NAME_PREFIX) or "/" in name or name in (".", ".."):
            raise ValueError(f"not a sandbox cgroup name: {name!r}")
        return JobCgroup(self, name)

    def names(self) -> list[str]:
        """The sandbox cgroups that exist now, in any hierarchy: one whose removal stopped
        half-way (its monitor killed meanwhile) is still there in some of them."""
        found: set[str] = set()
        for parent in self.jobs.values():
            with contextlib.suppress(FileNotFoundError):
                found.update(
                    e.name
                    for e in os.scandir(parent)
                    if e.is_dir() and e.name.startswith(NAME_PREFIX)
                )
        return sorted(found)


@dataclass(frozen=True)
class JobCgroup:
    layout: Layout
    name: str
    dirs: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        dirs = {key: f"{path}/{self.name}" for key, path in self.layout.jobs.items()}
        object.__setattr__(self, "dirs", dirs)

    def create(self) -> None:
        made = []
        try:
            for path in self.dirs.values():
                os.mkdir(path, 0o755)
                made.append(path)
        except OSError as exc:
            for path in made:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise CgroupError(
                exc.errno, f"cannot create cgroup {exc.filename}: {exc.strerror}"
            ) from None

    def procs_files(self) -> list[str]:
        """The files a process writes "0" to, to join this cgroup in every hierarchy."""
        return [f"{path}/cgroup.procs" for path in self.dirs.values()]

    def set_limits(self, limits: ResourceLimits, current: ResourceLimits | None = None) -> None:
        """Apply ``limits`` (0: no limit), writing only what differs from ``current`` (the
        limits already set, if any: a spare's cgroup has the defaults). IO limits need the
        layout's disks."""
        v2 = self.layout.version == "v2"
        cpu = self.dirs["cpu" if not v2 else "unified"]
        memory = self.dirs["memory" if not v2 else "unified"]
        pids = self.dirs["pids" if not v2 else "unified"]
        if current is None or limits.cpu_millis != current.cpu_millis:
            quota = limits.cpu_millis * CPU_PERIOD_US // 1000 if limits.cpu_millis else 0
            if v2:
                _write(f"{cpu}/cpu.max", f"{quota or 'max'} {CPU_PERIOD_US}")
            else:
                _write(f"{cpu}/cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(f"{cpu}/cpu.cfs_quota_us", str(quota or -1))
        if current is None or limits.memory_bytes != current.memory_bytes:
            if v2:
                _write(f"{memory}/memory.max", str(limits.memory_bytes or "max"))
                _write_if_there(f"{memory}/memory.swap.max", "0")
            else:
                # Swap off: memory and swap together may use no more than memory alone. The
                # kernel wants memsw at least memory at every moment: raise it first, lower last.
                value = str(limits.memory_bytes or -1)
                files = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
                old = current.memory_bytes if current is not None else 0
                if not limits.memory_bytes or (old and limits.memory_bytes > old):
                    files.reverse()
                for name in files:
                    if name == "memory.limit_in_bytes":
                        _write(f"{memory}/{name}", value)
                    else:
                        _write_if_there(f"{memory}/{name}", value)
        if current is None or limits.pids != current.pids:
            _write(f"{pids}/pids.max", str(limits.pids or "max"))
        if current is None or _io(limits) != _io(current):
            self._set_io(limits, clear=current is not None and any(_io(current)))

    def _set_io(self, limits: ResourceLimits, *, clear: bool = False) -> None:
        wanted = _io(limits)
        if not any(wanted) and not clear:
            return
        if not self.layout.io_devices:
            raise CgroupError(errno.ENODEV, f"IO limits cannot apply: {self.layout.io_problem}")
        if self.layout.version == "v2":
            keys = ("rbps", "wbps", "riops", "wiops")
            settings = " ".join(f"{k}={v or 'max'}" for k, v in zip(keys, wanted, strict=True))
            for device in self.layout.io_devices:
                _write(f"{self.dirs['unified']}/io.max", f"{device} {settings}")
            return
        files = (
            "blkio.throttle.read_bps_device",
            "blkio.throttle.write_bps_device",
            "blkio.throttle.read_iops_device",
            "blkio.throttle.write_iops_device",
        )
        for name, value in zip(files, wanted, strict=True):
            if value or clear:  # 0 removes a device's limit
                for device in self.layout.io_devices:
                    _write(f"{self.dirs['blkio']}/{name}", f"{device} {value}")

    def kill(self) -> None:
        """SIGKILL every process in the cgroup."""
        unified = self.dirs.get("unified")
        if unified is not None and os.path.exists(f"{unified}/cgroup.kill"):
            _write(f"{unified}/cgroup.kill", "1")
            return
        freezer = self.dirs.get("freezer")
        if freezer is None:
            raise CgroupError(errno.ENOTSUP, "no way to kill a cgroup: no cgroup.kill, no freezer")
        # Frozen, nothing can fork while the pids are read and killed; thawed, they die.
        _write(f"{freezer}/freezer.state", "FROZEN")
        deadline = time.monotonic() + FREEZE_SECONDS
        while _read(f"{freezer}/freezer.state").strip() != "FROZEN":
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _write(f"{freezer}/freezer.state", "THAWED")

    def pids(self) -> list[int]:
        return _procs(next(iter(self.dirs.values())))

    def populated(self) -> bool:
        unified = self.dirs.get("unified")
        if unified is not None:
            for line in _read_gone_empty(f"{unified}/cgroup.events").splitlines():
                key, _, value = line.partition(" ")
                if key == "populated":
                    return value.strip() == "1"
            return False
        return any(_procs(path) for path in self.dirs.values())

    def wait_empty(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.populated():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def usage(self) -> Usage:
        """What the cgroup counted. Missing files count as zero (an older kernel)."""
        v2 = self.layout.version == "v2"
        if v2:
            unified = self.dirs["unified"]
            cpu_ns = _keyed(f"{unified}/cpu.stat").get("usage_usec", 0) * 1000
            peak = _number(f"{unified}/memory.peak")
            oom = _keyed(f"{unified}/memory.events").get("oom_kill", 0)
            read = written = 0
            for line in _lines(f"{unified}/io.stat"):
                fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
                read += int(fields.get("rbytes", 0))
                written += int(fields.get("wbytes", 0))
        else:
            cpu_ns = _number(f"{self.dirs['cpuacct']}/cpuacct.usage")
            memory = self.dirs["memory"]
            peak = _number(f"{memory}/memory.max_usage_in_bytes")
            oom = _keyed(f"{memory}/memory.oom_control").get("oom_kill", 0)
            read = written = 0
            for line in _lines(f"{self.dirs['blkio']}/blkio.throttle.io_service_bytes"):
                parts = line.split()
                if len(parts) == 3 and parts[1] == "Read":
                    read += int(parts[2])
                elif len(parts) == 3 and parts[1] == "Write":
                    written += int(parts[2])
        return Usage(cpu_ns, peak, read, written, oom > 0)

    def remove(self, seconds: float = 5.0) -> None:
        """Remove the cgroup once its processes are gone (they may still be exiting)."""
        deadline = time.monotonic() + seconds
        for path in self.dirs.values():
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(
                            exc.errno, f"cannot remove cgroup {path}: {exc.strerror}"
                        ) from None
                    time.sleep(0.002)


# --- detection and setup ----------------------------------------------------------------------


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(filesystem type, mount point, options) of the cgroup mounts in this mount namespace."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, super_options = fields[sep + 1], fields[sep + 3]
            if fstype in ("cgroup", "cgroup2"):
                found.append((fstype, _unescape(fields[4]), set(super_options.split(","))))
    return found


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def detect(workspaces: Path, *, use_freezer: bool = False) -> Layout:
    """Find the cgroup hierarchies, make the ``jobs`` directories and find the disks behind
    ``workspaces``. ``use_freezer`` makes a hybrid host kill as a v1-only one would (tests).
    Raises CgroupError saying what is missing."""
    mounts = _mounts()
    v2 = next((m for m in mounts if m[0] == "cgroup2"), None)
    v1 = {
        c: m[1]
        for m in mounts
        if m[0] == "cgroup"
        for c in m[2]
        if c in (*V1_CONTROLLERS, "freezer")
    }
    devices, io_problem = disks_behind(workspaces)
    if v2 is not None:
        available = set(_read(f"{v2[1]}/cgroup.controllers").split())
        if {"cpu", "memory", "pids"} <= available:
            return _setup_v2(v2[1], available, devices, io_problem)
    missing = [c for c in ("cpu", "cpuacct", "memory", "pids") if c not in v1]
    if missing:
        raise CgroupError(
            errno.ENOTSUP,
            f"no usable cgroups: cgroup v2 without the cpu, memory and pids controllers, and "
            f"no cgroup v1 hierarchy for {', '.join(missing)}",
        )
    if "blkio" not in v1 and not io_problem:
        devices, io_problem = (), "there is no blkio controller"
    jobs = {c: _make_jobs_dir(v1[c]) for c in V1_CONTROLLERS if c in v1}
    version = "v1"
    unified = _make_jobs_dir(v2[1]) if v2 is not None and not use_freezer else ""
    if unified and os.path.exists(f"{unified}/cgroup.kill"):  # not in a root cgroup
        jobs["unified"] = unified
        version = "hybrid"
    elif "freezer" in v1:
        jobs["freezer"] = _make_jobs_dir(v1["freezer"])
    else:
        raise CgroupError(
            errno.ENOTSUP, "no way to kill a job's processes: no cgroup.kill, no freezer"
        )
    return Layout(version, jobs, devices, io_problem)


def _make_jobs_dir(root: str, base: str = "workernator") -> str:
    path = f"{root}/{base}/jobs"
    os.makedirs(path, mode=0o755, exist_ok=True)
    return path


def _setup_v2(mount: str, available: set[str], devices: tuple[str, ...], io_problem: str) -> Layout:
    controllers = [c for c in V2_CONTROLLERS if c in available]
    if "io" not in available and not io_problem:
        devices, io_problem = (), "the io controller is not available"
    base = f"{mount}/workernator"
    os.makedirs(base, mode=0o755, exist_ok=True)
    _enable(mount, controllers)
    _enable(base, controllers)
    jobs = f"{base}/jobs"
    os.makedirs(jobs, mode=0o755, exist_ok=True)
    _enable(jobs, controllers)
    return Layout("v2", {"unified": jobs}, devices, io_problem)


def _enable(cgroup: str, controllers: list[str]) -> None:
    enabled = set(_read(f"{cgroup}/cgroup.subtree_control").split())
    wanted = [c for c in controllers if c not in enabled]
    if wanted:
        try:
            _write(f"{cgroup}/cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
        except OSError as exc:
            raise CgroupError(
                exc.errno,
                f"cannot enable the {', '.join(wanted)} controllers in {cgroup}: {exc.strerror}",
            ) from None


def disks_behind(path: Path) -> tuple[tuple[str, ...], str]:
    """The whole disks ("MAJ:MIN") that hold ``path``: a partition is resolved to its disk,
    device-mapper, md and the like to the disks under them. Empty, with the reason, when there is
    no block device (tmpfs, overlay, a network filesystem)."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    sysfs = f"/sys/dev/block/{major}:{minor}"
    if not os.path.exists(sysfs):
        return (), (
            f"{path} is on a filesystem with no block device ({_fstype(path)}, device "
            f"{major}:{minor}): IO limits need one"
        )
    disks: list[str] = []
    _collect_disks(os.path.realpath(sysfs), disks)
    return tuple(sorted(set(disks))), ""


def _collect_disks(device: str, disks: list[str]) -> None:
    slaves = f"{device}/slaves"
    if os.path.isdir(slaves) and os.listdir(slaves):
        for slave in os.listdir(slaves):
            _collect_disks(os.path.realpath(f"{slaves}/{slave}"), disks)
        return
    if os.path.exists(f"{device}/partition"):
        device = os.path.dirname(device)
    disks.append(_read(f"{device}/dev").strip())


def _fstype(path: Path) -> str:
    best, fstype = "", "unknown"
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = _unescape(fields[4])
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(
                point
            ) >= len(best):
                best, fstype = point, fields[fields.index("-") + 1]
    return fstype


# --- files ------------------------------------------------------------------------------------


def _io(limits: ResourceLimits) -> tuple[int, int, int, int]:
    return (limits.io_read_bps, limits.io_write_bps, limits.io_read_iops, limits.io_write_iops)


def _read(path: str) -> str:
    """A cgroup or sysfs file's text: open, read to the end, close. (Python's ``open`` adds
    four system calls and a text wrapper to each of the reads a running job's status makes.)"""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, 65536):
            parts.append(chunk)
    finally:
        os.close(fd)
    return b"".join(parts).decode()


def _read_gone_empty(path: str) -> str:
    """A cgroup file's text; empty once its cgroup is removed (ENOENT before the open,
    ENODEV when the removal came between the open and the read)."""
    try:
        return _read(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV):
            return ""
        raise


def _procs(path: str) -> list[int]:
    """The processes in one cgroup directory: none once it is removed."""
    return [int(p) for p in _read_gone_empty(f"{path}/cgroup.procs").split()]


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(exc.errno, f"cannot write {value!r} to {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _write_if_there(path: str, value: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _write(path, value)


def _lines(path: str) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return _read(path).splitlines()
    return []


def _number(path: str) -> int:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return int(_read(path).split()[0])
    return 0


def _keyed(path: str) -> dict[str, int]:
    out = {}
    for line in _lines(path):
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out
