"""Runner and api configuration: defaults, parsing, and clear errors for bad files."""

from __future__ import annotations

import ipaddress
import pwd
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
    assert cfg.min_free_bytes == 256 * 1024 * 1024


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
        "keep_jobs_on_stop = true\n"
    )
    cfg = runner_config.load(path)
    assert cfg.socket == Path("/tmp/x.sock")
    assert cfg.socket_mode == 0o600
    assert cfg.allowed_uids == frozenset({0, 999})
    assert cfg.stop_grace_seconds == 2.0
    assert cfg.job_modules == ("a.b",)
    assert cfg.log_level == "debug"
    assert cfg.keep_jobs_on_stop is True
    assert runner_config.RunnerConfig().keep_jobs_on_stop is False  # a stop ends jobs


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
        ("[runner]\nkeep_jobs_on_stop = 'yes'\n", "keep_jobs_on_stop: expected <class 'bool'>"),
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
    assert cfg.drain_seconds == 10.0


def test_api_drain_seconds_is_a_number(tmp_path: Path) -> None:
    path = tmp_path / "api.toml"
    path.write_text("[api]\ndrain_seconds = 2.5\n")
    assert api_config.load(path).drain_seconds == 2.5
    path.write_text("[api]\ndrain_seconds = 0\n")
    assert api_config.load(path).drain_seconds == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[api]\nlisten = "8443"\n', "expected host:port"),
        ('[api]\nlisten = "host:99999"\n', "expected host:port"),
        ("[api]\nlisten = 8443\n", "api.listen: expected a string"),
        ('[api]\nkey_file = "x"\n', "unknown key(s): key_file"),
        ('[api]\nlog_level = "chatty"\n', "debug, info, warning or error"),
        ('[api]\ndrain_seconds = "10"\n', "api.drain_seconds: expected a number of seconds"),
        ("[api]\ndrain_seconds = true\n", "api.drain_seconds: expected a number of seconds"),
        ("[api]\ndrain_seconds = -1\n", "api.drain_seconds: must be between 0 and 3600"),
        ("[api]\ndrain_seconds = 3601\n", "api.drain_seconds: must be between 0 and 3600"),
    ],
)
def test_api_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "api.toml"
    path.write_text(text)
    with pytest.raises(api_config.ConfigError) as exc:
        api_config.load(path)
    assert message in str(exc.value)


def _parse(**runner: object) -> runner_config.RunnerConfig:
    return runner_config.parse({"runner": dict(runner)})


def test_runner_sandbox_keys_are_parsed(tmp_path: Path) -> None:
    path = tmp_path / "runner.toml"
    path.write_text(
        "[runner]\n"
        'job_user = "nobody"\n'
        "tmp_size_mb = 128\n"
        'egress_bridge = "wn_Test1"\n'
        'egress_subnet = "172.30.0.0/24"\n'
        'resolv_conf = "/run/systemd/resolve/resolv.conf"\n'
    )
    cfg = runner_config.load(path)
    assert cfg.job_user == "nobody"
    assert cfg.tmp_size_mb == 128
    assert cfg.egress_bridge == "wn_Test1"
    assert cfg.egress_subnet == ipaddress.IPv4Network("172.30.0.0/24")
    assert cfg.resolv_conf == Path("/run/systemd/resolve/resolv.conf")


def test_runner_sandbox_defaults() -> None:
    cfg = runner_config.RunnerConfig()
    assert cfg.job_user == "workernator-job"
    assert cfg.tmp_size_mb == 64
    assert cfg.egress_bridge == "wn0"
    assert cfg.egress_subnet == ipaddress.IPv4Network("10.92.0.0/16")
    assert cfg.resolv_conf == Path("/etc/resolv.conf")


