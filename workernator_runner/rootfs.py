r"""The job's root filesystem (design section 7): prepared once, finished per job in microseconds.

Once, in the launcher (its own mount namespace, so the host never sees these mounts), a
*template* root is built on a tmpfs per network mode, then made read-only:

    /usr                    the host's /usr, bound read-only (nosuid, nodev)
    /bin /lib ...           the host's merged-usr links (or read-only binds where they are dirs)
    <python dirs>           the Python installation and the job code, bound read-only at their
                            own paths (their parents are empty tmpfs directories, so a Python
                            under a 0700 home directory is reachable and nothing else of it is)
    /dev                    null, zero, full, random, urandom (binds of the host's nodes), and
                            the fd, stdin, stdout, stderr links
    /etc /proc /tmp /workspace   empty mount points, filled per job

In each sandbox's init (PID 1 of its namespaces) after it unshared the mount namespace,
:func:`prepare` mounts on the template's copy, before there is a job, a fresh ``/proc``, a
size-limited tmpfs ``/tmp``, the sandbox's ``/workspace`` (a directory on real disk) and a small
tmpfs ``/etc`` with the synthetic files; once there is a job, :func:`enter` writes its own files
(its host name; name servers for egress jobs), makes ``/etc`` read-only, ``pivot_root``\s into
the copy and detaches the old root: everything else of the host is gone.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Mapping

from workernator_runner import linux

DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
MOUNT_POINTS = ("etc", "proc", "tmp", "workspace", "dev")
# Only for jobs with network access: what TLS and name resolution read. They sit on a tmpfs of
# their own at EGRESS_DIR, so that for a job without network one empty mount hides them all.
EGRESS_DIR = "/etc/ssl"
EGRESS_FILES = ("/etc/ssl/certs", "/etc/ssl/openssl.cnf")
ETC_SIZE = "256k"
JOB_TMP = "/tmp"  # noqa: S108 - where the job's own tmpfs goes, not a file made here

_RO_BIND = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
_SAFE = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC


def python_paths() -> list[str]:
    """The directories (and single-file modules) a job needs to import what it may import
    lazily: the Python installation's entries of ``sys.path`` and the location of every
    top-level module loaded so far. Call it once the job code is imported."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    found: set[str] = set()
    for entry in sys.path:
        if entry and os.path.isabs(entry) and os.path.isdir(entry):
            real = os.path.realpath(entry)
            if any(_under(real, os.path.realpath(p)) for p in prefixes):
                found.add(real)
    for name, module in list(sys.modules.items()):
        if "." in name:
            continue
        locations: Iterable[str] = getattr(module, "__path__", None) or (
            [module.__file__] if getattr(module, "__file__", None) else []
        )
        for location in locations:
            if isinstance(location, str) and os.path.exists(location):
                found.add(os.path.realpath(location))
    # /usr is bound whole; /etc is the job's own (Debian's sitecustomize lives there: unneeded)
    return minimal_cover(p for p in found if not _under(p, "/usr") and not _under(p, "/etc"))


def under_tmp(paths: Iterable[str]) -> tuple[str, ...]:
    """The paths among ``paths`` that the job's own ``/tmp`` would hide (code in a checkout
    under the host's ``/tmp``, say): :func:`prepare` binds them again on top of it."""
    return tuple(p for p in paths if p != JOB_TMP and _under(p, JOB_TMP))


def minimal_cover(paths: Iterable[str]) -> list[str]:
    """The paths that are not inside another one of them, sorted."""
    result: list[str] = []
    for path in sorted(set(paths)):
        if not any(_under(path, kept) for kept in result):
            result.append(path)
    return result


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


# --- once, in the launcher --------------------------------------------------------------------


def build_template(root: str, binds: Iterable[str], extra_dirs: Iterable[str] = ()) -> None:
    """Make ``root`` (an existing empty directory) a read-only template root."""
    linux.mount("tmpfs", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755,size=1m")
    for name in MERGED_USR:
        host = f"/{name}"
        if os.path.islink(host):
            os.symlink(os.readlink(host), f"{root}/{name}")
        elif os.path.isdir(host):
            _bind_ro(host, root)
    _bind_ro("/usr", root)
    for path in binds:
        _bind_ro(path, root)
    for name in MOUNT_POINTS:
        os.makedirs(f"{root}/{name}", mode=0o755, exist_ok=True)
    for path in extra_dirs:
        os.makedirs(f"{root}{path}", mode=0o755, exist_ok=True)
    for device in DEVICES:
        target = f"{root}/dev/{device}"
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o666))
        linux.mount(f"/dev/{device}", target, None, linux.MS_BIND)
        linux.mount(
            None,
            target,
            None,
            linux.MS_BIND | linux.MS_REMOUNT | linux.MS_NOSUID | linux.MS_NOEXEC,
        )
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{root}/dev/{name}")
    linux.mount(
        None, root, None, linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
    )


