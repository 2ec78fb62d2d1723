"""``workernator``: the command line client of Workernator, and its certificate tooling.

::

    workernator jobs start fib 3            start a job (noop, fib, eval, wait)
    workernator jobs start fib 3 --cpu 0.5 --memory 256M    ... with resource limits
    workernator jobs status ID              how a job is doing, or how it ended
    workernator jobs tail ID                its output, from the first byte, following it
    workernator jobs stop ID                stop it
    workernator jobs delete ID              delete an ended job and its output (admins)
    workernator jobs list                   the jobs you may see
    workernator jobs types                  the job types the server runs, and their arguments
    workernator certs init DIR ...          the CAs, a server certificate and client certificates
    workernator completion bash             shell completion

Every ``jobs`` command connects to the API over mutual TLS. Where to connect and with which
certificate comes from, in order: the ``--host``/``--cert``/``--key``/``--ca`` options, the
``WORKERNATOR_HOST``/``_CERT``/``_KEY``/``_CA`` environment variables, the ``[client]`` table of
the config file (``--config``, ``WORKERNATOR_CONFIG``, or ``~/.config/workernator/config.toml``),
and for the host only, the default ``localhost:8443``.

Errors are one line on stderr and a non-zero exit status: 1 for a failed request, 2 for a
command line that does not parse (click's usage errors). Ctrl-C exits 130, quietly, at any
moment (see :mod:`workernator_api.interrupt`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click
from click.shell_completion import CompletionItem, get_completion_class
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from shared import catalog
from shared.errors import InvalidArgument
from workernator_api import certs, interrupt
from workernator_api import cli_format as fmt
from workernator_api import reconnect as reconnect_mod
from workernator_api._proto.workernator.v1 import workernator_pb2 as pb
from workernator_api.limits import MAX_REQUEST_BYTES, request_too_large

# grpc core logs handshake failures on stderr; the CLI reports every error itself, in one line.
# grpc reads GRPC_VERBOSITY when it is imported, so set it first (a value the user set wins).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc

PROG = "workernator"
DEFAULT_PORT = 8443
DEFAULT_HOST = f"localhost:{DEFAULT_PORT}"
UNARY_TIMEOUT_SECONDS = 30.0
"""Deadline of every call but stop and tail (which lasts as long as the job when it follows)."""
STOP_TIMEOUT_SECONDS = 3700.0
"""Deadline of stop, which returns once the job is gone: the server's grace period (at most an
hour) and then some, as the API server allows."""
CONNECT_TIMEOUT_MS = 5000
"""How long connecting (TCP and TLS) may take before a call fails."""
COMPLETION_TIMEOUT_SECONDS = 2.0
LIST_PAGE_SIZE = 500
"""Jobs asked for per ListJobs call; the CLI follows next_page_token to the end."""
TAIL_END_MESSAGE = "Job finished, no more output, exiting tail!"

_SERVICE = "/workernator.v1.JobService/"
_CLIENT_KEYS = ("host", "cert", "key", "ca")
_ENV = {name: f"WORKERNATOR_{name.upper()}" for name in (*_CLIENT_KEYS, "config")}

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Item = TypeVar("_Item")
_F = TypeVar("_F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """An error the CLI reports as ``Error: <message>`` on one line, exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


# --- settings: options, environment, config file ----------------------------------------------


@dataclasses.dataclass
class Settings:
    """What the options of the command line said (None: not given, not in the environment)."""

    host: str | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    config: str | None = None
    output: str = "text"
    limits: dict[str, int] = dataclasses.field(default_factory=dict)
    """The resource limits ``jobs start`` asks for, by ResourceLimits field (none: defaults)."""

    @property
    def json(self) -> bool:
        return self.output == "json"


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where to connect and the PEM material to connect with."""

    host: str
    cert: bytes
    key: bytes
    ca: bytes


def default_config_path() -> Path:
    """``$XDG_CONFIG_HOME/workernator/config.toml``, else ``~/.config/workernator/config.toml``."""
    base = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "workernator" / "config.toml"


def load_client_config(path: Path, *, explicit: bool) -> dict[str, str]:
    """The ``[client]`` table of a config file, its paths made absolute (relative paths are
    relative to the file's directory). A missing file is empty unless it was asked for."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise CliError(f"config file {path} does not exist") from None
        return {}
    except OSError as exc:
        raise CliError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"config file {path} is not valid TOML: {exc}") from None
    table = data.get("client", {})
    if not isinstance(table, dict):
        raise CliError(f"config file {path}: 'client' must be a table ([client])")
    unknown = sorted(set(table) - set(_CLIENT_KEYS))
    if unknown:
        raise CliError(
            f"config file {path}: unknown key(s) in [client]: {', '.join(unknown)} "
            f"(known: {', '.join(_CLIENT_KEYS)})"
        )
    out: dict[str, str] = {}
    for key, value in table.items():
        if not isinstance(value, str) or not value.strip():
            raise CliError(f"config file {path}: client.{key} must be a non-empty string")
        if key == "host":
            out[key] = value
        else:
            file = Path(value).expanduser()
            out[key] = str(file if file.is_absolute() else path.parent / file)
    return out


def normalize_host(host: str) -> str:
    """``HOST:PORT`` for gRPC: the default port is added when none is given, and a bare IPv6
    address is bracketed."""
    host = host.strip()
    if not host:
        raise CliError("the API host is empty; set --host or WORKERNATOR_HOST (HOST:PORT)")
    if "://" in host or "/" in host:
        raise CliError(f"give the API host as HOST:PORT (like {DEFAULT_HOST}), not {host!r}")
    if host.startswith("["):
        return host if "]:" in host else f"{host}:{DEFAULT_PORT}"
    colons = host.count(":")
    if colons == 0:
        return f"{host}:{DEFAULT_PORT}"
    if colons > 1:  # a bare IPv6 address
        return f"[{host}]:{DEFAULT_PORT}"
    return host


_WHAT = {
    "cert": "client certificate",
    "key": "client private key",
    "ca": "server CA certificate (to verify the API server)",
}


