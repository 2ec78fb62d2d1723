"""The real runner's files as root: attacks on its directories, socket, state and output files.

Each test plants what an attacker would (a symbolic link, a writable directory, a huge uid, a
full disk) and checks through the real ``workernator-runner`` process that it is refused or
survived, and that whatever the attack aimed at is untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from shared.model import JobState
from tests.conftest import (
    ROOT,
    Daemon,
    _stop_leftover_jobs,
    daemon_on_tmpfs_jobs,
    short_tmpdir,
    write_runner_config,
)
from tests.nethosts import wait_for
from workernator_api.runner_client import RunnerClient
from workernator_runner import monitor, store
from workernator_runner.config import RunnerConfig

pytestmark = pytest.mark.privileged

USER = ("alice", "user")
STRANGER = 1234  # the owner of the attacker's files and of the targets they aim at
HUGE_UID = 3_000_000_000  # above 2**31: a negative number when read as a signed int


def _snapshot(path: Path) -> object:
    """What an attack could change at ``path``: every entry's type, owner, mode, times and
    contents, without following links."""
    st = path.lstat()
    entry: dict[str, object] = {
        "mode": st.st_mode,
        "owner": (st.st_uid, st.st_gid),
        "mtime": st.st_mtime_ns,
        "ctime": st.st_ctime_ns,
    }
    if stat.S_ISLNK(st.st_mode):
        entry["target"] = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        entry["entries"] = {child.name: _snapshot(child) for child in sorted(path.iterdir())}
    else:
        entry["data"] = path.read_bytes()
    return entry


@pytest.fixture
def target() -> Iterator[Path]:
    """What an attacker points a link at: another user's directory with a file in it."""
    base = short_tmpdir("wn-target-")
    os.chmod(base, 0o755)
    directory = base / "theirs"
    directory.mkdir(mode=0o750)
    (directory / "precious").write_text("do not touch\n")
    os.chmod(directory / "precious", 0o640)
    os.chown(directory / "precious", STRANGER, STRANGER)
    os.chown(directory, STRANGER, STRANGER)
    yield directory
    shutil.rmtree(base)


