"""The systemd units and their sysusers.d and tmpfiles.d entries, checked by systemd's own tools
(systemd 252's ``systemd-analyze``, ``systemd-sysusers`` and ``systemd-tmpfiles``) against a
scratch root: nothing is written into this host's /etc, /opt or /var."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI, ROOT, short_tmpdir

DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
API = "workernator-api.service"
RUNNER = "workernator-runner.service"
# systemd-analyze security --offline=true: 0 is locked down, 10 is fully exposed.
MAX_EXPOSURE = {API: 2.0, RUNNER: 4.7}  # the runner: root, namespaces, mounts, cgroups, netlink
BINARIES = ("workernator-runner", "workernator-api", "workernator")


def _tool(name: str) -> str:
    """A systemd tool; its absence skips, and fails under CI (make system-deps installs it)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if path is None:
        message = f"{name} is not installed (Debian package systemd; make system-deps)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def root() -> Iterator[Path]:
    """A scratch root laid out as an installed host: the units in /etc/systemd/system, the
    programs they name in /opt/workernator/bin, systemd's own units beside them."""
    path = short_tmpdir("wn-units-")
    try:
        (path / "etc/systemd/system").mkdir(parents=True)
        for unit in (API, RUNNER):
            shutil.copy(UNITS / unit, path / "etc/systemd/system" / unit)
        system_units = Path("/usr/lib/systemd/system")
        if not system_units.is_dir():
            system_units = Path("/lib/systemd/system")
        shutil.copytree(system_units, path / "usr/lib/systemd/system", symlinks=True)
        bin_dir = path / "opt/workernator/bin"
        bin_dir.mkdir(parents=True)
        for name in BINARIES:
            (bin_dir / name).write_text("#!/bin/sh\n")
            (bin_dir / name).chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_both_units_verify_without_a_single_warning(root: Path) -> None:
    tool = _tool("systemd-analyze")
    result = _run(
        [tool, "verify", "--man=no", f"--root={root}"]
        + [f"/etc/systemd/system/{unit}" for unit in (API, RUNNER)]
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_would_catch_a_mistake(root: Path) -> None:
    """The check above can fail: a misspelt setting and a missing program are reported."""
    tool = _tool("systemd-analyze")
    unit = root / "etc/systemd/system" / API
    unit.write_text(unit.read_text().replace("ProtectClock=", "ProtectClocks="))
    (root / "opt/workernator/bin/workernator-api").unlink()
    result = _run([tool, "verify", "--man=no", f"--root={root}", f"/etc/systemd/system/{API}"])
    output = result.stdout + result.stderr
    assert "Unknown key 'ProtectClocks'" in output
    assert "/opt/workernator/bin/workernator-api is not executable" in output


@pytest.mark.parametrize("unit", [API, RUNNER])
def test_exposure_is_at_most_the_measured_score(unit: str) -> None:
    tool = _tool("systemd-analyze")
    result = _run([tool, "security", "--offline=true", "--no-pager", str(UNITS / unit)])
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    score = float(match.group(1))
    print(f"{unit}: exposure {score}")
    assert score <= MAX_EXPOSURE[unit], result.stdout


def test_the_units_run_what_the_install_puts_in_place() -> None:
    """The paths every part of the deployment agrees on (the install, the docs, the VM test)."""
    runner = (UNITS / RUNNER).read_text()
    api = (UNITS / API).read_text()
    config = "--config /etc/workernator/runner.toml"
    assert f"ExecStart=/opt/workernator/bin/workernator-runner {config}\n" in runner
    assert f"ExecStopPost=/opt/workernator/bin/workernator-runner {config} --after-stop %n\n" in (
        runner
    )
    assert "RuntimeDirectory=workernator\n" in runner  # /run/workernator/runner.sock
    assert "KillMode=process\n" in runner  # jobs outlive a restart
    api_config = "--config /etc/workernator/api.toml"
    assert f"ExecStart=/opt/workernator/bin/workernator-api {api_config}\n" in api
    assert "User=workernator-api\nGroup=workernator-api\n" in api
    assert "Requires=workernator-runner.service\n" in api


def test_sysusers_and_tmpfiles_make_the_users_and_directories_the_runner_accepts(
    root: Path,
) -> None:
    sysusers = _tool("systemd-sysusers")
    tmpfiles = _tool("systemd-tmpfiles")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    result = _run([sysusers, f"--root={root}", str(DEPLOY / "sysusers.d/workernator.conf")])
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").open()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").open()}
    for name in ("workernator-api", "workernator-job"):
        uid, gid = int(users[name][2]), int(users[name][3])
        assert 0 < uid < 1000 and 0 < gid < 1000  # system users, never root
        assert groups[name][2] == str(gid)  # each with a group of its own
        assert users[name][6].strip() == "/usr/sbin/nologin"
    api_gid = int(groups["workernator-api"][2])

    result = _run(
        [tmpfiles, f"--root={root}", "--create", str(DEPLOY / "tmpfiles.d/workernator.conf")]
    )
    assert result.returncode == 0, result.stderr
    expected = {
        "etc/workernator": (0o755, 0),
        "etc/workernator/tls": (0o750, api_gid),
        "var/lib/workernator": (0o700, 0),
        "run/workernator": (0o755, 0),
    }
    for path, (mode, gid) in expected.items():
        st = (root / path).lstat()
        assert stat.S_ISDIR(st.st_mode), path
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, gid), path
