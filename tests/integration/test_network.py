"""Job networking, tried from inside jobs: what ``none`` and ``egress`` jobs can reach.

Only test hosts of the tests' own are ever sent to (network namespaces created here, see
tests/nethosts.py), and listeners of the test process on this host. Every "cannot reach" has a
control showing the same target answers when reached the normal way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from shared.errors import FailedPrecondition
from shared.model import JobState, OutputChunk
from tests.helpers import collect, joined, run_job
from tests.nethosts import (
    DNS_SERVER,
    EgressLab,
    NetHost,
    bridge_host,
    routed_host,
    run_dns_server,
    wait_for,
)
from workernator_runner import store
from workernator_runner.config import RunnerConfig
from workernator_runner.manager import JobManager

TIMEOUT = 1.0  # for connections that must fail: a dropped packet is a timeout


class Listener:
    """A TCP listener of the test process, counting who connects."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.address = address
        self.port: int = self.sock.getsockname()[1]
        self.peers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.peers.append(peer[0])
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listeners(egress_lab: EgressLab) -> Iterator[dict[str, Listener]]:
    """Listeners on this host: loopback, the jobs' gateway, and the host's main address."""
    main_address = _main_address()
    made = {"loopback": Listener("127.0.0.1"), "gateway": Listener(str(egress_lab.gateway))}
    if main_address:
        made["main"] = Listener(main_address)
    try:
        yield made
    finally:
        for listener in made.values():
            listener.close()


def _main_address() -> str:
    """This host's address on its default route (only listened on, never sent to)."""
    routes = json.loads(
        subprocess.run(
            ["ip", "-j", "-4", "route", "show", "default"], capture_output=True, text=True
        ).stdout
        or "[]"
    )
    if not routes:
        return ""
    device = routes[0]["dev"]
    addresses = json.loads(
        subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "dev", device], capture_output=True, text=True
        ).stdout
    )
    infos = addresses[0].get("addr_info", []) if addresses else []
    return str(infos[0]["local"]) if infos else ""


@pytest.fixture
def lan_host(egress_lab: EgressLab) -> Iterator[tuple[NetHost, int]]:
    """A test host on the jobs' bridge with an HTTP server: (host, port)."""
    with bridge_host(egress_lab) as host:
        port, _ = host.http_server()
        yield host, port


@pytest.fixture
def far_host() -> Iterator[tuple[NetHost, int]]:
    """A test host behind the host's routing (reached through NAT, like the internet), holding
    a documentation address and the cloud metadata address; an HTTP server on both."""
    with routed_host("198.51.100.10", "169.254.169.254") as host:
        port, _ = host.http_server()
        yield host, port


@pytest.fixture
async def dns(egress_lab: EgressLab) -> AsyncIterator[subprocess.Popen[str]]:
    """A name server where the jobs' resolv.conf points on the host: a loopback address, as
    systemd-resolved's 127.0.0.53 is. It answers only clients on loopback, as resolved does."""
    server = run_dns_server(
        str(egress_lab.resolver),
        {"far.lab.test": "198.51.100.10", "meta.lab.test": "169.254.169.254"},
    )
    assert server.stdout is not None
    assert await asyncio.to_thread(server.stdout.readline) == "ready\n"
    try:
        yield server
    finally:
        server.kill()
        server.wait()


async def _connect(m: JobManager, job_type: str, **args: object) -> dict[str, str]:
    status, out, err = await run_job(m, job_type, {"timeout": TIMEOUT, **args})
    assert status.state is JobState.COMPLETED, (status, err)
    result: dict[str, str] = json.loads(out)
    return result


async def test_an_egress_job_posts_to_a_host_on_its_network(
    manager: JobManager, lan_host: tuple[NetHost, int]
) -> None:
    host, port = lan_host
    url = f"http://{host.address}:{port}/ok"
    status, out, _ = await run_job(manager, "wait", {"seconds": 0, "url": url})
    assert status.state is JobState.COMPLETED
    assert b"[RESULT] 201\n" in out
    server = host.processes[0]
    assert server.stdout is not None
    request = json.loads(await asyncio.to_thread(server.stdout.readline))
    assert (request["method"], request["path"]) == ("POST", "/ok")


