"""Certificates that ``workernator_api.certs`` refuses to make, for tests of what refuses them.

An attacker (or a confused operator) is not bound by our tooling: these build what they could
with the cryptography library (an intermediate CA under the client CA, a client certificate
signed by the server CA, an expired one) and write PEM files like the tooling does.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from workernator_api import certs

Pair = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization is not None:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def issue(
    issuer: Pair,
    subject: x509.Name,
    *,
    ca: bool = False,
    eku: x509.ObjectIdentifier | None = ExtendedKeyUsageOID.CLIENT_AUTH,
    not_before: datetime.datetime = NOW - DAY,
    not_after: datetime.datetime = NOW + DAY,
    sans: Sequence[x509.GeneralName] = (),
) -> Pair:
    """A new key and a certificate for it, signed by ``issuer``'s key, with whatever
    extensions were asked for (no checks: that is the point)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(issuer[0], hashes.SHA256())


def intermediate_chain(client_ca: Pair, user: str, role: str) -> tuple[Pair, x509.Certificate]:
    """The attack of an intermediate CA: a CA certificate signed with the client CA's key, and
    under it a client leaf naming ``user`` and ``role``. Returns the leaf (key, certificate)
    and the intermediate certificate, to be sent together."""
    intermediate = issue(client_ca, name("Workernator team CA"), ca=True, eku=None)
    leaf = issue(intermediate, name(user, role))
    return leaf, intermediate[1]


def load_pair(cert: Path, key: Path) -> Pair:
    return certs.load_key(key), certs.load_cert(cert)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_pair(
    directory: Path, stem: str, pair: Pair, *chain: x509.Certificate
) -> tuple[Path, Path]:
    """``stem.pem`` (the certificate, then ``chain``) and ``stem-key.pem`` in ``directory``."""
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    cert_path.write_bytes(b"".join(pem(c) for c in (pair[1], *chain)))
    key_path.write_bytes(key_pem(pair[0]))
    key_path.chmod(0o600)
    return cert_path, key_path
