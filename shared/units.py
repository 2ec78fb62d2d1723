"""Human sizes for resource limits: ``512M`` and back. K, M, G and T are powers of 1024.

The CLI and the runner's config read sizes with the same rules. ``MB`` and ``GB`` are refused:
they could mean powers of 1000 or of 1024; ``MiB`` and plain ``M`` cannot.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction

MAX_SIZE = 2**63 - 1
_UNITS: Mapping[str, int] = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(b|[kmgt](?:ib)?)?", re.IGNORECASE | re.ASCII)
_MAX_DIGITS = 40  # longer numbers are refused before they are converted


def parse_size(text: str, maximum: int = MAX_SIZE) -> int:
    """Bytes in ``text``: a whole number of bytes (``4096``, ``4096B``), or a number with a unit
    K, M, G or T, which are powers of 1024 (K = 1024 bytes), also written KiB, MiB, GiB, TiB,
    in any case (``256M``, ``1.5G``, ``64kib``); a fraction of a byte is dropped. More than 0 and
    at most ``maximum``; :class:`ValueError` with a message for people otherwise."""
    shown = text.strip()
    match = _SIZE.fullmatch(shown)
    if match is None:
        raise ValueError(
            f"{text!r} is not a size: give bytes, or a number with K, M, G or T "
            "(powers of 1024: K = 1024), like 256M or 1.5G"
        )
    number, unit = match.group(1), (match.group(2) or "").lower()
    scale = _UNITS[unit[:1]]
    if len(number) > _MAX_DIGITS:
        raise ValueError(f"{shown!r} has too many digits")
    if scale == 1 and "." in number:
        raise ValueError(f"{shown!r} is not a whole number of bytes (use a unit: 1.5K)")
    size = int(Fraction(number) * scale)
    if size <= 0:
        raise ValueError(f"{shown!r} must be more than 0")
    if size > maximum:
        raise ValueError(f"{shown!r} is too large: at most {maximum} bytes")
    return size


def format_size(count: int) -> str:
    """A size in binary units: ``512 B``, ``4 KiB``, ``1.5 MiB``, ``512 MiB``."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text} {unit}"
