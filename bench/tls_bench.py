"""What the api's TLS checks cost per call and per handshake (a benchmark, not a test).

    .venv/bin/python bench/tls_bench.py

Prints the median, in microseconds, of:
- ``authenticate`` of a certificate already verified: the per-call check (TLS 1.3, a look-up
  of the certificate verified for the CA set in force, its dates, three ``stat`` calls);
- ``authenticate`` of a certificate seen for the first time: parsing it and checking its
  signature against the client CA (``certs.check_issuer``);
- the certificate configuration fetcher gRPC calls before each handshake, files unchanged.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workernator_api import certs, config, tls

ROUNDS = 7
CALLS = 2000


def median_us(action: Callable[[], object]) -> float:
    """The median over ROUNDS of the mean time of CALLS calls, in microseconds."""
    means = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            action()
        means.append((time.perf_counter() - start) / CALLS * 1e6)
    return statistics.median(means)


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        pki = certs.create_deployment(Path(directory), ["localhost"], [("alice", "user")])
        server = tls.ServerTls(
            config.ApiConfig(cert=pki.server_cert, key=pki.server_key, client_ca=pki.client_ca_cert)
        )
        pem = pki.users["alice"][0].read_bytes()
        auth = {"ssl_tls_version": [b"TLSv1.3"], "x509_pem_cert": [pem]}
        server.authenticate(auth)

        def first_time() -> None:
            server.current().verified.clear()
            server.authenticate(auth)

        results = {
            "authenticate, certificate verified before": median_us(
                lambda: server.authenticate(auth)
            ),
            "authenticate, certificate seen first": median_us(first_time),
            "fetcher before a handshake, files unchanged": median_us(server._fetch),
        }
    for name, value in results.items():
        print(f"{name:<45} {value:8.1f} us")


if __name__ == "__main__":
    main()
