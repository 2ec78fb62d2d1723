"""The api server's TLS: its certificate files, reloaded when they change, and the check of
every caller's certificate.

Renewing a certificate must not need a restart, and a restart would cut every open stream. So
gRPC gets *dynamic* credentials: before each TLS handshake it asks :meth:`ServerTls._fetch`
for the configuration, which stats the three files (cheap) and reads them again only when one
changed. Connections already open keep the configuration they were made with. A changed file
that cannot be used (unreadable, not PEM, a key of another certificate, expired, ...) is
logged once per change, and the api goes on serving with the files it had.

The handshake verifies the client's certificate against the client CAs, but BoringSSL builds
a path through any intermediate CA the client sends and ignores the CAs' path length 0: a
leaf under an intermediate signed by the client CA's key would pass. So every call is checked
again here (:meth:`ServerTls.authenticate`): TLS 1.3, a leaf issued *directly* by one of the
client CAs currently loaded, valid now. :class:`AuthInterceptor` applies it to every service,
health and reflection included.
"""

from __future__ import annotations

import contextvars
import inspect
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared import log
from workernator_api import certs
from workernator_api.config import ApiConfig, ConfigError

MAX_VERIFIED = 4096
"""Client certificates remembered as verified (per loaded CA set); more clears the memory."""

_Signature = tuple[tuple[int, ...] | str, ...]


class Unauthenticated(Exception):
    """The caller's connection or certificate is not acceptable; the message says why."""


@dataclass(frozen=True)
class Material:
    """One consistent, checked set of the api's TLS files."""

    config: grpc.ServerCertificateConfiguration
    server_cert: x509.Certificate
    client_cas: tuple[x509.Certificate, ...]
    source: tuple[bytes, bytes, bytes]
    """The bytes of the cert, key and client_ca files, to tell a real change from a touch."""
    verified: dict[bytes, Verified] = field(default_factory=dict, compare=False)
    """Client certificates (PEM) already found issued by one of ``client_cas``."""


@dataclass(frozen=True, slots=True)
class Verified:
    """A client certificate found issued by a client CA, and its validity period as POSIX
    times: comparing two floats per call instead of building two datetimes."""

    cert: x509.Certificate
    not_before: float
    not_after: float

    @classmethod
    def of(cls, cert: x509.Certificate) -> Verified:
        return cls(
            cert, cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
        )


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"api.{setting}: cannot read {path}: {exc.strerror or exc}") from None


def load_material(cfg: ApiConfig) -> Material:
    """Read and check ``cfg``'s cert, key and client_ca; ConfigError names the file and the
    problem (see :func:`certs.check_server_key_pair` and :func:`certs.load_ca_bundle`)."""
    key, cert, bundle = (
        _read(cfg.key, "key"),
        _read(cfg.cert, "cert"),
        _read(cfg.client_ca, "client_ca"),
    )
    try:
        certs.check_server_key_pair(key, cert)
    except certs.ServerKeyError as exc:
        raise ConfigError(f"api.key: {cfg.key}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"api.cert: {cfg.cert}: {exc}") from None
    try:
        client_cas = tuple(certs.load_ca_bundle(bundle, "client"))
    except ValueError as exc:
        raise ConfigError(f"api.client_ca: {cfg.client_ca}: {exc}") from None
    # Only the CAs that parsed, re-encoded: gRPC trusts exactly what the per-call check knows.
    roots = b"".join(ca.public_bytes(serialization.Encoding.PEM) for ca in client_cas)
    return Material(
        config=grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots),
        server_cert=x509.load_pem_x509_certificates(cert)[0],
        client_cas=client_cas,
        source=(cert, key, bundle),
    )


def _signature(paths: Sequence[Path]) -> _Signature:
    """What changes when a file is replaced or rewritten: device, inode, size, times."""
    found: list[tuple[int, ...] | str] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            found.append(f"{type(exc).__name__}:{exc.errno}")
        else:
            found.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(found)


