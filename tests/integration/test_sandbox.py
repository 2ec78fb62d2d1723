"""The sandbox, observed from inside real jobs started through the runner library.

Every job runs in its own PID, mount, network, UTS, IPC and cgroup namespaces, in a minimal
read-only root, as the unprivileged job user with no capabilities, no_new_privs and a seccomp
filter. These tests look from inside a hostile job (tests/probe_jobs.py) and check what it can
see, reach and do, with a control wherever a check could pass for the wrong reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.model import JobState
from tests.conftest import ROOT
from tests.helpers import collect, job_namespace, namespace_members, run_job
from tests.nethosts import JOB_USER
from workernator_runner.manager import JobManager


async def _probe(m: JobManager, job_type: str, **args: object) -> dict[str, object]:
    status, out, err = await run_job(m, job_type, args)
    assert status.state is JobState.COMPLETED, (status, err)
    report: dict[str, object] = json.loads(out)
    return report


@pytest.fixture
async def inside(manager: JobManager) -> dict[str, object]:
    """What a job sees, asked about the paths a hostile job would look for."""
    other = await manager.start("drip", {"count": 1, "interval": 60}, "bob")  # someone else's
    paths = [
        "/etc/workernator",
        "/root",
        "/home",
        str(manager.config.state_dir),
        str(manager.config.jobs_dir / other.id),
        "/etc/resolv.conf",
        "/etc/ssl/certs",
        "/sys",
        "/var",
        "/run",
        "/boot",
        "/dev/sda",
        "/dev/vda",
        "/dev/mem",
    ]
    try:
        return await _probe(manager, "inspect", paths=json.dumps(paths))
    finally:
        await manager.stop(other.id)


async def test_a_job_sees_only_its_own_processes_and_names(
    manager: JobManager, inside: dict[str, object]
) -> None:
    assert inside["pid"] == 2  # its init is 1
    assert inside["proc_pids"] == [1, 2]  # not the runner, not the other job running now
    assert isinstance(inside["hostname"], str) and len(inside["hostname"]) == 6
    assert inside["hostname"] != os.uname().nodename
    assert inside["interfaces"] == ["lo"]  # network mode none: loopback only


async def test_a_job_runs_as_the_job_user_with_nothing_else(inside: dict[str, object]) -> None:
    user = pwd.getpwnam(JOB_USER)
    assert inside["uid"] == [user.pw_uid] * 3
    assert inside["gid"] == [user.pw_gid] * 3
    assert inside["groups"] == []
    assert inside["caps"] == {
        key: "0000000000000000" for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
    }
    assert inside["no_new_privs"] == "1"
    assert inside["seccomp"] == "2"  # a filter
    assert inside["fds"] == [0, 1, 2]
    assert inside["env"] == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/workspace",
        "TMPDIR": "/tmp",
    }
    assert inside["cwd"] == "/workspace"


async def test_the_host_is_absent_from_a_jobs_root(inside: dict[str, object]) -> None:
    exists = inside["exists"]
    assert isinstance(exists, dict)
    assert {path for path, there in exists.items() if there} <= _allowed_host_paths()
    for path in ("/etc/workernator", "/sys", "/var", "/run", "/boot", "/dev/sda", "/dev/mem"):
        assert exists[path] is False, path
    assert exists["/etc/resolv.conf"] is False  # network mode none: no name servers
    assert exists["/etc/ssl/certs"] is False
    root = inside["root"]
    assert isinstance(root, list)
    expected = {"bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp", "usr", "workspace"}
    # Plus the first component of where the runner's Python and code live (bound read-only).
    assert set(root) - expected <= {p.split("/")[1] for p in _code_paths()}


def _code_paths() -> set[str]:
    from workernator_runner import rootfs

    return set(rootfs.python_paths())


def _allowed_host_paths() -> set[str]:
    """A job may see the directories that lead to the code it runs, and nothing else."""
    allowed: set[str] = set()
    for path in _code_paths():
        parts = Path(path).parts
        allowed.update(str(Path(*parts[:i])) for i in range(2, len(parts) + 1))
    return allowed


async def test_a_job_can_write_only_to_tmp_and_workspace(inside: dict[str, object]) -> None:
    writable = inside["writable"]
    assert isinstance(writable, dict)
    assert writable.pop("/tmp") == "ok"
    assert writable.pop("/workspace") == "ok"
    assert writable.pop("/proc") in ("ENOENT", "EACCES")  # no file can be made in /proc
    assert set(writable.values()) == {"EROFS"}, writable


async def test_root_home_and_other_jobs_are_out_of_reach(manager: JobManager) -> None:
    """A secret the test leaves in /root and in another job's directory: not visible."""
    marker = Path("/root") / f".wn-test-secret-{secrets.token_hex(4)}"
    marker.write_text("secret")
    other = await manager.start("drip", {"count": 1, "interval": 60}, "bob")
    try:
        report = await _probe(
            manager,
            "inspect",
            paths=json.dumps([str(marker), str(manager.config.jobs_dir / other.id / "job.json")]),
        )
    finally:
        marker.unlink()
        await manager.stop(other.id)
    assert report["exists"] == {
        str(marker): False,
        str(manager.config.jobs_dir / other.id / "job.json"): False,
    }


