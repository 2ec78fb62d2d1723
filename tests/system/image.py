"""The system test's Debian 12 image: built from Debian packages with mmdebstrap, cached.

The image is a plain Debian 12 host (systemd as PID 1, cgroup v2) plus three things a test
needs and an operator's host would not have: the command channel's agent (``guest_agent.py``),
a static address for qemu's user network, and no apt timers. Nothing of Workernator is in it:
the code, the units and the certificates are handed in per run, so the cache stays valid while
the project changes. The cache key is a hash of this module and the agent (the recipe), so a
change to either builds a new image; old ones stay until removed (``rm -rf`` the cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("WORKERNATOR_VM_CACHE", "/var/cache/workernator-test"))
SUITE = "bookworm"
DISK_SIZE = "3G"
AGENT_PORT = "wn"  # the virtio serial port's name: /dev/virtio-ports/wn in the guest
GUEST_ADDRESS = "10.0.2.15"  # where qemu's user network forwards ports to

# What an operator's Debian 12 host has, plus what the runner needs (design: nftables for the
# jobs' egress, iproute2, libseccomp2 for the jobs' system call filter) and procps for `ps`.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "linux-image-amd64",
    "python3",
    "python3-venv",
    "iproute2",
    "kmod",
    "nftables",
    "libseccomp2",
    "procps",
)

_AGENT_UNIT = f"""\
[Unit]
Description=Command channel of the system test (virtio port {AGENT_PORT})
BindsTo=dev-virtio\\x2dports-{AGENT_PORT}.device
After=dev-virtio\\x2dports-{AGENT_PORT}.device

[Service]
ExecStart=/usr/bin/python3 /usr/local/sbin/wn-agent
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

_NETWORK = f"""\
[Match]
Name=en*

[Network]
Address={GUEST_ADDRESS}/24
LinkLocalAddressing=no
IPv6AcceptRA=no
"""

# Files written into the root, by path. No DNS: the guest has no outside network at all.
FILES = {
    "etc/hostname": "wn-vm\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 wn-vm\n",
    "etc/resolv.conf": "# no DNS in the system test's VM\n",
    "etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
    "etc/systemd/network/10-qemu.network": _NETWORK,
    "etc/systemd/system/wn-agent.service": _AGENT_UNIT,
}
ENABLE = ("systemd-networkd.service", "wn-agent.service")
MASK = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "systemd-networkd-wait-online.service",  # a static address: nothing to wait for
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
)
_AGENT = Path(__file__).with_name("guest_agent.py")


@dataclass(frozen=True)
class BaseImage:
    """A cached, read-only base: a raw ext4 disk, and the kernel and initrd to boot it with."""

    disk: Path
    kernel: Path
    initrd: Path
    build_seconds: float  # 0 when it came from the cache


def recipe_key() -> str:
    """The hash of everything that goes into the image: packages, files, units, the steps."""
    recipe = (SUITE, DISK_SIZE, PACKAGES, sorted(FILES.items()), ENABLE, MASK)
    digest = hashlib.sha256(repr(recipe).encode())
    digest.update(inspect.getsource(_build).encode())
    digest.update(_AGENT.read_bytes())
    return digest.hexdigest()[:16]


def missing_tools() -> list[str]:
    """The host commands the VM test needs and lacks (``make test`` installs them)."""
    tools = ("mmdebstrap", "mkfs.ext4", "qemu-system-x86_64", "qemu-img")
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [t for t in tools if shutil.which(t, path=path) is None]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time (parallel test runs share the cache)."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def base_image(cache: Path = CACHE) -> BaseImage:
    """The cached image for this recipe, built first when there is none."""
    target = cache / f"{SUITE}-{recipe_key()}"
    image = BaseImage(target / "disk.img", target / "vmlinuz", target / "initrd.img", 0.0)
    if (target / "ready").exists():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / "build.lock"):
        if (target / "ready").exists():  # built by another run while this one waited
            return image
        start = time.monotonic()
        for stale in cache.glob("building-*"):  # a build that was killed (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        work = cache / f"building-{os.getpid()}"
        try:
            _build(work)
            shutil.rmtree(target, ignore_errors=True)
            work.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        (target / "ready").write_text(f"{time.monotonic() - start:.1f}\n")
        return BaseImage(image.disk, image.kernel, image.initrd, time.monotonic() - start)


def _build(work: Path) -> None:
    root = work / "root"
    work.mkdir(parents=True)
    _run(
        "mmdebstrap",
        "--quiet",
        "--variant=apt",
        "--format=directory",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(root),
    )
    for rel, text in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # resolv.conf may be a symlink
        path.write_text(text)
    agent = root / "usr/local/sbin/wn-agent"
    shutil.copyfile(_AGENT, agent)
    agent.chmod(0o755)
    _run("systemctl", f"--root={root}", "enable", *ENABLE)
    _run("systemctl", f"--root={root}", "mask", *MASK)
    (kernel,) = sorted((root / "boot").glob("vmlinuz-*"))
    (initrd,) = sorted((root / "boot").glob("initrd.img-*"))
    shutil.copyfile(kernel, work / "vmlinuz")
    shutil.copyfile(initrd, work / "initrd.img")
    _run(
        "mkfs.ext4", "-q", "-L", "wn-root", "-d", str(root), "-F", str(work / "disk.img"), DISK_SIZE
    )
    shutil.rmtree(root)


def _run(*argv: str) -> None:
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"building the VM image: {' '.join(argv[:3])}... exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
