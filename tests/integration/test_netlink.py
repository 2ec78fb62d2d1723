"""The rtnetlink client against the kernel: a bridge, veths whose peers go straight into other
network namespaces, bridge port isolation, addresses, a default route, traffic through all of
it, and the kernel's errors. Checked with `ip`/`bridge`, not only with the client itself.

Every test removes what it created (links, namespaces, processes) even when it fails, and then
checks that its links are gone.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from workernator_runner.netlink import Link, Netlink, NetlinkError

ROOT = Path(__file__).resolve().parents[2]
GONE_WITHIN = 10.0  # seconds for the kernel to destroy a dead namespace and the links in it


def unique() -> str:
    return "wnt" + secrets.token_hex(3)  # 9 bytes: a valid interface and namespace name


def run(*argv: str, timeout: float = 30) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{argv} failed: {done.stderr}"
    return done.stdout


def ip_json(*args: str) -> Any:
    return json.loads(run("ip", "-j", *args))


def link_names(*netns: str) -> set[str]:
    return {link["ifname"] for link in ip_json(*netns, "link", "show")}


def wait_until(condition: Any, what: str, limit: float = GONE_WITHIN) -> float:
    """Poll ``condition`` until it is true; the seconds that took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > limit:
            raise AssertionError(f"{what}: not within {limit} s")
        time.sleep(0.005)
    return time.monotonic() - start


class Made:
    """What a test created, removed in its teardown."""

    def __init__(self) -> None:
        self.links: list[str] = []  # names in this (the test's) namespace
        self.netns: list[str] = []
        self.fds: list[int] = []
        self.processes: list[subprocess.Popen[str]] = []

    def link(self) -> str:
        name = unique()
        self.links.append(name)
        return name

    def named_netns(self) -> tuple[str, int]:
        """A new namespace (ip netns add) and an open file descriptor of it."""
        name = unique()
        run("ip", "netns", "add", name)
        self.netns.append(name)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        self.fds.append(fd)
        return name, fd

    def process_in_new_netns(self) -> subprocess.Popen[str]:
        """A process alone in a new network namespace (it sleeps; the teardown kills it)."""
        process = self.start(["unshare", "--net", "sleep", "120"])
        ours = os.readlink("/proc/self/ns/net")
        wait_until(lambda: os.readlink(f"/proc/{process.pid}/ns/net") != ours, "unshare", 10)
        return process

    def start(self, argv: list[str]) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        process = subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE)
        self.processes.append(process)
        return process

    def remove(self) -> None:
        for process in self.processes:  # ours only, by their Popen
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=20)
        for fd in self.fds:
            os.close(fd)
        # A veth whose peer is in one of our namespaces goes when the namespace does.
        for name in self.netns:
            run("ip", "netns", "del", name)
        existing = link_names()
        for name in reversed(self.links):
            if name in existing:
                # it may be going already, its peer's namespace being destroyed
                subprocess.run(["ip", "link", "del", "dev", name], capture_output=True, check=False)
        wait_until(lambda: not set(self.links) & link_names(), f"links {self.links} removed")


@pytest.fixture
def made() -> Iterator[Made]:
    m = Made()
    try:
        yield m
    finally:
        m.remove()


@pytest.fixture
def nl() -> Iterator[Netlink]:
    with Netlink() as n:
        yield n


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of the benchmarking range (198.18.0.0/15) that no address here is on."""
    used = [
        ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
        for link in ip_json("-4", "addr", "show")
        for a in link["addr_info"]
    ]
    while True:
        subnet = ipaddress.IPv4Network(
            f"198.{18 + secrets.randbelow(2)}.{secrets.randbelow(256)}.0/24"
        )
        if not any(subnet.overlaps(u) for u in used):
            return subnet


# Run inside a namespace by `ip netns exec`: sets up lo and eth0 as a job's network is set up.
CONFIGURE_JOB_NETNS = """
import dataclasses, ipaddress, json, sys
from workernator_runner.netlink import Netlink, NetlinkError
address = ipaddress.IPv4Interface(sys.argv[1])
gateway = ipaddress.IPv4Address(sys.argv[2])
with Netlink() as nl:
    nl.set_link(nl.link_index("lo"), up=True)
    eth0 = nl.link_index("eth0")
    nl.add_address(eth0, address)
    nl.set_link(eth0, up=True)
    nl.add_default_route(gateway)
    try:
        nl.add_default_route(gateway)
        again = 0
    except NetlinkError as e:
        again = e.errno
    links = [dataclasses.asdict(link) for link in nl.links()]
print(json.dumps({"links": links, "again": again}))
"""

# Run inside a namespace: sends "ping" over UDP until an answer comes back, prints it.
UDP_PING = """
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(0.25)
    for _ in range(40):
        s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
        try:
            data, (host, _port) = s.recvfrom(64)
        except TimeoutError:
            continue
        print(data.decode(), host)
        break
    else:
        sys.exit("no answer")
