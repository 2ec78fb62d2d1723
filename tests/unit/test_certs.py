"""Certificate tooling: what the certificates contain, how files are written, and that real TLS
stacks (openssl verify, a gRPC server requiring client certificates) accept and refuse them."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests import pki as tests_pki
from workernator_api import certs
from workernator_api import config as config_mod
from workernator_api import tls as api_tls

NOW_SLACK = datetime.timedelta(seconds=30)


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> tuple[certs.PrivateKey, x509.Certificate]:
    return certs.create_ca("Test CA", 30)


@pytest.fixture(scope="module")
def other_ca() -> tuple[certs.PrivateKey, x509.Certificate]:
    return certs.create_ca("Another CA", 30)


@pytest.fixture(scope="module")
def server(
    ca: tuple[certs.PrivateKey, x509.Certificate],
) -> tuple[certs.PrivateKey, x509.Certificate]:
    return certs.create_server_cert(
        ca[0], ca[1], ["localhost", "api.example.test"], ["127.0.0.1", "::1"], 7
    )


@pytest.fixture(scope="module")
def client(
    ca: tuple[certs.PrivateKey, x509.Certificate],
) -> tuple[certs.PrivateKey, x509.Certificate]:
    return certs.create_client_cert(ca[0], ca[1], "alice", "admin", 7)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask: files get exactly the mode they are created with."""
    old = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(old)


def ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def key_pem(key: certs.PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def assert_p256_sha256(key: certs.PrivateKey, cert: x509.Certificate) -> None:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.key_size == 256
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    assert public == key.public_key()
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert cert.version == x509.Version.v3


def assert_validity(cert: x509.Certificate, days: int) -> None:
    now = datetime.datetime.now(datetime.UTC)
    minute = datetime.timedelta(minutes=1)
    # Not-before is a minute in the past (tolerates clock skew), not-after `days` from now.
    assert now - minute - NOW_SLACK <= cert.not_valid_before_utc <= now - minute + NOW_SLACK
    expected_end = now + datetime.timedelta(days=days)
    assert expected_end - NOW_SLACK <= cert.not_valid_after_utc <= expected_end + NOW_SLACK


def assert_serial(cert: x509.Certificate) -> None:
    assert 0 < cert.serial_number < 2**159


def assert_leaf_extensions(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    purpose: x509.ObjectIdentifier,
) -> None:
    present = {e.oid for e in cert.extensions}
    expected = {
        x509.BasicConstraints.oid,
        x509.KeyUsage.oid,
        x509.ExtendedKeyUsage.oid,
        x509.SubjectKeyIdentifier.oid,
        x509.AuthorityKeyIdentifier.oid,
    }
    if purpose == ExtendedKeyUsageOID.SERVER_AUTH:
        expected.add(x509.SubjectAlternativeName.oid)
    assert present == expected

    basic = ext(cert, x509.BasicConstraints)
    assert basic.critical
    assert isinstance(basic.value, x509.BasicConstraints)
    assert basic.value.ca is False
    assert basic.value.path_length is None

    usage = ext(cert, x509.KeyUsage)
    assert usage.critical
    assert isinstance(usage.value, x509.KeyUsage)
    assert usage.value.digital_signature
    assert not usage.value.content_commitment
    assert not usage.value.key_encipherment
    assert not usage.value.data_encipherment
    assert not usage.value.key_agreement
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign

    eku = ext(cert, x509.ExtendedKeyUsage)
    assert not eku.critical
    assert isinstance(eku.value, x509.ExtendedKeyUsage)
    assert list(eku.value) == [purpose]

    ski = ext(cert, x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())

    aki = ext(cert, x509.AuthorityKeyIdentifier)
    assert not aki.critical
    assert isinstance(aki.value, x509.AuthorityKeyIdentifier)
    ca_ski = ext(ca_cert, x509.SubjectKeyIdentifier).value
    assert isinstance(ca_ski, x509.SubjectKeyIdentifier)
    assert aki.value.key_identifier == ca_ski.digest

    assert cert.issuer == ca_cert.subject
    cert.verify_directly_issued_by(ca_cert)


def run_openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)


def handmade_cert(
    ca: tuple[certs.PrivateKey, x509.Certificate],
    subject: list[x509.NameAttribute[str]],
    *,
    eku: list[x509.ObjectIdentifier] | None,
    is_ca: bool = False,
) -> x509.Certificate:
    """A certificate with an arbitrary subject, for the cases certs.py refuses to create."""
    key = certs.generate_key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(ca[0], hashes.SHA256())


# --- the CA -----------------------------------------------------------------------------------


def test_ca_key_signature_and_validity(ca: tuple[certs.PrivateKey, x509.Certificate]) -> None:
    key, cert = ca
    assert_p256_sha256(key, cert)
    assert_validity(cert, 30)
    assert_serial(cert)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    cert.verify_directly_issued_by(cert)


