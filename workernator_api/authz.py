"""Who may do what (design section 8): roles, and ownership of jobs.

- ``admin``: everything, and only admins delete jobs (any job that has ended).
- ``user``: start jobs; see, tail and stop their own jobs.
- ``viewer``: see and tail every job; start and stop nothing.

Deny by default: an action not listed for a role is refused. Another user's job looks exactly
like a job that does not exist, so a user learns nothing about other people's jobs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    ADMIN = "admin"
    USER = "user"
    VIEWER = "viewer"


class Action(enum.StrEnum):
    START = "start"
    STOP = "stop"
    READ = "read"  # status, output, list
    TYPES = "types"
    DELETE = "delete"


_ALLOWED: dict[Role, frozenset[Action]] = {
    Role.ADMIN: frozenset(Action),
    Role.USER: frozenset({Action.START, Action.STOP, Action.READ, Action.TYPES}),
    Role.VIEWER: frozenset({Action.READ, Action.TYPES}),
}

# Roles that act on every job; the others act on their own jobs only.
_SEES_ALL: dict[Role, frozenset[Action]] = {
    Role.ADMIN: frozenset({Action.STOP, Action.READ, Action.DELETE}),
    Role.USER: frozenset(),
    Role.VIEWER: frozenset({Action.READ}),
}


@dataclass(frozen=True)
class Identity:
    user: str
    role: Role


def may(identity: Identity, action: Action) -> bool:
    return action in _ALLOWED.get(identity.role, frozenset())


def may_touch(identity: Identity, action: Action, owner: str) -> bool:
    """May ``identity`` do ``action`` on a job owned by ``owner``?"""
    if not may(identity, action):
        return False
    return action in _SEES_ALL[identity.role] or owner == identity.user


def owner_filter(identity: Identity, requested: str | None) -> str | None:
    """The owner filter to list with: users only ever see their own jobs."""
    if Action.READ in _SEES_ALL[identity.role]:
        return requested
    return identity.user
