"""The runner <-> launcher messages: narrow, explicit, checked (design section 2).

They travel over a ``SOCK_SEQPACKET`` socketpair: each message is one datagram, so there is no
framing to get wrong, and none is longer than :data:`MAX_MESSAGE`. The first byte says what it
is; every field is checked before use, and anything else is an error.

Runner -> launcher:

- ``I`` + msgpack map: :class:`Init`, once, first.
- ``L`` + 4-byte big-endian header length + msgpack header (:class:`LaunchHeader`) + the job's
  validated arguments, msgpack. The launcher reads only the header; the arguments (user data)
  are unpacked by the job's own monitor after the fork, so the launcher never holds them.
- ``C`` + job id: give up on a start that has not reported (cancelled, timed out).

Launcher (or a monitor) -> runner:

- ``R`` + msgpack map ``{"egress_error": str}``: ready ("" when egress networking works).
- ``F`` + text: the launcher could not start; it exits.
- ``S`` + job id: the job runs. ``E`` + job id + text: it could not start, and nothing of it is
  left (the monitor cleaned up before saying so).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from shared import ids
from shared.model import LIMIT_NAMES, ResourceLimits
from workernator_runner import cgroups

MAX_MESSAGE = 64 * 1024
MAX_HEADER = 1024
MAX_GRACE_SECONDS = 3600.0
NO_LIMITS = ResourceLimits()
_HEADER_LEN = struct.Struct(">I")

INIT = b"I"
LAUNCH = b"L"
CANCEL = b"C"
READY = b"R"
INIT_FAILED = b"F"
STARTED = b"S"
START_FAILED = b"E"


class MessageError(ValueError):
    """A message that does not follow this module's rules."""


@dataclass(frozen=True)
class EgressConfig:
    bridge: str
    subnet: str
    resolver: str  # "" when the jobs use the host's name servers directly
    resolv_conf: str


@dataclass(frozen=True)
class Init:
    runner_pid: int
    state_dir: str
    job_modules: tuple[str, ...]
    uid: int
    gid: int
    user: str
    tmp_size_mb: int
    egress: EgressConfig | None
    cgroups: cgroups.Layout
    default_limits: ResourceLimits = NO_LIMITS  # what most jobs get: spares are set so
    max_output_bytes: int = 0  # a job whose output reaches this is stopped (0 = no cap)


@dataclass(frozen=True)
class LaunchHeader:
    job_id: str
    job_type: str
    grace_seconds: float
    address: str  # "10.92.0.2/16" for egress jobs, "" otherwise
    limits: ResourceLimits = NO_LIMITS  # effective: 0 = no limit


def _unpack(data: bytes | memoryview, limit: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit // 2,
            max_map_len=limit // 2,
        )
    except Exception as exc:  # msgpack raises several kinds for bad input
        raise MessageError(f"not valid msgpack: {exc}") from None


def _fields(data: Any, spec: Mapping[str, type | tuple[type, ...]], what: str) -> dict[str, Any]:
    if not isinstance(data, dict) or set(data) != set(spec):
        raise MessageError(f"{what}: expected exactly the fields {sorted(spec)}")
    for key, kind in spec.items():
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise MessageError(f"{what}: field {key!r} has the wrong type")
    return data


def encode_init(init: Init) -> bytes:
    egress = None
    if init.egress is not None:
        egress = {
            "bridge": init.egress.bridge,
            "subnet": init.egress.subnet,
            "resolver": init.egress.resolver,
            "resolv_conf": init.egress.resolv_conf,
        }
    body = {
        "runner_pid": init.runner_pid,
        "state_dir": init.state_dir,
        "job_modules": list(init.job_modules),
        "uid": init.uid,
        "gid": init.gid,
        "user": init.user,
        "tmp_size_mb": init.tmp_size_mb,
        "egress": egress,
        "cgroups": {
            "version": init.cgroups.version,
            "jobs": dict(init.cgroups.jobs),
            "io_devices": list(init.cgroups.io_devices),
            "io_problem": init.cgroups.io_problem,
        },
        "default_limits": init.default_limits.as_dict(),
        "max_output_bytes": init.max_output_bytes,
    }
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return INIT + packed