@pytest.mark.parametrize(
    ("key", "value", "parsed"),
    [
        ("egress_bridge", "", ""),  # no egress networking
        ("egress_bridge", "abcdefgh", "abcdefgh"),  # the longest: <bridge>-<id> is 15 bytes
        ("egress_bridge", "a", "a"),
        ("egress_subnet", "10.0.0.0/28", ipaddress.IPv4Network("10.0.0.0/28")),
        ("egress_subnet", "10.0.0.0/8", ipaddress.IPv4Network("10.0.0.0/8")),
        ("tmp_size_mb", 1, 1),
        ("tmp_size_mb", 1 << 20, 1 << 20),
        ("job_user", "j", "j"),
        ("resolv_conf", "/etc/resolv.conf", Path("/etc/resolv.conf")),
        ("min_free_bytes", "1G", 1 << 30),
        ("min_free_bytes", 4096, 4096),
        ("min_free_bytes", 0, 0),  # never refuse a start for want of space
        ("min_free_bytes", "0", 0),
    ],
)
def test_runner_sandbox_keys_accept_their_limits(key: str, value: object, parsed: object) -> None:
    assert getattr(_parse(**{key: value}), key) == parsed


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("egress_bridge", "abcdefghi", "not a valid interface name"),  # too long for the veths
        ("egress_bridge", "wn-0", "not a valid interface name"),
        ("egress_bridge", "wn 0", "not a valid interface name"),
        ("egress_bridge", "wn/0", "not a valid interface name"),
        ("egress_bridge", "wn0\n", "not a valid interface name"),
        ("egress_bridge", "wné", "not a valid interface name"),
        ("egress_bridge", "wn.0", "not a valid interface name"),
        ("egress_bridge", 0, "expected"),
        ("egress_subnet", "not a network", "runner.egress_subnet:"),
        ("egress_subnet", "10.92.0.1/16", "runner.egress_subnet:"),  # host bits set
        ("egress_subnet", "10.92.0.0/33", "runner.egress_subnet:"),
        ("egress_subnet", "fd00::/64", "runner.egress_subnet:"),
        ("egress_subnet", "10.0.0.0/29", "a /28 or larger"),
        ("egress_subnet", "10.0.0.0/30", "a /28 or larger"),
        ("egress_subnet", "10.0.0.1/32", "a /28 or larger"),
        ("egress_subnet", 168427520, "expected"),
        ("tmp_size_mb", 0, "between 1 and 1048576"),
        ("tmp_size_mb", -64, "between 1 and 1048576"),
        ("tmp_size_mb", (1 << 20) + 1, "between 1 and 1048576"),
        ("tmp_size_mb", "64", "expected"),
        ("tmp_size_mb", 64.0, "expected"),
        ("tmp_size_mb", True, "got a boolean"),
        ("job_user", "", "must not be empty"),
        ("job_user", 1000, "expected"),
        ("resolv_conf", "resolv.conf", "must be an absolute path"),
        ("resolv_conf", "./etc/resolv.conf", "must be an absolute path"),
        ("resolv_conf", "", "must be an absolute path"),
        ("min_free_bytes", -1, "must not be negative"),
        ("min_free_bytes", "1GB", "is not a size"),
        ("min_free_bytes", 1.5, "expected"),
        ("min_free_bytes", True, "got a boolean"),
    ],
)
def test_runner_sandbox_key_errors_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(runner_config.ConfigError) as exc:
        _parse(**{key: value})
    assert str(exc.value).startswith(f"runner.{key}:")
    assert message in str(exc.value)