async def test_a_job_without_network_reaches_nothing(
    manager: JobManager, lan_host: tuple[NetHost, int], far_host: tuple[NetHost, int]
) -> None:
    (lan, lan_port), (far, far_port) = lan_host, far_host
    targets = [[str(lan.address), lan_port], [str(far.address), far_port]]
    result = await _connect(manager, "connect", targets=json.dumps(targets))
    assert set(result.values()) == {"ENETUNREACH"}
    # Control: an egress job reaches both.
    result = await _connect(manager, "egress-connect", targets=json.dumps(targets))
    assert set(result.values()) == {"connected"}


async def test_an_egress_job_goes_out_through_nat(
    manager: JobManager, far_host: tuple[NetHost, int], egress_lab: EgressLab
) -> None:
    far, port = far_host
    result = await _connect(
        manager, "egress-connect", targets=json.dumps([[str(far.address), port]])
    )
    assert result == {f"{far.address}:{port}": "connected"}
    server = far.processes[0]
    assert server.stdout is not None
    client = json.loads(await asyncio.to_thread(server.stdout.readline))["client"]
    assert ipaddress.ip_address(client) not in egress_lab.subnet  # masqueraded, not the job's


async def test_no_job_reaches_the_host_itself(
    manager: JobManager, listeners: dict[str, Listener]
) -> None:
    targets = [[listener.address, listener.port] for listener in listeners.values()]
    for job_type in ("egress-connect", "connect"):
        result = await _connect(manager, job_type, targets=json.dumps(targets))
        assert result[f"127.0.0.1:{listeners['loopback'].port}"] == "ECONNREFUSED"  # its own lo
        for name, listener in listeners.items():
            if name != "loopback":
                assert result[f"{listener.address}:{listener.port}"] in ("timeout", "ENETUNREACH")
    assert all(listener.peers == [] for listener in listeners.values())
    # Control: each listener answers a connection from this host.
    for listener in listeners.values():
        with socket.create_connection((listener.address, listener.port), timeout=5):
            pass
    wait_for(lambda: all(len(listener.peers) == 1 for listener in listeners.values()))


async def test_link_local_addresses_are_unreachable(
    manager: JobManager, far_host: tuple[NetHost, int], dns: subprocess.Popen[str]
) -> None:
    far, port = far_host
    targets = [["169.254.169.254", port], [str(far.address), port]]
    result = await _connect(
        manager, "egress-connect", targets=json.dumps(targets), names=json.dumps(["meta.lab.test"])
    )
    assert result[f"169.254.169.254:{port}"] == "timeout"
    assert result[f"{far.address}:{port}"] == "connected"  # the same host, another address
    assert result["meta.lab.test"] == "169.254.169.254"  # a name does not help
    # Control: the metadata address answers this host.
    with socket.create_connection(("169.254.169.254", port), timeout=5):
        pass


async def test_jobs_cannot_reach_each_other(
    manager: JobManager, lan_host: tuple[NetHost, int]
) -> None:
    listener = await manager.start("egress-listen", {"seconds": 30}, "alice")
    try:
        chunks = await _first_chunk(manager, listener.id)
        port = json.loads(chunks)["port"]
        request = store.read_request(manager.config.jobs_dir / listener.id)
        address = request.address.split("/")[0]
        result = await _connect(manager, "egress-connect", targets=json.dumps([[address, port]]))
        assert result[f"{address}:{port}"] in ("timeout", "EHOSTUNREACH")
        # Control: a host on the bridge reaches the listening job.
        lan, _ = lan_host
        probe = lan.popen("python3", "-c", _CONNECT, address, str(port))
        assert probe.wait(10) == 0
        output = joined(await _collect_until(manager, listener.id, b"peer"))
        peers = [json.loads(line)["peer"] for line in output.splitlines()[1:]]
        assert peers == [str(lan.address)]
    finally:
        await manager.stop(listener.id)


_CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)"


async def _first_chunk(m: JobManager, job_id: str) -> bytes:
    async for chunk in m.read_output(job_id):
        return chunk.data
    raise AssertionError("no output")


async def _collect_until(m: JobManager, job_id: str, marker: bytes) -> list[OutputChunk]:
    chunks = []
    async with asyncio.timeout(10):
        async for chunk in m.read_output(job_id):
            chunks.append(chunk)
            if marker in chunk.data:
                break
    return chunks


