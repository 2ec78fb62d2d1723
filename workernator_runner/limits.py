"""Resource limits: the runner's defaults and maxima, and the limits a job gets.

A start request's limit of 0 takes the default. A request over a maximum is refused, whatever
the api sent, naming the limit; so is one under the minimum a sandbox needs to run at all. In
effective limits (what a job runs under, what its status shows) 0 means none: only IO limits
may be unlimited.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from shared.errors import InvalidArgument
from shared.model import ResourceLimits
from shared.units import format_size

# What a sandbox needs to start (its init and job process are Python): below, nothing runs.
MINIMUM = ResourceLimits(cpu_millis=10, memory_bytes=32 << 20, pids=8)
DEFAULTS = ResourceLimits(cpu_millis=1000, memory_bytes=512 << 20, pids=256)
NAMES = {
    "cpu_millis": "cpu",
    "memory_bytes": "memory",
    "pids": "pids",
    "io_read_bps": "io_read",
    "io_write_bps": "io_write",
    "io_read_iops": "io_read_iops",
    "io_write_iops": "io_write_iops",
}
UNLIMITABLE = ("cpu_millis", "memory_bytes", "pids")  # always limited: a default applies
NO_MAXIMA = ResourceLimits()


def describe(field: str, value: int) -> str:
    if field == "cpu_millis":
        return f"{value / 1000:g} CPU"
    if field == "memory_bytes":
        return format_size(value)
    if field in ("io_read_bps", "io_write_bps"):
        return f"{format_size(value)}/s"
    return str(value)


@dataclass(frozen=True)
class Policy:
    """Defaults and maxima (0 in ``maxima``: no maximum but the host's own)."""

    defaults: ResourceLimits = DEFAULTS
    maxima: ResourceLimits = NO_MAXIMA

    def check(self) -> str:
        """Why the policy itself is wrong, or ""."""
        for f in fields(ResourceLimits):
            default, maximum = getattr(self.defaults, f.name), getattr(self.maxima, f.name)
            name = NAMES[f.name]
            minimum = getattr(MINIMUM, f.name)
            if f.name in UNLIMITABLE and default < minimum:
                return f"{name}: the default must be at least {describe(f.name, minimum)}"
            if maximum and not default:
                return f"{name}: with a maximum, the default cannot be unlimited (0)"
            if maximum and default > maximum:
                return (
                    f"{name}: the default {describe(f.name, default)} is over the maximum "
                    f"{describe(f.name, maximum)}"
                )
        return ""

    def effective(self, asked: ResourceLimits) -> ResourceLimits:
        """The limits a job asking for ``asked`` gets; InvalidArgument naming a limit over its
        maximum or under the minimum."""
        out = {}
        for f in fields(ResourceLimits):
            value = getattr(asked, f.name) or getattr(self.defaults, f.name)
            maximum = getattr(self.maxima, f.name)
            name = NAMES[f.name]
            if maximum and value > maximum:
                raise InvalidArgument(
                    f"limit '{name}': {describe(f.name, value)} is over the runner's maximum "
                    f"of {describe(f.name, maximum)}"
                )
            minimum = getattr(MINIMUM, f.name)
            if value and value < minimum:
                raise InvalidArgument(
                    f"limit '{name}': {describe(f.name, value)} is under the minimum of "
                    f"{describe(f.name, minimum)} a job needs"
                )
            out[f.name] = value
        return replace(ResourceLimits(), **out)
