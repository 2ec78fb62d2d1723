"""Run a command confined as a systemd unit would confine it, read from the unit file itself:
for trying the daemons under ``deploy/systemd/`` on a host where systemd is not PID 1.

``python -m tests.unit_confine UNIT -- COMMAND...``, as root. It re-runs itself in new mount
(and, as the unit asks, IPC and UTS) namespaces, then applies what systemd 252 would:

- paths: ``ProtectSystem=full`` (``/usr``, ``/boot``, ``/efi``, ``/etc`` read-only) or
  ``strict`` (every mount read-only but ``/dev``, ``/proc``, ``/sys``, ``ReadWritePaths=`` and
  the directories named in ``$WN_UNIT_CONFINE_WRITABLE``, the test's stand-ins for the unit's
  ``StateDirectory=`` and ``RuntimeDirectory=``), ``ProtectHome=yes``
  (empty ``/home``, ``/root``, ``/run/user``; the code under test is bound back in, as an install
  in ``/opt`` would be seen), ``PrivateTmp=yes`` (empty ``/tmp`` and ``/var/tmp``),
  ``PrivateDevices=yes`` (a ``/dev`` of null, zero, full, random, urandom and tty),
  ``ProtectProc=`` and ``ProcSubset=`` (a ``/proc`` mounted with those options),
  ``ProtectKernelTunables=`` and ``ProtectControlGroups=`` (``/sys`` read-only);
- the process: ``User=``, ``Group=``, ``UMask=``, ``NoNewPrivileges=``, ``SecureBits=``,
  ``CapabilityBoundingSet=`` (with ``setpriv``; no ambient or inheritable capabilities),
  ``MemoryDenyWriteExecute=`` (the kernel's ``PR_SET_MDWE``, which refuses the same mappings);
- one seccomp filter: ``SystemCallFilter=`` (allow and deny lists, the groups expanded by
  ``systemd-analyze syscall-filter``) with ``SystemCallErrorNumber=``, ``RestrictAddressFamilies=``
  (EAFNOSUPPORT), ``RestrictSUIDSGID=`` (set-uid and set-gid modes), ``RestrictNamespaces=yes``
  (unshare, setns and namespace flags of clone), ``ProtectClock=``, ``ProtectKernelModules=``
  and ``ProtectHostname=`` (their calls), ``SystemCallArchitectures=native`` (libseccomp
  refuses other architectures' calls).

A setting it does not know makes it fail, unless listed in :data:`NOT_EMULATED` with the
reason; so a setting added to a unit is either emulated here or said not to be.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pyseccomp as seccomp

STAGE = "WN_UNIT_CONFINE_STAGE"
CODE = ("shared", "workernator_api", "workernator_runner", "tests", "deploy")  # what runs
WRITABLE = "WN_UNIT_CONFINE_WRITABLE"
HIDDEN_BY_PROTECT_HOME = ("/home", "/root", "/run/user")
READ_ONLY_BY_PROTECT_SYSTEM_FULL = ("/usr", "/boot", "/efi", "/etc")
API_FILE_SYSTEMS = ("/dev", "/proc", "/sys")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
AF_MAX = 64
PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
CLONE_NEW_FLAGS = (
    0x20000,
    0x2000000,
    0x4000000,
    0x8000000,
    0x10000000,
    0x20000000,
    0x40000000,
    0x80,
)
IGNORED_BY_SYSTEMD_HERE = {
    # Not confinement: how systemd runs, restarts and stops the unit, or its directories.
    "Type", "NotifyAccess", "ExecStart", "ExecStopPost", "Restart", "RestartSec", "KillMode",
    "TimeoutStopSec", "RuntimeDirectory", "RuntimeDirectoryMode", "RuntimeDirectoryPreserve",
    "StateDirectory", "StateDirectoryMode", "AmbientCapabilities",
}  # fmt: skip
NOT_EMULATED = {
    "PrivateMounts": "the command runs in a mount namespace of its own anyway",
    "PrivateUsers": "a user namespace mapping only the service's user: not emulated",
    "PrivateIPC": "emulated by the IPC namespace, with no further check",
    "ProtectKernelLogs": "no /dev/kmsg in a private /dev; the runner does not read it",
    "LockPersonality": "personality() is not filtered here",
    "RestrictRealtime": "realtime scheduling is not filtered here",
    "RemoveIPC": "acts after the unit stops",
    "KeyringMode": "the session keyring is not emulated",
    "DevicePolicy": "the device cgroup is not emulated (PrivateDevices= is)",
}


def service_settings(unit: Path) -> dict[str, list[str]]:
    """The ``[Service]`` section: each key with its values in order (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def _one(settings: dict[str, list[str]], key: str, default: str = "") -> str:
    return settings.pop(key, [default])[-1]


def _expand(groups: list[str]) -> set[str]:
    names: set[str] = set()
    for item in groups:
        if not item.startswith("@"):
            names.add(item)
            continue
        out = subprocess.run(
            ["systemd-analyze", "syscall-filter", item], capture_output=True, text=True, check=True
        ).stdout
        for line in out.splitlines()[1:]:
            name = line.strip()
            if name and not name.startswith("#"):
                names |= _expand([name])
    return names


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return sorted(set(points))


def _under(path: str, tops: tuple[str, ...]) -> bool:
    return any(path == top or path.startswith(top + "/") for top in tops)


def _empty_keeping(emptied: dict[str, str], keep: list[str]) -> None:
    """Mount an empty tmpfs of the given mode on each of ``emptied``, then put each path of
    ``keep`` under one of them back at its place (its parents new, root's, 0755: a checkout
    in a private directory is reachable as an install in /opt would be)."""
    hidden = tuple(emptied)
    # On a tmpfs that is not made read-only, under a name of this process's own; the host's
    # /dev/shm shares it, so it is removed again once the code is back in place.
    aside = Path(f"/dev/shm/wn-confine-keep-{os.getpid()}")
    kept: list[tuple[Path, str]] = []
    for path in keep:
        if _under(path, hidden):
            holder = aside / str(len(kept))
            holder.mkdir(parents=True, exist_ok=True)
            _mount("--bind", path, str(holder))
            kept.append((holder, path))
    for path, mode in emptied.items():
        _mount("-t", "tmpfs", "-o", f"mode={mode}", "tmpfs", path)
    for holder, path in kept:
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount("--bind", str(holder), path)
        subprocess.run(["umount", str(holder)], check=True)
        holder.rmdir()
    if kept:
        aside.rmdir()


def _paths(settings: dict[str, list[str]], keep: list[str]) -> None:
    if _one(settings, "PrivateDevices", "no") == "yes":
        new = "/run/wn-confine-dev"
        os.makedirs(new, exist_ok=True)
        _mount("-t", "tmpfs", "-o", "mode=0755,nosuid", "tmpfs", new)
        for name in DEVICES:
            Path(new, name).touch()
            _mount("--bind", f"/dev/{name}", f"{new}/{name}")
        os.mkdir(f"{new}/shm", 0o1777)
        _mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", f"{new}/shm")
        _mount("--move", new, "/dev")
        os.rmdir(new)
    protect_system = _one(settings, "ProtectSystem", "no")
    if protect_system == "full":
        for path in READ_ONLY_BY_PROTECT_SYSTEM_FULL:
            if os.path.isdir(path) and not os.path.islink(path):
                _mount("--bind", path, path)
                _mount("-o", "remount,bind,ro", path)
    elif protect_system == "strict":
        # What systemd leaves writable: the unit's ReadWritePaths=, and for its StateDirectory=
        # and RuntimeDirectory= the test's stand-ins (WRITABLE, colon-separated).
        writable = [p for v in settings.pop("ReadWritePaths", []) for p in v.split()]
        writable += [p for p in os.environ.get(WRITABLE, "").split(":") if p]
        for path in writable:
            _mount("--bind", path, path)
        for point in _mount_points():
            if not _under(point, (*API_FILE_SYSTEMS, *writable)):
                with contextlib.suppress(subprocess.CalledProcessError):
                    _mount("-o", "remount,bind,ro", point)
    elif protect_system != "no":
        raise SystemExit(f"ProtectSystem={protect_system} is not emulated")
    # Trees the unit empties, each with its tmpfs's mode: what the test runs from is put back.
    emptied: dict[str, str] = {}
    if _one(settings, "PrivateTmp", "no") == "yes":
        emptied |= dict.fromkeys(("/tmp", "/var/tmp"), "1777")
    if _one(settings, "ProtectHome", "no") == "yes":
        emptied |= dict.fromkeys((p for p in HIDDEN_BY_PROTECT_HOME if os.path.isdir(p)), "0755")
    _empty_keeping(emptied, keep)
    proc_options = []
    if (protect_proc := _one(settings, "ProtectProc", "default")) != "default":
        proc_options.append(f"hidepid={protect_proc}")
    if (subset := _one(settings, "ProcSubset", "all")) != "all":
        proc_options.append(f"subset={subset}")
    if proc_options:
        _mount("-t", "proc", "-o", ",".join(proc_options), "proc", "/proc")
    tunables = _one(settings, "ProtectKernelTunables", "no") == "yes"
    cgroups = _one(settings, "ProtectControlGroups", "no") == "yes"
    if tunables or cgroups:
        for point in _mount_points():
            if _under(point, ("/sys",)):
                with contextlib.suppress(subprocess.CalledProcessError):
                    _mount("-o", "remount,bind,ro", point)


FILTER_KEYS = (
    "SystemCallErrorNumber", "SystemCallFilter", "ProtectClock", "ProtectKernelModules",
    "ProtectHostname", "SystemCallArchitectures", "RestrictAddressFamilies", "RestrictSUIDSGID",
    "RestrictNamespaces",
)  # fmt: skip


def _seccomp(settings: dict[str, list[str]], *, load: bool) -> None:
    """The unit's system call filter, loaded (or only built, to check the settings)."""
    error = _one(settings, "SystemCallErrorNumber")
    refuse = seccomp.ERRNO(getattr(errno, error)) if error else seccomp.KILL_PROCESS
    allowed: set[str] = set()
    denied: set[str] = set()
    for value in settings.pop("SystemCallFilter", []):
        if value.startswith("~"):
            denied |= _expand(value[1:].split())
        else:
            allowed |= _expand(value.split())
    if _one(settings, "ProtectClock", "no") == "yes":
        denied |= _expand(["@clock"])
    if _one(settings, "ProtectKernelModules", "no") == "yes":
        denied |= _expand(["@module"])
    if _one(settings, "ProtectHostname", "no") == "yes":
        denied |= {"sethostname", "setdomainname"}
    _one(settings, "SystemCallArchitectures")  # native: what libseccomp does by default
    default = refuse if allowed else seccomp.ALLOW
    f = seccomp.SyscallFilter(default)

    def permitted(name: str) -> bool:
        return name not in denied and (not allowed or name in allowed)

    def add(action: int, name: str, *args: seccomp.Arg) -> None:
        if action != default:  # libseccomp refuses a rule that is the default
            with contextlib.suppress(OSError, RuntimeError, ValueError):  # not on this arch
                f.add_rule(action, name, *args)

    # Calls allowed for some arguments only: a rule for each case, none for the whole call.
    conditional: list[tuple[int, str, tuple[seccomp.Arg, ...]]] = []
    if families := settings.pop("RestrictAddressFamilies", []):
        kept = {getattr(socket, name) for value in families for name in value.split()}
        unsupported = seccomp.ERRNO(errno.EAFNOSUPPORT)
        for family in range(AF_MAX):
            action = seccomp.ALLOW if family in kept else unsupported
            conditional.append((action, "socket", (seccomp.Arg(0, seccomp.EQ, family),)))
        conditional.append((unsupported, "socket", (seccomp.Arg(0, seccomp.GE, AF_MAX),)))
    if _one(settings, "RestrictSUIDSGID", "no") == "yes":
        both = stat.S_ISUID | stat.S_ISGID
        for call, arg in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2)):
            for bit in (stat.S_ISUID, stat.S_ISGID):
                rule = seccomp.Arg(arg, seccomp.MASKED_EQ, bit, bit)
                conditional.append((seccomp.ERRNO(errno.EPERM), call, (rule,)))
            ordinary = seccomp.Arg(arg, seccomp.MASKED_EQ, both, 0)
            conditional.append((seccomp.ALLOW, call, (ordinary,)))
    if _one(settings, "RestrictNamespaces", "no") == "yes":
        denied |= {"unshare", "setns"}
        all_flags = sum(CLONE_NEW_FLAGS)
        for flag in CLONE_NEW_FLAGS:
            rule = seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag)
            conditional.append((seccomp.ERRNO(errno.EPERM), "clone", (rule,)))
        ordinary = seccomp.Arg(0, seccomp.MASKED_EQ, all_flags, 0)
        conditional.append((seccomp.ALLOW, "clone", (ordinary,)))
        add(seccomp.ERRNO(errno.ENOSYS), "clone3")  # glibc falls back to clone
        allowed.discard("clone3")
    with_conditions = {name for _, name, _ in conditional}
    for name in sorted((allowed | denied) - with_conditions):
        add(seccomp.ALLOW if permitted(name) else refuse, name)
    for action, name, args in conditional:
        if permitted(name) or action != seccomp.ALLOW:
            add(action, name, *args)
    if load:
        f.load()


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def _setpriv(settings: dict[str, list[str]]) -> list[str]:
    caps = ["-all"] + [
        "+" + cap.removeprefix("CAP_").lower()
        for value in settings.pop("CapabilityBoundingSet", [])
        for cap in value.split()
    ]
    argv = ["setpriv", "--bounding-set", ",".join(caps), "--inh-caps", "-all"]
    if user := _one(settings, "User"):
        group = _one(settings, "Group", user)
        argv += ["--reuid", user, "--regid", group, "--clear-groups"]
    if (bits := _one(settings, "SecureBits")) == "noroot-locked":
        argv += ["--securebits", "+noroot,+noroot_locked"]
    elif bits:
        raise SystemExit(f"SecureBits={bits} is not emulated")
    return argv