def test_job_ids_need_an_existing_unprivileged_user(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(runner_config.ConfigError) as exc:
        runner_config.RunnerConfig(job_user="no-such-user-wn").job_ids()
    assert "job_user" in str(exc.value)
    assert "'no-such-user-wn'" in str(exc.value)
    assert "useradd" in str(exc.value)
    with pytest.raises(runner_config.ConfigError, match="must not have uid or gid 0"):
        runner_config.RunnerConfig(job_user="root").job_ids()

    def fake(uid: int, gid: int) -> object:
        return pwd.struct_passwd(("job", "x", uid, gid, "", "/", "/usr/sbin/nologin"))

    monkeypatch.setattr(pwd, "getpwnam", lambda name: fake(1001, 0))
    with pytest.raises(runner_config.ConfigError, match="must not have uid or gid 0"):
        runner_config.RunnerConfig(job_user="job").job_ids()
    monkeypatch.setattr(pwd, "getpwnam", lambda name: fake(0, 1001))
    with pytest.raises(runner_config.ConfigError, match="must not have uid or gid 0"):
        runner_config.RunnerConfig(job_user="job").job_ids()
    monkeypatch.setattr(pwd, "getpwnam", lambda name: fake(1001, 1002))
    assert runner_config.RunnerConfig(job_user="job").job_ids() == (1001, 1002)


# --- [limits] ---------------------------------------------------------------------------------


def test_limits_section_sets_defaults_and_maxima() -> None:
    from shared.model import ResourceLimits

    cfg = runner_config.parse(
        {
            "limits": {
                "cpu": 0.5,
                "cpu_max": 2,
                "memory": "256M",
                "memory_max": "4GiB",
                "pids": 64,
                "io_write": "10M",
                "io_write_max": "100M",
                "io_read_iops_max": 0,
            }
        }
    )
    assert cfg.limits.defaults == ResourceLimits(
        cpu_millis=500, memory_bytes=256 << 20, pids=64, io_write_bps=10 << 20
    )
    assert cfg.limits.maxima == ResourceLimits(
        cpu_millis=2000, memory_bytes=4 << 30, pids=4096, io_write_bps=100 << 20
    )


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"memory": "lots"}, "limits.memory: 'lots' is not a size"),
        ({"memory": "8 MB"}, "limits.memory: '8 MB' is not a size"),
        ({"cpu": "half"}, "limits.cpu: expected"),
        ({"pids": -1}, "limits.pids: must not be negative"),
        ({"memory": "1G", "memory_max": "512M"}, "limits.memory: the default 1 GiB is over"),
        ({"io_read_max": "10M"}, "limits.io_read: with a maximum, the default cannot be"),
        ({"memory": "1M"}, "limits.memory: the default must be at least 32 MiB"),
        ({"swap": 0}, "[limits]: unknown key(s): swap"),
    ],
)
def test_bad_limits_are_config_errors_naming_the_key(
    limits: dict[str, object], message: str
) -> None:
    with pytest.raises(runner_config.ConfigError) as exc:
        runner_config.parse({"limits": limits})
    assert message in str(exc.value)


def test_retention_and_output_cap_defaults_are_documented_ones() -> None:
    cfg = runner_config.RunnerConfig()
    assert cfg.retention == runner_config.Retention(10_000, 7 * 86400.0, 10 << 30)
    assert cfg.max_job_output == 1 << 30


def test_retention_section_and_output_cap_are_parsed() -> None:
    cfg = runner_config.parse(
        {
            "runner": {"max_job_output": "64K"},
            "retention": {"max_jobs": 5, "max_age": "12h", "max_output_bytes": "2G"},
        }
    )
    assert cfg.max_job_output == 64 << 10
    assert cfg.retention == runner_config.Retention(5, 12 * 3600.0, 2 << 30)
    assert runner_config.parse({"retention": {"max_age": "30s"}}).retention.max_age_seconds == 30


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"retention": {"max_jobs": 0}}, "retention.max_jobs: must be between 1"),
        ({"retention": {"max_jobs": "10"}}, "retention.max_jobs: expected"),
        ({"retention": {"max_age": "7"}}, "retention.max_age: '7' is not an age"),
        ({"retention": {"max_age": "0d"}}, "retention.max_age: '0d' is not an age"),
        ({"retention": {"max_age": 7}}, "retention.max_age: expected"),
        ({"retention": {"max_output_bytes": "10GB"}}, "retention.max_output_bytes: '10GB'"),
        ({"retention": {"max_output_bytes": 0}}, "retention.max_output_bytes: must be more"),
        ({"retention": {"keep": 1}}, "[retention]: unknown key(s): keep"),
        ({"runner": {"max_job_output": -1}}, "runner.max_job_output: must be more than 0"),
        ({"runner": {"max_job_output": "lots"}}, "runner.max_job_output: 'lots' is not a size"),
    ],
)
def test_bad_retention_or_cap_is_a_config_error_naming_the_key(
    data: dict[str, object], message: str
) -> None:
    with pytest.raises(runner_config.ConfigError) as info:
        runner_config.parse(data)
    assert message in str(info.value)
