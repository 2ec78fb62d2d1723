"""Runner configuration, read from TOML. Every setting has a documented default.

Example (``/etc/workernator/runner.toml``)::

    [runner]
    socket = "/run/workernator/runner.sock"  # the Unix socket the api connects to
    socket_group = "workernator"             # group owning the socket ("" = root's group);
                                             # it must exist
    socket_mode = "0660"                     # permissions of the socket
    allowed_uids = [0]                       # peers (SO_PEERCRED uid) allowed to connect
    allowed_users = []                       # the same, by user name: ["workernator"] for the
                                             # api's user; a name that does not exist is an error
    state_dir = "/var/lib/workernator"       # jobs/<id>/{job.json,state.json,output}
    stop_grace_seconds = 5.0                 # SIGTERM, then this long, then SIGKILL
    job_modules = []                         # extra job types: modules with a JOBS list
    log_level = "info"                       # debug, info, warning, error
    job_user = "workernator-job"             # the unprivileged user jobs run as; it must exist
    tmp_size_mb = 64                         # size of each job's /tmp (tmpfs, memory)
    egress_bridge = "wn0"                    # bridge for jobs with network access ("" = none)
    egress_subnet = "10.92.0.0/16"           # their addresses; the bridge takes the first
    resolv_conf = "/etc/resolv.conf"         # name servers for egress jobs
    keep_jobs_on_stop = false                # under systemd: a stop of the unit (not a
                                             # restart) leaves running jobs running too
    max_job_output = "1G"                    # a job whose output reaches this is stopped
                                             # (FAILED, with the reason); K, M, G, T
    min_free_bytes = "256M"                  # a Start is refused (RESOURCE_EXHAUSTED) while
                                             # the jobs directory's filesystem has less free
                                             # (0 = never refuse; sizes as for [limits])

    [retention]                              # finished jobs kept; beyond any of these the
    max_jobs = 10000                         # ones that ended first are deleted (running
    max_age = "7d"                           # jobs never): s, m, h or d
    max_output_bytes = "10G"                 # all finished jobs' output together

    [limits]                                 # a job's cgroup: what it gets when it does not
    cpu = 1.0                                # ask (CPUs), and the most it may ask for
    cpu_max = 0                              # (_max; 0 = no maximum but the host's)
    memory = "512M"                          # K, M, G, T are powers of 1024; swap is off
    memory_max = 0
    pids = 256                               # processes and threads
    pids_max = 4096
    io_read = 0                              # bytes/s on the disk behind the workspaces;
    io_read_max = 0                          # 0 = unlimited
    io_write = 0
    io_write_max = 0
    io_read_iops = 0
    io_read_iops_max = 0
    io_write_iops = 0
    io_write_iops_max = 0
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.model import ResourceLimits
from shared.units import parse_size
from workernator_runner.limits import Policy

DEFAULT_PATH = Path("/etc/workernator/runner.toml")
DEFAULT_EGRESS_SUBNET = ipaddress.IPv4Network("10.92.0.0/16")
DEFAULT_POLICY = Policy(maxima=ResourceLimits(pids=4096))
MAX_UID = 2**32 - 2
DEFAULT_MAX_JOB_OUTPUT = 1 << 30
DEFAULT_MIN_FREE_BYTES = 256 * 1024 * 1024  # room kept for the output of the running jobs


@dataclass(frozen=True)
class Retention:
    """How many finished jobs are kept, and for how long: beyond any bound, the ones that
    ended first are deleted (directory and output). Running jobs are never deleted."""

    max_jobs: int = 10_000
    max_age_seconds: float = 7 * 86400.0
    max_output_bytes: int = 10 << 30


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RunnerConfig:
    socket: Path = Path("/run/workernator/runner.sock")
    socket_group: str = "workernator"
    socket_mode: int = 0o660
    allowed_uids: frozenset[int] = frozenset({0})
    state_dir: Path = Path("/var/lib/workernator")
    stop_grace_seconds: float = 5.0
    job_modules: tuple[str, ...] = ()
    log_level: str = "info"
    allowed_users: tuple[str, ...] = field(default=())
    job_user: str = "workernator-job"
    tmp_size_mb: int = 64
    egress_bridge: str = "wn0"
    egress_subnet: ipaddress.IPv4Network = DEFAULT_EGRESS_SUBNET
    resolv_conf: Path = Path("/etc/resolv.conf")
    keep_jobs_on_stop: bool = False
    max_job_output: int = DEFAULT_MAX_JOB_OUTPUT  # bytes of output file; then it is stopped
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES
    limits: Policy = DEFAULT_POLICY
    retention: Retention = Retention()

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def workspaces_dir(self) -> Path:
        """``<id>/``: each running job's writable ``/workspace``, removed when it ends."""
        return self.state_dir / "workspaces"

    @property
    def sandbox_dir(self) -> Path:
        """Where the launcher mounts the prepared job roots, in its own mount namespace."""
        return self.state_dir / "sandbox"

    def job_ids(self) -> tuple[int, int]:
        """(uid, gid) of the job user."""
        try:
            entry = pwd.getpwnam(self.job_user)
        except KeyError:
            raise ConfigError(
                f"job_user: no user named {self.job_user!r} (create it, for example with "
                f"useradd --system --no-create-home --shell /usr/sbin/nologin {self.job_user})"
            ) from None
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise ConfigError(f"job_user: {self.job_user!r} must not have uid or gid 0")
        return entry.pw_uid, entry.pw_gid

    def socket_gid(self) -> int | None:
        if not self.socket_group:
            return None
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ConfigError(f"socket_group: no group named {self.socket_group!r}") from None

    def peer_uids(self) -> frozenset[int]:
        uids = set(self.allowed_uids)
        for name in self.allowed_users:
            try:
                uids.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                raise ConfigError(f"allowed_users: no user named {name!r}") from None
        return frozenset(uids)