def decode_init(message: bytes) -> Init:
    if message[:1] != INIT:
        raise MessageError("expected the init message first")
    data = _fields(
        _unpack(message[1:], MAX_MESSAGE),
        {
            "runner_pid": int,
            "state_dir": str,
            "job_modules": list,
            "uid": int,
            "gid": int,
            "user": str,
            "tmp_size_mb": int,
            "egress": (dict, type(None)),
            "cgroups": dict,
            "default_limits": dict,
            "max_output_bytes": int,
        },
        "init",
    )
    if not 0 <= data["max_output_bytes"] < 2**63:
        raise MessageError("init: max_output_bytes out of range")
    defaults = _limits(data["default_limits"], "init default_limits")
    if not all(isinstance(m, str) for m in data["job_modules"]):
        raise MessageError("init: job_modules must be strings")
    if not (0 < data["uid"] < 2**32 - 1 and 0 < data["gid"] < 2**32 - 1):
        raise MessageError("init: the job user must not be root, and needs a valid uid and gid")
    egress = None
    if data["egress"] is not None:
        e = _fields(
            data["egress"],
            {"bridge": str, "subnet": str, "resolver": str, "resolv_conf": str},
            "init egress",
        )
        egress = EgressConfig(e["bridge"], e["subnet"], e["resolver"], e["resolv_conf"])
    c = _fields(
        data["cgroups"],
        {"version": str, "jobs": dict, "io_devices": list, "io_problem": str},
        "init cgroups",
    )
    if c["version"] not in ("v2", "hybrid", "v1") or not all(
        isinstance(k, str) and isinstance(v, str) and v.startswith("/")
        for k, v in c["jobs"].items()
    ):
        raise MessageError("init cgroups: bad version or directories")
    if not c["jobs"] or not all(isinstance(d, str) for d in c["io_devices"]):
        raise MessageError("init cgroups: no directories, or bad devices")
    layout = cgroups.Layout(c["version"], c["jobs"], tuple(c["io_devices"]), c["io_problem"])
    return Init(
        runner_pid=data["runner_pid"],
        state_dir=data["state_dir"],
        job_modules=tuple(data["job_modules"]),
        uid=data["uid"],
        gid=data["gid"],
        user=data["user"],
        tmp_size_mb=data["tmp_size_mb"],
        egress=egress,
        cgroups=layout,
        default_limits=defaults,
        max_output_bytes=data["max_output_bytes"],
    )


def encode_launch(header: LaunchHeader, args: Mapping[str, Any]) -> bytes:
    """Raises MessageError when the arguments do not fit in one message."""
    head: bytes = msgpack.packb(
        {
            "id": header.job_id,
            "type": header.job_type,
            "grace": float(header.grace_seconds),
            "address": header.address,
            "limits": header.limits.as_dict(),
        },
        use_bin_type=True,
    )
    body: bytes = msgpack.packb(dict(args), use_bin_type=True)
    if len(head) > MAX_HEADER:
        raise MessageError(f"the launch header takes more than {MAX_HEADER} bytes")
    message = LAUNCH + _HEADER_LEN.pack(len(head)) + head + body
    if len(message) > MAX_MESSAGE:
        raise MessageError(f"the job's arguments take more than {MAX_MESSAGE} bytes")
    return message


def decode_launch_header(message: memoryview) -> tuple[LaunchHeader, int]:
    """The header of a launch message and where its arguments start. Reads nothing else."""
    if bytes(message[:1]) != LAUNCH or len(message) < 1 + _HEADER_LEN.size:
        raise MessageError("not a launch message")
    (length,) = _HEADER_LEN.unpack(message[1 : 1 + _HEADER_LEN.size])
    start = 1 + _HEADER_LEN.size
    if length > MAX_HEADER or start + length > len(message):
        raise MessageError("launch header length out of bounds")
    data = _fields(
        _unpack(message[start : start + length], MAX_HEADER),
        {"id": str, "type": str, "grace": float, "address": str, "limits": dict},
        "launch",
    )
    limits = _limits(data["limits"], "launch limits")
    if not ids.is_job_id(data["id"]):
        raise MessageError("launch: bad job id")
    if not 0 <= data["grace"] <= MAX_GRACE_SECONDS:
        raise MessageError("launch: grace period out of range")
    if data["address"]:
        try:
            ipaddress.IPv4Interface(data["address"])
        except ValueError:
            raise MessageError("launch: bad address") from None
    header = LaunchHeader(data["id"], data["type"], data["grace"], data["address"], limits)
    return header, start + length


def _limits(data: Any, what: str) -> ResourceLimits:
    limits = _fields(data, dict.fromkeys(LIMIT_NAMES, int), what)
    if not all(0 <= value < 2**63 for value in limits.values()):
        raise MessageError(f"{what}: a limit out of range")
    return ResourceLimits(**limits)


def decode_args(data: bytes | memoryview) -> dict[str, Any]:
    args = _unpack(data, MAX_MESSAGE)
    if not isinstance(args, dict):
        raise MessageError("launch: the arguments must be a map")
    return args


def encode_cancel(job_id: str) -> bytes:
    return CANCEL + job_id.encode()


def decode_job_id(message: bytes | memoryview) -> str:
    job_id = bytes(message[1 : 1 + ids.LENGTH]).decode(errors="replace")
    if not ids.is_job_id(job_id):
        raise MessageError("bad job id")
    return job_id
