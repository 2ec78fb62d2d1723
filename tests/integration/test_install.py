"""deploy/install.sh and uninstall.sh, run for real into a tree of their own (``--root``): the
files, modes, owners and users they put in place, twice, an upgrade, the fallbacks without
systemd's tools, bad arguments, and what uninstall keeps. Nothing here writes this host's /etc,
/opt or /usr."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEPLOY, IN_CI, PIP_WHEEL, ROOT, short_tmpdir
from workernator_api import config as api_config
from workernator_runner import config as runner_config

pytestmark = pytest.mark.privileged  # chown to users of the tree's own /etc/passwd

PREFIX = "/opt/workernator"
API_USER = "workernator-api"
JOB_USER = "workernator-job"

# The contract's files (docs/operations.md), as deploy/ ships them; where this checkout lacks
# one, a stand-in that says what the contract says, so the scripts' mechanics are tested
# either way, and the shipped files are tested once they exist.
STAND_INS = {
    "sysusers.d/workernator.conf": (
        f'u {API_USER} - "Workernator API" / /usr/sbin/nologin\n'
        f'u {JOB_USER} - "Workernator jobs" /nonexistent /usr/sbin/nologin\n'
    ),
    "tmpfiles.d/workernator.conf": (
        "d /var/lib/workernator 0700 root root -\n"
        "d /etc/workernator 0755 root root -\n"
        f"d /etc/workernator/tls 0750 root {API_USER} -\n"
    ),
    "systemd/workernator-runner.service": (
        "[Service]\nType=notify\nExecStart=/opt/workernator/bin/workernator-runner\n"
    ),
    "systemd/workernator-api.service": (
        f"[Service]\nUser={API_USER}\nExecStart=/opt/workernator/bin/workernator-api\n"
    ),
}


@pytest.fixture(scope="module")
def deploy() -> Iterator[Path]:
    """A copy of deploy/, with stand-ins for contract files this checkout does not have yet."""
    base = short_tmpdir("wn-deploy-")
    try:
        shutil.copytree(DEPLOY, base / "deploy")
        for name, text in STAND_INS.items():
            path = base / "deploy" / name
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        yield base / "deploy"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **env),
        check=False,
    )


def install(deploy: Path, root: Path, wheels: Path, *args: str, **env: str) -> str:
    result = run(deploy / "install.sh", "--root", str(root), "--wheels", str(wheels), *args, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def seed_root(root: Path) -> None:
    """An /etc with root alone in it, as shadow's tools need one to add to."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\n")
    for name in ("shadow", "gshadow"):
        os.chmod(etc / name, 0o640)


def entries(root: Path, name: str) -> dict[str, list[str]]:
    lines = (root / "etc" / name).read_text().splitlines()
    return {line.split(":")[0]: line.split(":") for line in lines if line}