def confine(unit: Path, command: list[str]) -> None:
    """Apply ``unit``'s namespaces, paths and process settings to this process (root, in
    namespaces of its own), then become its user and load its filter (:func:`main`'s last
    stage) and exec ``command``."""
    settings = service_settings(unit)
    for key in IGNORED_BY_SYSTEMD_HERE | set(NOT_EMULATED):
        settings.pop(key, None)
    # The code, not the checkout itself: that may be a private (0700) directory.
    root = Path(__file__).resolve().parent.parent
    keep = [str(root / name) for name in CODE if (root / name).exists()]
    keep.append(os.path.realpath(sys.prefix))
    _paths(settings, keep)
    if umask := _one(settings, "UMask"):
        os.umask(int(umask, 8))
    if _one(settings, "MemoryDenyWriteExecute", "no") == "yes":
        _prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)  # kept across exec
    if _one(settings, "NoNewPrivileges", "no") == "yes":
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    setpriv = _setpriv(settings)
    _seccomp(dict(settings), load=False)  # every setting is known before anything runs
    for key in FILTER_KEYS:
        settings.pop(key, None)
    if settings:
        raise SystemExit(f"not emulated and not said why: {', '.join(sorted(settings))}")
    os.environ[STAGE] = "filter"
    me = [sys.executable, "-m", "tests.unit_confine", str(unit), "--", *command]
    os.execvp(setpriv[0], [*setpriv, "--", *me])


def main(argv: list[str]) -> int:
    unit, separator, *command = argv
    if separator != "--" or not command:
        raise SystemExit("usage: python -m tests.unit_confine UNIT -- COMMAND...")
    stage = os.environ.pop(STAGE, "")
    me = [sys.executable, "-m", "tests.unit_confine", *argv]
    if not stage:  # first: into namespaces of its own, as systemd does
        settings = service_settings(Path(unit))
        flags = ["-m", "--propagation", "private"]
        if settings.get("PrivateIPC") == ["yes"]:
            flags.append("-i")
        if settings.get("ProtectHostname") == ["yes"]:
            flags.append("-u")
        os.environ[STAGE] = "inside"
        os.execvp("unshare", ["unshare", *flags, "--", *me])
    if stage == "inside":  # then paths and the process, as root; then its user...
        confine(Path(unit), command)
    # ...and last the system call filter, which may refuse what setpriv needed.
    _seccomp(service_settings(Path(unit)), load=True)
    os.execvp(command[0], command)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
