"""Run a command confined as a systemd unit would confine it, read from the unit file itself:
for trying the runner under ``deploy/systemd/workernator-runner.service`` on a host where
systemd is not PID 1.

``python -m tests.unit_confine UNIT -- COMMAND...``, as root, in a mount namespace of its own
(``unshare -m --propagation private``). What it applies, as systemd 252 does:

- ``ProtectSystem=full`` (``/usr``, ``/boot``, ``/efi``, ``/etc`` read-only), ``ProtectHome=yes``
  (empty ``/home``, ``/root``, ``/run/user``), ``PrivateTmp=yes`` (an empty ``/tmp``). The code
  under test stays visible: a checkout under ``/root`` is bound back in, as an install in
  ``/opt`` would be seen.
- ``NoNewPrivileges=yes``, ``CapabilityBoundingSet=`` (with ``setpriv``), no ambient or
  inheritable capabilities.
- ``SystemCallFilter=~...`` (the groups expanded by ``systemd-analyze syscall-filter``) with
  ``SystemCallErrorNumber=``, ``RestrictAddressFamilies=`` (EAFNOSUPPORT) and
  ``RestrictSUIDSGID=yes`` (set-uid and set-gid modes refused), as one seccomp filter.

Any other setting of the unit is not emulated; the test names those it relies on.
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

HIDDEN_BY_PROTECT_HOME = ("/home", "/root", "/run/user")
READ_ONLY_BY_PROTECT_SYSTEM_FULL = ("/usr", "/boot", "/efi", "/etc")
AF_MAX = 64


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


def _expand(groups: list[str]) -> set[str]:
    names: set[str] = set()
    for item in groups:
        if not item.startswith("@"):
            names.add(item)
            continue
        out = subprocess.run(
            ["systemd-analyze", "syscall-filter", item],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines()[1:]:
            name = line.strip()
            if name and not name.startswith("#"):
                names |= _expand([name]) if name.startswith("@") else {name}
    return names


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _protect_paths(settings: dict[str, list[str]], keep: list[str]) -> None:
    if settings.get("ProtectSystem") == ["full"]:
        for path in READ_ONLY_BY_PROTECT_SYSTEM_FULL:
            if os.path.isdir(path) and not os.path.islink(path):
                _mount("--bind", path, path)
                _mount("-o", "remount,bind,ro", path)
    elif "ProtectSystem" in settings:
        raise SystemExit(f"ProtectSystem={settings['ProtectSystem']} is not emulated")
    if settings.get("PrivateTmp") == ["yes"]:
        _mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp")
    if settings.get("ProtectHome") == ["yes"]:
        hidden = [p for p in HIDDEN_BY_PROTECT_HOME if os.path.isdir(p)]
        # Bind what the test runs from first, so that it can be put back over the emptied tree.
        spare = Path("/run/wn-confine-keep")
        kept: list[tuple[Path, str]] = []
        for path in keep:
            if any(path == h or path.startswith(h + "/") for h in hidden):
                holder = spare / str(len(kept))
                holder.mkdir(parents=True, exist_ok=True)
                _mount("--bind", path, str(holder))
                kept.append((holder, path))
        for path in hidden:
            _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", path)
        for holder, path in kept:
            os.makedirs(path, exist_ok=True)
            _mount("--move", str(holder), path)


def _seccomp(settings: dict[str, list[str]]) -> None:
    action = seccomp.KILL_PROCESS
    if "SystemCallErrorNumber" in settings:
        action = seccomp.ERRNO(getattr(errno, settings["SystemCallErrorNumber"][-1]))
    denied: list[str] = []
    for value in settings.get("SystemCallFilter", []):
        if not value.startswith("~"):
            raise SystemExit("only deny lists (SystemCallFilter=~...) are emulated")
        denied += value[1:].split()
    f = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in sorted(_expand(denied)):
        with contextlib.suppress(OSError, RuntimeError, ValueError):  # not on this architecture
            f.add_rule(action, name)
    families = settings.get("RestrictAddressFamilies", [])
    if families:
        allowed = {getattr(socket, name) for value in families for name in value.split()}
        for family in range(AF_MAX):
            if family not in allowed:
                f.add_rule(
                    seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, family)
                )
    if settings.get("RestrictSUIDSGID") == ["yes"]:
        for call, arg in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2)):
            for bit in (stat.S_ISUID, stat.S_ISGID):
                f.add_rule(
                    seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(arg, seccomp.MASKED_EQ, bit, bit)
                )
    f.load()


def main(argv: list[str]) -> int:
    unit, separator, *command = argv
    if separator != "--" or not command:
        raise SystemExit("usage: python -m tests.unit_confine UNIT -- COMMAND...")
    settings = service_settings(Path(unit))
    keep = [str(Path(__file__).resolve().parent.parent), os.path.realpath(sys.prefix)]
    _protect_paths(settings, keep)
    if settings.get("NoNewPrivileges") == ["yes"]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    _seccomp(settings)
    caps = ["-all"] + [
        "+" + cap.removeprefix("CAP_").lower()
        for value in settings.get("CapabilityBoundingSet", [])
        for cap in value.split()
    ]
    setpriv = ["setpriv", "--bounding-set", ",".join(caps), "--inh-caps", "-all"]
    os.execvp(setpriv[0], [*setpriv, "--", *command])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
