"""Directories and files as root, without being led astray (docs/security.md section 6a).

The runner works as root in directories it shares with nobody. Before it uses one, it checks
that nobody else could have put anything there: the directory and every directory above it
belong to root and nobody else may write to them (a directory above may be sticky, like
``/tmp``: then nobody else can move or remove what root made in it). The last name of a path
is never followed when it is a symbolic link, and what the runner makes inside a checked
directory it makes relative to a descriptor of it, so a renamed or replaced path cannot send
it elsewhere.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

# A directory opened for use: never through a symbolic link at its last name.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SYMLINKS = 40
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class UnsafePath(Exception):
    """A path the runner will not use as root: the message names it, what it is, and what was
    expected."""


def open_dir(path: Path, mode: int, *, gid: int | None = None) -> int:
    """A descriptor of the directory ``path``, made with ``mode`` (and group ``gid``) if it does
    not exist. Raises UnsafePath when it, or a directory above it, could have been changed by
    anyone but root: a symbolic link, not a directory, owned by another user, or writable by
    the group or others."""
    if not path.is_absolute() or ".." in path.parts or path.name == "":
        raise UnsafePath(f"{path}: expected an absolute path of a directory, without '..'")
    parent = _open_ancestors(str(path.parent))
    try:
        created = True
        try:
            os.mkdir(path.name, mode, dir_fd=parent)
        except FileExistsError:
            created = False
        try:
            fd = os.open(path.name, DIR_FLAGS, dir_fd=parent)
        except OSError:
            kind = _kind(os.stat(path.name, dir_fd=parent, follow_symlinks=False).st_mode)
            raise UnsafePath(
                f"{path} is {kind}; expected a directory owned by root, like mode {mode:04o}"
            ) from None
        try:
            if created:  # exactly the mode asked for, whatever the umask
                os.fchmod(fd, mode)
                if gid is not None:
                    os.fchown(fd, -1, gid)
            _check_own(fd, path, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        os.close(parent)


def make_dir(parent: Path, name: str, mode: int, uid: int, gid: int) -> None:
    """Make the new directory ``name`` in ``parent`` (a checked directory) for ``uid``:``gid``;
    the chown is on a descriptor of what was just made, never on a path."""
    parent_fd = os.open(parent, DIR_FLAGS)
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    finally:
        os.close(parent_fd)


def _open_ancestors(path: str) -> int:
    """An ``O_PATH`` descriptor of the directory ``path``, every directory from ``/`` to it
    checked (and made, 0755, when missing). A symbolic link on the way is followed only once the
    directory holding it passed the check (so root made it); the walk then starts over on the
    link's target, checking every directory of that path too."""
    for _ in range(MAX_SYMLINKS):
        fd = os.open("/", _WALK_FLAGS)
        parts = [part for part in path.split("/") if part]
        try:
            _check_above(fd, "/")
            for i, name in enumerate(parts):
                here = "/" + "/".join(parts[: i + 1])
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    os.mkdir(name, 0o755, dir_fd=fd)
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    path = os.path.join(os.path.realpath(here), *parts[i + 1 :])
                    break
                try:
                    next_fd = os.open(name, _WALK_FLAGS, dir_fd=fd)
                except OSError as exc:
                    raise UnsafePath(f"{here}: {exc.strerror}; expected a directory") from None
                os.close(fd)
                fd = next_fd
                _check_above(fd, here)
            else:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise UnsafePath(f"{path}: more than {MAX_SYMLINKS} symbolic links on the way")


def _check_above(fd: int, path: str) -> None:
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()) or (
        mode & _WRITABLE_BY_OTHERS and not mode & stat.S_ISVTX
    ):
        raise UnsafePath(
            f"{path} is owned by {_user(st.st_uid)} with mode {mode:04o}; every directory above "
            "the runner's files must be owned by root and writable by nobody else "
            "(or sticky, like /tmp)"
        )


def _check_own(fd: int, path: Path, mode: int) -> None:
    st = os.fstat(fd)
    actual = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid() or actual & _WRITABLE_BY_OTHERS:
        raise UnsafePath(
            f"{path} is owned by {_user(st.st_uid)} with mode {actual:04o}; expected a "
            f"directory owned by {_user(os.geteuid())} that nobody else can write, like mode "
            f"{mode:04o} (chown {_user_name(os.geteuid())} {path}; chmod {mode:04o} {path})"
        )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user(uid: int) -> str:
    name = _user_name(uid)
    return f"uid {uid}" if name == str(uid) else f"{name} (uid {uid})"


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory that cannot be opened"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a directory"
