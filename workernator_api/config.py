"""The api server's configuration, read from TOML. Every setting has a documented default.

Example (``/etc/workernator/api.toml``)::

    [api]
    listen = "0.0.0.0:8443"                        # host:port for gRPC over mTLS
    cert = "/etc/workernator/server.pem"           # the server certificate (with SANs)
    key = "/etc/workernator/server-key.pem"        # its private key (readable by the api only)
    client_ca = "/etc/workernator/client-ca.pem"   # the client CA: signs client certificates
    runner_socket = "/run/workernator/runner.sock" # the runner's Unix socket
    log_level = "info"                             # debug, info, warning, error
    drain_seconds = 10.0                           # on SIGTERM: how long open calls and
                                                   # streams may go on before streams are cut
                                                   # (UNAVAILABLE: clients reconnect)

The api follows its TLS files: a renewed cert/key or client CA bundle, renamed into place,
serves new connections without a restart (:mod:`workernator_api.tls`). The CA keys belong
elsewhere: nothing here points at them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/workernator/api.toml")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ApiConfig:
    listen: str = "0.0.0.0:8443"
    cert: Path = Path("/etc/workernator/server.pem")
    key: Path = Path("/etc/workernator/server-key.pem")
    client_ca: Path = Path("/etc/workernator/client-ca.pem")
    runner_socket: Path = Path("/run/workernator/runner.sock")
    log_level: str = "info"
    drain_seconds: float = 10.0


_PATHS = ("cert", "key", "client_ca", "runner_socket")


def parse(data: dict[str, Any], base: Path | None = None) -> ApiConfig:
    unknown_sections = set(data) - {"api"}
    if unknown_sections:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown_sections))}")
    section = data.get("api", {})
    unknown = set(section) - set(ApiConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"[api]: unknown key(s): {', '.join(sorted(unknown))}")
    kw: dict[str, Any] = {}
    for key, value in section.items():
        if key == "drain_seconds":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"api.{key}: expected a number of seconds")
            if not 0 <= value <= 3600:
                raise ConfigError(f"api.{key}: must be between 0 and 3600")
            kw[key] = float(value)
            continue
        if not isinstance(value, str):
            raise ConfigError(f"api.{key}: expected a string, got {type(value).__name__}")
        if key in _PATHS:
            path = Path(value)
            if not path.is_absolute():
                if base is None:
                    raise ConfigError(f"api.{key}: must be an absolute path")
                path = base / path
            kw[key] = path
        elif key == "listen":
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ConfigError(f"api.listen: expected host:port, got {value!r}")
            kw[key] = value
        elif key == "log_level":
            if value.lower() not in ("debug", "info", "warning", "error"):
                raise ConfigError("api.log_level: must be debug, info, warning or error")
            kw[key] = value.lower()
    return ApiConfig(**kw)


def load(path: Path) -> ApiConfig:
    """Relative paths in the file are taken relative to the file's directory."""
    try:
        with path.open("rb") as f:
            return parse(tomllib.load(f), base=path.parent.resolve())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
