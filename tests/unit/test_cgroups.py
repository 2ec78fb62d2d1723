"""The cgroup interface's files, on a fake cgroup tree: what is written for each layout, and
how usage is read. (Real enforcement is measured in tests/integration/test_cgroups.py; this
covers the v2 file formats too, which this host's kernel cannot show with controllers.)"""

from __future__ import annotations

import dataclasses
import errno
import shutil
from pathlib import Path

import pytest

from shared.errors import InvalidArgument
from shared.model import ResourceLimits
from shared.units import format_size, parse_size
from workernator_runner import cgroups
from workernator_runner.limits import Policy

MiB = 1 << 20
V1_FILES = {
    "cpu": ["cpu.cfs_period_us", "cpu.cfs_quota_us"],
    "cpuacct": ["cpuacct.usage"],
    "memory": [
        "memory.limit_in_bytes",
        "memory.memsw.limit_in_bytes",
        "memory.max_usage_in_bytes",
        "memory.oom_control",
    ],
    "pids": ["pids.max"],
    "blkio": [
        "blkio.throttle.read_bps_device",
        "blkio.throttle.write_bps_device",
        "blkio.throttle.read_iops_device",
        "blkio.throttle.write_iops_device",
        "blkio.throttle.io_service_bytes",
    ],
}
V2_FILES = [
    "cpu.max",
    "memory.max",
    "memory.swap.max",
    "pids.max",
    "io.max",
    "cpu.stat",
    "memory.peak",
    "memory.events",
    "io.stat",
    "cgroup.events",
    "cgroup.procs",
]


def _v2(tmp: Path, devices: tuple[str, ...] = ("8:0", "8:16")) -> cgroups.JobCgroup:
    jobs = tmp / "jobs"
    (jobs / "sb-1").mkdir(parents=True)
    for name in V2_FILES:
        (jobs / "sb-1" / name).write_text("")
    return cgroups.Layout("v2", {"unified": str(jobs)}, devices).job("sb-1")


def _v1(tmp: Path, devices: tuple[str, ...] = ("254:0",)) -> cgroups.JobCgroup:
    dirs = {}
    for controller, names in V1_FILES.items():
        jobs = tmp / controller / "jobs"
        (jobs / "sb-1").mkdir(parents=True)
        for name in names:
            (jobs / "sb-1" / name).write_text("")
        dirs[controller] = str(jobs)
    return cgroups.Layout("v1", dirs, devices).job("sb-1")