async def test_names_resolve_through_a_resolver_on_the_hosts_loopback(
    manager: JobManager, dns: subprocess.Popen[str], far_host: tuple[NetHost, int]
) -> None:
    _, port = far_host
    status, out, _ = await run_job(
        manager, "wait", {"seconds": 0, "url": f"http://far.lab.test:{port}/ok"}
    )
    assert status.state is JobState.COMPLETED
    assert b"[RESULT] 201\n" in out
    assert dns.stdout is not None
    query = json.loads(await asyncio.to_thread(dns.stdout.readline))
    assert query["name"] == "far.lab.test"
    assert query["client"] == "127.0.0.1"  # the resolver sees a local client
    result = await _connect(manager, "egress-connect", names=json.dumps(["nowhere.lab.test"]))
    assert result["nowhere.lab.test"].startswith("error")
    # A job without network has no name servers at all.
    result = await _connect(manager, "connect", names=json.dumps(["far.lab.test"]))
    assert result["far.lab.test"].startswith("error")


async def test_a_jobs_veth_goes_with_the_job(
    manager: JobManager, egress_lab: EgressLab, lan_host: tuple[NetHost, int]
) -> None:
    job = await manager.start("egress-listen", {"seconds": 30}, "alice")
    await _first_chunk(manager, job.id)
    assert egress_lab.job_veths() == [f"{egress_lab.bridge}-{job.id}"]
    await manager.stop(job.id)
    wait_for(lambda: egress_lab.job_veths() == [], what="the veth to go")
    with suppress(Exception):
        await collect(manager, job.id)


async def test_a_link_local_name_server_still_answers_egress_jobs(
    runner_config: RunnerConfig, egress_lab: EgressLab, tmp_path: Path
) -> None:
    """A cloud host's resolver is often link-local (169.254.169.253): jobs reach it through
    the gateway, and only for DNS."""
    with routed_host("198.51.100.10", "169.254.169.253") as host:
        port, _ = host.http_server()
        dns = host.popen(
            sys.executable,
            "-c",
            DNS_SERVER,
            "169.254.169.253",
            json.dumps({"x.test": "198.51.100.10"}),
        )
        assert dns.stdout is not None
        assert await asyncio.to_thread(dns.stdout.readline) == "ready\n"
        resolv_conf = tmp_path / "resolv.conf"
        resolv_conf.write_text("nameserver 169.254.169.253\n")
        config = dataclasses.replace(runner_config, resolv_conf=resolv_conf)
        async with JobManager(config) as m:
            targets = [["169.254.169.253", port], ["198.51.100.10", port]]
            result = await _connect(
                m, "egress-connect", targets=json.dumps(targets), names=json.dumps(["x.test"])
            )
        assert result == {
            "x.test": "198.51.100.10",
            f"169.254.169.253:{port}": "timeout",  # the same address, another port: dropped
            f"198.51.100.10:{port}": "connected",
        }


async def test_a_bridge_name_taken_by_another_interface_is_refused(
    runner_config: RunnerConfig,
) -> None:
    config = dataclasses.replace(runner_config, egress_bridge="lo")
    async with JobManager(config) as m:
        assert m.egress is None
        assert m.egress_error == (
            "egress networking could not be set up: lo exists and is not a bridge (it is '')"
        )
        with pytest.raises(FailedPrecondition, match="needs network access"):
            await m.start("wait", {"seconds": 0, "url": "http://192.0.2.1/"}, "alice")
        status, _, _ = await run_job(m, "fib", {"position": 3})  # the rest works
        assert status.state is JobState.COMPLETED
    assert "workernator_lo" not in _nft_tables()


def _nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout


async def test_a_wait_job_follows_no_redirect_but_to_http(
    manager: JobManager, lan_host: tuple[NetHost, int]
) -> None:
    host, port = lan_host
    base = f"http://{host.address}:{port}"
    ftp = f"ftp://{host.address}:{port}/passwd"
    status, out, err = await run_job(
        manager, "wait", {"seconds": 0, "url": f"{base}/redirect?to={ftp}"}
    )
    assert status.state is JobState.FAILED
    assert (
        err
        == (
            f"[ERROR] Redirect to {ftp} refused: only http and https redirects are followed\n"
        ).encode()
    )
    assert out.endswith(b"[JOB] Failed\n")
    status, out, _ = await run_job(
        manager, "wait", {"seconds": 0, "url": f"{base}/redirect?to={base}/ok"}
    )
    assert status.state is JobState.COMPLETED
    assert f"[WAIT] Following a 302 redirect to {base}/ok\n".encode() in out
    assert b"[RESULT] 201\n" in out
