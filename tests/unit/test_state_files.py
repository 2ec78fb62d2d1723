"""State files under concurrent writers, failed writes, links; the peer's credentials; uids."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.model import JobState
from tests.conftest import ROOT
from workernator_runner import config, store
from workernator_runner.daemon import parse_ucred

# Writes ``count`` states into the job directory argv[1] as fast as it can, each whole state
# naming its writer and its number; with "first", one exclusive first write per directory.
_WRITER = """
import sys
from pathlib import Path
from workernator_runner import store

mode, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
dirs = [Path(d) for d in sys.argv[4:]]
padding = "x" * 100_000  # many write calls per file: a torn file would show
for n in range(count):
    for job_dir in dirs:
        state = store.StateFile(error=f"{name} {n} {padding}")
        if mode == "replace":
            store.write_state(job_dir, state, durable=False)
        else:
            try:
                store.write_state(job_dir, state, durable=False, exclusive=True)
                print("won", job_dir.name, flush=True)
            except FileExistsError:
                pass
"""


def _writers(mode: str, count: int, dirs: list[Path], how_many: int) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, mode, f"w{i}", str(count), *map(str, dirs)],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(how_many)
    ]


def _temps(job_dir: Path) -> list[str]:
    return sorted(p.name for p in job_dir.iterdir() if p.name.endswith(store.TEMP_SUFFIX))


def test_concurrent_writers_never_leave_a_torn_or_missing_state_file(tmp_path: Path) -> None:
    store.write_state(tmp_path, store.StateFile(error="initial"))
    writers = _writers("replace", 150, [tmp_path], 4)
    reads = 0
    seen = set()
    deadline = time.monotonic() + 120
    while any(w.poll() is None for w in writers):
        assert time.monotonic() < deadline, "the writers did not finish"
        state = store.read_state(tmp_path)  # raises on a torn file
        assert state is not None, "state.json went missing"
        seen.add(state.error.split()[0])
        reads += 1
    for w in writers:
        _, err = w.communicate()
        assert w.returncode == 0, err  # no writer lost its temporary file to another
    assert reads > 10
    assert len(seen) > 1  # the readers did see the writers at work
    final = store.read_state(tmp_path)
    assert final is not None and final.error.split()[1] == "149"
    assert _temps(tmp_path) == []


def test_first_writes_are_exclusive_one_writer_wins_each_file(tmp_path: Path) -> None:
    dirs = [tmp_path / f"job{i}" for i in range(100)]
    for d in dirs:
        d.mkdir()
    writers = _writers("first", 1, dirs, 4)
    winners: dict[str, list[str]] = {}
    for i, w in enumerate(writers):
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
        for line in out.split():
            if line != "won":
                winners.setdefault(line, []).append(f"w{i}")
    assert sorted(winners) == sorted(d.name for d in dirs)
    for d in dirs:
        (winner,) = winners[d.name]  # exactly one
        state = store.read_state(d)
        assert state is not None and state.error.split()[0] == winner
        assert _temps(d) == []


_TOO_BIG = """
import resource, signal, sys
from pathlib import Path
from workernator_runner import store

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
try:
    store.write_state(Path(sys.argv[1]), store.StateFile(error="y" * 50_000))
except OSError as exc:
    print(exc.strerror)
"""


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    store.write_state(tmp_path, store.StateFile(error="old"))
    result = subprocess.run(
        [sys.executable, "-c", _TOO_BIG, str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "File too large"
    state = store.read_state(tmp_path)
    assert state is not None and state.error == "old"
    assert _temps(tmp_path) == []


def test_a_write_through_a_reserve_is_exact_and_leaves_no_temporary(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        reserve = store.reserve(fd, store.STATE_FILE)
        assert reserve is not None
        assert os.fstat(reserve.fd).st_size == store.RESERVE_BYTES
        assert _temps(tmp_path) == [reserve.name]
        store.write_state_at(fd, store.StateFile(state=JobState.COMPLETED), reserve=reserve)
    finally:
        os.close(fd)
    data = (tmp_path / store.STATE_FILE).read_bytes()
    assert json.loads(data)["state"] == "COMPLETED"  # nothing of the reserve after it
    assert _temps(tmp_path) == []


def test_links_in_a_job_directory_are_not_read_through(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text('{"state": "COMPLETED"}')
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / store.STATE_FILE).symlink_to(secret)
    (job_dir / store.OUTPUT_FILE).symlink_to(secret)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        store.read_state(job_dir)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        store.RecordReader(job_dir / store.OUTPUT_FILE)
    linked = tmp_path / "linked"
    linked.symlink_to(job_dir)
    with pytest.raises(NotADirectoryError):
        store.write_state(linked, store.StateFile())


def test_remove_temps_removes_only_temporary_files(tmp_path: Path) -> None:
    names = [".state.json.0123abcd.tmp", ".job.json.tmp", ".state.json.tmp", "state.json", "x.tmp"]
    for name in names:
        (tmp_path / name).write_text("{}")
    removed = store.remove_temps(tmp_path)
    assert sorted(removed) == [".job.json.tmp", ".state.json.0123abcd.tmp", ".state.json.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "x.tmp"]


# --- the peer's credentials and the allowed uids ----------------------------------------------


@pytest.mark.parametrize("uid", [0, 1000, 2**31 - 1, 2**31, 3_000_000_000, 2**32 - 2, 2**32 - 1])
def test_peer_uids_and_gids_are_read_unsigned(uid: int) -> None:
    data = struct.pack("=iII", 4242, uid, uid)  # what the kernel gives for SO_PEERCRED
    assert parse_ucred(data) == (4242, uid, uid)


def test_a_huge_uid_cannot_match_a_negative_allow_list_entry() -> None:
    data = struct.pack("=iII", 1, 2**32 - 2, 0)  # the signed reading was -2
    with pytest.raises(config.ConfigError, match=r"runner.allowed_uids: -2 is not a uid"):
        config.parse({"runner": {"allowed_uids": [0, -2]}})
    assert parse_ucred(data)[1] not in config.parse({"runner": {"allowed_uids": [0]}}).peer_uids()


@pytest.mark.parametrize(("uid", "ok"), [(0, True), (2**32 - 2, True), (2**32 - 1, False)])
def test_allowed_uids_must_be_uids(uid: int, ok: bool) -> None:
    if ok:
        assert config.parse({"runner": {"allowed_uids": [uid]}}).allowed_uids == {uid}
    else:
        with pytest.raises(config.ConfigError, match=r"is not a uid \(0 to 4294967294\)"):
            config.parse({"runner": {"allowed_uids": [uid]}})