@dataclass
class Tree:
    root: Path

    def path(self, name: str) -> Path:
        return self.root / name.lstrip("/")

    def owner(self, name: str) -> tuple[str, str, int]:
        """(user, group, mode) of a path, the names from the tree's own passwd and group."""
        st = self.path(name).stat()
        users = {int(e[2]): user for user, e in entries(self.root, "passwd").items()}
        groups = {int(e[2]): group for group, e in entries(self.root, "group").items()}
        return users[st.st_uid], groups[st.st_gid], stat.S_IMODE(st.st_mode)

    def manifest(self) -> dict[str, tuple[int, int, int, bytes | str]]:
        """Every path outside the virtualenv: owner, group, mode and contents (or link)."""
        out: dict[str, tuple[int, int, int, bytes | str]] = {}
        venv = self.path(PREFIX)
        for path in sorted(self.root.rglob("*")):
            if path == venv or venv in path.parents or path.name.endswith("-"):
                continue  # the venv is compared by `pip freeze`; passwd- are shadow's backups
            st = path.lstat()
            content: bytes | str = (
                os.readlink(path)
                if path.is_symlink()
                else path.read_bytes()
                if path.is_file()
                else ""
            )
            out[str(path.relative_to(self.root))] = (st.st_uid, st.st_gid, st.st_mode, content)
        return out

    def venv(self, *args: str) -> str:
        result = subprocess.run(
            [str(self.path(PREFIX) / "bin" / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
        )
        return result.stdout


def new_tree() -> Tree:
    """An empty tree but for /etc with root in it (as on any host)."""
    root = short_tmpdir("wn-root-")
    seed_root(root)
    return Tree(root)


@pytest.fixture
def tree() -> Iterator[Tree]:
    made = new_tree()
    try:
        yield made
    finally:
        shutil.rmtree(made.root, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(deploy: Path, wheelhouse: Path) -> Iterator[tuple[Tree, str]]:
    """One install (a fresh venv costs some 15 s) that the tests below run again, upgrade and
    finally uninstall, in this order; each leaves it installed but the last."""
    made = new_tree()
    try:
        yield made, install(deploy, made.root, wheelhouse)
    finally:
        shutil.rmtree(made.root, ignore_errors=True)


def check_installed(tree: Tree, deploy: Path) -> None:
    """What an install puts in place, whichever way it created users and directories."""
    # The code: a venv of the system Python whose three commands run.
    assert "Usage: workernator" in tree.venv("workernator", "--help")
    assert "usage: workernator-runner" in tree.venv("workernator-runner", "--help")
    assert "usage: workernator-api" in tree.venv("workernator-api", "--help")
    assert "home = /usr/bin\n" in tree.path(PREFIX + "/pyvenv.cfg").read_text()
    # Readable by the api's user, and by nobody but root writable: the runner (root) runs this
    # code, so a compromised api that could change it would be root.
    files = [p for p in tree.path(PREFIX).rglob("*") if not p.is_symlink()]
    assert [p for p in files if p.stat().st_mode & 0o004 == 0] == []
    assert [p for p in files if p.stat().st_mode & 0o022 or p.stat().st_uid != 0] == []
    for path in (tree.path(PREFIX), *tree.path(PREFIX).parents):
        assert path.stat().st_mode & 0o022 == 0 or path == Path("/tmp"), path
    # Units, sysusers.d, tmpfiles.d: each shipped file, 0644 root's, its paths under PREFIX.
    for src, dest in [
        ("systemd", "/etc/systemd/system"),
        ("sysusers.d", "/etc/sysusers.d"),
        ("tmpfiles.d", "/etc/tmpfiles.d"),
    ]:
        shipped = sorted((deploy / src).iterdir())
        assert shipped
        for file in shipped:
            installed = tree.path(f"{dest}/{file.name}")
            assert tree.owner(str(installed.relative_to(tree.root))) == ("root", "root", 0o644)
            assert installed.read_text() == file.read_text()
    # The users of the contract, unprivileged, with no login.
    passwd = entries(tree.root, "passwd")
    for user in (API_USER, JOB_USER):
        assert int(passwd[user][2]) != 0 and int(passwd[user][3]) != 0
        assert passwd[user][6].endswith("nologin")
    assert API_USER in entries(tree.root, "group")
    # State root's alone; configs readable as each daemon needs, and valid for it.
    assert tree.owner("/var/lib/workernator") == ("root", "root", 0o700)
    assert tree.owner("/etc/workernator/runner.toml") == ("root", "root", 0o640)
    assert tree.owner("/etc/workernator/api.toml") == ("root", API_USER, 0o640)
    with tree.path("/etc/workernator/runner.toml").open("rb") as f:
        runner = runner_config.parse(tomllib.load(f))
    with tree.path("/etc/workernator/api.toml").open("rb") as f:
        api = api_config.parse(tomllib.load(f))
    assert runner.socket == api.runner_socket
    assert runner.socket_group == API_USER and runner.allowed_users == (API_USER,)
    assert runner.job_user == JOB_USER
    assert str(runner.state_dir) == "/var/lib/workernator"
    for path in (api.cert, api.key, api.client_ca):
        assert str(path).startswith("/etc/workernator/tls/")


def test_install_puts_code_units_users_directories_and_configs_in_place(
    deploy: Path, installed: tuple[Tree, str]
) -> None:
    tree, out = installed
    check_installed(tree, deploy)
    # systemd's tools where this host has them (a minimal Debian root has neither).
    if shutil.which("systemd-sysusers"):
        assert "users in place (systemd-sysusers)" in out
    else:
        assert "creating the users with useradd" in out
    if shutil.which("systemd-tmpfiles"):
        assert "directories in place (systemd-tmpfiles)" in out
    else:
        assert "making the directories by hand" in out
    assert "no daemon-reload" in out  # never tells the host's systemd about a --root tree
    assert "systemctl enable --now workernator-runner workernator-api" in out


def test_without_systemd_tools_useradd_and_mkdir_give_the_same_result(
    deploy: Path, installed: tuple[Tree, str], wheelhouse: Path
) -> None:
    """A host without systemd as PID 1, or without its tools: shadow's useradd and the script
    itself do what systemd-sysusers and systemd-tmpfiles would. (The venv of the install
    above is reused; its users, directories and configs are taken away first.)"""
    tree = installed[0]
    for name in ("passwd", "group", "shadow", "gshadow"):
        path = tree.path(f"/etc/{name}")
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if not line.startswith("workernator-")))
    shutil.rmtree(tree.path("/var/lib/workernator"))
    shutil.rmtree(tree.path("/etc/workernator"))
    out = install(
        deploy, tree.root, wheelhouse, WORKERNATOR_SYSUSERS="false", WORKERNATOR_TMPFILES="false"
    )
    assert "creating the users with useradd" in out
    assert "making the directories by hand" in out
    check_installed(tree, deploy)
    # The same directories, modes and owners as the tmpfiles.d file asks for.
    for line in (deploy / "tmpfiles.d" / "workernator.conf").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in ("d", "D"):
            user = "root" if fields[3] == "-" else fields[3]
            group = "root" if fields[4] == "-" else fields[4]
            assert tree.owner(fields[1]) == (user, group, int(fields[2], 8)), line


def test_a_second_run_changes_nothing_and_never_overwrites_configs(
    deploy: Path, installed: tuple[Tree, str], wheelhouse: Path
) -> None:
    tree = installed[0]
    api_toml = tree.path("/etc/workernator/api.toml")
    api_toml.write_text(api_toml.read_text().replace("0.0.0.0:8443", "127.0.0.1:9443"))
    before, freeze = tree.manifest(), tree.venv("python", "-m", "pip", "freeze")
    out = install(deploy, tree.root, wheelhouse)
    assert f"kept {api_toml}" in out
    assert "is already installed" in out
    assert tree.manifest() == before
    assert tree.venv("python", "-m", "pip", "freeze") == freeze
    assert "127.0.0.1:9443" in api_toml.read_text()


def test_an_upgrade_installs_the_newer_wheel_and_keeps_the_configs(
    deploy: Path, installed: tuple[Tree, str], wheelhouse: Path
) -> None:
    tree = installed[0]
    runner_toml = tree.path("/etc/workernator/runner.toml")
    runner_toml.write_text(runner_toml.read_text() + "# the operator's own\n")
    config = runner_toml.read_text()
    # A newer release: this source as version 99.0, next to the old wheel.
    source = tree.root / "src"
    for name in ("shared", "workernator_runner", "workernator_api"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'version = "0.1.0"' in pyproject
    newer = pyproject.replace('version = "0.1.0"', 'version = "99.0"')
    (source / "pyproject.toml").write_text(newer)
    wheels = tree.root / "wheels"
    shutil.copytree(wheelhouse, wheels)
    subprocess.run(
        [*PIP_WHEEL, "--no-deps", "--wheel-dir", str(wheels), str(source)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(source)
    out = install(deploy, tree.root, wheels)
    shutil.rmtree(wheels)
    assert "installing workernator-99.0-py3-none-any.whl" in out
    version = "import importlib.metadata as m; print(m.version('workernator'))"
    assert tree.venv("python", "-c", version).strip() == "99.0"
    assert runner_toml.read_text() == config


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prefix", "opt/wn"], "--prefix must be an absolute path other than /, not 'opt/wn'"),
        (["--prefix", "/"], "--prefix must be an absolute path other than /, not '/'"),
        (["--wheels", "/nonexistent"], "--wheels: no directory '/nonexistent'"),
        (["--wheels", "/"], "no workernator-*.whl in /"),
        (["--root", "/nonexistent"], "--root must be an existing directory"),
        (["--frobnicate"], "unknown argument '--frobnicate'"),
    ],
)
def test_bad_arguments_are_named_and_leave_nothing(
    deploy: Path, tree: Tree, wheelhouse: Path, args: list[str], message: str
) -> None:
    defaults = {"--root": str(tree.root), "--wheels": str(wheelhouse)}
    for name, value in defaults.items():
        if name not in args:
            args = [*args, name, value]
    result = run(deploy / "install.sh", *args)
    assert result.returncode == 1
    assert result.stderr.startswith("install: error: ")
    assert message in result.stderr
    assert sorted(str(p.relative_to(tree.root)) for p in tree.root.rglob("*")) == [
        "etc",
        *(f"etc/{name}" for name in ("group", "gshadow", "passwd", "shadow")),
    ]


def test_wheels_without_the_dependencies_fail_and_leave_no_venv(
    deploy: Path, tree: Tree, wheelhouse: Path
) -> None:
    """Offline means from the given wheels only: a missing dependency is named by pip, and the
    virtualenv this run made is removed again."""
    wheels = tree.root / "wheels"
    wheels.mkdir()
    for wheel in wheelhouse.glob("workernator-*.whl"):
        shutil.copy(wheel, wheels)
    result = run(deploy / "install.sh", "--root", str(tree.root), "--wheels", str(wheels))
    assert result.returncode != 0
    assert "No matching distribution found for" in result.stderr
    assert f"nothing installed; removed the new {tree.path(PREFIX)}" in result.stderr
    assert not tree.path(PREFIX).exists()
    assert not tree.path("/etc/systemd").exists()


def test_uninstall_names_bad_arguments(deploy: Path, tree: Tree) -> None:
    for args, message in [
        (["--prefix", "relative"], "--prefix must be an absolute path other than /"),
        (["--purge", "--now"], "unknown argument '--now'"),
    ]:
        result = run(deploy / "uninstall.sh", "--root", str(tree.root), *args)
        assert result.returncode == 1
        assert result.stderr.startswith("uninstall: error: ") and message in result.stderr


def test_a_directory_that_is_not_a_venv_is_never_taken_over(
    deploy: Path, tree: Tree, wheelhouse: Path
) -> None:
    data = tree.path(PREFIX) / "data.txt"
    data.parent.mkdir(parents=True)
    data.write_text("someone's")
    result = run(deploy / "install.sh", "--root", str(tree.root), "--wheels", str(wheelhouse))
    assert result.returncode == 1
    assert "exists and is not a virtualenv" in result.stderr
    assert sorted(p.name for p in tree.path("/opt").rglob("*")) == ["data.txt", "workernator"]
    # Nor removed by uninstall.
    result = run(deploy / "uninstall.sh", "--root", str(tree.root))
    assert result.returncode == 1
    assert "is not a Workernator virtualenv; not removing it" in result.stderr
    assert data.read_text() == "someone's"


def test_uninstall_keeps_state_configs_and_users_unless_purged(
    deploy: Path, installed: tuple[Tree, str]
) -> None:
    tree = installed[0]
    job = tree.path("/var/lib/workernator/jobs/ABC123/output")
    job.parent.mkdir(parents=True)
    job.write_text("kept")
    result = run(deploy / "uninstall.sh", "--root", str(tree.root))
    assert result.returncode == 0, result.stderr
    assert not tree.path(PREFIX).exists()
    assert not list(tree.path("/etc/systemd/system").iterdir())
    assert not tree.path("/etc/sysusers.d/workernator.conf").exists()
    assert not tree.path("/etc/tmpfiles.d/workernator.conf").exists()
    assert job.read_text() == "kept"
    assert tree.path("/etc/workernator/api.toml").exists()
    assert API_USER in entries(tree.root, "passwd")
    result = run(deploy / "uninstall.sh", "--root", str(tree.root), "--purge")
    assert result.returncode == 0, result.stderr
    for gone in (PREFIX, "/etc/workernator", "/var/lib/workernator"):
        assert not tree.path(gone).exists(), gone
    assert API_USER not in entries(tree.root, "passwd")
    assert JOB_USER not in entries(tree.root, "passwd")
    assert API_USER not in entries(tree.root, "group")


def test_the_scripts_are_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if IN_CI:
            pytest.fail("shellcheck is not installed (make lint installs it)")
        pytest.skip("shellcheck is not installed (make lint installs it)")
    scripts = sorted([*DEPLOY.glob("*.sh"), *(ROOT / "scripts").glob("*.sh")])
    assert DEPLOY / "install.sh" in scripts
    result = subprocess.run(
        [shellcheck, *map(str, scripts)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_the_shellcheck_test_can_fail(tmp_path: Path) -> None:
    """shellcheck does find what it should (an unquoted expansion), so a clean result means
    something."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm $1\n")
    result = subprocess.run(["shellcheck", str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "SC2086" in result.stdout
