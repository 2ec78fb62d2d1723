"""The job root's pure parts: which host paths it binds, and the files of its /etc."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

import shared
import workernator_runner
from workernator_runner import rootfs


@pytest.mark.parametrize(
    ("paths", "cover"),
    [
        ([], []),
        (["/a"], ["/a"]),
        (["/a/b/c", "/a/b", "/a"], ["/a"]),
        (["/a/b", "/a/bc"], ["/a/b", "/a/bc"]),
        (["/a/bc", "/a/b", "/a/b/c", "/a/bc/d"], ["/a/b", "/a/bc"]),
        (["/a/b-c", "/a/b", "/a/b/c", "/a/b.c"], ["/a/b", "/a/b-c", "/a/b.c"]),
        (["/x", "/x", "/x/y", "/x/y"], ["/x"]),
        (["/z/1", "/y", "/z/2", "/y/1/2/3"], ["/y", "/z/1", "/z/2"]),
        (["/usr/lib/python3", "/", "/opt"], ["/"]),
        (["/a/", "/a/b"], ["/a/"]),
    ],
    ids=[
        "empty",
        "one",
        "nested",
        "common prefix siblings",
        "siblings with children",
        "separators sorting before slash",
        "duplicates",
        "unsorted input",
        "root covers all",
        "trailing slash",
    ],
)
def test_minimal_cover(paths: list[str], cover: list[str]) -> None:
    assert rootfs.minimal_cover(paths) == cover
    assert rootfs.minimal_cover(iter(paths)) == cover  # any iterable, read once


def _inside(path: str, parent: str) -> bool:
    return os.path.commonpath([path, parent]) == parent


def test_python_paths_are_absolute_existing_and_disjoint() -> None:
    paths = rootfs.python_paths()
    assert paths
    assert paths == sorted(set(paths))
    for path in paths:
        assert os.path.isabs(path), path
        assert os.path.exists(path), path
        assert os.path.realpath(path) == path, path
        assert not _inside(path, "/usr"), path  # /usr is bound whole
    for a in paths:
        for b in paths:
            assert a == b or not _inside(a, b), (a, b)


def test_python_paths_cover_the_job_code_and_the_stdlib() -> None:
    paths = rootfs.python_paths()
    needed = [
        *(os.path.realpath(p) for p in shared.__path__),
        *(os.path.realpath(p) for p in workernator_runner.__path__),
    ]
    stdlib = os.path.realpath(os.path.dirname(os.path.dirname(json.__file__)))
    if not _inside(stdlib, "/usr"):
        needed.append(stdlib)
    for path in needed:
        assert any(_inside(path, p) for p in paths), (path, paths)


def test_python_paths_include_modules_loaded_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Top-level modules imported from outside the prefixes are found by their location: a
    single-file module by its file, a package by its directory."""
    (tmp_path / "wn_single_module.py").write_text("VALUE = 1\n")
    (tmp_path / "wn_package").mkdir()
    (tmp_path / "wn_package" / "__init__.py").write_text("")
    (tmp_path / "wn_package" / "sub.py").write_text("")
    (tmp_path / "not_imported.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("wn_single_module", "wn_package", "wn_package.sub"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.import_module("wn_single_module")
    importlib.import_module("wn_package.sub")
    try:
        paths = rootfs.python_paths()
    finally:
        for name in ("wn_single_module", "wn_package", "wn_package.sub"):
            sys.modules.pop(name, None)
    real = os.path.realpath(tmp_path)
    assert f"{real}/wn_single_module.py" in paths
    assert f"{real}/wn_package" in paths
    assert not any(_inside(f"{real}/not_imported.py", p) for p in paths)
    assert real not in paths  # a sys.path entry outside the Python installation is not bound


def test_common_etc_names_the_job_user() -> None:
    etc = rootfs.common_etc(998, 997, "workernator-job")
    assert set(etc) == {"passwd", "group", "nsswitch.conf"}
    passwd = etc["passwd"].splitlines()
    assert "workernator-job:x:998:997:Workernator job:/workspace:/usr/sbin/nologin" in passwd
    assert passwd[0].startswith("root:x:0:0:")
    assert all(len(line.split(":")) == 7 for line in passwd)
    assert [line.split(":")[0] for line in passwd] == ["root", "workernator-job", "nobody"]
    group = etc["group"].splitlines()
    assert "workernator-job:x:997:" in group
    assert all(len(line.split(":")) == 4 for line in group)
    assert all(text.endswith("\n") for text in etc.values())
    assert "passwd: files" in etc["nsswitch.conf"].splitlines()
    assert "hosts: files dns" in etc["nsswitch.conf"].splitlines()


def test_job_etc_has_the_job_id_and_resolv_conf_only_when_given() -> None:
    etc = rootfs.job_etc("XE38YM", None)
    assert set(etc) == {"hosts", "hostname"}
    assert etc["hostname"] == "XE38YM\n"
    hosts = [line.split() for line in etc["hosts"].splitlines()]
    assert ["127.0.0.1", "localhost"] in hosts
    assert ["127.0.1.1", "XE38YM"] in hosts
    assert ["::1", "localhost"] in hosts

    resolv = "nameserver 10.92.0.1\nsearch x\n"
    egress = rootfs.job_etc("AB12CD", resolv)
    assert set(egress) == {"hosts", "hostname", "resolv.conf"}
    assert egress["resolv.conf"] == resolv
    assert ["127.0.1.1", "AB12CD"] in [line.split() for line in egress["hosts"].splitlines()]
    # an egress job whose host has no usable name servers still gets its (empty) file
    assert rootfs.job_etc("AB12CD", "")["resolv.conf"] == ""


def test_code_under_tmp_is_what_the_jobs_own_tmp_would_hide() -> None:
    paths = ["/tmp/tmp.x1/wn/shared", "/tmp", "/tmpx/code", "/opt/wn/venv", "/tmp/a.py"]
    assert rootfs.under_tmp(paths) == ("/tmp/tmp.x1/wn/shared", "/tmp/a.py")