class ServerTls:
    """The api's TLS files, loaded and checked at start (a :class:`ConfigError` if unusable),
    then followed: new connections get new files once they change and are usable."""

    def __init__(self, cfg: ApiConfig) -> None:
        self._cfg = cfg
        self._paths = (cfg.cert, cfg.key, cfg.client_ca)
        self._lock = threading.Lock()  # gRPC calls _fetch on its own threads
        self._signature = _signature(self._paths)
        self._material = load_material(cfg)
        self._generation = 0  # of _material; _served is the one gRPC was last given
        self._served = 0
        self._failed: _Signature | None = None  # the change already logged as unusable

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate and follow the files."""
        # gRPC documents None as "keep the current configuration"; types-grpcio omits it.
        fetch = cast("Callable[[], grpc.ServerCertificateConfiguration]", self._fetch)
        return grpc.dynamic_ssl_server_credentials(
            self._material.config, fetch, require_client_authentication=True
        )

    def current(self) -> Material:
        """The files in force, after taking up a change to them if it is usable."""
        signature = _signature(self._paths)
        with self._lock:
            self._follow(signature)
            return self._material

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate configuration fetcher, called before every handshake: a new
        configuration when the files changed since the last call, else None (keep it)."""
        signature = _signature(self._paths)
        with self._lock:
            self._follow(signature)
            if self._served == self._generation:
                return None
            self._served = self._generation
            return self._material.config

    def _follow(self, signature: _Signature) -> None:
        """Load the files again if ``signature`` says they changed (with the lock held)."""
        if signature in (self._signature, self._failed):
            return
        try:
            material = load_material(self._cfg)
        except ConfigError as exc:
            self._failed = signature
            log.warning(
                "TLS files changed but cannot be used; still using the previous ones",
                error=str(exc),
            )
            return
        self._signature, self._failed = signature, None
        if material.source == self._material.source:
            return  # rewritten or touched, not changed (the files in force put back, say)
        self._material = material
        self._generation += 1
        log.info(
            "TLS files reloaded",
            server_cert_serial=f"{material.server_cert.serial_number:x}",
            server_cert_expires=f"{material.server_cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            client_cas=len(material.client_cas),
        )

    def authenticate(self, auth: Mapping[str, Iterable[bytes]]) -> x509.Certificate:
        """The caller's verified client certificate, from a call's auth context.

        TLS 1.3, a certificate, issued directly by one of the client CAs loaded now (not only
        those of the handshake: a CA taken out of the bundle stops counting at once), and valid
        now. Raises :class:`Unauthenticated` with the reason.
        """
        if list(auth.get("ssl_tls_version", ())) != [b"TLSv1.3"]:
            raise Unauthenticated("TLS 1.3 is required")
        pems = list(auth.get("x509_pem_cert", ()))
        if not pems:
            raise Unauthenticated("a client certificate is required")
        material = self.current()
        verified = material.verified.get(pems[0])
        try:
            if verified is None:
                cert = x509.load_pem_x509_certificate(pems[0])
                certs.check_issuer(cert, material.client_cas)
                if len(material.verified) >= MAX_VERIFIED:
                    material.verified.clear()
                verified = material.verified[pems[0]] = Verified.of(cert)
            if not verified.not_before <= time.time() <= verified.not_after:
                certs.check_validity(verified.cert, "client certificate")  # says how
        except ValueError as exc:
            raise Unauthenticated(f"unusable client certificate: {exc}") from None
        return verified.cert


# --- applying the check to every call -----------------------------------------------------------

_Context = grpc.aio.ServicerContext[Any, Any]
_Check = Callable[[_Context], Awaitable[None]]

_CALLER: contextvars.ContextVar[x509.Certificate | None] = contextvars.ContextVar(
    "workernator_caller", default=None
)
"""The certificate :class:`AuthInterceptor` accepted for the call running in this task: the
handler behind it reads the caller from here instead of checking the certificate a second time.
Each call runs in a task (and a context) of its own, so one call never sees another's."""


def checked_caller() -> x509.Certificate | None:
    """The client certificate :class:`AuthInterceptor` accepted for the current call, if it
    checked this call."""
    return _CALLER.get()


def _guard(behavior: Callable[..., Any], check: _Check) -> Callable[..., Any]:
    """``behavior`` (an async method handler) that runs only once ``check`` passed."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: _Context) -> AsyncIterator[Any]:
            await check(context)
            async for response in behavior(request, context):
                yield response

        return stream

    async def unary(request: Any, context: _Context) -> Any:
        await check(context)
        return await behavior(request, context)

    return unary


def guard_handler(
    handler: grpc.RpcMethodHandler[Any, Any], check: _Check
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same method handler, with ``check`` run before its behavior."""
    kinds = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
    )
    for behavior, make in kinds:
        if behavior is not None:
            return make(
                _guard(behavior, check),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise TypeError("a method handler without a behavior")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse, UNAUTHENTICATED, every call (of every service) whose peer
    :meth:`ServerTls.authenticate` does not accept, before its handler runs."""

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls

    async def _check(self, context: _Context) -> None:
        try:
            _CALLER.set(self._tls.authenticate(context.auth_context()))
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return handler
        return guard_handler(handler, self._check)