def test_ca_extensions(ca: tuple[certs.PrivateKey, x509.Certificate]) -> None:
    cert = ca[1]
    assert {e.oid for e in cert.extensions} == {
        x509.BasicConstraints.oid,
        x509.KeyUsage.oid,
        x509.SubjectKeyIdentifier.oid,
    }
    basic = ext(cert, x509.BasicConstraints)
    assert basic.critical
    assert isinstance(basic.value, x509.BasicConstraints)
    assert basic.value.ca is True
    assert basic.value.path_length == 0

    usage = ext(cert, x509.KeyUsage)
    assert usage.critical
    assert isinstance(usage.value, x509.KeyUsage)
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    assert not usage.value.key_encipherment

    ski = ext(cert, x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(ca[0].public_key())


def test_serial_numbers_are_random() -> None:
    serials = {certs.create_ca("CA", 1)[1].serial_number for _ in range(4)}
    assert len(serials) == 4
    # 159 random bits: all four below 2**150 would happen with probability 2**-36.
    assert any(s >= 2**150 for s in serials)


@pytest.mark.parametrize(
    ("common_name", "days", "message"),
    [
        ("", 1, "empty"),
        ("x" * 65, 1, "longer than 64"),
        ("CA", 0, "valid_days"),
        ("CA", -5, "valid_days"),
    ],
)
def test_ca_rejects_bad_input(common_name: str, days: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        certs.create_ca(common_name, days)


# --- server certificates ----------------------------------------------------------------------


def test_server_cert(
    ca: tuple[certs.PrivateKey, x509.Certificate],
    server: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    key, cert = server
    assert_p256_sha256(key, cert)
    assert_validity(cert, 7)
    assert_serial(cert)
    assert_leaf_extensions(cert, ca[1], ExtendedKeyUsageOID.SERVER_AUTH)
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])

    san = ext(cert, x509.SubjectAlternativeName)
    assert not san.critical
    assert isinstance(san.value, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", "api.example.test"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_server_cert_with_only_an_ip_uses_it_as_cn(
    ca: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    _, cert = certs.create_server_cert(ca[0], ca[1], [], ["10.1.2.3"], 1)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "10.1.2.3"
    san = ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]


def test_server_cert_wildcard(ca: tuple[certs.PrivateKey, x509.Certificate]) -> None:
    _, cert = certs.create_server_cert(ca[0], ca[1], ["*.jobs.example.test"], [], 1)
    san = ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["*.jobs.example.test"]


@pytest.mark.parametrize(
    ("dns_names", "ips", "message"),
    [
        ([], [], "at least one DNS name or IP address"),
        (["bad name"], [], "invalid label 'bad name'"),
        (["-x.example"], [], "invalid label '-x'"),
        (["a..b"], [], "invalid label ''"),
        (["héllo.example"], [], "not ASCII"),
        (["127.0.0.1"], [], "is an IP address"),
        (["::1"], [], "is an IP address"),
        (["localhost"], ["localhost"], "'localhost' is not an IP address"),
        (["*.com"], [], "invalid label"),
        ([("a" * 60) + ".example"], [], "longer than 64"),
    ],
)
def test_server_cert_rejects_bad_names(
    ca: tuple[certs.PrivateKey, x509.Certificate],
    dns_names: list[str],
    ips: list[str],
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        certs.create_server_cert(ca[0], ca[1], dns_names, ips, 1)


def test_split_server_names() -> None:
    assert certs.split_server_names(["localhost", "127.0.0.1", "::1", "api.test"]) == (
        ["localhost", "api.test"],
        ["127.0.0.1", "::1"],
    )


# --- client certificates and identity --------------------------------------------------------


def test_client_cert(
    ca: tuple[certs.PrivateKey, x509.Certificate],
    client: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    key, cert = client
    assert_p256_sha256(key, cert)
    assert_validity(cert, 7)
    assert_serial(cert)
    assert_leaf_extensions(cert, ca[1], ExtendedKeyUsageOID.CLIENT_AUTH)
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["alice"]
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        "admin"
    ]
    assert certs.identity_from_cert(cert) == ("alice", "admin")
    assert certs.identity_from_pem(cert_pem(cert)) == ("alice", "admin")


@pytest.mark.parametrize("role", certs.ROLES)
def test_every_role(ca: tuple[certs.PrivateKey, x509.Certificate], role: str) -> None:
    _, cert = certs.create_client_cert(ca[0], ca[1], "bob.smith_2-x", role, 1)
    assert certs.identity_from_cert(cert) == ("bob.smith_2-x", role)


def test_longest_user_name(ca: tuple[certs.PrivateKey, x509.Certificate]) -> None:
    _, cert = certs.create_client_cert(ca[0], ca[1], "u" * 64, "viewer", 1)
    assert certs.identity_from_cert(cert) == ("u" * 64, "viewer")


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("", "user name is empty"),
        ("a" * 65, "user name is 65 characters long; the maximum is 64"),
        ("bob smith", r"not allowed \(' '\)"),
        ("alice/../root", r"not allowed \('/'\)"),
        ("ålice", r"not allowed \('å'\)"),
        ("a@b:c", r"not allowed \(':', '@'\)"),
        ("..", "reserved"),
    ],
)
def test_bad_user_names_are_rejected(
    ca: tuple[certs.PrivateKey, x509.Certificate], user: str, message: str
) -> None:
    with pytest.raises(certs.InvalidIdentityError, match=message):
        certs.validate_user(user)
    with pytest.raises(ValueError, match=message):
        certs.create_client_cert(ca[0], ca[1], user, "user", 1)


