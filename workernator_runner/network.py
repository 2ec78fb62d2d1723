"""Job networking (design section 7): ``none`` and ``egress``.

``none``: the job's own network namespace with only ``lo``, up.

``egress``: a veth pair per job, one end (``eth0``) inside the job's namespace with an address
of the egress subnet and a default route, the other (``<bridge>-<job id>``) on a runner-managed
bridge whose address is the jobs' gateway. The bridge ports are *isolated* (jobs cannot talk to
each other at layer 2), and an nftables table of the runner's own:

- masquerades the jobs' traffic to the outside;
- forwards the gateway's port 53 to the host's first name server (DNAT; when that one listens
  on loopback, as systemd-resolved's 127.0.0.53 does, the source is rewritten to 127.0.0.1
  too, because such resolvers answer only local clients) and lets exactly that through;
- drops everything else from the bridge to the host itself (its addresses and ports: the api,
  the runner, anything on 127.0.0.1);
- drops forwarding from the bridge to loopback, link-local (169.254.0.0/16: cloud metadata),
  multicast and reserved addresses, and all IPv6;
- lets nothing from outside reach a job, but the answers to what it sent.

Jobs cannot reach each other because their bridge ports are isolated: an isolated port talks
only to non-isolated ones (the bridge itself, and whatever an operator attaches). Where
``br_netfilter`` is loaded, bridged traffic also crosses the forward hook, with the bridge as
both input and output interface: the table lets it through and leaves it to the isolation.

The bridge and the table are set up by the launcher when the runner starts (they outlive it:
running jobs use them); a veth goes away with its job's namespace, and the monitor removes it
explicitly when the job ends. Leftovers are removed at runner start.
"""

from __future__ import annotations

import ipaddress
import itertools
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from workernator_runner import netlink

NFT = "nft"
BLOCKED_DESTINATIONS = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)


@dataclass(frozen=True)
class Egress:
    """The egress network as the runner's config describes it."""

    bridge: str
    subnet: ipaddress.IPv4Network
    resolver: ipaddress.IPv4Address | None  # a loopback resolver of the host, reached by NAT
    resolv_conf: str  # the jobs' /etc/resolv.conf

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.subnet.network_address + 1}/{self.subnet.prefixlen}")

    @property
    def table(self) -> str:
        return f"workernator_{self.bridge}"

    def veth_name(self, job_id: str) -> str:
        return f"{self.bridge}-{job_id}"

    def is_job_veth(self, name: str) -> bool:
        return name.startswith(f"{self.bridge}-")

    def addresses(
        self, after: ipaddress.IPv4Interface | None = None
    ) -> Iterable[ipaddress.IPv4Interface]:
        """Addresses for jobs (the gateway excluded): from the first, or from the one after
        ``after`` round the subnet back to it. Handing them out from the last one given, the
        next is free at once, however many jobs run (a scan from the first costs a step per
        running job)."""
        first = int(self.subnet.network_address) + 1
        last = int(self.subnet.broadcast_address) - 1
        start = first
        if after is not None and first <= int(after.ip) < last:
            start = int(after.ip) + 1
        gateway = int(self.gateway.ip)
        for host in itertools.chain(range(start, last + 1), range(first, start)):
            if host != gateway:
                yield ipaddress.IPv4Interface((host, self.subnet.prefixlen))


def plan(bridge: str, subnet: ipaddress.IPv4Network, resolv_conf_text: str) -> Egress:
    """Work out how jobs resolve names from the host's resolv.conf.

    Jobs ask the gateway, whose port 53 is forwarded (DNAT) to the host's first IPv4 name
    server, wherever it is: on loopback (systemd-resolved's 127.0.0.53, which jobs could not
    reach otherwise), on one of the host's addresses, on a link-local address (a cloud's
    169.254.169.254, blocked for anything else), or further away. Other name servers are not
    used (a DNAT rule has one target); IPv6 ones are left out (jobs have no IPv6). ``search``,
    ``domain`` and ``options`` lines are kept. With no IPv4 name server, jobs get none.
    """
    gateway = subnet.network_address + 1
    servers: list[ipaddress.IPv4Address] = []
    kept: list[str] = []
    for raw in resolv_conf_text.splitlines():
        words = raw.split()
        if not words or words[0].startswith(("#", ";")):
            continue
        if words[0] == "nameserver" and len(words) >= 2:
            try:
                address = ipaddress.ip_address(words[1].split("%")[0])
            except ValueError:
                continue
            if isinstance(address, ipaddress.IPv4Address):
                servers.append(address)
        elif words[0] in ("search", "domain", "options"):
            kept.append(" ".join(words))
    resolver = servers[0] if servers else None
    lines = [f"nameserver {gateway}"] if resolver is not None else []
    lines += kept
    return Egress(bridge, subnet, resolver, "".join(f"{line}\n" for line in lines))


