"""Job IDs: six characters of A-Z and 0-9, as in the original design (``XE38YM``).

36^6 is about 2.2 billion; uniqueness over the whole history is guaranteed by whoever stores the
jobs (the runner creates the job directory exclusively and draws again on a collision).
"""

from __future__ import annotations

import re
import secrets

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
LENGTH = 6
_PATTERN = re.compile(rf"[A-Z0-9]{{{LENGTH}}}")


def new_job_id() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))


def is_job_id(value: object) -> bool:
    """True for a well-formed ID. Anything else can never name a job (or a path)."""
    return isinstance(value, str) and _PATTERN.fullmatch(value) is not None
