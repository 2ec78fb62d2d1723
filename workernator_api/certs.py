"""Certificate tooling: CAs, server and client certificates, and the identity in a client cert.

Design section 8: ECDSA P-256 keys, SHA-256 signatures, separate client and server CAs (every
function takes the CA to sign with; a CA made for one kind refuses to sign the other), leaves
that are CA:FALSE with key usage and extended key usage set, server certificates with SANs,
private keys written 0600. A client leaf counts only when the client CA issued it directly
(:func:`check_issuer`): no intermediate CAs.

A client certificate carries the identity the API authorizes: CN = user name, O = role (as
Kubernetes does). :func:`identity_from_cert` is the one rule that reads it back; the API server
applies it to the peer certificate of every call.

Everything here is a plain function with keyword-friendly arguments so the CLI can wrap it
one-to-one. Validation problems raise :class:`ValueError` (or its subclass
:class:`InvalidIdentityError`) with a message that names what is wrong.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_KEY_DIR",
    "CA_KINDS",
    "DEFAULT_CA_VALID_DAYS",
    "DEFAULT_LEAF_VALID_DAYS",
    "MAX_USER_LENGTH",
    "ROLES",
    "SERVER_CERT_FILE",
    "SERVER_KEY_CURVES",
    "SERVER_KEY_FILE",
    "Deployment",
    "InvalidIdentityError",
    "PrivateKey",
    "ServerKeyError",
    "ca_file_names",
    "ca_kind",
    "check_issuer",
    "check_key_dir",
    "check_server_key_pair",
    "check_validity",
    "create_ca",
    "create_client_cert",
    "create_deployment",
    "create_server_cert",
    "generate_key",
    "identity_from_cert",
    "identity_from_pem",
    "load_ca_bundle",
    "load_cert",
    "load_key",
    "make_key_dir",
    "split_server_names",
    "user_file_names",
    "validate_role",
    "validate_user",
    "write_cert",
    "write_key",
]

PrivateKey = ec.EllipticCurvePrivateKey
"""The only key type this module creates or accepts: ECDSA on P-256 (secp256r1)."""

SERVER_KEY_CURVES: dict[str, str] = {"secp256r1": "P-256", "secp384r1": "P-384"}
"""The curves the api server accepts for its own key (grpcio peers handshake with both)."""

ROLES: tuple[str, ...] = ("admin", "user", "viewer")
"""The roles a client certificate may carry in O (design section 8)."""

MAX_USER_LENGTH = 64
_USER_RE = re.compile(r"[A-Za-z0-9._-]+")

DEFAULT_CA_VALID_DAYS = 3650
DEFAULT_LEAF_VALID_DAYS = 365

CA_KINDS: dict[str, x509.ObjectIdentifier] = {
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
}
"""The two kinds of CA, and the extended key usage that marks (and limits) what each issues."""

# File names written by create_deployment and found by the CLI's certs commands. The CA keys go
# in a directory of their own (0700) that no daemon's configuration points at.
CA_KEY_DIR = "ca"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"

# The clock skew a fresh certificate tolerates: not-before is this far in the past.
_BACKDATE = datetime.timedelta(minutes=1)
_MAX_COMMON_NAME = 64  # ub-common-name in RFC 5280
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_KEY_MODE = 0o600
_CERT_MODE = 0o644


class InvalidIdentityError(ValueError):
    """A user name, role or client certificate subject that is not a valid identity."""


# --- identity ---------------------------------------------------------------------------------


def validate_user(user: str) -> str:
    """Return ``user`` if it is a valid user name, else raise :class:`InvalidIdentityError`.

    A user name is 1-64 characters of ``[A-Za-z0-9._-]`` and not ``.`` or ``..`` (it also names
    files, e.g. ``<user>.pem``).
    """
    if not isinstance(user, str):
        raise InvalidIdentityError(f"user name must be a string, got {type(user).__name__}")
    if not user:
        raise InvalidIdentityError("user name is empty")
    if len(user) > MAX_USER_LENGTH:
        raise InvalidIdentityError(
            f"user name is {len(user)} characters long; the maximum is {MAX_USER_LENGTH}"
        )
    if not _USER_RE.fullmatch(user):
        bad = sorted({c for c in user if not _USER_RE.fullmatch(c)})
        shown = ", ".join(repr(c) for c in bad)
        raise InvalidIdentityError(
            f"user name {user!r} contains characters that are not allowed ({shown}); "
            "use only letters, digits, '.', '_' and '-'"
        )
    if user in (".", ".."):
        raise InvalidIdentityError(f"user name {user!r} is reserved")
    return user


def validate_role(role: str) -> str:
    """Return ``role`` if it is one of :data:`ROLES`, else raise :class:`InvalidIdentityError`."""
    if role not in ROLES:
        raise InvalidIdentityError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")
    return role


def _single_attribute(name: x509.Name, oid: x509.ObjectIdentifier, what: str) -> str:
    values = name.get_attributes_for_oid(oid)
    if not values:
        raise InvalidIdentityError(f"client certificate subject has no {what}")
    if len(values) > 1:
        raise InvalidIdentityError(f"client certificate subject has {len(values)} {what} values")
    value = values[0].value
    if not isinstance(value, str):
        raise InvalidIdentityError(f"client certificate {what} is not a string")
    return value


def identity_from_cert(cert: x509.Certificate) -> tuple[str, str]:
    """Return ``(user, role)`` from a client certificate: CN = user, O = role.

    The subject must carry exactly one CN and exactly one O, both valid
    (:func:`validate_user`, :func:`validate_role`). As defense in depth the certificate must also
    be a leaf meant for client authentication (not a CA; extended key usage includes
    clientAuth), so a server certificate from a shared CA never passes as a client.
    Raises :class:`InvalidIdentityError` naming the problem. This does not check who issued it
    (:func:`check_issuer` does) or its validity dates (:func:`check_validity`).
    """
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is not None and basic.ca:
        raise InvalidIdentityError("client certificate is a CA certificate")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise InvalidIdentityError(
            "client certificate has no extended key usage (clientAuth is required)"
        ) from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise InvalidIdentityError("client certificate is not valid for client authentication")
    user = _single_attribute(cert.subject, NameOID.COMMON_NAME, "common name (CN)")
    role = _single_attribute(cert.subject, NameOID.ORGANIZATION_NAME, "organization (O)")
    return validate_user(user), validate_role(role)


def identity_from_pem(pem: bytes) -> tuple[str, str]:
    """:func:`identity_from_cert` for a PEM certificate (gRPC's ``x509_pem_cert`` auth property).

    Raises :class:`InvalidIdentityError` for a certificate that does not parse, too.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise InvalidIdentityError(f"client certificate does not parse: {exc}") from None
    return identity_from_cert(cert)


# --- verifying a peer -------------------------------------------------------------------------


def check_issuer(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> x509.Certificate:
    """Return the CA of ``cas`` that issued ``cert`` directly (its signature checked).

    TLS libraries build a path through whatever intermediates the peer sends, and BoringSSL
    (gRPC's) does not enforce the CAs' path length 0. So the api checks every call's client
    certificate here too: it must be signed by one of the configured client CAs themselves.
    Raises :class:`InvalidIdentityError` otherwise.
    """
    for ca in cas:
        if cert.issuer != ca.subject:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    raise InvalidIdentityError(
        f"client certificate was not issued directly by a client CA this server trusts (its "
        f"issuer is {cert.issuer.rfc4514_string() or '(empty)'}; intermediate CAs are not "
        "accepted)"
    )


def check_validity(cert: x509.Certificate, what: str, now: datetime.datetime | None = None) -> None:
    """Raise ValueError if ``cert`` (called ``what`` in the message) is expired or not yet
    valid at ``now`` (default: the current time)."""
    now = now or datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        raise ValueError(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise ValueError(
            f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def load_ca_bundle(pem: bytes, kind: str) -> list[x509.Certificate]:
    """The CA certificates of a PEM bundle that must hold only CAs of ``kind`` (or of no kind).

    A file the api (``kind="client"``) or the CLI (``kind="server"``) trusts: a leaf in it, or
    the CA of the other kind, is a configuration mistake worth an error that says so (a server CA
    in the client bundle would let server certificates in as clients). Raises ValueError.
    """
    try:
        cas = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError("not a PEM certificate") from None
    for number, ca in enumerate(cas, 1):
        where = f"certificate {number} ({_subject(ca)})" if len(cas) > 1 else _subject(ca)
        if not _is_ca(ca):
            raise ValueError(f"{where} is not a CA certificate (BasicConstraints CA:TRUE)")
        other = ca_kind(ca)
        if other not in (None, kind):
            raise ValueError(
                f"{where} is the {other} CA (it issues {other} certificates only); "
                f"give the {kind} CA"
            )
    return cas


# --- names ------------------------------------------------------------------------------------


def _validate_dns_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError("server DNS name is empty")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"{name!r} is an IP address, not a DNS name; pass it as an IP address")
    if not name.isascii():
        raise ValueError(f"server DNS name {name!r} is not ASCII (use its IDNA 'xn--' form)")
    host = name.removesuffix(".")
    if len(host) > 253:
        raise ValueError(f"server DNS name {name!r} is longer than 253 characters")
    labels = host.split(".")
    for i, label in enumerate(labels):
        if i == 0 and label == "*" and len(labels) > 2:
            continue  # a wildcard in the leftmost label of a name with at least two more
        if not _DNS_LABEL_RE.fullmatch(label):
            raise ValueError(
                f"server DNS name {name!r} has an invalid label {label!r} (labels are 1-63 "
                "letters, digits and '-', not starting or ending with '-')"
            )
    return host


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def split_server_names(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split names as a user types them (``localhost``, ``127.0.0.1``, ``::1``) into
    ``(dns_names, ip_addresses)``, keeping their order. Useful for a CLI ``--name`` option."""
    dns_names: list[str] = []
    ip_addresses: list[str] = []
    for name in names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            dns_names.append(name)
        else:
            ip_addresses.append(name)
    return dns_names, ip_addresses


# --- building certificates --------------------------------------------------------------------


def generate_key() -> PrivateKey:
    """A new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _serial_number() -> int:
    # 159 random bits: positive, at most 20 octets in DER, and never zero.
    while True:
        serial = secrets.randbits(159)
        if serial:
            return serial


def _check_valid_days(valid_days: int) -> None:
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or valid_days < 1:
        raise ValueError(f"valid_days must be a whole number of days >= 1, got {valid_days!r}")


def _validity(valid_days: int) -> tuple[datetime.datetime, datetime.datetime]:
    _check_valid_days(valid_days)
    now = datetime.datetime.now(datetime.UTC)
    return now - _BACKDATE, now + datetime.timedelta(days=valid_days)


def _check_ca(ca_key: PrivateKey, ca_cert: x509.Certificate) -> None:
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.curve.name != "secp256r1":
        raise ValueError("the CA key is not an ECDSA P-256 key")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if ca_key.public_key().public_bytes(der, pub) != ca_cert.public_key().public_bytes(der, pub):
        raise ValueError("the CA key does not belong to the CA certificate")
    try:
        basic = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise ValueError("the CA certificate is not a CA (BasicConstraints CA:TRUE is missing)")


def _cap_to_ca(not_after: datetime.datetime, ca_cert: x509.Certificate) -> datetime.datetime:
    """A leaf never outlives its CA: cap its not-after at the CA's. Asking for a day or more
    beyond the CA's expiry is an error rather than a silently shorter certificate."""
    ca_end = ca_cert.not_valid_after_utc
    if ca_end <= datetime.datetime.now(datetime.UTC):
        raise ValueError(f"the CA certificate expired on {ca_end:%Y-%m-%d %H:%M} UTC")
    if not_after - ca_end >= datetime.timedelta(days=1):
        raise ValueError(
            f"the certificate would outlive its CA, which expires {ca_end:%Y-%m-%d %H:%M} UTC; "
            "ask for fewer days"
        )
    return min(not_after, ca_end)


def _leaf_builder(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    key: PrivateKey,
    *,
    valid_days: int,
    purpose: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    not_before, not_after = _validity(valid_days)
    _check_ca(ca_key, ca_cert)
    _check_kind(ca_cert, purpose)
    not_after = _cap_to_ca(not_after, ca_cert)
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )


def create_ca(
    common_name: str, valid_days: int = DEFAULT_CA_VALID_DAYS, *, kind: str | None = None
) -> tuple[PrivateKey, x509.Certificate]:
    """Create a self-signed CA: a new key and its certificate.

    CA:TRUE with path length 0 (it signs leaves only), key usage keyCertSign + cRLSign (both
    critical), a subject key identifier. ``kind`` (``"server"`` or ``"client"``, see
    :data:`CA_KINDS`) adds an extended key usage that limits the CA to that kind of leaf: TLS
    stacks (OpenSSL, BoringSSL, Go) then refuse a leaf of the other kind under it, and this
    module refuses to sign one. Use one CA for clients and another for servers.
    """
    if kind is not None and kind not in CA_KINDS:
        raise ValueError(f"unknown CA kind {kind!r}; the kinds are {', '.join(CA_KINDS)}")
    if not isinstance(common_name, str) or not common_name.strip():
        raise ValueError("CA common name is empty")
    if len(common_name) > _MAX_COMMON_NAME:
        raise ValueError(f"CA common name is longer than {_MAX_COMMON_NAME} characters")
    not_before, not_after = _validity(valid_days)
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if kind is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([CA_KINDS[kind]]), critical=False)
    return key, builder.sign(key, hashes.SHA256())


def ca_kind(cert: x509.Certificate) -> str | None:
    """``"server"`` or ``"client"`` for a CA limited to that kind of leaf, else None."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    kinds = [kind for kind, oid in CA_KINDS.items() if oid in eku]
    return kinds[0] if len(kinds) == 1 else None


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _check_kind(ca_cert: x509.Certificate, purpose: x509.ObjectIdentifier) -> None:
    """A CA made for one kind of leaf does not sign the other kind."""
    try:
        eku = ca_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if purpose not in eku:
        wanted = next(kind for kind, oid in CA_KINDS.items() if oid == purpose)
        issues = ca_kind(ca_cert) or "other"
        raise ValueError(
            f"the CA {_subject(ca_cert)} issues {issues} certificates only; sign {wanted} "
            f"certificates with the {wanted} CA"
        )


def create_server_cert(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    valid_days: int = DEFAULT_LEAF_VALID_DAYS,
) -> tuple[PrivateKey, x509.Certificate]:
    """Create a server key and certificate signed by the (server) CA.

    Every DNS name and IP address goes in the subject alternative names; the CN is the first
    name (the first DNS name, or the first IP address when there is none). At least one name is
    required. Extended key usage: serverAuth.
    """
    if isinstance(dns_names, str) or isinstance(ip_addresses, str):
        raise TypeError("dns_names and ip_addresses are lists of strings, not strings")
    hosts = [_validate_dns_name(n) for n in dns_names]
    ips = [_parse_ip(a) for a in ip_addresses]
    if not hosts and not ips:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    common_name = hosts[0] if hosts else str(ips[0])
    if len(common_name) > _MAX_COMMON_NAME:
        raise ValueError(
            f"the first server name {common_name!r} is longer than {_MAX_COMMON_NAME} "
            "characters and cannot be the CN; put a shorter name first"
        )
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dict.fromkeys(hosts)]
    sans += [x509.IPAddress(ip) for ip in dict.fromkeys(ips)]
    key = generate_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _leaf_builder(
            ca_key,
            ca_cert,
            subject,
            key,
            valid_days=valid_days,
            purpose=ExtendedKeyUsageOID.SERVER_AUTH,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def create_client_cert(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    user: str,
    role: str,
    valid_days: int = DEFAULT_LEAF_VALID_DAYS,
) -> tuple[PrivateKey, x509.Certificate]:
    """Create a client key and certificate signed by the (client) CA: CN = user, O = role.

    ``user`` must pass :func:`validate_user` and ``role`` :func:`validate_role`. Extended key
    usage: clientAuth.
    """
    validate_user(user)
    validate_role(role)
    key = generate_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, user),
        ]
    )
    cert = _leaf_builder(
        ca_key,
        ca_cert,
        subject,
        key,
        valid_days=valid_days,
        purpose=ExtendedKeyUsageOID.CLIENT_AUTH,
    ).sign(ca_key, hashes.SHA256())
    return key, cert


# --- files ------------------------------------------------------------------------------------


def _write_private(fd: int, data: bytes, mode: int) -> None:
    """Set the exact mode on a file we just created (umask only ever removed bits), then write."""
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_file(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    if not overwrite:
        try:
            fd = os.open(path, flags, mode)
        except FileExistsError:
            raise FileExistsError(
                f"{path} already exists; refusing to overwrite it (pass overwrite=True)"
            ) from None
        try:
            _write_private(fd, data, mode)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return
    # Overwrite: write a new file beside the old one (created with its final mode), then
    # rename it over the old one, so the path always holds a whole file and never a wider mode.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, flags, mode)
    try:
        _write_private(fd, data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_key(path: str | os.PathLike[str], key: PrivateKey, *, overwrite: bool = False) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM to a file created with mode 0600.

    The file is created 0600 from the start (never written and then chmod-ed). An existing file
    is an error (:class:`FileExistsError`) unless ``overwrite`` is true, in which case the new
    key is written to a 0600 temporary file in the same directory and renamed over it.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _create_file(Path(path), pem, _KEY_MODE, overwrite)


def write_cert(
    path: str | os.PathLike[str], cert: x509.Certificate, *, overwrite: bool = False
) -> None:
    """Write ``cert`` as PEM to a file with mode 0644; same overwrite rule as :func:`write_key`."""
    _create_file(Path(path), cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE, overwrite)


def load_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Read an unencrypted PEM private key; it must be ECDSA P-256."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{path}: not an ECDSA P-256 private key")
    return key


class ServerKeyError(ValueError):
    """The api server's private key cannot be used (see :func:`check_server_key_pair`)."""


def _describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC on {key.curve.name}"
    size = getattr(key, "key_size", None)
    kind = type(key).__name__.removeprefix("_").removesuffix("PrivateKey") or "unknown"
    return f"{kind}, {size} bits" if size else kind


def check_server_key_pair(key_pem: bytes, cert_pem: bytes) -> None:
    """Check the api server's key and certificate before serving with them.

    The key must be ECDSA on P-256 or P-384: TLS 1.3-only rests on it, since the TLS 1.2
    cipher suites left enabled are RSA-authenticated ones, which an EC key cannot use (with an
    RSA key, TLS 1.2 handshakes would succeed). The key must belong to the certificate. The
    certificate must be one clients accept from a server: not a CA, valid now, and with
    serverAuth in its extended key usage when it has one.
    Raises :class:`ServerKeyError` about the key, and a plain :class:`ValueError` about the
    certificate.
    """
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ServerKeyError("the key is encrypted; the server needs an unencrypted key") from None
    except ValueError:
        raise ServerKeyError("not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in SERVER_KEY_CURVES:
        raise ServerKeyError(
            "the server key must be an ECDSA key on P-256 or P-384 (TLS 1.3-only relies on "
            f"it); this one is {_describe_key(key)}"
        )
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ValueError("not a PEM certificate") from None
    if _is_ca(cert):
        raise ValueError(
            "this is a CA certificate, not a server certificate (make one with "
            "'workernator certs server')"
        )
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise ValueError(
            "not a server certificate: its extended key usage lacks serverAuth (a client "
            "certificate?)"
        )
    check_validity(cert, "the server certificate")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ServerKeyError("the key does not belong to the server certificate")


def load_cert(path: str | os.PathLike[str]) -> x509.Certificate:
    """Read a PEM certificate (the first one, if the file holds a chain)."""
    data = Path(path).read_bytes()
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM certificate: {exc}") from None


# --- a whole deployment in one call ------------------------------------------------------------


def ca_file_names(kind: str) -> tuple[str, str]:
    """The ``(certificate, key)`` paths of the ``kind`` CA, relative to a deployment directory:
    ``<kind>-ca.pem`` beside the leaves (public: daemons and clients read it), and
    ``ca/<kind>-ca-key.pem`` in the CA key directory, which no daemon reads."""
    if kind not in CA_KINDS:
        raise ValueError(f"unknown CA kind {kind!r}; the kinds are {', '.join(CA_KINDS)}")
    return f"{kind}-ca.pem", f"{CA_KEY_DIR}/{kind}-ca-key.pem"


@dataclass(frozen=True)
class Deployment:
    """The files :func:`create_deployment` wrote."""

    directory: Path
    server_ca_cert: Path
    """What clients trust the server with (the CLI's ``--ca``)."""
    server_ca_key: Path
    client_ca_cert: Path
    """What the api trusts clients with (``api.client_ca``)."""
    client_ca_key: Path
    server_cert: Path
    server_key: Path
    users: dict[str, tuple[Path, Path]]
    """user name -> (certificate, key)"""


def user_file_names(user: str) -> tuple[str, str]:
    """The ``(certificate, key)`` file names :func:`create_deployment` uses for ``user``."""
    validate_user(user)
    return f"{user}.pem", f"{user}-key.pem"


def check_key_dir(path: Path) -> None:
    """An existing directory for private keys must be a real directory (not a symlink) that
    grants nothing to group or others; a missing one is fine. Raises ValueError."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} is not a directory")
    if info.st_mode & 0o077:
        raise ValueError(
            f"{path} is open to group or others (mode {stat.S_IMODE(info.st_mode):04o}); CA "
            "keys go in a directory only its owner can enter (chmod 0700 it)"
        )


def make_key_dir(path: Path) -> None:
    """Create ``path`` (0700) for private keys if missing, then :func:`check_key_dir` it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_key_dir(path)


def create_deployment(
    directory: str | os.PathLike[str],
    server_names: Sequence[str],
    users: Sequence[tuple[str, str]],
    *,
    ca_valid_days: int = DEFAULT_CA_VALID_DAYS,
    valid_days: int = DEFAULT_LEAF_VALID_DAYS,
    overwrite: bool = False,
) -> Deployment:
    """Create a server CA, a client CA and everything they sign, in ``directory``.

    Writes ``server-ca.pem`` and ``client-ca.pem`` (the CA certificates),
    ``server.pem``/``server-key.pem`` for ``server_names`` (DNS names and IP addresses, mixed;
    see :func:`split_server_names`) signed by the server CA, and ``<user>.pem``/
    ``<user>-key.pem`` for each ``(user, role)`` signed by the client CA. The CA keys go in
    ``ca/`` (0700), away from the files the api and the clients read. ``directory`` is created
    (mode 0700) if missing. Everything is validated, and file name clashes and existing files
    are detected, before anything is written; an existing file is an error naming it unless
    ``overwrite`` is true.
    """
    _check_valid_days(ca_valid_days)
    _check_valid_days(valid_days)
    if valid_days > ca_valid_days:
        raise ValueError(
            f"leaf validity ({valid_days} days) is longer than the CA's ({ca_valid_days} days)"
        )
    dns_names, ip_addresses = split_server_names(server_names)
    for user, role in users:
        validate_user(user)
        validate_role(role)
    seen_users = [u for u, _ in users]
    duplicates = sorted({u for u in seen_users if seen_users.count(u) > 1})
    if duplicates:
        raise ValueError(f"user listed more than once: {', '.join(duplicates)}")

    root = Path(directory)
    files: dict[str, str] = {}
    for kind in CA_KINDS:
        cert_name, key_name = ca_file_names(kind)
        files[cert_name] = f"the {kind} CA certificate"
        files[key_name] = f"the {kind} CA key"
    files[SERVER_CERT_FILE] = "the server certificate"
    files[SERVER_KEY_FILE] = "the server key"
    for user, _ in users:
        for file_name in user_file_names(user):
            if file_name in files:
                raise ValueError(
                    f"user {user!r} would write {file_name}, which is {files[file_name]}"
                )
            files[file_name] = f"a file of user {user!r}"
    if not overwrite:
        existing = [root / name for name in files if (root / name).exists()]
        if existing:
            raise FileExistsError(
                f"{existing[0]} already exists"
                + (f" (and {len(existing) - 1} more of the files to write)" if existing[1:] else "")
                + "; refusing to overwrite (pass overwrite=True)"
            )
    check_key_dir(root / CA_KEY_DIR)

    server_ca_key, server_ca = create_ca("Workernator server CA", ca_valid_days, kind="server")
    client_ca_key, client_ca = create_ca("Workernator client CA", ca_valid_days, kind="client")
    server_key, server_cert = create_server_cert(
        server_ca_key, server_ca, dns_names, ip_addresses, valid_days
    )
    clients = {
        user: create_client_cert(client_ca_key, client_ca, user, role, valid_days)
        for user, role in users
    }

    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    make_key_dir(root / CA_KEY_DIR)
    server_ca_files = [root / name for name in ca_file_names("server")]
    client_ca_files = [root / name for name in ca_file_names("client")]
    write_key(server_ca_files[1], server_ca_key, overwrite=overwrite)
    write_cert(server_ca_files[0], server_ca, overwrite=overwrite)
    write_key(client_ca_files[1], client_ca_key, overwrite=overwrite)
    write_cert(client_ca_files[0], client_ca, overwrite=overwrite)
    write_key(root / SERVER_KEY_FILE, server_key, overwrite=overwrite)
    write_cert(root / SERVER_CERT_FILE, server_cert, overwrite=overwrite)
    user_paths: dict[str, tuple[Path, Path]] = {}
    for user, (key, cert) in clients.items():
        cert_name, key_name = user_file_names(user)
        write_key(root / key_name, key, overwrite=overwrite)
        write_cert(root / cert_name, cert, overwrite=overwrite)
        user_paths[user] = (root / cert_name, root / key_name)
    return Deployment(
        directory=root,
        server_ca_cert=server_ca_files[0],
        server_ca_key=server_ca_files[1],
        client_ca_cert=client_ca_files[0],
        client_ca_key=client_ca_files[1],
        server_cert=root / SERVER_CERT_FILE,
        server_key=root / SERVER_KEY_FILE,
        users=user_paths,
    )