def _read(path: str, name: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise CliError(
            f"cannot read the {_WHAT[name]} {path} (--{name}): {exc.strerror or exc}"
        ) from None


# Parse the PEM files up front, so a wrong file is an error naming the file and the option rather
# than a TLS failure later.


def _load_certificate(name: str, path: str, data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise CliError(f"{path} (--{name}) is not a PEM certificate") from None


def _load_key(path: str, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CliError(
            f"the client private key {path} (--key) is encrypted; the CLI needs an unencrypted key"
        ) from None
    except ValueError:
        raise CliError(f"{path} (--key) is not a PEM private key") from None


def check_client_certificate(path: str, cert: x509.Certificate) -> None:
    """Refuse, naming what is wrong, a certificate the API would not take as a client's: the
    handshake would fail with a message that does not say why (or the call UNAUTHENTICATED)."""
    hint = "use a certificate made with 'workernator certs client'"
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is not None and basic.ca:
        raise CliError(f"{path} (--cert) is a CA certificate, not a client certificate; {hint}")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        what = "a server certificate?" if eku and ExtendedKeyUsageOID.SERVER_AUTH in eku else hint
        raise CliError(
            f"{path} (--cert) is not a client certificate: its extended key usage lacks "
            f"clientAuth ({what})"
        )
    try:
        certs.check_validity(cert, f"the client certificate {path} (--cert)")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        certs.identity_from_cert(cert)  # the user name and role the API will read
    except ValueError as exc:
        raise CliError(f"{path} (--cert) cannot be used: {exc}") from None


def resolve_connection(settings: Settings) -> Connection:
    """Options > environment (click read both into ``settings``) > config file > default.

    The files are checked before anything connects: each parses, the key belongs to the
    certificate, which is a valid client certificate now, and ``ca`` is the server CA."""
    explicit = settings.config is not None
    config_path = Path(settings.config).expanduser() if settings.config else default_config_path()
    config = load_client_config(config_path, explicit=explicit)
    host = normalize_host(settings.host or config.get("host") or DEFAULT_HOST)
    paths: dict[str, str] = {}
    for name in ("cert", "key", "ca"):
        value = getattr(settings, name) or config.get(name)
        if not value:
            raise CliError(
                f"no {_WHAT[name]} given: set --{name} or {_ENV[name]}, or {name} in the "
                f"[client] table of {config_path}"
            )
        paths[name] = value
    data = {name: _read(path, name) for name, path in paths.items()}
    cert = _load_certificate("cert", paths["cert"], data["cert"])
    key = _load_key(paths["key"], data["key"])
    try:
        certs.load_ca_bundle(data["ca"], "server")
    except ValueError as exc:
        raise CliError(f"{paths['ca']} (--ca): {exc} (the server CA is server-ca.pem)") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise CliError(
            f"the key {paths['key']} (--key) does not belong to the certificate "
            f"{paths['cert']} (--cert)"
        )
    check_client_certificate(paths["cert"], cert)
    return Connection(host=host, cert=data["cert"], key=data["key"], ca=data["ca"])


# --- the API, typed ---------------------------------------------------------------------------


class Api:
    """A typed client of ``workernator.v1.JobService`` (the generated stub is untyped).

    Unary calls have a deadline and never wait for the server to become ready, so an unreachable
    server fails within the connect timeout instead of hanging. Every wait for the server is
    an :func:`interrupt.deferred` one: Ctrl-C cancels the call and raises
    :class:`interrupt.Interrupted`.
    """

    def __init__(self, conn: Connection, *, timeout: float = UNARY_TIMEOUT_SECONDS) -> None:
        self.host = conn.host
        credentials = grpc.ssl_channel_credentials(
            root_certificates=conn.ca, private_key=conn.key, certificate_chain=conn.cert
        )
        # min_reconnect_backoff_ms is also grpc's minimum connect timeout (TCP + handshakes).
        self._channel = grpc.secure_channel(
            conn.host,
            credentials,
            options=[
                ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
                # A channel of its own: a tail reconnecting after a restart of the api must
                # not inherit the connection backoff of an earlier channel to the same host.
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        self._timeout = timeout
        ch = self._channel
        self._start = ch.unary_unary(
            _SERVICE + "StartJob",
            request_serializer=pb.StartJobRequest.SerializeToString,
            response_deserializer=pb.StartJobResponse.FromString,
        )
        self._stop = ch.unary_unary(
            _SERVICE + "StopJob",
            request_serializer=pb.StopJobRequest.SerializeToString,
            response_deserializer=pb.StopJobResponse.FromString,
        )
        self._delete = ch.unary_unary(
            _SERVICE + "DeleteJob",
            request_serializer=pb.DeleteJobRequest.SerializeToString,
            response_deserializer=pb.DeleteJobResponse.FromString,
        )
        self._status = ch.unary_unary(
            _SERVICE + "GetJobStatus",
            request_serializer=pb.GetJobStatusRequest.SerializeToString,
            response_deserializer=pb.GetJobStatusResponse.FromString,
        )
        self._tail = ch.unary_stream(
            _SERVICE + "TailJobOutput",
            request_serializer=pb.TailJobOutputRequest.SerializeToString,
            response_deserializer=pb.TailJobOutputResponse.FromString,
        )
        self._list = ch.unary_unary(
            _SERVICE + "ListJobs",
            request_serializer=pb.ListJobsRequest.SerializeToString,
            response_deserializer=pb.ListJobsResponse.FromString,
        )
        self._types = ch.unary_unary(
            _SERVICE + "ListJobTypes",
            request_serializer=pb.ListJobTypesRequest.SerializeToString,
            response_deserializer=pb.ListJobTypesResponse.FromString,
        )

    def _call(
        self,
        rpc: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None = None,
    ) -> _Resp:
        _check_size(request)
        deadline = self._timeout if timeout is None else timeout
        future = rpc.future(request, timeout=deadline, wait_for_ready=False)
        with interrupt.deferred():
            while not interrupt.requested():
                try:
                    return future.result(timeout=interrupt.POLL_SECONDS)
                except grpc.FutureTimeoutError:
                    continue
            future.cancel()
        raise AssertionError("unreachable: leaving deferred() raises Interrupted")

    def start(self, request: pb.StartJobRequest) -> pb.JobStatus:
        return self._call(self._start, request).job

    def stop(self, job_id: str) -> pb.JobStatus:
        request = pb.StopJobRequest(job_id=job_id)
        return self._call(self._stop, request, timeout=STOP_TIMEOUT_SECONDS).job

    def delete(self, job_id: str) -> pb.JobStatus:
        return self._call(self._delete, pb.DeleteJobRequest(job_id=job_id)).job

    def status(self, job_id: str) -> pb.JobStatus:
        return self._call(self._status, pb.GetJobStatusRequest(job_id=job_id)).job

    def list_jobs(
        self, state: pb.JobState = pb.JOB_STATE_UNSPECIFIED, owner: str = ""
    ) -> list[pb.JobStatus]:
        """Every matching job, oldest first, asked for a page at a time."""
        jobs: list[pb.JobStatus] = []
        token = ""
        while True:
            request = pb.ListJobsRequest(
                state=state, owner=owner, page_size=LIST_PAGE_SIZE, page_token=token
            )
            response = self._call(self._list, request)
            jobs.extend(response.jobs)
            if not response.next_page_token or response.next_page_token == token:
                return jobs
            token = response.next_page_token

    def job_types(self) -> list[pb.JobTypeInfo]:
        return list(self._call(self._types, pb.ListJobTypesRequest()).types)

    def tail(
        self, request: pb.TailJobOutputRequest
    ) -> Generator[pb.TailJobOutputResponse, None, None]:
        """The output stream (no deadline); closing the generator cancels the call.

        A thread of its own reads the stream, so this thread only waits on a queue (deferring
        Ctrl-C, see :class:`Api`), and handles each response between waits.
        """
        _check_size(request)
        call = self._tail(request, wait_for_ready=False)
        responses: queue.Queue[pb.TailJobOutputResponse | grpc.RpcError | None] = queue.Queue(8)
        done = threading.Event()

        def read() -> None:
            try:
                for response in call:
                    if not _put(responses, response, done):
                        return
                _put(responses, None, done)
            except grpc.RpcError as exc:
                _put(responses, exc, done)

        reader = threading.Thread(target=read, name="workernator-tail", daemon=True)
        reader.start()
        try:
            while (item := _get(responses)) is not None:
                if isinstance(item, grpc.RpcError):
                    raise item
                yield item
        finally:
            done.set()
            call.cancel()
            reader.join(timeout=1)

    def close(self) -> None:
        self._channel.close()


def _check_size(request: object) -> None:
    """Refuse, before sending it, a request the API would refuse for its size."""
    refusal = request_too_large(request.ByteSize()) if isinstance(request, Message) else None
    if refusal is not None:
        raise CliError(refusal)


def _get(items: queue.Queue[_Item]) -> _Item:
    """The next item of ``items``; Ctrl-C raises :class:`interrupt.Interrupted` instead."""
    with interrupt.deferred():
        while not interrupt.requested():
            try:
                return items.get(timeout=interrupt.POLL_SECONDS)
            except queue.Empty:
                continue
    raise AssertionError("unreachable: leaving deferred() raises Interrupted")


def _put(items: queue.Queue[_Item], item: _Item, done: threading.Event) -> bool:
    """Put ``item`` into ``items`` unless ``done`` is set first; True when it was put."""
    while not done.is_set():
        try:
            items.put(item, timeout=interrupt.POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


_TRANSPORT = re.compile(
    r"failed to connect to all addresses|errors resolving|dns resolution failed|"
    r"socket closed|connection reset|endpoint closing|broken pipe|handshake|empty address list|"
    r"connections to all backends failing|connection refused|goaway",
    re.IGNORECASE,
)
_LAST_ERROR = re.compile(r"last error: [A-Z_]+: (?:ipv[46]|unix):\S*?: ")
_TOO_LARGE = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")


def describe_rpc_error(
    code: grpc.StatusCode, details: str | None, host: str, job_id: str | None = None
) -> str:
    """One line for people about a failed call."""
    text = " ".join((details or "").split())
    if code == grpc.StatusCode.UNAVAILABLE and _TRANSPORT.search(text):
        reason = text
        match = _LAST_ERROR.search(text)
        if match:
            reason = text[match.end() :]
        lowered = reason.lower()
        if "hostname verification" in lowered:
            return (
                f"cannot reach the API at {host}: its certificate is not valid for that name "
                f"(connect with a name or address the server certificate lists)"
            )
        if "certificate_verify_failed" in lowered:
            why = reason.split("CERTIFICATE_VERIFY_FAILED:", 1)[-1].removesuffix(": OK").strip()
            return (
                f"cannot reach the API at {host}: TLS handshake failed, the server certificate "
                f"was not accepted ({why}); check --ca"
            )
        if "failed to create security handshaker" in lowered:
            return (
                f"cannot reach the API at {host}: the TLS client could not start with the "
                "certificate and key given (check --cert and --key: a client certificate made "
                "with 'workernator certs client' and its key)"
            )
        if "tls" in lowered or "ssl" in lowered:
            return f"cannot reach the API at {host}: TLS handshake failed: {reason}"
        if "socket closed" in lowered or "endpoint closing" in lowered:
            return (
                f"cannot reach the API at {host}: the server closed the connection during the "
                "handshake (did it refuse the client certificate? check --cert and --key)"
            )
        return f"cannot reach the API at {host}: {reason}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"the API at {host} is unavailable: {text}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the API at {host} did not answer in time ({text or 'deadline exceeded'})"
    if code == grpc.StatusCode.NOT_FOUND:
        return f"job {job_id} not found" if job_id else text or "not found"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return text or "invalid argument"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"permission denied: {text}" if text else "permission denied"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"the API at {host} did not accept the client certificate: {text}"
    if code == grpc.StatusCode.CANCELLED:
        return "the call was cancelled"
    too_large = _TOO_LARGE.search(text) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
    if too_large:  # grpc's own words, from either end of the call
        return f"message too large: {too_large[1]} bytes, at most {too_large[2]} accepted"
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    return f"{name.lower()}: {text}" if text else name.lower()


@contextlib.contextmanager
def connect(settings: Settings, *, job_id: str | None = None) -> Iterator[Api]:
    """An :class:`Api` for the duration of a command; gRPC errors become one-line CLI errors."""
    conn = resolve_connection(settings)
    api = Api(conn)
    try:
        yield api
    except grpc.RpcError as exc:
        raise CliError(describe_rpc_error(exc.code(), exc.details(), conn.host, job_id)) from None
    finally:
        api.close()


# --- click plumbing ---------------------------------------------------------------------------


class OrderedGroup(click.Group):
    """A group that lists its commands in the order they were added, not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _settings(ctx: click.Context) -> Settings:
    return ctx.ensure_object(Settings)


def _store(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None and value != ():
            setattr(_settings(ctx), name, value)
        return value

    return callback


_OUTPUT_HELP = "Output format: text for people, or json for programs."


def output_option(f: _F) -> _F:
    return click.option(
        "-o",
        "--output",
        type=click.Choice(["text", "json"]),
        default=None,
        expose_value=False,
        callback=_store("output"),
        help=_OUTPUT_HELP + "  [default: text]",
    )(f)


# The connection options of every ``jobs`` command: (name, metavar, help).
_CLIENT_OPTIONS = (
    ("host", "HOST:PORT", f"API server to connect to.  [default: {DEFAULT_HOST}]"),
    ("cert", "FILE", "Your client certificate (PEM)."),
    ("key", "FILE", "The private key of your client certificate (PEM)."),
    (
        "ca",
        "FILE",
        "The server CA certificate (PEM, server-ca.pem): the CA of the API server's certificate.",
    ),
    (
        "config",
        "FILE",
        "Config file with a [client] table (host, cert, key, ca).  "
        "[default: ~/.config/workernator/config.toml]",
    ),
)


def client_options(f: _F) -> _F:
    """The connection options, and --output, of every ``jobs`` command."""
    f = output_option(f)
    for name, metavar, help_text in reversed(_CLIENT_OPTIONS):
        f = click.option(
            f"--{name}",
            envvar=_ENV[name],
            show_envvar=True,
            metavar=metavar,
            expose_value=False,
            callback=_store(name),
            help=help_text,
        )(f)
    return f


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _job_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    job_id = value.strip().upper()
    if not job_id:
        raise click.BadParameter("the job ID is empty")
    return job_id


def _complete_job_ids(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Job IDs for shell completion, from ListJobs (best effort, a short deadline)."""
    try:
        conn = resolve_connection(ctx.find_object(Settings) or Settings())
        api = Api(conn, timeout=COMPLETION_TIMEOUT_SECONDS)
        try:
            jobs = api.list_jobs()
        finally:
            api.close()
    except Exception:  # completion must never fail loudly
        return []
    prefix = incomplete.upper()
    return [
        CompletionItem(
            job.id,
            help=f"{fmt.TYPE_NAMES.get(job.type, '?')} {fmt.STATE_LABELS.get(job.state, '?')}",
        )
        for job in jobs
        if job.id.startswith(prefix)
    ]


def job_id_argument(f: _F) -> _F:
    return click.argument(
        "job_id", metavar="ID", callback=_job_id, shell_complete=_complete_job_ids
    )(f)


def _limit(
    field: str, parse: Callable[[str], int]
) -> Callable[[click.Context, click.Parameter, str | None], int | None]:
    """The callback of a limit option: parse the value, or a usage error naming the option."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
        if value is None:
            return None
        try:
            number = parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
        _settings(ctx).limits[field] = number
        return number

    return callback


def _complete_size(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """A number completes to that number with each unit: 256 -> 256K, 256M, 256G, 256T."""
    if not re.fullmatch(r"\d+(?:\.\d+)?", incomplete, re.ASCII):
        return []
    return [
        CompletionItem(f"{incomplete}{unit}", help=f"{incomplete} {unit}iB")
        for unit in ("K", "M", "G", "T")
    ]


_SIZE_HELP = (
    "SIZE is bytes, or a number with K, M, G or T, which are powers of 1024 (K = 1024 bytes; "
    "KiB, MiB, GiB, TiB also work)"
)

# The resource limits of ``jobs start``: (option, ResourceLimits field, metavar, parser, help).
_LIMIT_OPTIONS: tuple[tuple[str, str, str, Callable[[str], int], str], ...] = (
    (
        "--cpu",
        "cpu_millis",
        "CPUS",
        fmt.parse_cpu,
        "CPU time the job may use, in CPUs: 0.5 is half a CPU, 2 is two (at most 3 decimals).",
    ),
    (
        "--memory",
        "memory_bytes",
        "SIZE",
        fmt.parse_size,
        f"Memory the job may use, like 256M or 1.5G (swap is off). {_SIZE_HELP}.",
    ),
    (
        "--pids",
        "pids",
        "N",
        lambda text: fmt.parse_count(text, fmt.MAX_PIDS),
        "Processes and threads the job may have at once.",
    ),
    (
        "--io-read",
        "io_read_bps",
        "SIZE",
        fmt.parse_size,
        "Bytes per second the job may read from disk, like 10M.",
    ),
    (
        "--io-write",
        "io_write_bps",
        "SIZE",
        fmt.parse_size,
        "Bytes per second the job may write to disk, like 10M.",
    ),
    (
        "--io-read-iops",
        "io_read_iops",
        "N",
        fmt.parse_count,
        "Disk reads per second the job may do.",
    ),
    (
        "--io-write-iops",
        "io_write_iops",
        "N",
        fmt.parse_count,
        "Disk writes per second the job may do.",
    ),
)


def limit_options(f: _F) -> _F:
    """The resource limit options of every ``jobs start`` command (see :data:`_LIMIT_OPTIONS`)."""
    for name, field, metavar, parse, help_text in reversed(_LIMIT_OPTIONS):
        f = click.option(
            name,
            metavar=metavar,
            default=None,
            expose_value=False,
            callback=_limit(field, parse),
            shell_complete=_complete_size if metavar == "SIZE" else None,
            help=help_text,
        )(f)
    return f


# --- workernator ------------------------------------------------------------------------------


@click.group(cls=OrderedGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="workernator", prog_name=PROG)
@output_option
def cli() -> None:
    """Workernator: run typed jobs on a Linux host, driven over gRPC with mutual TLS.

    \b
    Start here:
      workernator certs init ./certs --user alice:user   certificates for a test setup
      workernator jobs types                             what jobs the server runs
      workernator jobs start fib 3                       start a job
      workernator jobs tail ID                           follow its output
    """


# --- workernator jobs -------------------------------------------------------------------------


@cli.group(
    cls=OrderedGroup,
    context_settings=CONTEXT_SETTINGS,
    short_help="Start, stop, inspect and follow jobs.",
)
def jobs() -> None:
    """Start, stop, inspect and follow jobs on a Workernator API server.

    Every command connects with mutual TLS. Each connection setting is taken from, in order:
    its option (--host, --cert, --key, --ca), its environment variable (WORKERNATOR_HOST,
    WORKERNATOR_CERT, WORKERNATOR_KEY, WORKERNATOR_CA), the [client] table of the config file
    (--config, WORKERNATOR_CONFIG, default ~/.config/workernator/config.toml), and for the host
    only the default localhost:8443.

    \b
    Example config file:
      [client]
      host = "workernator.example.com:8443"
      cert = "~/.config/workernator/alice.pem"
      key = "~/.config/workernator/alice-key.pem"
      ca = "~/.config/workernator/server-ca.pem"
    """


@jobs.group(
    "start",
    cls=OrderedGroup,
    context_settings=CONTEXT_SETTINGS,
    short_help="Start a job: noop, fib, eval or wait.",
)
def start() -> None:
    """Start a job of one of the types below; prints its ID.

    The server validates the arguments (a bad one is an error naming it) before anything
    runs. 'workernator jobs types' shows the limits of each argument.

    \b
    Every job type takes resource limits (see 'workernator jobs start fib -h'):
      --cpu 0.5  --memory 256M  --pids 64  --io-read 10M  --io-write 10M
      --io-read-iops N  --io-write-iops N

    Sizes are bytes, or a number with K, M, G or T, which are powers of 1024 (K = 1024 bytes).
    A limit left out takes the server's default; one over the server's maximum is an error
    naming it. 'workernator jobs status -v ID' shows the limits a job got.
    """


class ValuesMayStartWithDash(click.Command):
    """A command whose arguments may begin with '-': a negative number (``fib -5``) or an
    expression (``eval -2^2``, as the README shows it), which click would take for options.

    Before click parses, every word that is neither one of the command's options nor an
    option's value moves after a ``--``, in order, so click takes it as an argument wherever
    it was: ``eval -2^2 --cpu 1`` works. A word that looks like a long option (``--frob``)
    stays an option, and click reports one the command does not have by its name. A ``--``
    typed on the command line ends the options, as usual. One cost: a short option must be
    apart from its value here (``-o json``, not ``-ojson``).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._values_last(ctx, args))

    def _values_last(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value: dict[str, bool] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Option):
                for name in (*param.opts, *param.secondary_opts):
                    takes_value[name] = not param.is_flag and not param.count
        options: list[str] = []
        values: list[str] = []
        words = iter(args)
        for word in words:
            if word == "--":
                values.extend(words)
                break
            name = word.partition("=")[0] if word.startswith("--") else word
            if name in takes_value:
                options.append(word)
                value = next(words, None) if takes_value[name] and name == word else None
                if value is not None:  # the option's value is the next word, whatever it is
                    options.append(value)
            elif word.startswith("--") and word[2:3].isalpha():
                options.append(word)  # not an option of ours: click says which
            else:
                values.append(word)
        return [*options, "--", *values] if values else options


def _start(ctx: click.Context, request: pb.StartJobRequest) -> None:
    settings = _settings(ctx)
    if settings.limits:
        request.limits.CopyFrom(pb.ResourceLimits(**settings.limits))
    with connect(settings) as api:
        job = api.start(request)
    if settings.json:
        _print_json(fmt.job_to_dict(job))
    else:
        click.echo(fmt.format_started(job, prog=PROG))


@start.command("noop", short_help="(no arguments) A job that does nothing and prints nothing.")
@limit_options
@client_options
@click.pass_context
def start_noop(ctx: click.Context) -> None:
    """Start a job that does nothing and prints nothing."""
    _start(ctx, pb.StartJobRequest(noop=pb.NoopArgs()))


_WHOLE_NUMBER = re.compile(r"[+-]?\d+", re.ASCII)
_MAX_NUMBER_DIGITS = 30  # more, and a number is out of any range here (and not converted)


def _position(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """A whole number the API can carry (a uint64). One it cannot is refused here with the
    words the server uses for any position out of range, which name the range."""
    text = value.strip()
    if not _WHOLE_NUMBER.fullmatch(text):
        raise click.BadParameter(f"{value!r} is not a whole number", ctx, param)
    spec = catalog.FIB.arg("position")
    if len(text.lstrip("+-")) > _MAX_NUMBER_DIGITS:
        shown = f"{text[:_MAX_NUMBER_DIGITS]}... ({len(text)} characters)"
        raise CliError(f"argument '{spec.name}': {catalog.range_text(spec)}, got {shown}")
    number = int(text)
    if not 0 <= number < 2**64:
        try:
            spec.validate(number)
        except InvalidArgument as exc:
            raise CliError(exc.message) from None
    return number


@start.command(
    "fib",
    cls=ValuesMayStartWithDash,
    short_help="POSITION  The POSITION-th Fibonacci number (1 -> 0, 2 -> 1, 10 -> 34).",
)
@click.argument("position", callback=_position)
@limit_options
@client_options
@click.pass_context
def start_fib(ctx: click.Context, position: int) -> None:
    """Start a job printing the POSITION-th Fibonacci number, exactly.

    Positions count from 1, and the sequence from 0: 1 -> 0, 2 -> 1, 3 -> 1, 4 -> 2, 10 -> 34.
    """
    _start(ctx, pb.StartJobRequest(fib=pb.FibArgs(position=position)))


def _variables(
    ctx: click.Context, param: click.Parameter, value: Sequence[str]
) -> dict[str, float]:
    try:
        return fmt.parse_variables(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


_EXPRESSION_SPEC = catalog.EVAL.arg("expression")


def _read_expression(path: str) -> str:
    """The expression in the file ``path`` (``-``: standard input), surrounding blanks (and a
    byte order mark) removed; an error naming the file when it cannot be read, is empty, is not
    UTF-8, or is longer than the catalog allows."""
    where = "standard input (-f -)" if path == "-" else f"{path} (-f)"
    what = where if path == "-" else f"the expression file {where}"
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_REQUEST_BYTES + 1)
    except OSError as exc:
        raise CliError(f"cannot read {what}: {exc.strerror or exc}") from None
    limit = _EXPRESSION_SPEC.length_limit
    if len(data) > MAX_REQUEST_BYTES:
        raise CliError(
            f"{what} is larger than {MAX_REQUEST_BYTES} bytes; an expression is at most "
            f"{limit} characters"
        )
    try:
        expression = data.decode("utf-8").removeprefix("\ufeff").strip()
    except UnicodeDecodeError as exc:
        raise CliError(
            f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    if not expression:
        raise CliError(f"{what} is empty" + (" (blanks only)" if data else ""))
    if len(expression) > limit:
        raise CliError(
            f"the expression in {where} is {len(expression)} characters long; the most "
            f"allowed is {limit}"
        )
    return expression


@start.command(
    "eval",
    cls=ValuesMayStartWithDash,
    short_help="EXPRESSION [--var NAME=VALUE]...  Evaluate an arithmetic expression.",
)
@click.argument("expression", required=False)
@click.option(
    "-f",
    "--file",
    "source",
    metavar="FILE",
    default=None,
    help="Read the expression from FILE instead ('-': standard input).",
)
@click.option(
    "--var",
    "variables",
    multiple=True,
    metavar="NAME=VALUE",
    callback=_variables,
    help="Value of a variable of the expression (repeat for each variable).",
)
@limit_options
@client_options
@click.pass_context
def start_eval(
    ctx: click.Context, expression: str | None, source: str | None, variables: dict[str, float]
) -> None:
    """Start a job evaluating an arithmetic EXPRESSION, or the one in a file (-f FILE, -f -
    for standard input), at most 4096 characters.

    \b
    Operators + - * / % ^, parentheses, unary minus, decimals, functions (sqrt, sin, log, ...),
    the constants pi and e, and variables with implicit multiplication:
      workernator jobs start eval '2x * 3y' --var x=2 --var y=1.5
      workernator jobs start eval -2^2
      workernator jobs start eval -f formula.txt --var x=2

    EXPRESSION may start with '-'; after '--', a word is always the expression.
    """
    if expression is not None and source is not None:
        raise click.UsageError("give EXPRESSION or -f FILE, not both", ctx=ctx)
    if source is not None:
        expression = _read_expression(source)
    elif expression is None:
        raise click.UsageError("Missing argument 'EXPRESSION' (or -f FILE).", ctx=ctx)
    _start(ctx, pb.StartJobRequest(eval=pb.EvalArgs(expression=expression, variables=variables)))


def _seconds(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        return fmt.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@start.command(
    "wait",
    cls=ValuesMayStartWithDash,
    short_help="SECONDS URL  Wait, then send an empty HTTP POST to URL.",
)
@click.argument("seconds", callback=_seconds)
@click.argument("url")
@limit_options
@client_options
@click.pass_context
def start_wait(ctx: click.Context, seconds: float, url: str) -> None:
    """Start a job that waits SECONDS, then sends an empty HTTP POST to URL and prints the
    response status.

    SECONDS is a number of seconds (5, 2.5) or a duration with units d, h, m, s, ms (1m30s,
    500ms). URL is an http:// or https:// URL.
    """
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    _start(ctx, pb.StartJobRequest(wait=pb.WaitArgs(seconds=duration, url=url)))


@jobs.command("status", short_help="Show how a job is doing, or how it ended.")
@job_id_argument
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Also show the owner, the resource limits, the resource usage and OOM kills.",
)
@client_options
@click.pass_context
def status(ctx: click.Context, job_id: str, verbose: bool) -> None:
    """Show how a job is doing, or how it ended.

    On a terminal a progress line comes first; piped, only the status block is printed. With -v
    it also shows the owner, the limits the job runs under (only those set: CPU, memory,
    processes, disk rates), what it used (CPU time, peak memory, bytes read and written) and
    "Out of memory: yes" when the kernel's OOM killer killed a process of the job.
    """
    settings = _settings(ctx)
    progress = not settings.json and _isatty(sys.stdout)
    with connect(settings, job_id=job_id) as api:
        if progress:
            click.echo(f"Getting info for job {job_id}... ", nl=False)
        try:
            job = api.status(job_id)
        except Exception:  # not on Ctrl-C, which exits quietly
            if progress:
                click.echo("FAILED!")
            raise
        if progress:
            click.echo("DONE!\n")
    if settings.json:
        _print_json(fmt.job_to_dict(job))
    else:
        click.echo(fmt.format_status(job, verbose=verbose))


@jobs.command("stop", short_help="Stop a job.")
@job_id_argument
@client_options
@click.pass_context
def stop(ctx: click.Context, job_id: str) -> None:
    """Stop a job: SIGTERM, a grace period, then every process of the job is killed.

    Returns when the job is gone. Stopping a job that already ended is not an error.
    """
    settings = _settings(ctx)
    with connect(settings, job_id=job_id) as api:
        job = api.stop(job_id)
    if settings.json:
        _print_json(fmt.job_to_dict(job))
    elif job.state == pb.JOB_STATE_STOPPED:
        click.echo(f"Stopped job {job.id}.")
    else:
        label = fmt.STATE_LABELS.get(job.state, "ended")
        click.echo(f"Job {job.id} had already ended: {label}.")


@jobs.command("delete", short_help="Delete an ended job and its output (admins).")
@job_id_argument
@client_options
@click.pass_context
def delete(ctx: click.Context, job_id: str) -> None:
    """Delete a job that has ended: its status, its output and what it left on the server.

    Only admins may delete jobs. A running job is refused: stop it first.
    """
    settings = _settings(ctx)
    with connect(settings, job_id=job_id) as api:
        job = api.delete(job_id)
    if settings.json:
        _print_json(fmt.job_to_dict(job))
    else:
        click.echo(f"Deleted job {job.id}.")


class _OutputWriter:
    """Writes a tail stream: stdout chunks to stdout and stderr chunks to stderr, byte for byte
    (or JSON lines to stdout), and remembers how far it got."""

    def __init__(self, *, as_json: bool) -> None:
        self.as_json = as_json
        self.streams = {1: sys.stdout.buffer, 2: sys.stderr.buffer}
        self.last_byte = {1: b"\n", 2: b"\n"}  # of each stream, to end a partial line
        self.next_offset: int | None = None  # where to resume after what was written
        self._current = 1

    def write(self, response: pb.TailJobOutputResponse) -> None:
        count = len(response.chunks)
        for i, chunk in enumerate(response.chunks):
            if self.as_json:
                offset = response.next_offset if i == count - 1 else None
                line = json.dumps(fmt.chunk_to_dict(chunk, offset), separators=(",", ":"))
                self.streams[1].write(line.encode() + b"\n")
                continue
            target = 2 if chunk.stream == pb.STREAM_STDERR else 1
            if target != self._current:
                self.streams[self._current].flush()  # keep the order the job wrote in
                self._current = target
            if chunk.data:
                self.streams[target].write(chunk.data)
                self.last_byte[target] = chunk.data[-1:]
        self.streams[1].flush()
        self.streams[2].flush()
        self.next_offset = response.next_offset


@jobs.command("tail", short_help="Stream a job's output, following it by default.")
@job_id_argument
@click.option(
    "--follow/--no-follow",
    default=True,
    show_default=True,
    help="Keep streaming while the job runs, until it ends; or stop at the current end.",
)
@click.option(
    "-n",
    "--last",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Start at the last N lines instead of the first byte.",
)
@click.option(
    "--offset",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Resume at this position (a next_offset from --output json).",
)
@click.option(
    "--reconnect/--no-reconnect",
    default=True,
    show_default=True,
    help="When following and the API or the runner restarts, reconnect (with backoff) and "
    "resume where the output broke off; or stop with an error.",
)
@client_options
@click.pass_context
def tail(
    ctx: click.Context,
    job_id: str,
    follow: bool,
    last: int | None,
    offset: int | None,
    reconnect: bool,
) -> None:
    """Stream a job's output, from the first byte, following it until the job ends.

    The job's stdout goes to stdout and its stderr to stderr, exactly as the job wrote them
    (bytes, not necessarily UTF-8). When the job has ended and everything was shown, the line
    "Job finished, no more output, exiting tail!" follows: on stdout when stdout is a terminal,
    else on stderr when stderr is one, else not at all, so redirected output stays byte-exact.

    With --output json each chunk is a JSON line: time, stream (stdout or stderr), data (base64)
    and, on the last chunk of each batch, next_offset to resume from with --offset.

    While following, a stream cut by a restart of the API or the runner (UNAVAILABLE) is
    resumed from the next byte after what was shown, after a short random wait that grows up to
    5 s; a line on stderr says so. After 5 minutes of failures it gives up. --no-reconnect
    stops at the first failure instead.
    """
    if last is not None and offset is not None:
        raise click.UsageError("--last and --offset cannot be used together", ctx=ctx)
    settings = _settings(ctx)
    request = pb.TailJobOutputRequest(job_id=job_id, follow=follow)
    if last is not None:
        request.last_lines = min(last, 2**32 - 1)  # more lines than that: all of them
    elif offset is not None:
        if offset >= 2**64:
            raise click.BadParameter("is too large", ctx, param_hint="'--offset'")
        request.offset = offset
    writer = _OutputWriter(as_json=settings.json)
    backoff = reconnect_mod.Backoff() if follow and reconnect else None
    retrying = False  # a first call failing before any output is an error at once (a typo)
    while True:
        with connect(settings, job_id=job_id) as api:  # a fresh channel for each attempt
            try:
                with contextlib.closing(api.tail(request)) as responses:
                    for response in responses:
                        writer.write(response)
                        if backoff is not None:
                            backoff.reset()
                break
            except grpc.RpcError as exc:
                reason = describe_rpc_error(exc.code(), exc.details(), api.host, job_id)
                delay = None
                unavailable = exc.code() == grpc.StatusCode.UNAVAILABLE
                if (
                    backoff is not None
                    and unavailable
                    and (retrying or writer.next_offset is not None)
                ):
                    delay = backoff.next_delay()
                if delay is None and writer.next_offset is None:
                    raise  # nothing came: the usual error
                if delay is None:
                    raise CliError(
                        f"the output stream broke off ({reason}); resume with: {PROG} jobs tail "
                        f"{job_id} --offset {writer.next_offset}"
                    ) from None
        click.echo(f"{PROG}: {reason}; reconnecting in {delay:.1f} s", err=True)
        time.sleep(delay)  # Ctrl-C ends it (interrupt.Interrupted)
        retrying = True
        if writer.next_offset is not None:  # resume after the last byte shown
            request = pb.TailJobOutputRequest(job_id=job_id, follow=True, offset=writer.next_offset)
    if follow and not settings.json:
        for number, name in ((1, "stdout"), (2, "stderr")):
            if _isatty(getattr(sys, name)):
                newline = "" if writer.last_byte[number] == b"\n" else "\n"
                click.echo(newline + TAIL_END_MESSAGE, err=number == 2)
                break


_STATES = {
    "running": pb.JOB_STATE_RUNNING,
    "completed": pb.JOB_STATE_COMPLETED,
    "failed": pb.JOB_STATE_FAILED,
    "stopped": pb.JOB_STATE_STOPPED,
}


@jobs.command("list", short_help="List jobs (your own, or all for admin and viewer).")
@click.option(
    "--state",
    type=click.Choice(list(_STATES), case_sensitive=False),
    default=None,
    help="Only jobs in this state.",
)
@click.option("--owner", metavar="USER", default=None, help="Only jobs of this user.")
@client_options
@click.pass_context
def list_jobs(ctx: click.Context, state: str | None, owner: str | None) -> None:
    """List the jobs you may see, oldest first: your own (role user), or everybody's (roles
    admin and viewer)."""
    settings = _settings(ctx)
    with connect(settings) as api:
        found = api.list_jobs(
            _STATES[state.lower()] if state else pb.JOB_STATE_UNSPECIFIED, owner or ""
        )
    if settings.json:
        _print_json({"jobs": [fmt.job_to_dict(job) for job in found]})  # all pages
    elif not found:
        click.echo("No jobs.")
    else:
        click.echo(fmt.format_job_table(found))


@jobs.command("types", short_help="List the job types and their arguments.")
@client_options
@click.pass_context
def types(ctx: click.Context) -> None:
    """List the job types the server runs, with their arguments."""
    settings = _settings(ctx)
    with connect(settings) as api:
        found = api.job_types()
    if settings.json:
        _print_json(fmt.message_to_dict(pb.ListJobTypesResponse(types=found)))
    else:
        click.echo(fmt.format_job_types(found, prog=PROG))


# --- workernator certs ------------------------------------------------------------------------


@cli.group(
    "certs",
    cls=OrderedGroup,
    context_settings=CONTEXT_SETTINGS,
    short_help="Create CA, server and client certificates.",
)
def certs_group() -> None:
    """Create the certificates of a deployment: ECDSA P-256, SHA-256, keys written 0600.

    Two CAs: the server CA signs the API server's certificate (clients trust it: --ca), the
    client CA signs client certificates (the API trusts it: client_ca). A client certificate
    carries the identity: CN = user name, O = role (admin, user or viewer).

    \b
    Files in DIR (--dir, default .):
      server-ca.pem, client-ca.pem     the CA certificates (public)
      ca/server-ca-key.pem, ca/client-ca-key.pem
                                       the CA keys, in ca/ (0700): keep them off the API host
      server.pem, server-key.pem       the API server's certificate and key
      USER.pem, USER-key.pem           a client's certificate and key
    """


_dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(),
    show_default=True,
    help="Directory to write to (created 0700 if missing), and to find the CA in.",
)
_force_option = click.option(
    "--force", is_flag=True, help="Overwrite files that exist (a new file replaces each)."
)


def _days_option(default: int) -> Callable[[_F], _F]:
    return click.option(
        "--days",
        type=click.IntRange(min=1),
        default=default,
        show_default=True,
        help="Validity in days.",
    )


def _ca_options(kind: str) -> Callable[[_F], _F]:
    cert_name, key_name = certs.ca_file_names(kind)

    def decorate(f: _F) -> _F:
        f = click.option(
            "--ca-key",
            metavar="FILE",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help=f"The {kind} CA's private key.  [default: DIR/{key_name}]",
        )(f)
        return click.option(
            "--ca",
            metavar="FILE",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help=f"The {kind} CA certificate to sign with.  [default: DIR/{cert_name}]",
        )(f)

    return decorate


def _fail(exc: BaseException) -> NoReturn:
    if isinstance(exc, FileExistsError):
        raise CliError(f"{exc.filename or exc}: already exists; use --force to overwrite it")
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        raise CliError(f"{where}{exc.strerror or exc}")
    raise CliError(str(exc))


def _load_ca(
    kind: str, directory: Path, ca: Path | None, ca_key: Path | None
) -> tuple[certs.PrivateKey, x509.Certificate]:
    cert_name, key_name = certs.ca_file_names(kind)
    cert_path = ca if ca is not None else directory / cert_name
    key_path = ca_key if ca_key is not None else directory / key_name
    for path, what in ((cert_path, "certificate"), (key_path, "key")):
        if not path.exists():
            raise CliError(
                f"{kind} CA {what} {path} does not exist (create the CA with 'workernator certs "
                f"ca {kind}', or pass --ca and --ca-key)"
            )
    try:
        return certs.load_key(key_path), certs.load_cert(cert_path)
    except (OSError, ValueError) as exc:
        _fail(exc)


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise CliError(f"{path} already exists; use --force to overwrite it")


def _write_pair(
    cert_path: Path, key_path: Path, key: certs.PrivateKey, cert: x509.Certificate, force: bool
) -> None:
    """Write a key (0600, first) and its certificate; the key's directory is created 0700."""
    if not force:
        _refuse_existing(cert_path, key_path)
    try:
        cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        certs.write_key(key_path, key, overwrite=force)
        certs.write_cert(cert_path, cert, overwrite=force)
    except (OSError, ValueError) as exc:
        _fail(exc)
    click.echo(f"Wrote {cert_path} (certificate) and {key_path} (private key, mode 0600).")


def _leaf_paths(directory: Path, stem: str) -> tuple[Path, Path]:
    if not stem or "/" in stem or stem in (".", ".."):
        raise CliError(f"--out must be a plain file name stem, got {stem!r}")
    return directory / f"{stem}.pem", directory / f"{stem}-key.pem"


@certs_group.command("ca", short_help="Create the server CA or the client CA.")
@click.argument("kind", metavar="KIND", type=click.Choice(list(certs.CA_KINDS)))
@_dir_option
@click.option(
    "--common-name", default=None, help="The CA's name (CN).  [default: Workernator KIND CA]"
)
@_days_option(certs.DEFAULT_CA_VALID_DAYS)
@_force_option
def certs_ca(kind: str, directory: Path, common_name: str | None, days: int, force: bool) -> None:
    """Create the server CA or the client CA (KIND: server or client): a key and a self-signed
    certificate, limited to signing that kind of certificate.

    \b
    Writes DIR/KIND-ca.pem and DIR/ca/KIND-ca-key.pem (ca/ is created 0700). Example:
      workernator certs ca server --dir ./pki && workernator certs ca client --dir ./pki
    """
    cert_name, key_name = certs.ca_file_names(kind)
    cert_path, key_path = directory / cert_name, directory / key_name
    if not force:
        _refuse_existing(cert_path, key_path)
    try:
        key, cert = certs.create_ca(common_name or f"Workernator {kind} CA", days, kind=kind)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        certs.make_key_dir(key_path.parent)  # an existing ca/ must be 0700
    except (OSError, ValueError) as exc:
        _fail(exc)
    _write_pair(cert_path, key_path, key, cert, force)


@certs_group.command("server", short_help="Create the API server's certificate.")
@click.option(
    "--name",
    "names",
    multiple=True,
    required=True,
    metavar="NAME",
    help="DNS name or IP address clients connect to (repeat for each); the first is the CN.",
)
@_dir_option
@_ca_options("server")
@click.option(
    "--out",
    "stem",
    default="server",
    show_default=True,
    metavar="NAME",
    help="Write NAME.pem and NAME-key.pem.",
)
@_days_option(certs.DEFAULT_LEAF_VALID_DAYS)
@_force_option
def certs_server(
    names: tuple[str, ...],
    directory: Path,
    ca: Path | None,
    ca_key: Path | None,
    stem: str,
    days: int,
    force: bool,
) -> None:
    """Create the API server's key and certificate, signed by the server CA.

    \b
    Example:
      workernator certs server --name localhost --name 127.0.0.1
    To renew, write a new pair (--out server.new) and rename it over the old files: the API
    takes it up for new connections, without a restart.
    """
    cert_path, key_path = _leaf_paths(directory, stem)
    if not force:
        _refuse_existing(cert_path, key_path)
    ca_private, ca_cert = _load_ca("server", directory, ca, ca_key)
    dns_names, ip_addresses = certs.split_server_names(names)
    try:
        key, cert = certs.create_server_cert(ca_private, ca_cert, dns_names, ip_addresses, days)
    except ValueError as exc:
        _fail(exc)
    _write_pair(cert_path, key_path, key, cert, force)


@certs_group.command("client", short_help="Create a client certificate (user and role).")
@click.argument("user")
@click.option(
    "--role",
    type=click.Choice(certs.ROLES),
    required=True,
    help="admin: everything; user: start jobs, see and stop their own; viewer: read all jobs.",
)
@_dir_option
@_ca_options("client")
@click.option(
    "--out",
    "stem",
    default=None,
    metavar="NAME",
    help="Write NAME.pem and NAME-key.pem.  [default: USER]",
)
@_days_option(certs.DEFAULT_LEAF_VALID_DAYS)
@_force_option
def certs_client(
    user: str,
    role: str,
    directory: Path,
    ca: Path | None,
    ca_key: Path | None,
    stem: str | None,
    days: int,
    force: bool,
) -> None:
    """Create a client key and certificate for USER with a role, signed by the client CA.

    \b
    Example:
      workernator certs client alice --role user
    """
    try:
        certs.validate_user(user)
    except ValueError as exc:
        _fail(exc)
    cert_path, key_path = _leaf_paths(directory, stem or user)
    if not force:
        _refuse_existing(cert_path, key_path)
    ca_private, ca_cert = _load_ca("client", directory, ca, ca_key)
    try:
        key, cert = certs.create_client_cert(ca_private, ca_cert, user, role, days)
    except ValueError as exc:
        _fail(exc)
    _write_pair(cert_path, key_path, key, cert, force)


def _user_role(
    ctx: click.Context, param: click.Parameter, value: Sequence[str]
) -> list[tuple[str, str]]:
    out = []
    for item in value:
        user, sep, role = item.partition(":")
        if not sep or not user or not role:
            raise click.BadParameter(
                f"{item!r} is not USER:ROLE (like alice:user; roles: {', '.join(certs.ROLES)})",
                ctx=ctx,
                param=param,
            )
        try:
            certs.validate_user(user)
            certs.validate_role(role)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        out.append((user, role))
    return out


@certs_group.command("init", short_help="Create everything at once: both CAs, server and clients.")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    metavar="NAME",
    help="DNS name or IP address of the API server (repeat).  [default: localhost, 127.0.0.1]",
)
@click.option(
    "--user",
    "users",
    multiple=True,
    metavar="USER:ROLE",
    callback=_user_role,
    help="A client certificate to create, like alice:user (repeat).",
)
@_days_option(certs.DEFAULT_LEAF_VALID_DAYS)
@click.option(
    "--ca-days",
    type=click.IntRange(min=1),
    default=certs.DEFAULT_CA_VALID_DAYS,
    show_default=True,
    help="Validity of the CAs in days.",
)
@_force_option
def certs_init(
    directory: Path,
    server_names: tuple[str, ...],
    users: list[tuple[str, str]],
    days: int,
    ca_days: int,
    force: bool,
) -> None:
    """Create a whole deployment in DIR: a server CA and a client CA, the API server's
    certificate, and a client certificate per --user.

    \b
    Writes server-ca.pem, client-ca.pem, ca/server-ca-key.pem, ca/client-ca-key.pem (ca/ is
    0700), server.pem, server-key.pem, and USER.pem, USER-key.pem. Refuses to overwrite an
    existing file unless --force. Example:
      workernator certs init ./certs --server-name localhost --user alice:user --user root:admin
    """
    try:
        deployment = certs.create_deployment(
            directory,
            server_names or ("localhost", "127.0.0.1"),
            users,
            ca_valid_days=ca_days,
            valid_days=days,
            overwrite=force,
        )
    except FileExistsError as exc:
        raise CliError(f"{exc}".replace("(pass overwrite=True)", "(use --force)")) from None
    except (OSError, ValueError) as exc:
        _fail(exc)
    dep = deployment
    click.echo(f"Wrote to {dep.directory}:")
    click.echo(f"  {dep.server_ca_cert.name}  the server CA: clients trust it (--ca)")
    click.echo(f"  {dep.client_ca_cert.name}  the client CA: the API trusts it (client_ca)")
    click.echo(
        f"  {certs.CA_KEY_DIR}/{dep.server_ca_key.name}, {certs.CA_KEY_DIR}/"
        f"{dep.client_ca_key.name}  the CA keys: keep them secret, off the API host"
    )
    click.echo(f"  {dep.server_cert.name}, {dep.server_key.name}  the API server")
    for user, (cert_path, key_path) in dep.users.items():
        click.echo(f"  {cert_path.name}, {key_path.name}  {user}")
    if dep.users:
        user, (cert_path, key_path) = next(iter(dep.users.items()))
        click.echo(f"To act as {user}:")
        click.echo(f"  export WORKERNATOR_CA={dep.server_ca_cert.resolve()}")
        click.echo(f"  export WORKERNATOR_CERT={cert_path.resolve()}")
        click.echo(f"  export WORKERNATOR_KEY={key_path.resolve()}")


# --- workernator completion -------------------------------------------------------------------


@cli.command("completion", short_help="Print a shell completion script (bash, zsh, fish).")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (commands, options and job IDs).

    \b
    bash:  eval "$(workernator completion bash)"    (e.g. in ~/.bashrc)
    zsh:   eval "$(workernator completion zsh)"     (e.g. in ~/.zshrc)
    fish:  workernator completion fish > ~/.config/fish/completions/workernator.fish
    """
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click ships all three
        raise CliError(f"no completion for {shell}")
    click.echo(cls(cli, {}, PROG, "_WORKERNATOR_COMPLETE").source())


# --- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``workernator`` console script."""
    interrupt.install()
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name=PROG)
    except interrupt.Interrupted:
        interrupt.exit_quietly()
    except Exception as exc:
        if interrupt.requested():  # whatever the interrupt broke on its way
            interrupt.exit_quietly()
        if os.environ.get("WORKERNATOR_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        click.echo(f"Error: unexpected {type(exc).__name__}: {message}", err=True)
        sys.exit(1)
    sys.exit(0)  # pragma: no cover - cli.main exits itself


if __name__ == "__main__":
    main()
