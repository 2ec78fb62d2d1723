"""Networks of the tests' own: an egress bridge for the runner, and test hosts in network
namespaces the tests create. Nothing here sends traffic anywhere but to these hosts.

- :class:`EgressLab`: a bridge name and subnet for the session's runners (the runner creates
  the bridge and its nftables table; the lab removes both at the end), and a resolv.conf whose
  name server is a loopback address of the lab's own (as systemd-resolved's 127.0.0.53 is).
- :func:`bridge_host`: a host on the jobs' bridge (an ordinary, non-isolated port), in the jobs'
  subnet, like a machine on the same LAN.
- :func:`routed_host`: a host behind the host's routing table, reached through the runner's NAT
  like the internet is: it holds addresses of any kind (a link-local "metadata" address, a
  documentation address) that the host routes to it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

JOB_USER = "workernator-job"

# A tiny HTTP server for test hosts: prints its port, then one JSON line per request.
HTTP_SERVER = r"""
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        code = 201 if self.path == "/ok" else 404
        if self.path.startswith("/redirect?to="):  # a redirect to wherever the query says
            code = 302
        self.send_response(code)
        if code == 302:
            self.send_header("Location", self.path.split("=", 1)[1])
        self.send_header("Content-Length", "0")
        self.end_headers()
        print(json.dumps({"method": self.command, "path": self.path, "body": len(body),
                          "client": self.client_address[0]}), flush=True)
    do_GET = do_POST
    def log_message(self, *a): pass
s = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def ensure_job_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            check=True,
        )


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _used_networks() -> list[ipaddress.IPv4Network]:
    routes = json.loads(ip("-j", "-4", "route", "show", "table", "all").stdout or "[]")
    nets = []
    for route in routes:
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


def _free_subnet(first: int, prefix: int) -> ipaddress.IPv4Network:
    used = _used_networks()
    for _ in range(200):
        candidate = ipaddress.IPv4Network(
            f"10.{secrets.choice(range(first, 250))}.{secrets.randbelow(256)}.0/{prefix}",
            strict=False,
        )
        if not any(candidate.overlaps(n) for n in used):
            return candidate
    raise RuntimeError("no free test subnet")


LABS = Path("/run/workernator-test-labs")  # <bridge> -> the pid of the session that made it


def _remove_network(bridge: str) -> None:
    subprocess.run(
        ["nft", "delete", "table", "inet", f"workernator_{bridge}"],
        capture_output=True,
        check=False,
    )
    ip("link", "del", bridge, check=False)


def _remove_host(netns: str, link: str) -> None:
    for pid in ip("netns", "pids", netns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)  # a test server of ours, in our namespace
    ip("netns", "del", netns, check=False)
    ip("link", "del", link, check=False)


def _remove_dead_labs() -> None:
    """Bridges, tables and test hosts of test sessions killed before they could remove them
    (each is registered with the pid of its session)."""
    if not LABS.is_dir():
        return
    for entry in LABS.iterdir():
        pid, _, link = entry.read_text().partition(" ")
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue
        if entry.name.startswith("wn-"):  # a test host: netns name, then its link
            _remove_host(entry.name, link)
        else:
            _remove_network(entry.name)
        entry.unlink(missing_ok=True)


@dataclass
class EgressLab:
    bridge: str
    subnet: ipaddress.IPv4Network
    resolver: ipaddress.IPv4Address  # a loopback address: a test may serve DNS there
    dir: Path
    ip_forward: str

    @property
    def resolv_conf(self) -> Path:
        return self.dir / "resolv.conf"

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @classmethod
    def create(cls) -> EgressLab:
        _remove_dead_labs()
        directory = Path(tempfile.mkdtemp(prefix="wn-lab-"))
        resolver = ipaddress.IPv4Address(
            f"127.53.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"
        )
        (directory / "resolv.conf").write_text(f"nameserver {resolver}\nsearch lab.test\n")
        lab = cls(
            bridge=f"wnt{secrets.token_hex(2)}",
            subnet=_free_subnet(200, 24),
            resolver=resolver,
            dir=directory,
            ip_forward=Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
        )
        LABS.mkdir(parents=True, exist_ok=True)
        (LABS / lab.bridge).write_text(str(os.getpid()))  # so a killed session's is found
        return lab

    def remove(self) -> None:
        _remove_network(self.bridge)
        (LABS / self.bridge).unlink(missing_ok=True)
        Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward)
        shutil.rmtree(self.dir, ignore_errors=True)

    def job_veths(self) -> list[str]:
        links = json.loads(ip("-j", "link", "show").stdout or "[]")
        return [link["ifname"] for link in links if link["ifname"].startswith(f"{self.bridge}-")]