"""


@pytest.mark.privileged
def test_a_job_network_bridge_isolated_veth_into_a_netns_address_route_traffic(
    made: Made, nl: Netlink
) -> None:
    subnet = free_subnet()
    gateway = ipaddress.IPv4Interface(f"{subnet[1]}/24")
    job = ipaddress.IPv4Interface(f"{subnet[2]}/24")
    bridge_name, host_name = made.link(), made.link()
    netns, netns_fd = made.named_netns()

    bridge = nl.create_bridge(bridge_name)
    nl.add_address(bridge, gateway)
    nl.set_link(bridge, up=True)
    host = nl.create_veth(host_name, "eth0", peer_netns_fd=netns_fd)
    nl.set_link(host, master=bridge)
    nl.set_bridge_port(host, isolated=True)
    nl.set_link(host, up=True)
    inside = json.loads(
        run(
            "ip",
            "netns",
            "exec",
            netns,
            sys.executable,
            "-c",
            CONFIGURE_JOB_NETNS,
            str(job),
            str(gateway.ip),
        )
    )

    # What the client reports, here and in the namespace
    links = {link.name: link for link in nl.links()}
    assert links[bridge_name] == Link(bridge, bridge_name, "bridge", 0, True)
    assert links[host_name] == Link(host, host_name, "veth", bridge, True)
    assert [
        (link["name"], link["kind"], link["master"], link["up"]) for link in inside["links"]
    ] == [
        ("lo", "", 0, True),
        ("eth0", "veth", 0, True),
    ]
    assert inside["again"] == errno.EEXIST  # a second default route

    # What ip and bridge report
    (veth,) = ip_json("-d", "link", "show", "dev", host_name)
    assert veth["ifindex"] == host
    assert veth["master"] == bridge_name
    assert "UP" in veth["flags"]
    assert veth["linkinfo"]["info_kind"] == "veth"
    assert veth["linkinfo"]["info_slave_kind"] == "bridge"
    assert veth["linkinfo"]["info_slave_data"]["isolated"] is True
    (port,) = json.loads(run("bridge", "-j", "-d", "link", "show", "dev", host_name))
    assert (port["master"], port["isolated"]) == (bridge_name, True)
    (br,) = ip_json("-4", "addr", "show", "dev", bridge_name)
    assert [(a["local"], a["prefixlen"], a["broadcast"]) for a in br["addr_info"]] == [
        (str(gateway.ip), 24, str(subnet.broadcast_address))
    ]
    assert link_names("-n", netns) == {"lo", "eth0"}
    (eth0,) = ip_json("-n", netns, "-d", "link", "show", "dev", "eth0")
    assert eth0["linkinfo"]["info_kind"] == "veth"
    assert "UP" in eth0["flags"]
    (eth0,) = ip_json("-n", netns, "-4", "addr", "show", "dev", "eth0")
    assert [(a["local"], a["prefixlen"], a["broadcast"]) for a in eth0["addr_info"]] == [
        (str(job.ip), 24, str(subnet.broadcast_address))
    ]
    routes = ip_json("-n", netns, "-4", "-d", "route", "show", "table", "main")
    assert routes == [
        {
            "type": "unicast",
            "dst": "default",
            "gateway": str(gateway.ip),
            "dev": "eth0",
            "protocol": "boot",
            "scope": "global",
            "flags": [],
        },
        {
            "type": "unicast",
            "dst": str(subnet),
            "dev": "eth0",
            "protocol": "kernel",
            "scope": "link",
            "prefsrc": str(job.ip),
            "flags": [],
        },
    ]

    # Traffic: the job reaches the bridge's address and gets the answer back
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((str(gateway.ip), 0))
        server.settimeout(15)
        ping = made.start(
            [
                "ip",
                "netns",
                "exec",
                netns,
                sys.executable,
                "-c",
                UDP_PING,
                str(gateway.ip),
                str(server.getsockname()[1]),
            ]
        )
        data, sender = server.recvfrom(64)
        assert (data, sender[0]) == (b"ping", str(job.ip))
        server.sendto(b"pong", sender)
        out, _ = ping.communicate(timeout=15)
    assert (ping.returncode, out) == (0, f"pong {gateway.ip}\n")

    # Deleting the end here deletes the pair
    nl.delete_link(host)
    assert nl.link_index(host_name) is None
    assert link_names("-n", netns) == {"lo"}


@pytest.mark.privileged
def test_a_veth_peer_goes_into_the_netns_of_a_process_and_dies_with_it(
    made: Made, nl: Netlink
) -> None:
    process = made.process_in_new_netns()
    host_name, peer_name = made.link(), unique()
    host = nl.create_veth(host_name, peer_name, peer_netns_pid=process.pid)

    assert nl.link_index(host_name) == host
    assert nl.link_index(peer_name) is None  # not here
    inside = json.loads(
        run("nsenter", "-t", str(process.pid), "-n", "ip", "-j", "-d", "link", "show")
    )
    assert {link["ifname"]: link.get("linkinfo", {}).get("info_kind") for link in inside} == {
        "lo": None,
        peer_name: "veth",
    }
    # The namespace's last holder ends: the kernel destroys the namespace, and the pair with it,
    # but asynchronously (in a work queue, typically some milliseconds later).
    process.kill()
    process.wait(timeout=10)
    wait_until(lambda: nl.link_index(host_name) is None, "the host end goes with the namespace")


@pytest.mark.privileged
def test_links_master_up_down_release_and_delete_one_end(made: Made, nl: Netlink) -> None:
    bridge_name, one_name, other_name = made.link(), made.link(), made.link()
    bridge = nl.create_bridge(bridge_name)
    one = nl.create_veth(one_name, other_name)
    other = nl.link_index(other_name)
    assert other is not None and other != one

    nl.set_link(one, up=True, master=bridge)
    links = {link.name: link for link in nl.links()}
    assert links[bridge_name] == Link(bridge, bridge_name, "bridge", 0, False)
    assert links[one_name] == Link(one, one_name, "veth", bridge, True)
    assert links[other_name] == Link(other, other_name, "veth", 0, False)
    (port,) = json.loads(run("bridge", "-j", "link", "show", "dev", one_name))
    assert port["master"] == bridge_name

    nl.set_link(one, up=False, master=0)
    assert Link(one, one_name, "veth", 0, False) in nl.links()
    (shown,) = ip_json("link", "show", "dev", one_name)
    assert "master" not in shown
    assert "UP" not in shown["flags"]

    nl.delete_link(other)
    assert nl.link_index(one_name) is None
    assert nl.link_index(other_name) is None


@pytest.mark.privileged
def test_the_kernels_errors_come_with_their_errno_and_the_operation(
    made: Made, nl: Netlink
) -> None:
    name, host_name = made.link(), made.link()
    bridge = nl.create_bridge(name)

    with pytest.raises(NetlinkError) as e:
        nl.create_bridge(name)
    assert (e.value.errno, e.value.strerror) == (errno.EEXIST, f"create bridge {name}: File exists")
    assert name in str(e.value)
    with pytest.raises(NetlinkError) as e:
        nl.create_veth(name, unique())
    assert (e.value.errno, e.value.strerror) == (errno.EEXIST, f"create veth {name}: File exists")

    missing = 0x7FFFFFFF
    with pytest.raises(NetlinkError) as e:
        nl.delete_link(missing)
    assert (e.value.errno, e.value.strerror) == (
        errno.ENODEV,
        f"delete link {missing}: No such device",
    )
    with pytest.raises(NetlinkError) as e:
        nl.set_link(missing, up=True)
    assert e.value.errno == errno.ENODEV

    address = ipaddress.IPv4Interface(f"{free_subnet()[1]}/32")
    nl.add_address(bridge, address)
    with pytest.raises(NetlinkError, match=f"add address {address} to link {bridge}") as e:
        nl.add_address(bridge, address)
    assert e.value.errno == errno.EEXIST

    with pytest.raises(NetlinkError) as e:  # a bridge is no bridge port
        nl.set_bridge_port(bridge, isolated=True)
    assert e.value.errno == errno.EOPNOTSUPP

    # A peer that cannot be created leaves nothing behind here.
    netns, netns_fd = made.named_netns()
    with pytest.raises(NetlinkError) as e:
        nl.create_veth(host_name, "lo", peer_netns_fd=netns_fd)
    assert e.value.errno == errno.EEXIST
    with open("/dev/null", "rb") as not_a_netns, pytest.raises(NetlinkError) as e:
        nl.create_veth(host_name, "eth0", peer_netns_fd=not_a_netns.fileno())
    assert e.value.errno == errno.EINVAL
    with pytest.raises(NetlinkError) as e:
        nl.create_veth(host_name, "eth0", peer_netns_pid=0x7FFFFFFF)
    assert e.value.errno == errno.ESRCH
    assert nl.link_index(host_name) is None
    assert link_names("-n", netns) == {"lo"}

    # Errors from the kernel leave the socket usable.
    assert nl.link_index(name) == bridge


def test_lookups_need_no_privilege() -> None:
    with Netlink() as n:
        assert n.link_index("lo") == 1  # lo is the first link of every namespace
        assert n.link_index("wnt-none") is None
        (lo,) = (link for link in n.links() if link.index == 1)
        assert (lo.name, lo.kind, lo.master) == ("lo", "", 0)
