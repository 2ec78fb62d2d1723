"""The egress network's pure parts: the jobs' resolv.conf, the nftables table, addresses, names."""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import subprocess

import pytest

from workernator_runner import config, network

SUBNET = ipaddress.IPv4Network("10.92.0.0/16")
GATEWAY = "10.92.0.1"


def _plan(text: str) -> network.Egress:
    return network.plan("wn0", SUBNET, text)


# --- plan() -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "jobs", "resolver"),
    [
        pytest.param(
            "# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).\n"
            "# Do not edit.\n"
            "\n"
            "nameserver 127.0.0.53\n"
            "options edns0 trust-ad\n"
            "search x\n",
            f"nameserver {GATEWAY}\noptions edns0 trust-ad\nsearch x\n",
            "127.0.0.53",
            id="systemd-resolved",
        ),
        pytest.param(
            "nameserver 192.168.1.1\n"
            "nameserver 127.0.0.1\n"
            "nameserver 8.8.8.8\n"
            "nameserver 127.0.0.53\n",
            f"nameserver {GATEWAY}\n",
            "192.168.1.1",  # the first one, whatever it is; a DNAT rule has one target
            id="loopback and lan",
        ),
        pytest.param(
            "nameserver 1.1.1.1\nnameserver 9.9.9.9\n",
            f"nameserver {GATEWAY}\n",
            "1.1.1.1",
            id="lan only",
        ),
        pytest.param("nameserver ::1\nnameserver fe80::1%eth0\n", "", None, id="ipv6 only"),
        pytest.param(
            "nameserver fe80::1%eth0\nnameserver 2001:4860:4860::8888\nnameserver 1.0.0.1\n",
            f"nameserver {GATEWAY}\n",
            "1.0.0.1",
            id="ipv6 and ipv4",
        ),
        pytest.param(
            "# a comment\n"
            "; another\n"
            "\n"
            "   \n"
            "#nameserver 1.1.1.1\n"
            ";nameserver 127.0.0.53\n"
            "  # nameserver 2.2.2.2\n"
            "nameserver\t9.9.9.9\n"
            "search  a.example   b.example\n",
            f"nameserver {GATEWAY}\nsearch a.example b.example\n",
            "9.9.9.9",
            id="comments and blank lines",
        ),
        pytest.param(
            "nameserver\n"
            "nameserver not-an-address\n"
            "nameserver 300.1.1.1\n"
            "nameserver 10.0.0\n"
            "NAMESERVER 2.2.2.2\n"
            "foo bar\n"
            "sortlist 130.155.160.0/255.255.240.0\n"
            "\x00\xff garbage\n"
            "nameserver 1.1.1.1 trailing words\n",
            f"nameserver {GATEWAY}\n",
            "1.1.1.1",
            id="garbage lines",
        ),
        pytest.param(
            "search example.com\noptions ndots:2\n",
            "search example.com\noptions ndots:2\n",
            None,
            id="no servers",
        ),
        pytest.param("", "", None, id="empty"),
        pytest.param(
            "domain corp.example\nnameserver 10.0.0.2\r\nnameserver 127.0.0.1\r\n",
            f"nameserver {GATEWAY}\ndomain corp.example\n",
            "10.0.0.2",
            id="domain line, crlf",
        ),
    ],
)
def test_plan_derives_the_jobs_resolv_conf(host: str, jobs: str, resolver: str | None) -> None:
    egress = _plan(host)
    assert egress.resolv_conf == jobs
    assert egress.resolver == (None if resolver is None else ipaddress.IPv4Address(resolver))
    assert egress.bridge == "wn0"
    assert egress.subnet == SUBNET


def test_plan_uses_the_subnets_gateway() -> None:
    egress = network.plan(
        "br_x1", ipaddress.IPv4Network("172.30.4.0/24"), "nameserver 127.0.0.53\n"
    )
    assert egress.resolv_conf == "nameserver 172.30.4.1\n"
    assert egress.gateway == ipaddress.IPv4Interface("172.30.4.1/24")
    assert egress.table == "workernator_br_x1"


def test_every_name_server_given_to_jobs_is_reachable_through_the_ruleset() -> None:
    egress = _plan("nameserver 169.254.169.254\nsearch c.project.internal\n")
    blocked = [ipaddress.IPv4Network(n) for n in network.BLOCKED_DESTINATIONS]
    for line in egress.resolv_conf.splitlines():
        if line.startswith("nameserver "):
            server = ipaddress.IPv4Address(line.split()[1])
            assert not any(server in net for net in blocked), line


# --- ruleset() --------------------------------------------------------------------------------


def _chains(text: str) -> dict[str, list[str]]:
    """The rules of each chain, without the chain's type line, stripped."""
    chains: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("    chain ") and line.endswith(" {"):
            current = chains.setdefault(line.split()[1], [])
        elif line == "    }":
            current = None
        elif current is not None and not line.strip().startswith("type "):
            current.append(line.strip())
    return chains