async def test_forbidden_system_calls_fail_with_eperm(manager: JobManager) -> None:
    report = await _probe(manager, "syscalls")
    assert report == {
        "unshare_user": "EPERM",  # an unprivileged process could do this without seccomp
        "unshare_net": "EPERM",
        "mount": "EPERM",
        "ptrace": "EPERM",
        "setuid0": "EPERM",
        "chroot": "EPERM",
        "sethostname": "EPERM",
        "raw_socket": "EPERM",
        "mknod": "EPERM",
        # EPERM while the init is still root (it drops its privileges last), allowed and
        # ignored after that: the init of a namespace cannot be killed from inside.
        "kill_init": report["kill_init"] if report["kill_init"] in ("ok", "EPERM") else "?",
    }


def _setuid_copy_of_id(directory: Path) -> Path:
    binary = directory / "id"
    shutil.copy("/usr/bin/id", binary)
    os.chown(binary, 0, 0)
    os.chmod(binary, 0o4755)
    return binary


@pytest.fixture
def setuid_id() -> Iterator[Path]:
    """A setuid-root copy of id(1) where jobs can see it (the tests' own code directory, which
    the sandbox binds read-only), and a control: the same copy raises the job user on the host
    (made in a world-readable directory, in case the checkout is not)."""
    directory = ROOT / "tests" / f".wn-suid-{secrets.token_hex(4)}"
    directory.mkdir(mode=0o755)
    control = Path(tempfile.mkdtemp(prefix="wn-suid-"))
    os.chmod(control, 0o755)
    try:
        user = pwd.getpwnam(JOB_USER)
        result = subprocess.run(
            [str(_setuid_copy_of_id(control)), "-u"],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.strip() == "0", "the setuid copy does not work on the host"
        yield _setuid_copy_of_id(directory)
    finally:
        shutil.rmtree(directory)
        shutil.rmtree(control)


async def test_a_setuid_binary_does_not_raise_a_job(manager: JobManager, setuid_id: Path) -> None:
    assert os.stat(setuid_id).st_mode & stat.S_ISUID
    report = await _probe(manager, "run", argv=json.dumps([str(setuid_id), "-u"]))
    assert report["code"] == 0
    assert report["out"] == f"{pwd.getpwnam(JOB_USER).pw_uid}\n"


async def test_a_job_cannot_find_another_users_arguments_in_its_memory(
    manager: JobManager,
) -> None:
    prefix = "wnsecret-"
    secret = secrets.token_hex(16)  # 32 hex digits
    digest = hashlib.sha256(secret.encode()).hexdigest()
    alice = await manager.start("secret", {"secret": prefix + secret, "seconds": 60}, "alice")
    try:
        # Control: a job holding the secret finds it in its own memory.
        own = await _probe(manager, "memscan", prefix=prefix, digest=digest, secret=prefix + secret)
        assert own["hits"] >= 1  # type: ignore[operator]
        theirs = await _probe(manager, "memscan", prefix=prefix, digest=digest)
        assert theirs["hits"] == 0
        assert theirs["scanned"] > 10_000_000  # type: ignore[operator] # it did look
    finally:
        await manager.stop(alice.id)


async def test_no_zombies_and_no_pid_namespace_left_after_short_jobs(
    manager: JobManager,
) -> None:
    namespaces = []
    for _ in range(20):
        job = await manager.start("forker", {"children": 1, "seconds": 0.2}, "alice")
        # A busy host may have run it to its end already: then nothing is left of it.
        with contextlib.suppress(FileNotFoundError):
            namespaces.append(job_namespace(manager, job.id))
        await collect(manager, job.id)
    for namespace in namespaces:
        assert namespace_members(namespace) == []
    assert _zombie_children(os.getpid()) == []


def _zombie_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    zombies = []
    for child in children:
        with open(f"/proc/{child}/stat", "rb") as f:
            stat_line = f.read()
        if stat_line[stat_line.rindex(b")") + 2 :].split()[0] == b"Z":
            zombies.append(int(child))
    return zombies


async def test_the_workspace_is_private_and_removed_with_the_job(manager: JobManager) -> None:
    job = await manager.start("drip", {"count": 1, "interval": 60}, "alice")
    workspace = manager.config.workspaces_dir / job.id
    info = workspace.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (pwd.getpwnam(JOB_USER).pw_uid, 0o700)
    await manager.stop(job.id)
    assert not workspace.exists()


async def test_only_jobs_with_network_get_name_servers_and_ca_certificates(
    manager: JobManager,
) -> None:
    paths = ["/etc/resolv.conf", "/etc/ssl", "/etc/ssl/certs", "/etc/ssl/openssl.cnf", "/etc"]
    egress = await _probe(manager, "egress-inspect", paths=json.dumps(paths))
    assert egress["exists"] == dict.fromkeys(paths, True)
    assert egress["interfaces"] == ["eth0", "lo"]
    listed = egress["listed"]
    assert isinstance(listed, dict)
    assert len(listed["/etc/ssl/certs"]) > 10  # the host's CA certificates
    assert listed["/etc"] == [
        "group",
        "hostname",
        "hosts",
        "nsswitch.conf",
        "passwd",
        "resolv.conf",
        "ssl",
    ]
    none = await _probe(manager, "inspect", paths=json.dumps(paths))
    # /etc/ssl stays, empty: hidden under an empty read-only tmpfs (cheaper than an unmount).
    assert none["exists"] == {**dict.fromkeys(paths, False), "/etc": True, "/etc/ssl": True}
    assert none["listed"] == {
        **dict.fromkeys(paths),
        "/etc": ["group", "hostname", "hosts", "nsswitch.conf", "passwd", "ssl"],
        "/etc/ssl": [],
    }