@pytest.mark.parametrize("role", ["", "root", "Admin", "admins", "user "])
def test_bad_roles_are_rejected(ca: tuple[certs.PrivateKey, x509.Certificate], role: str) -> None:
    message = f"unknown role {role!r}; the roles are admin, user, viewer"
    with pytest.raises(certs.InvalidIdentityError) as info:
        certs.create_client_cert(ca[0], ca[1], "alice", role, 1)
    assert str(info.value) == message


CN = NameOID.COMMON_NAME
O = NameOID.ORGANIZATION_NAME  # noqa: E741
CLIENT = [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize(
    ("subject", "eku", "is_ca", "message"),
    [
        ([(O, "admin")], CLIENT, False, r"no common name \(CN\)"),
        ([(CN, "alice")], CLIENT, False, r"no organization \(O\)"),
        ([(O, "admin"), (CN, "alice"), (CN, "bob")], CLIENT, False, "2 common name"),
        ([(O, "admin"), (O, "user"), (CN, "alice")], CLIENT, False, r"2 organization \(O\)"),
        ([(O, "root"), (CN, "alice")], CLIENT, False, "unknown role 'root'"),
        ([(O, "user"), (CN, "al ice")], CLIENT, False, "not allowed"),
        ([(O, "user"), (CN, "alice")], None, False, "no extended key usage"),
        (
            [(O, "user"), (CN, "alice")],
            [ExtendedKeyUsageOID.SERVER_AUTH],
            False,
            "not valid for client authentication",
        ),
        ([(O, "user"), (CN, "alice")], CLIENT, True, "is a CA certificate"),
    ],
)
def test_identity_from_cert_rejects(
    ca: tuple[certs.PrivateKey, x509.Certificate],
    subject: list[tuple[x509.ObjectIdentifier, str]],
    eku: list[x509.ObjectIdentifier] | None,
    is_ca: bool,
    message: str,
) -> None:
    attributes = [x509.NameAttribute(oid, value) for oid, value in subject]
    cert = handmade_cert(ca, attributes, eku=eku, is_ca=is_ca)
    with pytest.raises(certs.InvalidIdentityError, match=message):
        certs.identity_from_cert(cert)


def test_identity_from_server_and_ca_certs_is_refused(
    ca: tuple[certs.PrivateKey, x509.Certificate],
    server: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    with pytest.raises(certs.InvalidIdentityError):
        certs.identity_from_cert(server[1])
    with pytest.raises(certs.InvalidIdentityError):
        certs.identity_from_cert(ca[1])
    with pytest.raises(certs.InvalidIdentityError, match="does not parse"):
        certs.identity_from_pem(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


# --- signing preconditions --------------------------------------------------------------------


def test_leaf_cannot_outlive_its_ca(ca: tuple[certs.PrivateKey, x509.Certificate]) -> None:
    with pytest.raises(ValueError, match="would outlive its CA"):
        certs.create_client_cert(ca[0], ca[1], "alice", "user", 31)
    # As many days as the CA was made for (it started a moment earlier): capped at the CA's end.
    _, cert = certs.create_client_cert(ca[0], ca[1], "alice", "user", 30)
    assert cert.not_valid_after_utc == ca[1].not_valid_after_utc
    with pytest.raises(ValueError, match="valid_days"):
        certs.create_client_cert(ca[0], ca[1], "alice", "user", 0)


def test_ca_key_must_match_ca_cert(
    ca: tuple[certs.PrivateKey, x509.Certificate],
    other_ca: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    with pytest.raises(ValueError, match="does not belong to the CA certificate"):
        certs.create_client_cert(other_ca[0], ca[1], "alice", "user", 1)


def test_a_leaf_cannot_sign(
    client: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    with pytest.raises(ValueError, match="is not a CA"):
        certs.create_server_cert(client[0], client[1], ["localhost"], [], 1)


# --- files ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("open_umask")
def test_key_and_cert_files_modes_and_round_trip(
    tmp_path: Path, client: tuple[certs.PrivateKey, x509.Certificate]
) -> None:
    key, cert = client
    certs.write_key(tmp_path / "alice-key.pem", key)
    certs.write_cert(tmp_path / "alice.pem", cert)
    assert mode(tmp_path / "alice-key.pem") == 0o600
    assert mode(tmp_path / "alice.pem") == 0o644

    data = (tmp_path / "alice-key.pem").read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    assert certs.load_key(tmp_path / "alice-key.pem").private_numbers() == key.private_numbers()
    assert certs.load_cert(tmp_path / "alice.pem") == cert


def test_cert_mode_is_exact_under_a_strict_umask(
    tmp_path: Path, client: tuple[certs.PrivateKey, x509.Certificate]
) -> None:
    old = os.umask(0o277)
    try:
        certs.write_key(tmp_path / "k.pem", client[0])
        certs.write_cert(tmp_path / "c.pem", client[1])
    finally:
        os.umask(old)
    assert mode(tmp_path / "k.pem") == 0o600
    assert mode(tmp_path / "c.pem") == 0o644


@pytest.mark.usefixtures("open_umask")
def test_key_file_is_never_wider_than_0600(
    tmp_path: Path,
    client: tuple[certs.PrivateKey, x509.Certificate],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Watch every os.open: the key file is created 0600 and exclusively, not chmod-ed later."""
    calls: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: object) -> int:
        calls.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode)

    def no_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError("a key file must be created with its mode, not chmod-ed later")

    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(os, "chmod", no_chmod)
    certs.write_key(tmp_path / "k.pem", client[0])
    certs.write_key(tmp_path / "k.pem", client[0], overwrite=True)
    monkeypatch.undo()

    creates = [c for c in calls if c[1] & os.O_CREAT]
    assert len(creates) == 2
    for path, flags, file_mode in creates:
        assert Path(path).parent == tmp_path
        assert flags & os.O_EXCL
        assert flags & os.O_WRONLY
        assert file_mode == 0o600
    assert mode(tmp_path / "k.pem") == 0o600


def test_refuses_to_overwrite(
    tmp_path: Path,
    client: tuple[certs.PrivateKey, x509.Certificate],
    server: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    certs.write_key(tmp_path / "k.pem", client[0])
    certs.write_cert(tmp_path / "c.pem", client[1])
    before_key = (tmp_path / "k.pem").read_bytes()
    before_cert = (tmp_path / "c.pem").read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        certs.write_key(tmp_path / "k.pem", server[0])
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        certs.write_cert(tmp_path / "c.pem", server[1])
    assert (tmp_path / "k.pem").read_bytes() == before_key
    assert (tmp_path / "c.pem").read_bytes() == before_cert


@pytest.mark.usefixtures("open_umask")
def test_overwrite_replaces_atomically_with_the_right_mode(
    tmp_path: Path,
    client: tuple[certs.PrivateKey, x509.Certificate],
    server: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    target = tmp_path / "k.pem"
    target.write_bytes(b"old")
    target.chmod(0o644)  # a key someone left readable
    old_inode = target.stat().st_ino
    certs.write_key(target, server[0], overwrite=True)
    assert mode(target) == 0o600
    assert target.stat().st_ino != old_inode  # a new file renamed into place
    assert certs.load_key(target).private_numbers() == server[0].private_numbers()
    certs.write_cert(tmp_path / "c.pem", client[1])
    certs.write_cert(tmp_path / "c.pem", server[1], overwrite=True)
    assert certs.load_cert(tmp_path / "c.pem") == server[1]
    assert mode(tmp_path / "c.pem") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pem", "k.pem"]  # no temp files


def test_does_not_follow_a_symlink(
    tmp_path: Path, client: tuple[certs.PrivateKey, x509.Certificate]
) -> None:
    (tmp_path / "k.pem").symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(FileExistsError):
        certs.write_key(tmp_path / "k.pem", client[0])
    assert not (tmp_path / "elsewhere.pem").exists()


def test_load_key_rejects_other_key_types(tmp_path: Path) -> None:
    others: list[tuple[str, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]] = [
        ("p384.pem", ec.generate_private_key(ec.SECP384R1())),
        ("rsa.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ]
    for name, other in others:
        (tmp_path / name).write_bytes(
            other.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        with pytest.raises(ValueError, match="not an ECDSA P-256 private key"):
            certs.load_key(tmp_path / name)
    (tmp_path / "junk.pem").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        certs.load_key(tmp_path / "junk.pem")
    with pytest.raises(ValueError, match="not a PEM certificate"):
        certs.load_cert(tmp_path / "junk.pem")


# --- create_deployment ------------------------------------------------------------------------


@pytest.mark.usefixtures("open_umask")
def test_create_deployment(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    dep = certs.create_deployment(
        out, ["localhost", "127.0.0.1"], [("alice", "admin"), ("bob", "viewer")]
    )
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "alice-key.pem",
        "alice.pem",
        "bob-key.pem",
        "bob.pem",
        "ca",
        "ca/client-ca-key.pem",
        "ca/server-ca-key.pem",
        "client-ca.pem",
        "server-ca.pem",
        "server-key.pem",
        "server.pem",
    ]
    assert mode(out) == 0o700
    assert mode(out / "ca") == 0o700  # the CA keys: a directory of their own
    for path in out.rglob("*.pem"):
        assert mode(path) == (0o600 if path.name.endswith("-key.pem") else 0o644), path
    assert dep.server_ca_cert == out / "server-ca.pem"
    assert dep.server_ca_key == out / "ca" / "server-ca-key.pem"
    assert dep.client_ca_cert == out / "client-ca.pem"
    assert dep.client_ca_key == out / "ca" / "client-ca-key.pem"
    assert dep.server_cert == out / "server.pem"
    assert dep.server_key == out / "server-key.pem"
    assert dep.users == {
        "alice": (out / "alice.pem", out / "alice-key.pem"),
        "bob": (out / "bob.pem", out / "bob-key.pem"),
    }
    server_ca = certs.load_cert(dep.server_ca_cert)
    client_ca = certs.load_cert(dep.client_ca_cert)
    assert server_ca != client_ca and server_ca.public_key() != client_ca.public_key()
    assert (certs.ca_kind(server_ca), certs.ca_kind(client_ca)) == ("server", "client")
    server_cert = certs.load_cert(dep.server_cert)
    assert_leaf_extensions(server_cert, server_ca, ExtendedKeyUsageOID.SERVER_AUTH)
    for user in ("alice", "bob"):
        leaf = certs.load_cert(dep.users[user][0])
        assert_leaf_extensions(leaf, client_ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    assert certs.identity_from_cert(certs.load_cert(out / "bob.pem")) == ("bob", "viewer")
    assert certs.load_key(dep.server_key).public_key() == server_cert.public_key()
    assert certs.load_key(dep.server_ca_key).public_key() == server_ca.public_key()
    assert certs.load_key(dep.client_ca_key).public_key() == client_ca.public_key()

    with pytest.raises(FileExistsError, match=r"server-ca\.pem already exists .*refusing"):
        certs.create_deployment(out, ["localhost"], [])
    again = certs.create_deployment(out, ["localhost"], [("alice", "user")], overwrite=True)
    assert certs.load_cert(again.client_ca_cert) != client_ca
    assert certs.identity_from_cert(certs.load_cert(out / "alice.pem")) == ("alice", "user")


def test_create_deployment_names_the_file_it_will_not_overwrite(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir(mode=0o700)
    (tmp_path / "ca" / "client-ca-key.pem").write_text("mine\n")
    with pytest.raises(FileExistsError) as exc:
        certs.create_deployment(tmp_path, ["localhost"], [("alice", "user")])
    assert str(exc.value) == (
        f"{tmp_path / 'ca' / 'client-ca-key.pem'} already exists; refusing to overwrite "
        "(pass overwrite=True)"
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ca", "client-ca-key.pem"]


@pytest.mark.parametrize("bad_mode", [0o750, 0o705, 0o777])
def test_create_deployment_refuses_a_ca_key_directory_open_to_others(
    tmp_path: Path, bad_mode: int
) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca").chmod(bad_mode)
    with pytest.raises(ValueError, match=f"is open to group or others \\(mode {bad_mode:04o}\\)"):
        certs.create_deployment(tmp_path, ["localhost"], [])
    assert list(tmp_path.rglob("*.pem")) == []


def test_create_deployment_refuses_a_symlinked_ca_key_directory(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ca").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="ca is not a directory"):
        certs.create_deployment(tmp_path / "out", ["localhost"], [])
    assert list(tmp_path.rglob("*.pem")) == []


@pytest.mark.parametrize(
    ("users", "message"),
    [
        ([("alice", "admin"), ("alice", "user")], "more than once: alice"),
        ([("server-ca", "admin")], "would write server-ca.pem, which is the server CA cert"),
        ([("client-ca", "admin")], "would write client-ca.pem, which is the client CA cert"),
        ([("server-key", "admin")], "would write server-key.pem, which is the server key"),
        ([("alice", "admin"), ("alice-key", "user")], "would write alice-key.pem"),
        ([("alice", "superuser")], "unknown role 'superuser'"),
        ([("", "user")], "user name is empty"),
    ],
)
def test_create_deployment_validates_before_writing(
    tmp_path: Path, users: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        certs.create_deployment(tmp_path / "out", ["localhost"], users)
    assert not (tmp_path / "out").exists()


def test_create_deployment_needs_a_server_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        certs.create_deployment(tmp_path / "out", [], [("alice", "admin")])
    assert not (tmp_path / "out").exists()


# --- openssl agrees ---------------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@needs_openssl
def test_openssl_verifies_the_deployment(tmp_path: Path) -> None:
    dep = certs.create_deployment(tmp_path, ["localhost", "127.0.0.1"], [("alice", "user")])
    server_ca, client_ca = str(dep.server_ca_cert), str(dep.client_ca_cert)
    srv, cli = str(dep.server_cert), str(dep.users["alice"][0])
    for ca, leaf, purpose in [(server_ca, srv, "sslserver"), (client_ca, cli, "sslclient")]:
        for extra in ([], ["-purpose", purpose]):
            result = run_openssl("verify", "-x509_strict", *extra, "-CAfile", ca, leaf)
            assert result.returncode == 0, (extra, result.stdout, result.stderr)
            assert result.stdout.strip() == f"{leaf}: OK"
    # The wrong purpose is refused: a server certificate is no client certificate and back.
    for ca, leaf, purpose in [(server_ca, srv, "sslclient"), (client_ca, cli, "sslserver")]:
        result = run_openssl("verify", "-purpose", purpose, "-CAfile", ca, leaf)
        assert result.returncode != 0, (leaf, purpose, result.stdout)
        assert "certificate purpose" in result.stdout + result.stderr  # error 26
    # Each CA vouches for its own leaves only, even when both are trusted together.
    for ca, leaf in [(client_ca, srv), (server_ca, cli)]:
        result = run_openssl("verify", "-CAfile", ca, leaf)
        assert result.returncode != 0, (ca, leaf, result.stdout)
    both = tmp_path / "both.pem"
    both.write_bytes(dep.server_ca_cert.read_bytes() + dep.client_ca_cert.read_bytes())
    for leaf, purpose in [(srv, "sslserver"), (cli, "sslclient")]:
        result = run_openssl("verify", "-purpose", purpose, "-CAfile", str(both), leaf)
        assert result.returncode == 0, (leaf, result.stdout, result.stderr)
    # A client certificate signed with the server CA's key (certs.py refuses to make one) fails
    # on the CA's extended key usage even where the server CA is trusted.
    server_ca_pair = tests_pki.load_pair(dep.server_ca_cert, dep.server_ca_key)
    crossed = tests_pki.issue(server_ca_pair, tests_pki.name("mallory", "admin"))
    crossed_path, _ = tests_pki.write_pair(tmp_path, "crossed", crossed)
    result = run_openssl("verify", "-purpose", "sslclient", "-CAfile", str(both), str(crossed_path))
    assert result.returncode != 0, result.stdout
    # The key files are PKCS#8 P-256 keys that openssl reads.
    result = run_openssl("pkey", "-in", str(dep.server_key), "-noout", "-text")
    assert result.returncode == 0, result.stderr
    assert "prime256v1" in result.stdout


@needs_openssl
def test_openssl_separate_client_and_server_cas(tmp_path: Path) -> None:
    server_ca_key, server_ca = certs.create_ca("Server CA", 10)
    client_ca_key, client_ca = certs.create_ca("Client CA", 10)
    _, srv = certs.create_server_cert(server_ca_key, server_ca, ["localhost"], [], 5)
    _, cli = certs.create_client_cert(client_ca_key, client_ca, "carol", "viewer", 5)
    files = {"server-ca.pem": server_ca, "client-ca.pem": client_ca, "s.pem": srv, "c.pem": cli}
    for name, cert in files.items():
        certs.write_cert(tmp_path / name, cert)

    def verify(ca_file: str, leaf: str, purpose: str) -> int:
        ca_path, leaf_path = str(tmp_path / ca_file), str(tmp_path / leaf)
        args = ["verify", "-x509_strict", "-purpose", purpose, "-CAfile", ca_path, leaf_path]
        return run_openssl(*args).returncode

    assert verify("server-ca.pem", "s.pem", "sslserver") == 0
    assert verify("client-ca.pem", "c.pem", "sslclient") == 0
    assert verify("client-ca.pem", "s.pem", "sslserver") != 0
    assert verify("server-ca.pem", "c.pem", "sslclient") != 0


# --- a real mTLS handshake with gRPC ------------------------------------------------------------


class RecordingHealth(health.HealthServicer):
    """The standard health service, also recording the identity of each caller."""

    def __init__(self) -> None:
        super().__init__()
        self.identities: list[tuple[str, str]] = []

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        # The property holds a list of values; the types-grpcio stub says bytes.
        pem = cast("list[bytes]", context.auth_context()["x509_pem_cert"])[0]
        self.identities.append(certs.identity_from_pem(pem))
        return super().Check(request, context)


@pytest.fixture
def mtls_server(
    ca: tuple[certs.PrivateKey, x509.Certificate],
    server: tuple[certs.PrivateKey, x509.Certificate],
) -> Iterator[tuple[int, RecordingHealth]]:
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = RecordingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    credentials = grpc.ssl_server_credentials(
        [(key_pem(server[0]), cert_pem(server[1]))],
        root_certificates=cert_pem(ca[1]),
        require_client_auth=True,
    )
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    try:
        yield port, servicer
    finally:
        grpc_server.stop(grace=None).wait()


def check_health(
    port: int,
    ca_cert: x509.Certificate,
    client: tuple[certs.PrivateKey, x509.Certificate] | None,
) -> health_pb2.HealthCheckResponse:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=cert_pem(ca_cert),
        private_key=key_pem(client[0]) if client else None,
        certificate_chain=cert_pem(client[1]) if client else None,
    )
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        # health_pb2_grpc.HealthStub would do, but its stub has no methods for mypy.
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        return check(health_pb2.HealthCheckRequest(), timeout=10)


def test_mtls_good_client_succeeds(
    mtls_server: tuple[int, RecordingHealth],
    ca: tuple[certs.PrivateKey, x509.Certificate],
    client: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    port, servicer = mtls_server
    response = check_health(port, ca[1], client)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert servicer.identities == [("alice", "admin")]


def test_mtls_client_without_a_cert_fails(
    mtls_server: tuple[int, RecordingHealth], ca: tuple[certs.PrivateKey, x509.Certificate]
) -> None:
    port, servicer = mtls_server
    with pytest.raises(grpc.RpcError) as info:
        check_health(port, ca[1], None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.identities == []


def test_mtls_client_from_another_ca_fails(
    mtls_server: tuple[int, RecordingHealth],
    ca: tuple[certs.PrivateKey, x509.Certificate],
    other_ca: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    port, servicer = mtls_server
    stranger = certs.create_client_cert(other_ca[0], other_ca[1], "mallory", "admin", 1)
    with pytest.raises(grpc.RpcError) as info:
        check_health(port, ca[1], stranger)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.identities == []


def test_mtls_client_rejects_a_server_from_another_ca(
    mtls_server: tuple[int, RecordingHealth],
    other_ca: tuple[certs.PrivateKey, x509.Certificate],
    client: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    port, servicer = mtls_server
    with pytest.raises(grpc.RpcError) as info:
        check_health(port, other_ca[1], client)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.identities == []


def test_mtls_server_cert_used_as_client_cert_fails(
    mtls_server: tuple[int, RecordingHealth],
    ca: tuple[certs.PrivateKey, x509.Certificate],
    server: tuple[certs.PrivateKey, x509.Certificate],
) -> None:
    """Same CA, but extended key usage serverAuth only: the TLS stack refuses it as a client."""
    port, servicer = mtls_server
    with pytest.raises(grpc.RpcError) as info:
        check_health(port, ca[1], server)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.identities == []


def test_create_deployment_leaves_may_last_as_long_as_the_ca(tmp_path: Path) -> None:
    dep = certs.create_deployment(
        tmp_path, ["localhost"], [("alice", "user")], ca_valid_days=5, valid_days=5
    )
    server_ca_end = certs.load_cert(dep.server_ca_cert).not_valid_after_utc
    client_ca_end = certs.load_cert(dep.client_ca_cert).not_valid_after_utc
    assert certs.load_cert(dep.server_cert).not_valid_after_utc == server_ca_end
    assert certs.load_cert(dep.users["alice"][0]).not_valid_after_utc == client_ca_end
    with pytest.raises(ValueError, match="longer than the CA's"):
        certs.create_deployment(tmp_path / "x", ["localhost"], [], ca_valid_days=5, valid_days=6)


# --- the api server's own key -----------------------------------------------------------------


def _server_pair(
    ca: tuple[certs.PrivateKey, x509.Certificate],
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    directory: Path,
) -> config_mod.ApiConfig:
    """An api config whose server certificate (signed by ``ca``) is for ``key``."""
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca[0], hashes.SHA256())
    )
    directory.mkdir()
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "ca.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    return config_mod.ApiConfig(
        cert=directory / "server.pem",
        key=directory / "server-key.pem",
        client_ca=directory / "ca.pem",
    )


@pytest.mark.parametrize(
    ("key", "described"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA, 2048 bits"),
        (ec.generate_private_key(ec.SECP521R1()), "EC on secp521r1"),
        (ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
    ],
    ids=["rsa", "p521", "ed25519"],
)
def test_the_api_refuses_a_server_key_that_is_not_ecdsa_p256_or_p384(
    ca: tuple[certs.PrivateKey, x509.Certificate],
    tmp_path: Path,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    described: str,
) -> None:
    # With an RSA key, TLS 1.2 handshakes would succeed: the cipher suites left enabled for
    # TLS 1.2 are the RSA-authenticated ones (workernator_api/__init__.py).
    cfg = _server_pair(ca, key, tmp_path / "tls")
    with pytest.raises(config_mod.ConfigError) as exc:
        api_tls.ServerTls(cfg)
    assert str(exc.value) == (
        f"api.key: {cfg.key}: the server key must be an ECDSA key on P-256 or P-384 "
        f"(TLS 1.3-only relies on it); this one is {described}"
    )


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["p256", "p384"])
def test_the_api_accepts_ecdsa_p256_and_p384_server_keys(
    ca: tuple[certs.PrivateKey, x509.Certificate], tmp_path: Path, curve: ec.EllipticCurve
) -> None:
    cfg = _server_pair(ca, ec.generate_private_key(curve), tmp_path / "tls")
    assert isinstance(api_tls.ServerTls(cfg).credentials(), grpc.ServerCredentials)


def test_the_api_refuses_a_server_key_of_another_certificate(
    ca: tuple[certs.PrivateKey, x509.Certificate], tmp_path: Path
) -> None:
    cfg = _server_pair(ca, ec.generate_private_key(ec.SECP256R1()), tmp_path / "tls")
    certs.write_key(tmp_path / "other-key.pem", certs.generate_key())
    other = dataclasses.replace(cfg, key=tmp_path / "other-key.pem")
    with pytest.raises(config_mod.ConfigError, match="does not belong to the server certificate"):
        api_tls.ServerTls(other)
    (tmp_path / "junk.pem").write_text("junk\n")
    junk_cert = dataclasses.replace(cfg, cert=tmp_path / "junk.pem")
    with pytest.raises(config_mod.ConfigError, match=r"api.cert: .*junk.pem: not a PEM cert"):
        api_tls.ServerTls(junk_cert)
    junk_key = dataclasses.replace(cfg, key=tmp_path / "junk.pem")
    with pytest.raises(config_mod.ConfigError, match=r"api.key: .*junk.pem: not a PEM private"):
        api_tls.ServerTls(junk_key)


def _api_config(
    directory: Path, server: tests_pki.Pair, client_ca_pem: bytes
) -> config_mod.ApiConfig:
    directory.mkdir(exist_ok=True)
    cert, key = tests_pki.write_pair(directory, "server", server)
    (directory / "client-ca.pem").write_bytes(client_ca_pem)
    return config_mod.ApiConfig(cert=cert, key=key, client_ca=directory / "client-ca.pem")


def test_the_api_refuses_a_server_certificate_clients_would_refuse(tmp_path: Path) -> None:
    """At start, a config error naming the file and what is wrong with it."""
    server_ca = certs.create_ca("Server CA", 30, kind="server")
    client_ca = certs.create_ca("Client CA", 30, kind="client")
    client_ca_pem = cert_pem(client_ca[1])
    localhost = [x509.DNSName("localhost")]
    cases = {
        "a CA": (server_ca, "this is a CA certificate, not a server certificate"),
        "a client cert": (
            tests_pki.issue(server_ca, tests_pki.name("alice", "user"), sans=localhost),
            "not a server certificate: its extended key usage lacks serverAuth",
        ),
        "expired": (
            tests_pki.issue(
                server_ca,
                tests_pki.name("localhost"),
                eku=ExtendedKeyUsageOID.SERVER_AUTH,
                not_before=tests_pki.NOW - 3 * tests_pki.DAY,
                not_after=tests_pki.NOW - tests_pki.DAY,
                sans=localhost,
            ),
            "the server certificate expired on",
        ),
        "not yet valid": (
            tests_pki.issue(
                server_ca,
                tests_pki.name("localhost"),
                eku=ExtendedKeyUsageOID.SERVER_AUTH,
                not_before=tests_pki.NOW + tests_pki.DAY,
                sans=localhost,
            ),
            "the server certificate is not valid before",
        ),
    }
    for label, (pair, message) in cases.items():
        cfg = _api_config(tmp_path / label.replace(" ", "-"), pair, client_ca_pem)
        with pytest.raises(config_mod.ConfigError) as exc:
            api_tls.ServerTls(cfg)
        assert str(exc.value).startswith(f"api.cert: {cfg.cert}: {message}"), (label, exc.value)


def test_the_api_refuses_a_client_ca_bundle_that_is_not_the_client_ca(tmp_path: Path) -> None:
    server_ca = certs.create_ca("Server CA", 30, kind="server")
    client_ca = certs.create_ca("Client CA", 30, kind="client")
    server = certs.create_server_cert(*server_ca, ["localhost"], valid_days=7)
    alice = certs.create_client_cert(*client_ca, "alice", "user", 7)
    cases = {
        "server CA": (
            cert_pem(server_ca[1]),
            "CN=Server CA is the server CA (it issues server certificates only); give the "
            "client CA",
        ),
        "leaf": (
            cert_pem(alice[1]),
            "CN=alice,O=user is not a CA certificate (BasicConstraints CA:TRUE)",
        ),
        "second is a leaf": (
            cert_pem(client_ca[1]) + cert_pem(alice[1]),
            "certificate 2 (CN=alice,O=user) is not a CA certificate (BasicConstraints CA:TRUE)",
        ),
        "garbage": (b"hello\n", "not a PEM certificate"),
        "empty": (b"", "not a PEM certificate"),
    }
    for label, (bundle, message) in cases.items():
        cfg = _api_config(tmp_path / label.replace(" ", "-"), server, bundle)
        with pytest.raises(config_mod.ConfigError) as exc:
            api_tls.ServerTls(cfg)
        assert str(exc.value) == f"api.client_ca: {cfg.client_ca}: {message}", label
    both = cert_pem(client_ca[1]) + cert_pem(certs.create_ca("Old client CA", 30)[1])
    cfg = _api_config(tmp_path / "two-client-cas", server, both)
    assert len(api_tls.ServerTls(cfg).current().client_cas) == 2


def test_an_unreadable_tls_file_is_named(tmp_path: Path) -> None:
    server_ca = certs.create_ca("Server CA", 30, kind="server")
    cfg = _api_config(
        tmp_path,
        certs.create_server_cert(*server_ca, ["localhost"], valid_days=7),
        cert_pem(server_ca[1]),
    )
    missing = dataclasses.replace(cfg, client_ca=tmp_path / "nope.pem")
    with pytest.raises(config_mod.ConfigError) as exc:
        api_tls.ServerTls(missing)
    assert str(exc.value) == (
        f"api.client_ca: cannot read {tmp_path / 'nope.pem'}: No such file or directory"
    )


# --- CA kinds and the direct-issuer rule ----------------------------------------------------------


def test_a_ca_of_a_kind_carries_it_and_signs_only_that_kind() -> None:
    server_ca = certs.create_ca("S", 30, kind="server")
    client_ca = certs.create_ca("C", 30, kind="client")
    assert ext(server_ca[1], x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert certs.ca_kind(client_ca[1]) == "client"
    assert certs.ca_kind(certs.create_ca("Any", 30)[1]) is None
    with pytest.raises(ValueError, match="CN=C issues client certificates only; sign server"):
        certs.create_server_cert(*client_ca, ["localhost"])
    with pytest.raises(ValueError, match="CN=S issues server certificates only; sign client"):
        certs.create_client_cert(*server_ca, "alice", "admin", 7)
    with pytest.raises(ValueError, match="unknown CA kind 'user'"):
        certs.create_ca("X", 30, kind="user")


def test_check_issuer_accepts_only_a_leaf_the_ca_signed_itself() -> None:
    client_ca = certs.create_ca("Client CA", 30, kind="client")
    other_ca = certs.create_ca("Client CA", 30, kind="client")  # same name, another key
    alice = certs.create_client_cert(*client_ca, "alice", "user", 7)
    assert certs.check_issuer(alice[1], [other_ca[1], client_ca[1]]) == client_ca[1]
    (_, leaf), _ = tests_pki.intermediate_chain(client_ca, "mallory", "admin")
    with pytest.raises(certs.InvalidIdentityError) as exc:
        certs.check_issuer(leaf, [client_ca[1]])
    assert str(exc.value) == (
        "client certificate was not issued directly by a client CA this server trusts (its "
        "issuer is CN=Workernator team CA; intermediate CAs are not accepted)"
    )
    with pytest.raises(certs.InvalidIdentityError, match="not issued directly"):
        certs.check_issuer(alice[1], [other_ca[1]])  # the name matches, the signature does not
    with pytest.raises(certs.InvalidIdentityError, match="not issued directly"):
        certs.check_issuer(alice[1], [])