def _chain_types(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("type ")]


LOOPBACK = _plan("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
DIRECT = _plan("nameserver 192.168.1.1\n")  # forwarded too, but no source rewriting
NONE = _plan("search example.com\n")  # no name server at all


@pytest.mark.parametrize("egress", [LOOPBACK, DIRECT], ids=["loopback resolver", "direct"])
def test_ruleset_replaces_the_table_atomically(egress: network.Egress) -> None:
    lines = network.ruleset(egress).splitlines()
    # create (so the delete cannot fail), delete, define: one transaction of one nft -f
    assert lines[:3] == [
        "table inet workernator_wn0",
        "delete table inet workernator_wn0",
        "table inet workernator_wn0 {",
    ]
    assert lines[-1] == "}"
    assert sum(line.startswith("table ") for line in lines) == 2
    assert sum(line.startswith("delete ") for line in lines) == 1


@pytest.mark.parametrize(
    "egress", [LOOPBACK, DIRECT, NONE], ids=["loopback resolver", "lan resolver", "none"]
)
def test_ruleset_drops_everything_from_the_bridge_to_the_host(egress: network.Egress) -> None:
    text = network.ruleset(egress)
    rules = _chains(text)["input"]
    assert rules[-1] == 'iifname "wn0" drop'
    others = rules[:-1]
    if egress.resolver is None:
        assert others == []
    else:  # only DNS that the prerouting chain forwarded to the resolver
        assert others == [
            'iifname "wn0" ct status dnat meta l4proto { udp, tcp } th dport 53 accept'
        ]
    # the chain runs before the host's own filter rules, and does not touch other traffic
    assert "type filter hook input priority filter - 10; policy accept;" in _chain_types(text)


@pytest.mark.parametrize("egress", [LOOPBACK, DIRECT], ids=["loopback resolver", "direct"])
def test_ruleset_forward_drops_loopback_link_local_and_ipv6(egress: network.Egress) -> None:
    rules = _chains(network.ruleset(egress))["forward"]
    blocked = [r for r in rules if r.startswith('iifname "wn0" ip daddr {') and r.endswith("drop")]
    assert len(blocked) == 1
    destinations = blocked[0].split("{")[1].split("}")[0].replace(" ", "").split(",")
    for net in ("127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"):
        assert net in destinations
    assert 'iifname "wn0" meta nfproto ipv6 drop' in rules
    # nothing from outside reaches a job, but answers
    established = rules.index('oifname "wn0" ct state established,related accept')
    assert rules.index('oifname "wn0" drop') == established + 1
    # no rule accepts the jobs' traffic before the drops (the policy lets the rest out), but
    # DNS forwarded to the resolver, which may be link-local (a cloud's 169.254.169.254)
    dns = 'iifname "wn0" ct status dnat meta l4proto { udp, tcp } th dport 53 accept'
    accepted = [r for r in rules if r.startswith('iifname "wn0"') and r.endswith("accept")]
    assert accepted == [dns]
    assert rules.index(dns) < rules.index(blocked[0])


@pytest.mark.parametrize("egress", [LOOPBACK, DIRECT], ids=["loopback resolver", "direct"])
def test_ruleset_masquerades_only_the_subnet_leaving_elsewhere(egress: network.Egress) -> None:
    text = network.ruleset(egress)
    assert _chains(text)["postrouting"] == ['ip saddr 10.92.0.0/16 oifname != "wn0" masquerade']
    assert text.count("masquerade") == 1
    assert "type nat hook postrouting priority srcnat; policy accept;" in _chain_types(text)


def test_ruleset_forwards_dns_to_a_loopback_resolver() -> None:
    text = network.ruleset(LOOPBACK)
    chains = _chains(text)
    assert chains["prerouting"] == [
        f'iifname "wn0" ip daddr {GATEWAY} meta l4proto {{ udp, tcp }} th dport 53 '
        "dnat ip to 127.0.0.53:53"
    ]
    assert chains["nat_input"] == [
        'iifname "wn0" ip daddr 127.0.0.53 meta l4proto { udp, tcp } th dport 53 '
        "snat ip to 127.0.0.1"
    ]
    assert "type nat hook prerouting priority dstnat; policy accept;" in _chain_types(text)
    assert "type nat hook input priority 100; policy accept;" in _chain_types(text)


def test_ruleset_forwards_dns_without_rewriting_the_source_to_another_resolver() -> None:
    chains = _chains(network.ruleset(DIRECT))
    assert set(chains) == {"input", "forward", "prerouting", "postrouting"}
    assert chains["prerouting"] == [
        f'iifname "wn0" ip daddr {GATEWAY} meta l4proto {{ udp, tcp }} th dport 53 '
        "dnat ip to 192.168.1.1:53"
    ]


def test_ruleset_has_no_dns_rules_without_a_name_server() -> None:
    text = network.ruleset(NONE)
    assert set(_chains(text)) == {"input", "forward", "postrouting"}
    assert "dnat" not in text
    assert "snat" not in text
    assert "dport 53" not in text


def test_ruleset_follows_the_bridge_and_subnet() -> None:
    egress = network.plan("br_x1", ipaddress.IPv4Network("172.30.4.0/24"), "nameserver ::1\n")
    text = network.ruleset(egress)
    assert "wn0" not in text
    assert "10.92." not in text
    assert 'ip saddr 172.30.4.0/24 oifname != "br_x1" masquerade' in text
    assert 'iifname "br_x1" drop' in text


def _nft_check(text: str) -> subprocess.CompletedProcess[bytes]:
    nft = shutil.which("nft")
    assert nft is not None
    return subprocess.run(
        [nft, "--check", "-f", "-"], input=text.encode(), capture_output=True, timeout=30
    )


@pytest.mark.privileged
def test_nft_accepts_the_ruleset() -> None:
    """``nft --check`` parses and evaluates the ruleset in the kernel, committing nothing."""
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    assert os.geteuid() == 0
    for egress in (
        LOOPBACK,
        DIRECT,
        network.plan("abcdefgh", ipaddress.IPv4Network("172.30.4.0/28"), ""),
    ):
        result = _nft_check(network.ruleset(egress))
        assert result.returncode == 0, result.stderr.decode()
    # and the check does check
    broken = network.ruleset(DIRECT).replace("masquerade", "masqurade")
    assert _nft_check(broken).returncode != 0


# --- addresses and names ----------------------------------------------------------------------


@pytest.mark.parametrize("subnet", ["10.0.0.0/28", "172.30.4.0/24", "10.92.0.0/22"])
def test_addresses_skip_network_gateway_and_broadcast(subnet: str) -> None:
    net = ipaddress.IPv4Network(subnet)
    egress = network.Egress("wn0", net, None, "")
    addresses = list(egress.addresses())
    ips = [a.ip for a in addresses]
    assert {a.network for a in addresses} == {net}
    assert net.network_address not in ips
    assert net.broadcast_address not in ips
    assert egress.gateway.ip not in ips
    assert ips == sorted(ips)
    assert len(set(ips)) == len(ips) == net.num_addresses - 3
    assert ips[0] == net.network_address + 2
    assert ips[-1] == net.broadcast_address - 1


def test_addresses_of_a_large_subnet_start_after_the_gateway() -> None:
    egress = network.Egress("wn0", SUBNET, None, "")
    first = [str(a) for a in itertools.islice(egress.addresses(), 3)]
    assert first == ["10.92.0.2/16", "10.92.0.3/16", "10.92.0.4/16"]
    assert egress.gateway == ipaddress.IPv4Interface("10.92.0.1/16")


def test_veth_names_fit_in_ifnamsiz() -> None:
    longest = "b" * 8
    assert config.parse({"runner": {"egress_bridge": longest}}).egress_bridge == longest
    egress = network.Egress(longest, SUBNET, None, "")
    name = egress.veth_name("XE38YM")
    assert name == "bbbbbbbb-XE38YM"
    assert len(name.encode()) <= 15  # IFNAMSIZ is 16 with the NUL
    assert egress.is_job_veth(name)
    assert not egress.is_job_veth(longest)
    assert not egress.is_job_veth("bbbbbbbbb-XE38YM")
    assert not network.Egress("wn0", SUBNET, None, "").is_job_veth("wn00-XE38YM")


def test_addresses_after_one_go_round_the_subnet_back_to_it() -> None:
    egress = network.Egress("wn0", ipaddress.IPv4Network("10.0.0.0/28"), None, "")
    everything = [str(a) for a in egress.addresses()]
    after = ipaddress.IPv4Interface("10.0.0.9/28")
    assert [str(a) for a in egress.addresses(after=after)] == everything[8:] + everything[:8]
    last = ipaddress.IPv4Interface("10.0.0.14/28")  # the last: round to the first
    assert [str(a) for a in egress.addresses(after=last)] == everything
    outside = ipaddress.IPv4Interface("192.0.2.7/28")  # not of this subnet: from the first
    assert [str(a) for a in egress.addresses(after=outside)] == everything


def test_the_next_address_is_found_in_one_step_however_many_jobs_hold_one() -> None:
    """The runner hands addresses out from the last one given: with a thousand held, finding
    a free one looks at one candidate, not a thousand (a start must not slow down with the
    number of running jobs)."""
    egress = network.Egress("wn0", ipaddress.IPv4Network("10.0.0.0/20"), None, "")
    held = set(itertools.islice(egress.addresses(), 1000))
    last = max(held, key=lambda a: a.ip)
    looked = 0
    for candidate in egress.addresses(after=last):
        looked += 1
        if candidate not in held:
            break
    assert looked == 1
    assert candidate.ip == last.ip + 1
