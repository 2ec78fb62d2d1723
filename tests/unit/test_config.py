"""Runner and api configuration: defaults, parsing, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from workernator_api import config as api_config
from workernator_runner import config as runner_config


def test_runner_defaults_match_the_design() -> None:
    cfg = runner_config.RunnerConfig()
    assert cfg.socket == Path("/run/workernator/runner.sock")
    assert cfg.socket_mode == 0o660
    assert cfg.state_dir == Path("/var/lib/workernator")
    assert cfg.jobs_dir == Path("/var/lib/workernator/jobs")
    assert cfg.allowed_uids == frozenset({0})


def test_runner_config_file_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "runner.toml"
    path.write_text(
        "[runner]\n"
        'socket = "/tmp/x.sock"\n'
        'socket_mode = "0600"\n'
        "allowed_uids = [0, 999]\n"
        "stop_grace_seconds = 2\n"
        'job_modules = ["a.b"]\n'
        'log_level = "DEBUG"\n'
    )
    cfg = runner_config.load(path)
    assert cfg.socket == Path("/tmp/x.sock")
    assert cfg.socket_mode == 0o600
    assert cfg.allowed_uids == frozenset({0, 999})
    assert cfg.stop_grace_seconds == 2.0
    assert cfg.job_modules == ("a.b",)
    assert cfg.log_level == "debug"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[runner]\nsocket = 'relative.sock'\n", "runner.socket: must be an absolute path"),
        ("[runner]\nsocket_mode = '0666'\n", "must give no permissions to others"),
        ("[runner]\nsocket_mode = 'rw'\n", "expected an octal string"),
        ("[runner]\nallowed_uids = ['root']\n", "runner.allowed_uids: expected"),
        ("[runner]\nstop_grace_seconds = -1\n", "between 0 and 3600"),
        ("[runner]\nstop_grace_seconds = true\n", "got a boolean"),
        ("[runner]\nlog_level = 'loud'\n", "debug, info, warning or error"),
        ("[runner]\nsokcet = '/x'\n", "unknown key(s): sokcet"),
        ("[runer]\n", "unknown section(s): runer"),
        ("[runner\n", "runner.toml"),
    ],
)
def test_runner_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "runner.toml"
    path.write_text(text)
    with pytest.raises(runner_config.ConfigError) as exc:
        runner_config.load(path)
    assert message in str(exc.value)


def test_unknown_group_and_user_are_reported() -> None:
    cfg = runner_config.RunnerConfig(socket_group="no-such-group-wn", allowed_users=("no-such-wn",))
    with pytest.raises(runner_config.ConfigError, match="no group named 'no-such-group-wn'"):
        cfg.socket_gid()
    with pytest.raises(runner_config.ConfigError, match="no user named 'no-such-wn'"):
        cfg.peer_uids()
    assert runner_config.RunnerConfig(allowed_users=("root",)).peer_uids() == frozenset({0})


def test_api_config_relative_paths_are_taken_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "api.toml"
    path.write_text('[api]\nlisten = "127.0.0.1:9443"\ncert = "certs/server.pem"\n')
    cfg = api_config.load(path)
    assert cfg.listen == "127.0.0.1:9443"
    assert cfg.cert == tmp_path.resolve() / "certs" / "server.pem"
    assert cfg.runner_socket == Path("/run/workernator/runner.sock")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[api]\nlisten = "8443"\n', "expected host:port"),
        ('[api]\nlisten = "host:99999"\n', "expected host:port"),
        ("[api]\nlisten = 8443\n", "api.listen: expected a string"),
        ('[api]\nkey_file = "x"\n', "unknown key(s): key_file"),
        ('[api]\nlog_level = "chatty"\n', "debug, info, warning or error"),
    ],
)
def test_api_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "api.toml"
    path.write_text(text)
    with pytest.raises(api_config.ConfigError) as exc:
        api_config.load(path)
    assert message in str(exc.value)