def _run_runner(cfg: RunnerConfig, where: Path) -> subprocess.CompletedProcess[str]:
    """Run ``workernator-runner`` with ``cfg``; it is expected to refuse, so it exits soon."""
    config_path = where / "runner-test.toml"
    write_runner_config(cfg, config_path)
    return subprocess.run(
        [sys.executable, "-m", "workernator_runner.daemon", "--config", str(config_path)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _refused(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one line a refusing runner printed; each of ``words`` is in it."""
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith("workernator-runner: "), line
    assert "\n" not in line, line  # a clear message, no traceback
    for word in words:
        assert word in line, line
    return line


# --- symbolic links where the runner makes its directories and socket -------------------------


def test_a_symlink_at_the_socket_directory_is_not_followed(
    runner_config: RunnerConfig, state_dir: Path, target: Path
) -> None:
    link = state_dir / "run"
    link.symlink_to(target)
    before = _snapshot(target)
    cfg = dataclasses.replace(runner_config, socket=link / "runner.sock")
    line = _refused(_run_runner(cfg, state_dir), str(link), "is a symbolic link", "expected")
    assert _snapshot(target) == before  # no socket made there, no chown, no chmod
    assert not (state_dir / "jobs").exists()  # refused before anything else was made
    assert "0755" in line


def test_a_symlink_at_the_socket_path_is_neither_followed_nor_removed(
    runner_config: RunnerConfig, state_dir: Path, target: Path
) -> None:
    link = state_dir / "runner.sock"
    link.symlink_to(target / "precious")
    before = _snapshot(target)
    _refused(_run_runner(runner_config, state_dir), str(link), "is a symbolic link")
    assert _snapshot(target) == before
    assert os.readlink(link) == str(target / "precious")


@pytest.mark.parametrize("which", ["state_dir", "jobs", "workspaces", "sandbox"])
def test_a_symlink_at_a_state_directory_is_not_followed(
    runner_config: RunnerConfig, state_dir: Path, target: Path, which: str
) -> None:
    cfg = runner_config
    if which == "state_dir":  # the socket elsewhere, so that the state directory comes first
        cfg = dataclasses.replace(cfg, state_dir=state_dir / "state")
        link = cfg.state_dir
    else:
        link = state_dir / which
    link.symlink_to(target)
    before = _snapshot(target)
    _refused(_run_runner(cfg, state_dir), str(link), "is a symbolic link")
    assert _snapshot(target) == before
    assert not cfg.socket.exists()


# --- directories that exist with another owner or a mode that lets others write ---------------


@pytest.mark.parametrize(
    ("which", "mode", "owner", "words"),
    [
        ("state_dir", 0o777, 0, ["0777", "nobody else can write", "chmod 0700"]),
        ("state_dir", 0o770, 0, ["0770"]),
        ("state_dir", 0o700, STRANGER, [f"uid {STRANGER}", "expected a directory owned by root"]),
        ("socket_dir", 0o757, 0, ["0757", "like mode 0755"]),
        ("socket_dir", 0o755, STRANGER, [f"uid {STRANGER}"]),
        ("jobs", 0o722, 0, ["0722"]),
        ("workspaces", 0o700, STRANGER, [f"uid {STRANGER}"]),
        ("above", 0o777, 0, ["0777", "every directory above", "or sticky"]),
        ("above", 0o755, STRANGER, [f"uid {STRANGER}", "every directory above"]),
    ],
)
def test_an_unsafe_existing_directory_stops_the_runner_with_a_clear_message(
    runner_config: RunnerConfig,
    state_dir: Path,
    which: str,
    mode: int,
    owner: int,
    words: list[str],
) -> None:
    cfg = dataclasses.replace(
        runner_config,
        state_dir=state_dir / "above" / "state",
        socket=state_dir / "run" / "runner.sock",
    )
    path = {
        "state_dir": cfg.state_dir,
        "socket_dir": cfg.socket.parent,
        "jobs": cfg.jobs_dir,
        "workspaces": cfg.workspaces_dir,
        "above": cfg.state_dir.parent,
    }[which]
    path.mkdir(parents=True)
    os.chmod(path, mode)
    os.chown(path, owner, owner)
    before = _snapshot(path)
    _refused(_run_runner(cfg, state_dir), str(path), *words)
    assert _snapshot(path) == before  # neither "fixed" nor used
    assert not cfg.socket.exists()


def test_a_sticky_directory_above_like_tmp_is_fine_and_what_is_made_gets_its_mode(
    runner_config: RunnerConfig, state_dir: Path
) -> None:
    sticky = state_dir / "shared"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    cfg = dataclasses.replace(
        runner_config, state_dir=sticky / "state", socket=sticky / "run" / "runner.sock"
    )
    config_path = state_dir / "runner-sticky.toml"
    write_runner_config(cfg, config_path)
    old_umask = os.umask(0)  # the runner's modes do not depend on the umask it inherits
    try:
        daemon = Daemon(cfg, config_path, state_dir / "runner-sticky.log")
        daemon.start()
    finally:
        os.umask(old_umask)
    try:
        modes = {
            path: stat.S_IMODE(path.stat().st_mode)
            for path in (
                cfg.socket.parent,
                cfg.socket,
                cfg.state_dir,
                cfg.jobs_dir,
                cfg.workspaces_dir,
                cfg.sandbox_dir,
            )
        }
        assert modes == {
            cfg.socket.parent: 0o755,
            cfg.socket: 0o660,
            cfg.state_dir: 0o700,
            cfg.jobs_dir: 0o700,
            cfg.workspaces_dir: 0o700,
            cfg.sandbox_dir: 0o700,
        }
    finally:
        daemon.stop()
        _stop_leftover_jobs(cfg)


# --- the peer's uid ---------------------------------------------------------------------------

_PEER = """
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
data = b""
while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.hex())
"""


def _first_frame_as(uid: int, socket_path: Path) -> dict[str, object]:
    """The first frame the runner sends a process of ``uid`` that connects: its hello, or a
    refusal (sent before it reads anything)."""
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", _PEER, str(socket_path)],
        user=uid,
        group=uid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = bytes.fromhex(result.stdout.strip())
    frame = msgpack.unpackb(data[4 : 4 + int.from_bytes(data[:4], "big")])
    assert isinstance(frame, dict)
    return frame


def _open_to_everyone(cfg: RunnerConfig) -> None:
    os.chmod(cfg.state_dir, 0o755)  # let other uids reach the socket at all
    os.chmod(cfg.socket, 0o666)


def test_a_peer_with_a_uid_above_2_to_the_31_is_seen_as_it_is(daemon: Daemon) -> None:
    _open_to_everyone(daemon.config)
    frame = _first_frame_as(HUGE_UID, daemon.config.socket)
    assert frame["type"] == "error"
    assert frame["message"] == f"uid {HUGE_UID} is not allowed"  # not -1294967296
    assert f"peer_uid={HUGE_UID}".encode() in daemon.log_path.read_bytes()


def test_a_peer_with_a_huge_uid_is_allowed_when_listed(
    runner_config: RunnerConfig, state_dir: Path
) -> None:
    cfg = dataclasses.replace(runner_config, allowed_uids=frozenset({0, HUGE_UID}))
    config_path = state_dir / "runner-huge.toml"
    write_runner_config(cfg, config_path)
    daemon = Daemon(cfg, config_path, state_dir / "runner-huge.log")
    daemon.start()
    try:
        _open_to_everyone(cfg)
        assert _first_frame_as(HUGE_UID, cfg.socket)["type"] == "hello"
        assert _first_frame_as(HUGE_UID + 1, cfg.socket)["type"] == "error"
    finally:
        daemon.stop()
        _stop_leftover_jobs(cfg)


# --- state files ------------------------------------------------------------------------------


async def test_links_planted_at_state_temp_names_are_not_followed(
    daemon: Daemon, target: Path
) -> None:
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "drip", {"count": 2, "interval": 0.5})
        job_dir = daemon.config.jobs_dir / job.id
        planted = [
            job_dir / ".state.json.tmp",  # the old fixed temporary names
            job_dir / ".job.json.tmp",
        ]
        for link in planted:
            link.symlink_to(target / "precious")
        before = _snapshot(target)
        async for _ in client.tail(*USER, job.id):
            pass
        status = await client.status(*USER, job.id)
    assert status.state is JobState.COMPLETED, status.error
    assert _snapshot(target) == before
    assert stat.S_ISREG((job_dir / store.STATE_FILE).lstat().st_mode)
    assert store.read_state(job_dir).state is JobState.COMPLETED  # type: ignore[union-attr]
    assert sorted(job_dir.iterdir()) == sorted(
        [*planted, job_dir / "job.json", job_dir / "state.json", job_dir / "output"]
    )


async def test_state_files_are_always_whole_while_many_jobs_start_and_end(
    daemon: Daemon,
) -> None:
    """Readers of every job's state.json, in a thread, while 24 jobs start and end at once:
    each file, once there, stays there and parses; no temporary file stays behind."""
    jobs_dir = daemon.config.jobs_dir
    stop = threading.Event()
    problems: list[str] = []
    seen: set[str] = set()
    reads = 0

    def read_all() -> None:
        nonlocal reads
        while not stop.is_set():
            for job_dir in list(jobs_dir.iterdir()):
                path = job_dir / store.STATE_FILE
                try:
                    json.loads(path.read_bytes())
                    seen.add(job_dir.name)
                    reads += 1
                except FileNotFoundError:
                    if job_dir.name in seen:
                        problems.append(f"{path} disappeared")
                except ValueError as exc:
                    problems.append(f"{path}: {exc}")

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        async with RunnerClient(daemon.config.socket) as client:
            jobs = await asyncio.gather(
                *(client.start(*USER, "drip", {"count": 3, "interval": 0.02}) for _ in range(24))
            )
            for job in jobs:
                async for _ in client.tail(*USER, job.id):
                    pass
            statuses = [await client.status(*USER, job.id) for job in jobs]
    finally:
        stop.set()
        reader.join()
    assert problems == []
    assert reads > 0
    assert {s.state for s in statuses} == {JobState.COMPLETED}
    temps = [p for p in jobs_dir.glob("*/.*") if p.name.endswith(store.TEMP_SUFFIX)]
    assert temps == []


# --- the output log on a full disk and over a file size limit ---------------------------------


def _records_read_back(path: Path) -> bytes:
    """Every record of the output file, which must end exactly where its last record ends."""
    chunks = list(store.iter_records(path))
    end = chunks[-1].next_offset if chunks else 0
    assert end == path.stat().st_size, "bytes after the last whole record"
    return b"".join(c.data for c in chunks)


def _spare_monitors(cfg: RunnerConfig) -> list[int]:
    names = [p.name for p in cfg.workspaces_dir.glob(f"{monitor.SPARE_PREFIX}*")]
    return [int(name.removeprefix(monitor.SPARE_PREFIX)) for name in names]


async def test_output_over_a_file_size_limit_leaves_whole_records_and_says_so(
    daemon: Daemon,
) -> None:
    limit = 2000
    # The file size limit on the monitors of the spare sandboxes, so on the next job's.
    wait_for(lambda: len(_spare_monitors(daemon.config)) == 2, 30, "two spare sandboxes")
    for pid in _spare_monitors(daemon.config):
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, limit))
    text = "first\n|" + "x" * 2500 + "\n|ok\n"  # the second record does not fit; the third would
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "pieces", {"text": text, "interval": 0.3})
        tailed = b""
        async for batch in client.tail(*USER, job.id):
            tailed += b"".join(c.data for c in batch)
        status = await client.status(*USER, job.id)
    path = daemon.config.jobs_dir / job.id / store.OUTPUT_FILE
    saved = _records_read_back(path)
    # The first piece alone, unless the monitor read it with the second (then none at all):
    # nothing of the record that did not fit, and nothing after it although "ok" would fit.
    assert saved in (b"first\n", b""), saved
    assert tailed == saved
    assert status.state is JobState.FAILED  # its output is not all there: it did not complete
    assert f"output could not be saved after byte {path.stat().st_size}" in status.error
    assert "File too large" in status.error
    assert "so its monitor stopped it" in status.error
    temps = [p for p in path.parent.iterdir() if p.name.endswith(store.TEMP_SUFFIX)]
    assert temps == []


@pytest.fixture
def full_disk_daemon(runner_config: RunnerConfig, state_dir: Path) -> Iterator[Daemon]:
    """A runner whose jobs directory is a 512 KiB tmpfs: a job printing more fills it. (No
    reserve: the disk fills while the job runs.)"""
    cfg = dataclasses.replace(runner_config, min_free_bytes=0)
    with daemon_on_tmpfs_jobs(cfg, "512k", "wn-test-jobs") as d:
        yield d


async def test_output_on_a_full_disk_leaves_whole_records_and_the_end_is_recorded(
    full_disk_daemon: Daemon,
) -> None:
    daemon = full_disk_daemon
    size = 4 * 1024 * 1024  # 8 times the disk
    async with RunnerClient(daemon.config.socket) as client:
        job = await client.start(*USER, "spew", {"size": size})
        tailed = b""
        async for batch in client.tail(*USER, job.id):
            tailed += b"".join(c.data for c in batch)
        status = await client.status(*USER, job.id)
    job_dir = daemon.config.jobs_dir / job.id
    saved = _records_read_back(job_dir / store.OUTPUT_FILE)
    line = b"0123456789" * 10 + b"\n"
    assert 0 < len(saved) < size
    assert saved == (line * (len(saved) // len(line) + 1))[: len(saved)]  # a prefix, no gap
    assert tailed == saved
    assert status.state is JobState.FAILED
    assert "output could not be saved after byte" in status.error
    assert "No space left on device" in status.error
    recorded = store.read_state(job_dir)  # the end made it to disk, through the reserve
    assert recorded is not None and recorded.state is JobState.FAILED
    assert sorted(p.name for p in job_dir.iterdir()) == ["job.json", "output", "state.json"]