def _patch_writes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Record every write (a real cgroup file keeps only the last, and some take many)."""
    written: dict[str, list[str]] = {}

    def write(path: str, value: str) -> None:
        written.setdefault(path, []).append(value)

    monkeypatch.setattr(cgroups, "_write", write)
    return written


def test_v2_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cgroup = _v2(tmp_path)
    written = _patch_writes(monkeypatch)
    cgroup.set_limits(
        ResourceLimits(
            cpu_millis=500, memory_bytes=256 * MiB, pids=64, io_write_bps=5 * MiB, io_read_iops=100
        )
    )
    d = cgroup.dirs["unified"]
    assert written[f"{d}/cpu.max"] == ["50000 100000"]
    assert written[f"{d}/memory.max"] == [str(256 * MiB)]
    assert written[f"{d}/memory.swap.max"] == ["0"]
    assert written[f"{d}/pids.max"] == ["64"]
    assert written[f"{d}/io.max"] == [
        "8:0 rbps=max wbps=5242880 riops=100 wiops=max",
        "8:16 rbps=max wbps=5242880 riops=100 wiops=max",
    ]


def test_v2_no_limits_are_max(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cgroup = _v2(tmp_path)
    written = _patch_writes(monkeypatch)
    cgroup.set_limits(ResourceLimits())
    d = cgroup.dirs["unified"]
    assert written[f"{d}/cpu.max"] == ["max 100000"]
    assert written[f"{d}/memory.max"] == ["max"]
    assert written[f"{d}/pids.max"] == ["max"]
    assert f"{d}/io.max" not in written  # nothing asked: no IO limit written at all


def test_v1_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cgroup = _v1(tmp_path)
    written = _patch_writes(monkeypatch)
    cgroup.set_limits(
        ResourceLimits(cpu_millis=250, memory_bytes=64 * MiB, pids=32, io_read_bps=MiB)
    )
    assert written[f"{cgroup.dirs['cpu']}/cpu.cfs_period_us"] == ["100000"]
    assert written[f"{cgroup.dirs['cpu']}/cpu.cfs_quota_us"] == ["25000"]
    memory = cgroup.dirs["memory"]
    assert written[f"{memory}/memory.limit_in_bytes"] == [str(64 * MiB)]
    assert written[f"{memory}/memory.memsw.limit_in_bytes"] == [str(64 * MiB)]  # no swap
    assert written[f"{cgroup.dirs['pids']}/pids.max"] == ["32"]
    blkio = cgroup.dirs["blkio"]
    assert written[f"{blkio}/blkio.throttle.read_bps_device"] == [f"254:0 {MiB}"]
    assert f"{blkio}/blkio.throttle.write_bps_device" not in written


def test_only_what_differs_from_the_current_limits_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cgroup = _v1(tmp_path)
    written = _patch_writes(monkeypatch)
    current = ResourceLimits(cpu_millis=1000, memory_bytes=512 * MiB, pids=256)
    cgroup.set_limits(current, current=current)
    assert written == {}  # a spare's cgroup has the defaults already: nothing to write
    cgroup.set_limits(dataclasses.replace(current, memory_bytes=1024 * MiB), current=current)
    memory = cgroup.dirs["memory"]
    # memory + swap may never be under memory: raised, memsw goes first
    assert list(written) == [
        f"{memory}/memory.memsw.limit_in_bytes",
        f"{memory}/memory.limit_in_bytes",
    ]
    written.clear()
    cgroup.set_limits(dataclasses.replace(current, memory_bytes=64 * MiB), current=current)
    assert list(written) == [  # lowered, memsw goes last
        f"{memory}/memory.limit_in_bytes",
        f"{memory}/memory.memsw.limit_in_bytes",
    ]


def test_io_limits_without_a_disk_are_an_error(tmp_path: Path) -> None:
    layout = cgroups.Layout("v2", {"unified": str(tmp_path)}, (), "it is on tmpfs")
    (tmp_path / "sb-1").mkdir()
    for name in V2_FILES:
        (tmp_path / "sb-1" / name).write_text("")
    with pytest.raises(cgroups.CgroupError, match="IO limits cannot apply: it is on tmpfs"):
        layout.job("sb-1").set_limits(ResourceLimits(io_write_iops=10))


def test_v2_usage(tmp_path: Path) -> None:
    cgroup = _v2(tmp_path)
    d = Path(cgroup.dirs["unified"])
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    (d / "memory.peak").write_text("73400320\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    (d / "io.stat").write_text(
        "8:0 rbytes=4096 wbytes=1048576 rios=1 wios=256 dbytes=0 dios=0\n"
        "8:16 rbytes=100 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n"
    )
    assert cgroup.usage() == cgroups.Usage(1_500_000_000, 73400320, 4196, 1048576, True)


def test_v1_usage(tmp_path: Path) -> None:
    cgroup = _v1(tmp_path)
    Path(cgroup.dirs["cpuacct"], "cpuacct.usage").write_text("2000000000\n")
    memory = Path(cgroup.dirs["memory"])
    (memory / "memory.max_usage_in_bytes").write_text("1048576\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    Path(cgroup.dirs["blkio"], "blkio.throttle.io_service_bytes").write_text(
        "254:0 Read 8192\n254:0 Write 4096\n254:0 Sync 0\n254:0 Total 12288\nTotal 12288\n"
    )
    assert cgroup.usage() == cgroups.Usage(2_000_000_000, 1048576, 8192, 4096, False)


def test_usage_of_missing_files_is_zero(tmp_path: Path) -> None:
    layout = cgroups.Layout("v2", {"unified": str(tmp_path)})
    (tmp_path / "sb-1").mkdir()
    assert layout.job("sb-1").usage() == cgroups.Usage()


def test_populated_reads_cgroup_events(tmp_path: Path) -> None:
    cgroup = _v2(tmp_path)
    events = Path(cgroup.dirs["unified"], "cgroup.events")
    events.write_text("populated 1\nfrozen 0\n")
    assert cgroup.populated()
    events.write_text("populated 0\nfrozen 0\n")
    assert not cgroup.populated()
    assert cgroup.wait_empty(0.1)


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_a_cgroup_removed_meanwhile_is_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """Its monitor may remove a job's cgroup while another reader waits for it to empty:
    gone before the open (ENOENT) or between the open and the read (ENODEV), it is empty."""
    cgroup = _v1(tmp_path) if layout == "v1" else _v2(tmp_path)
    for path in cgroup.dirs.values():
        Path(path, "cgroup.procs").write_text("4242\n")
    Path(cgroup.dirs.get("unified", tmp_path), "cgroup.events").write_text("populated 1\n")
    assert cgroup.populated()
    assert cgroup.pids() == [4242]

    def removed(path: str) -> str:
        raise OSError(errno.ENODEV, "No such device", path)

    monkeypatch.setattr(cgroups, "_read", removed)
    assert not cgroup.populated()
    assert cgroup.pids() == []
    assert cgroup.wait_empty(0.1)
    monkeypatch.undo()
    for path in cgroup.dirs.values():
        shutil.rmtree(path)
    assert not cgroup.populated()
    assert cgroup.pids() == []

    def broken(path: str) -> str:
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(cgroups, "_read", broken)
    with pytest.raises(OSError, match="Input/output"):
        cgroup.populated()  # anything else is not taken for an empty cgroup


@pytest.mark.parametrize("name", ["XE38YM", "sb-1/..", "..", "sb-", "/etc"])
def test_only_sandbox_cgroup_names_are_used(tmp_path: Path, name: str) -> None:
    layout = cgroups.Layout("v2", {"unified": str(tmp_path)})
    if name == "sb-":
        assert layout.job(name).name == "sb-"  # odd but harmless: still under jobs/
        return
    with pytest.raises(ValueError, match="not a sandbox cgroup name"):
        layout.job(name)


def test_disks_behind_a_tmpfs_say_why(tmp_path: Path) -> None:
    devices, problem = cgroups.disks_behind(Path("/dev/shm"))
    assert devices == ()
    assert "no block device" in problem and "tmpfs" in problem


def test_disks_behind_a_disk_are_whole_disks() -> None:
    devices, problem = cgroups.disks_behind(Path("/"))
    if not devices:
        pytest.skip(f"/ has no block device here: {problem}")
    for device in devices:
        major, minor = device.split(":")
        sysfs = Path(f"/sys/dev/block/{device}")
        assert sysfs.exists() and not (sysfs / "partition").exists()  # a disk, not a part
        assert int(major) >= 0 and int(minor) >= 0


# --- the runner's policy ----------------------------------------------------------------------

POLICY = Policy(
    defaults=ResourceLimits(cpu_millis=500, memory_bytes=128 * MiB, pids=64),
    maxima=ResourceLimits(
        cpu_millis=2000, memory_bytes=1024 * MiB, pids=256, io_write_bps=10 * MiB
    ),
)


def test_defaults_fill_what_is_not_asked() -> None:
    assert POLICY.effective(ResourceLimits(memory_bytes=256 * MiB)) == ResourceLimits(
        cpu_millis=500, memory_bytes=256 * MiB, pids=64
    )


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        (
            ResourceLimits(cpu_millis=3000),
            "limit 'cpu': 3 CPU is over the runner's maximum of 2 CPU",
        ),
        (
            ResourceLimits(memory_bytes=2 << 30),
            "limit 'memory': 2 GiB is over the runner's maximum of 1 GiB",
        ),
        (ResourceLimits(pids=1000), "limit 'pids': 1000 is over the runner's maximum of 256"),
        (
            ResourceLimits(io_write_bps=20 * MiB),
            "limit 'io_write': 20 MiB/s is over the runner's maximum of 10 MiB/s",
        ),
        (
            ResourceLimits(memory_bytes=MiB),
            "limit 'memory': 1 MiB is under the minimum of 32 MiB a job needs",
        ),
        (ResourceLimits(cpu_millis=5), "limit 'cpu': 0.005 CPU is under the minimum of 0.01 CPU"),
    ],
)
def test_limits_out_of_bounds_are_refused_naming_them(asked: ResourceLimits, message: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        POLICY.effective(asked)
    assert message in exc.value.message


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        (
            Policy(ResourceLimits(cpu_millis=1000, memory_bytes=MiB, pids=64)),
            "memory: the default must be at least 32 MiB",
        ),
        (
            Policy(maxima=ResourceLimits(memory_bytes=256 * MiB)),
            "memory: the default 512 MiB is over the maximum 256 MiB",
        ),
        (
            Policy(maxima=ResourceLimits(io_read_bps=MiB)),
            "io_read: with a maximum, the default cannot be unlimited (0)",
        ),
        (Policy(), ""),
    ],
)
def test_a_policy_checks_itself(policy: Policy, problem: str) -> None:
    assert policy.check() == problem


# --- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("512M", 512 * MiB),
        ("1.5G", 3 << 29),
        ("2GiB", 2 << 30),
        ("64k", 64 << 10),
        ("1T", 1 << 40),
        (" 8 MiB ", 8 * MiB),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1", "1X", "1.2.3", "ten", "1 M B", "1GB", "8 MB"])
def test_parse_size_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (512 * MiB, "512 MiB"),
        (3 << 29, "1.5 GiB"),
        (5 << 40, "5 TiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_a_cgroup_left_in_some_hierarchies_only_is_listed_and_removed(tmp_path: Path) -> None:
    """A monitor killed while it removed its cgroup leaves it in the hierarchies it had not
    reached yet: the runner's start must still find it there (and remove the rest)."""
    cgroup = _v1(tmp_path)
    for controller in ("cpu", "cpuacct", "memory"):
        shutil.rmtree(cgroup.dirs[controller])
    layout = cgroup.layout
    assert layout.names() == ["sb-1"]
    for path in cgroup.dirs.values():  # the fake tree's files stand in for the kernel's
        for entry in Path(path).glob("*") if Path(path).exists() else ():
            entry.unlink()
    assert not cgroup.populated()
    cgroup.remove(0.1)
    assert layout.names() == []