@dataclass
class NetHost:
    """A network namespace of the test's own, with processes the test started in it."""

    name: str
    address: ipaddress.IPv4Address
    link: str  # the host-side end of its veth
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.processes.append(process)
        return process

    def http_server(self, port: int = 0) -> tuple[int, subprocess.Popen[str]]:
        """Start an HTTP server on all its addresses; (port, process). The process prints one
        JSON line per request it answered."""
        process = self.popen(sys.executable, "-c", HTTP_SERVER, "0.0.0.0", str(port))
        assert process.stdout is not None
        return int(process.stdout.readline()), process

    def remove(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(timeout=10)
        _remove_host(self.name, self.link)
        (LABS / self.name).unlink(missing_ok=True)


def _new_netns(prefix: str) -> tuple[str, str]:
    name, link = f"{prefix}{secrets.token_hex(3)}", f"wnh{secrets.token_hex(4)}"
    LABS.mkdir(parents=True, exist_ok=True)
    (LABS / name).write_text(f"{os.getpid()} {link}")  # so a killed session's is found
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")
    return name, link


@contextlib.contextmanager
def bridge_host(lab: EgressLab) -> Iterator[NetHost]:
    """A host on the jobs' bridge with the subnet's last address."""
    name, link = _new_netns("wn-bh-")
    address = lab.subnet.broadcast_address - 1
    host = NetHost(name, address, link)
    try:
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("link", "set", link, "master", lab.bridge, "up")
        ip("-n", name, "addr", "add", f"{address}/{lab.subnet.prefixlen}", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        yield host
    finally:
        host.remove()


@contextlib.contextmanager
def routed_host(*addresses: str) -> Iterator[NetHost]:
    """A host the host routes ``addresses`` (single IPv4 addresses) to, over a veth of its
    own; it answers from each of them. Its first address is ``address``."""
    name, link = _new_netns("wn-rh-")
    transfer = _free_subnet(100, 30)
    near, far = list(transfer.hosts())
    host = NetHost(name, ipaddress.IPv4Address(addresses[0]), link)
    try:
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("addr", "add", f"{near}/30", "dev", link)
        ip("link", "set", link, "up")
        ip("-n", name, "addr", "add", f"{far}/30", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "route", "add", "default", "via", str(near))
        for address in addresses:
            ip("-n", name, "addr", "add", f"{address}/32", "dev", "lo")
            ip("route", "add", f"{address}/32", "via", str(far), "dev", link)
        yield host
    finally:
        host.remove()  # its routes go with the link


def wait_for(predicate: object, seconds: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true, or fail after ``seconds``."""
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def run_dns_server(address: str, answers: dict[str, str]) -> subprocess.Popen[str]:
    """A DNS server on ``address``:53 (UDP) answering A queries from ``answers`` and refusing
    anything else. It prints one line per query with the client's address."""
    return subprocess.Popen(
        [sys.executable, "-c", DNS_SERVER, address, json.dumps(answers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ),
    )


DNS_SERVER = r"""
import json, socket, struct, sys
answers = json.loads(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    data, client = s.recvfrom(512)
    ident, flags, qd = struct.unpack(">HHH", data[:6])
    pos, labels = 12, []
    while data[pos]:
        labels.append(data[pos + 1 : pos + 1 + data[pos]].decode())
        pos += 1 + data[pos]
    qtype = struct.unpack(">H", data[pos + 1 : pos + 3])[0]
    question = data[12 : pos + 5]
    name = ".".join(labels).lower()
    print(json.dumps({"name": name, "client": client[0]}), flush=True)
    address = answers.get(name) if qtype == 1 else None
    rcode = 0 if address or name in answers else 3
    header = struct.pack(">HHHHHH", ident, 0x8180 | rcode, 1, 1 if address else 0, 0, 0)
    answer = b""
    if address:
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
    s.sendto(header + question + answer, client)
"""