_IFNAME = re.compile(r"[A-Za-z0-9_]{1,8}")  # veths are named <bridge>-<job id>: 15 bytes at most


def _expect(value: Any, kind: type | tuple[type, ...], key: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{key}: expected {kind}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {kind}, got {type(value).__name__}")
    return value


_LIMIT_KEYS = {
    "cpu": "cpu_millis",
    "memory": "memory_bytes",
    "pids": "pids",
    "io_read": "io_read_bps",
    "io_write": "io_write_bps",
    "io_read_iops": "io_read_iops",
    "io_write_iops": "io_write_iops",
}


def _limit(key: str, value: Any, name: str) -> int:
    if key == "cpu":
        cpus = float(_expect(value, (int, float), name))
        if not 0 <= cpus <= 1 << 20:
            raise ConfigError(f"{name}: must be a number of CPUs, like 0.5")
        return round(cpus * 1000)
    if key in ("memory", "io_read", "io_write"):
        return _size(value, name)
    count: int = _expect(value, int, name)
    if count < 0:
        raise ConfigError(f"{name}: must not be negative")
    return count


def _size(value: Any, name: str, *, zero: bool = True) -> int:
    """Bytes, as a number or a size like "256M" (see shared.units); 0 only when ``zero`` (off)."""
    if isinstance(value, str) and value.strip() == "0":
        value = 0
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    size: int = _expect(value, int, name)
    if size < 0 or (size == 0 and not zero):
        raise ConfigError(
            f"{name}: must be more than 0" if not zero else f"{name}: must not be negative"
        )
    return size


def _parse_limits(section: Any) -> Policy:
    section = _expect(section, dict, "limits")
    unknown = set(section) - set(_LIMIT_KEYS) - {f"{k}_max" for k in _LIMIT_KEYS}
    if unknown:
        raise ConfigError(f"[limits]: unknown key(s): {', '.join(sorted(unknown))}")
    defaults = dict(DEFAULT_POLICY.defaults.as_dict())
    maxima = dict(DEFAULT_POLICY.maxima.as_dict())
    for key, value in section.items():
        base = key.removesuffix("_max")
        target = maxima if key.endswith("_max") else defaults
        target[_LIMIT_KEYS[base]] = _limit(base, value, f"limits.{key}")
    policy = Policy(ResourceLimits(**defaults), ResourceLimits(**maxima))
    problem = policy.check()
    if problem:
        raise ConfigError(f"limits.{problem}")
    return policy


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_AGE = re.compile(r"(\d{1,9})\s*([smhd])")


def _parse_retention(section: Any) -> Retention:
    section = _expect(section, dict, "retention")
    unknown = set(section) - {"max_jobs", "max_age", "max_output_bytes"}
    if unknown:
        raise ConfigError(f"[retention]: unknown key(s): {', '.join(sorted(unknown))}")
    kw: dict[str, Any] = {}
    if "max_jobs" in section:
        count = _expect(section["max_jobs"], int, "retention.max_jobs")
        if not 1 <= count <= 10_000_000:
            raise ConfigError("retention.max_jobs: must be between 1 and 10000000")
        kw["max_jobs"] = count
    if "max_age" in section:
        text = _expect(section["max_age"], str, "retention.max_age")
        match = _AGE.fullmatch(text.strip())
        if match is None or int(match.group(1)) == 0:
            raise ConfigError(
                f"retention.max_age: {text!r} is not an age: give a number and s, m, h or d, "
                'like "7d" or "12h"'
            )
        kw["max_age_seconds"] = float(int(match.group(1)) * _AGE_UNITS[match.group(2)])
    if "max_output_bytes" in section:
        kw["max_output_bytes"] = _size(
            section["max_output_bytes"], "retention.max_output_bytes", zero=False
        )
    return Retention(**kw)


def parse(data: dict[str, Any]) -> RunnerConfig:
    unknown_sections = set(data) - {"runner", "limits", "retention"}
    if unknown_sections:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown_sections))}")
    section = data.get("runner", {})
    known = set(RunnerConfig.__dataclass_fields__) - {"limits", "retention"}
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"[runner]: unknown key(s): {', '.join(sorted(unknown))}")
    kw: dict[str, Any] = {}
    for key, value in section.items():
        name = f"runner.{key}"
        if key in ("socket", "state_dir", "resolv_conf"):
            path = Path(_expect(value, str, name))
            if not path.is_absolute():
                raise ConfigError(f"{name}: must be an absolute path")
            kw[key] = path
        elif key == "socket_mode":
            try:
                mode = int(_expect(value, str, name), 8)
            except ValueError:
                raise ConfigError(f'{name}: expected an octal string like "0660"') from None
            if mode & ~0o777 or mode & 0o007:
                raise ConfigError(f"{name}: must give no permissions to others, got {value}")
            kw[key] = mode
        elif key == "allowed_uids":
            uids = [_expect(u, int, name) for u in _expect(value, list, name)]
            for uid in uids:  # a uid is unsigned, and (uid_t)-1 names nobody
                if not 0 <= uid <= MAX_UID:
                    raise ConfigError(f"{name}: {uid} is not a uid (0 to {MAX_UID})")
            kw[key] = frozenset(uids)
        elif key in ("job_modules", "allowed_users"):
            kw[key] = tuple(_expect(m, str, name) for m in _expect(value, list, name))
        elif key == "stop_grace_seconds":
            grace = float(_expect(value, (int, float), name))
            if not 0 <= grace <= 3600:
                raise ConfigError(f"{name}: must be between 0 and 3600")
            kw[key] = grace
        elif key == "log_level":
            level = _expect(value, str, name).lower()
            if level not in ("debug", "info", "warning", "error"):
                raise ConfigError(f"{name}: must be debug, info, warning or error")
            kw[key] = level
        elif key == "tmp_size_mb":
            size = _expect(value, int, name)
            if not 1 <= size <= 1 << 20:
                raise ConfigError(f"{name}: must be between 1 and 1048576")
            kw[key] = size
        elif key == "egress_bridge":
            bridge = _expect(value, str, name)
            if bridge and not _IFNAME.fullmatch(bridge):
                raise ConfigError(f"{name}: not a valid interface name: {bridge!r}")
            kw[key] = bridge
        elif key == "egress_subnet":
            try:
                subnet = ipaddress.IPv4Network(_expect(value, str, name))
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
            if subnet.prefixlen > 28:
                raise ConfigError(f"{name}: must have room for jobs (a /28 or larger)")
            kw[key] = subnet
        elif key == "min_free_bytes":
            kw[key] = _size(value, name)
        elif key == "keep_jobs_on_stop":
            kw[key] = _expect(value, bool, name)
        elif key == "max_job_output":
            kw[key] = _size(value, name, zero=False)
        elif key == "job_user":
            user = _expect(value, str, name)
            if not user:
                raise ConfigError(f"{name}: must not be empty")
            kw[key] = user
        else:
            kw[key] = _expect(value, str, name)
    if "limits" in data:
        kw["limits"] = _parse_limits(data["limits"])
    if "retention" in data:
        kw["retention"] = _parse_retention(data["retention"])
    return RunnerConfig(**kw)


def load(path: Path) -> RunnerConfig:
    try:
        with path.open("rb") as f:
            return parse(tomllib.load(f))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