def _bind_ro(host: str, root: str) -> None:
    """Bind ``host`` read-only at the same path under ``root``, creating what leads there."""
    target = f"{root}{host}"
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if os.path.isdir(host):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    linux.mount(host, target, None, linux.MS_BIND)
    linux.mount(None, target, None, _RO_BIND)


# --- per job, in the job's init ---------------------------------------------------------------


def prepare(
    template: str,
    tmp_size_mb: int,
    workspace: str,
    etc: Mapping[str, str],
    tmp_binds: Iterable[str] = (),
) -> None:
    """Before there is a job: private propagation, then on the template's copy a fresh
    ``/proc`` (of this PID namespace), an empty ``/tmp`` (with ``tmp_binds``, the code the
    template had there, bound read-only again on top), the sandbox's ``/workspace`` (a
    directory on the host, owned by the job user), ``/etc`` with the files that are the same for
    every job and the egress files; then ``pivot_root`` into the copy and detach the host's
    tree. Call as PID 1 of a new PID namespace, in a new mount namespace, as root."""
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)  # nothing goes back out
    linux.mount("proc", f"{template}/proc", "proc", _SAFE)
    tmp = f"{template}/tmp"  # noqa: S108 - the job's own tmpfs
    linux.mount("tmpfs", tmp, "tmpfs", _SAFE, f"mode=1777,size={tmp_size_mb}m")
    if tmp_binds:
        tmp_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for path in tmp_binds:  # its directories above the code are root's, 0755
                _mount_point_in(tmp_fd, path.removeprefix(JOB_TMP + "/"), os.path.isdir(path))
                linux.mount(path, f"{template}{path}", None, linux.MS_BIND)
                linux.mount(None, f"{template}{path}", None, _RO_BIND)
        finally:
            os.close(tmp_fd)
    linux.mount(workspace, f"{template}/workspace", None, linux.MS_BIND)
    linux.mount(None, f"{template}/workspace", None, linux.MS_BIND | linux.MS_REMOUNT | _SAFE)
    linux.mount("tmpfs", f"{template}/etc", "tmpfs", _SAFE, f"mode=0755,size={ETC_SIZE}")
    _write_files(f"{template}/etc", etc)
    egress_dir = f"{template}{EGRESS_DIR}"  # hidden again for a job without network
    os.mkdir(egress_dir, 0o755)
    linux.mount("tmpfs", egress_dir, "tmpfs", _SAFE, "mode=0755,size=16k")
    for path in EGRESS_FILES:
        if os.path.exists(path):
            _bind_ro(path, template)
    linux.mount(None, egress_dir, None, linux.MS_REMOUNT | linux.MS_RDONLY | _SAFE)
    os.chdir(template)
    linux.pivot_root(".", ".")  # the old root now sits on top of the new one...
    linux.umount(".", linux.MNT_DETACH)  # ...and goes away, with every host mount under it
    os.chdir("/")


def _mount_point_in(dir_fd: int, relative: str, is_dir: bool) -> None:
    """Make ``relative`` (a directory, or a file) and what leads there inside the directory
    ``dir_fd``, through descriptors: never anywhere else, whatever happens to the template's
    mounts meanwhile (a state directory removed under a spare being prepared, say, would
    otherwise get them made on the host's disk)."""
    *parents, last = relative.split("/")
    fd = os.dup(dir_fd)
    try:
        for name in parents:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=fd)
            inner = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
            )
            os.close(fd)
            fd = inner
        if is_dir:
            with contextlib.suppress(FileExistsError):
                os.mkdir(last, 0o755, dir_fd=fd)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(last, flags, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def enter(etc: Mapping[str, str], egress: bool) -> None:
    """Per job, after :func:`prepare`, inside the root: the rest of ``/etc`` (the egress files
    go for a job without network), then ``/etc`` read-only."""
    _write_files("/etc", etc)
    if not egress:
        # Hidden under an empty read-only tmpfs, not unmounted: a mount takes about 15 µs,
        # where an unmount makes the kernel wait for an RCU grace period (50 µs on an idle
        # host, a millisecond and more on a busy one).
        linux.mount("tmpfs", EGRESS_DIR, "tmpfs", linux.MS_RDONLY | _SAFE, "mode=0755,size=4k")
    linux.mount(None, "/etc", None, linux.MS_REMOUNT | linux.MS_RDONLY | _SAFE)


def _write_files(directory: str, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        fd = os.open(f"{directory}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def common_etc(uid: int, gid: int, user: str) -> dict[str, str]:
    """The files of a job's /etc that are the same for every job: who is who."""
    return {
        "passwd": (
            "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
            f"{user}:x:{uid}:{gid}:Workernator job:/workspace:/usr/sbin/nologin\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\n{user}:x:{gid}:\nnogroup:x:65534:\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    }


def job_etc(hostname: str, resolv_conf: str | None) -> dict[str, str]:
    """The files of a job's /etc that are its own: its name, and for egress jobs how names
    resolve."""
    files = {
        "hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost\n",
        "hostname": f"{hostname}\n",
    }
    if resolv_conf is not None:
        files["resolv.conf"] = resolv_conf
    return files