def ruleset(egress: Egress) -> str:
    """The nftables table, replaced whole and atomically by one ``nft -f -``."""
    b, table = egress.bridge, egress.table
    blocked = ", ".join(BLOCKED_DESTINATIONS)
    dns = "meta l4proto { udp, tcp } th dport 53"
    dns_accept = dns_nat = ""
    if egress.resolver is not None:
        # Only the gateway's port 53 is forwarded, and only to the resolver: let that through.
        dns_accept = f'        iifname "{b}" ct status dnat {dns} accept\n'
        dns_nat = (
            "    chain prerouting {\n"
            "        type nat hook prerouting priority dstnat; policy accept;\n"
            f'        iifname "{b}" ip daddr {egress.gateway.ip} {dns} '
            f"dnat ip to {egress.resolver}:53\n"
            "    }\n"
        )
        if egress.resolver.is_loopback:  # such resolvers answer local clients only
            dns_nat += (
                "    chain nat_input {\n"
                "        type nat hook input priority 100; policy accept;\n"
                f'        iifname "{b}" ip daddr {egress.resolver} {dns} snat ip to 127.0.0.1\n'
                "    }\n"
            )
    return (
        f"table inet {table}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        "    chain input {\n"
        "        type filter hook input priority filter - 10; policy accept;\n"
        f"{dns_accept}"
        f'        iifname "{b}" drop\n'
        "    }\n"
        "    chain forward {\n"
        "        type filter hook forward priority filter - 10; policy accept;\n"
        # Within the bridge (seen here where br_netfilter is loaded): port isolation decides.
        f'        oifname "{b}" iifname "{b}" accept\n'
        f'        oifname "{b}" ct state established,related accept\n'
        f'        oifname "{b}" drop\n'
        f'        iifname "{b}" meta nfproto ipv6 drop\n'
        f"{dns_accept}"
        f'        iifname "{b}" ip daddr {{ {blocked} }} drop\n'
        "    }\n"
        f"{dns_nat}"
        "    chain postrouting {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f'        ip saddr {egress.subnet} oifname != "{b}" masquerade\n'
        "    }\n"
        "}\n"
    )


def _sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


def setup_host(egress: Egress) -> None:
    """Create (or update) the bridge, the sysctls and the nftables table. Idempotent.

    Runs in the launcher at startup (it may fork ``nft``: it has one thread)."""
    with netlink.Netlink() as nl:
        index = nl.link_index(egress.bridge)
        if index is None:
            index = nl.create_bridge(egress.bridge)
        else:
            kind = next((link.kind for link in nl.links() if link.index == index), "")
            if kind != "bridge":
                raise OSError(f"{egress.bridge} exists and is not a bridge (it is {kind!r})")
        _sysctl(f"net/ipv6/conf/{egress.bridge}/disable_ipv6", "1")
        try:
            nl.add_address(index, egress.gateway)
        except netlink.NetlinkError as exc:
            if exc.errno != 17:  # EEXIST: it has it from an earlier start
                raise
        nl.set_link(index, up=True)
    if egress.resolver is not None:
        _sysctl(f"net/ipv4/conf/{egress.bridge}/route_localnet", "1")
    _sysctl("net/ipv4/ip_forward", "1")
    result = subprocess.run(
        [NFT, "-f", "-"],
        input=ruleset(egress).encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise OSError(f"nft refused the ruleset: {result.stderr.decode(errors='replace').strip()}")


def attach(egress: Egress, job_id: str, init_pid: int) -> None:
    """Give the job whose init is ``init_pid`` its ``eth0``, the other end on the bridge."""
    name = egress.veth_name(job_id)
    with netlink.Netlink() as nl:
        bridge = nl.link_index(egress.bridge)
        if bridge is None:
            raise OSError(f"the egress bridge {egress.bridge} is gone")
        index = nl.create_veth(name, "eth0", peer_netns_pid=init_pid)
        try:
            nl.set_link(index, master=bridge)
            nl.set_bridge_port(index, isolated=True)
            nl.set_link(index, up=True)
        except BaseException:
            nl.delete_link(index)
            raise


def detach(egress: Egress, job_id: str) -> None:
    """Remove the job's veth if it is still there (it also goes with the job's namespace)."""
    with netlink.Netlink() as nl:
        index = nl.link_index(egress.veth_name(job_id))
        if index is not None:
            try:
                nl.delete_link(index)
            except netlink.NetlinkError as exc:
                if exc.errno != 19:  # ENODEV: the namespace took it meanwhile
                    raise


def remove_leftovers(egress: Egress, running: set[str]) -> list[str]:
    """Delete job veths of this bridge whose job is not running; returns their names."""
    removed = []
    with netlink.Netlink() as nl:
        for link in nl.links():
            if link.kind != "veth" or not egress.is_job_veth(link.name):
                continue
            if link.name[len(egress.bridge) + 1 :] in running:
                continue
            try:
                nl.delete_link(link.index)
            except netlink.NetlinkError as exc:
                if exc.errno != 19:
                    raise
            removed.append(link.name)
    return removed


def configure_inside(
    address: ipaddress.IPv4Interface | None, gateway: ipaddress.IPv4Address | None
) -> None:
    """In the job's own network namespace, as its init: ``lo`` up, and for egress ``eth0``
    with its address and the default route through the gateway. No IPv6 for egress jobs."""
    with netlink.Netlink() as nl:
        nl.set_link(1, up=True)  # lo is always index 1 in a new namespace
        if address is None or gateway is None:
            return
        _sysctl("net/ipv6/conf/all/disable_ipv6", "1")
        _sysctl("net/ipv6/conf/default/disable_ipv6", "1")
        index = nl.link_index("eth0")
        if index is None:
            raise OSError("eth0 did not arrive in the job's network namespace")
        nl.add_address(index, address)
        nl.set_link(index, up=True)
        nl.add_default_route(gateway)
