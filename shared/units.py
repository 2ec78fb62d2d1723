"""Human sizes for resource limits: ``512M`` and back. K, M, G, T are powers of 1024."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of ``"4096"``, ``"512M"``, ``"1.5G"``, ``"2GiB"``, ``"64k"``; ValueError otherwise."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (a number of bytes, or with K, M, G or T)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(size: int) -> str:
    """``536870912`` -> ``"512 MiB"``: the largest unit that keeps it whole, else one decimal."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value.is_integer() else f"{value:.1f} {unit}"
    return f"{size} B"
