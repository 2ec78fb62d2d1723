"""The api's TLS files followed in process: when gRPC gets a new configuration, what is logged,
and what the per-call check accepts. (tests/e2e/test_tls.py does the same through the real api.)"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests import pki
from workernator_api import certs, config, tls

UNUSABLE = "TLS files changed but cannot be used; still using the previous ones"
RELOADED = "TLS files reloaded"


def replace(path: Path, data: bytes) -> None:
    """Rename a new file over ``path``, as operators are told to."""
    staging = path.with_name(f".{path.name}.new")
    staging.write_bytes(data)
    os.replace(staging, path)


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="workernator")


@pytest.fixture
def deployment(tmp_path: Path) -> certs.Deployment:
    return certs.create_deployment(tmp_path, ["localhost"], [("alice", "user"), ("bob", "admin")])


@pytest.fixture
def server(deployment: certs.Deployment) -> tls.ServerTls:
    return tls.ServerTls(
        config.ApiConfig(
            cert=deployment.server_cert,
            key=deployment.server_key,
            client_ca=deployment.client_ca_cert,
        )
    )


def auth(cert: Path | bytes, version: bytes = b"TLSv1.3") -> dict[str, list[bytes]]:
    pem = cert if isinstance(cert, bytes) else cert.read_bytes()
    return {"ssl_tls_version": [version], "x509_pem_cert": [pem]}


def messages(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


def test_grpc_gets_a_new_configuration_once_per_usable_change(
    server: tls.ServerTls, deployment: certs.Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    first = server.current()
    assert [server._fetch() for _ in range(3)] == [None, None, None]
    renewed = certs.create_server_cert(
        *pki.load_pair(deployment.server_ca_cert, deployment.server_ca_key), ["localhost"], [], 30
    )
    replace(deployment.server_key, pki.key_pem(renewed[0]))
    replace(deployment.server_cert, pki.pem(renewed[1]))
    config_ = server._fetch()
    assert config_ is not None and config_ is server.current().config
    assert server.current().server_cert == renewed[1] != first.server_cert
    assert [server._fetch() for _ in range(3)] == [None, None, None]
    assert len(messages(caplog, RELOADED)) == 1


def test_a_rewrite_with_the_same_bytes_is_no_change(
    server: tls.ServerTls, deployment: certs.Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    before = server.current()
    for path in (deployment.server_cert, deployment.client_ca_cert):
        replace(path, path.read_bytes())  # a new inode, the same content
    assert server._fetch() is None
    assert server.current() is before
    assert caplog.records == []


def test_an_unusable_change_is_logged_once_and_the_old_files_stay(
    server: tls.ServerTls, deployment: certs.Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    before = server.current()
    replace(deployment.client_ca_cert, pki.pem(certs.load_cert(deployment.server_ca_cert)))
    for _ in range(5):
        assert server._fetch() is None
        assert server.current() is before
    (warning,) = messages(caplog, UNUSABLE)
    assert getattr(warning, "fields", {})["error"] == (
        f"api.client_ca: {deployment.client_ca_cert}: CN=Workernator server CA is the server CA "
        "(it issues server certificates only); give the client CA"
    )
    deployment.client_ca_cert.unlink()  # another change, another single warning
    for _ in range(3):
        assert server._fetch() is None
    assert len(messages(caplog, UNUSABLE)) == 2
    assert "cannot read" in getattr(messages(caplog, UNUSABLE)[-1], "fields", {})["error"]
    replace(deployment.client_ca_cert, pki.pem(before.client_cas[0]))  # back as it was
    assert server._fetch() is None and server.current() is before
    assert messages(caplog, RELOADED) == []


def test_authenticate_refuses_what_the_handshake_might_let_through(
    server: tls.ServerTls, deployment: certs.Deployment, tmp_path: Path
) -> None:
    alice = deployment.users["alice"][0]
    assert server.authenticate(auth(alice)) == certs.load_cert(alice)
    with pytest.raises(tls.Unauthenticated, match=r"^TLS 1\.3 is required$"):
        server.authenticate(auth(alice, b"TLSv1.2"))
    with pytest.raises(tls.Unauthenticated, match=r"^a client certificate is required$"):
        server.authenticate({"ssl_tls_version": [b"TLSv1.3"]})
    client_ca = pki.load_pair(deployment.client_ca_cert, deployment.client_ca_key)
    (_, leaf), _ = pki.intermediate_chain(client_ca, "bob", "admin")
    with pytest.raises(tls.Unauthenticated, match="intermediate CAs are not accepted"):
        server.authenticate(auth(pki.pem(leaf)))
    expired = pki.issue(client_ca, pki.name("bob", "admin"), not_after=pki.NOW - pki.DAY)
    with pytest.raises(tls.Unauthenticated, match="client certificate expired on"):
        server.authenticate(auth(pki.pem(expired[1])))
    with pytest.raises(tls.Unauthenticated, match=r"^unusable client certificate: "):
        server.authenticate(auth(b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n"))


def test_a_client_ca_taken_out_stops_counting_at_once(
    server: tls.ServerTls, deployment: certs.Deployment
) -> None:
    alice = deployment.users["alice"][0]
    server.authenticate(auth(alice))  # verified, and remembered for this CA set
    newer = certs.create_ca("Newer client CA", 30, kind="client")
    replace(deployment.client_ca_cert, pki.pem(newer[1]))
    with pytest.raises(tls.Unauthenticated, match="not issued directly by a client CA"):
        server.authenticate(auth(alice))
    dave = certs.create_client_cert(*newer, "dave", "user", 7)
    assert server.authenticate(auth(pki.pem(dave[1]))) == dave[1]
