"""The rtnetlink client without the kernel: encoding, parsing, and how strictly it takes replies
(a scripted fake socket stands in for the kernel)."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workernator_runner import netlink as nl
from workernator_runner.netlink import Link, Malformed, Message, Netlink, NetlinkError

PORT = 4242  # the port id the fake kernel gives the socket
IFINFO = struct.Struct("=BxHiII")
ERROR_HEAD = struct.Struct("=i")


# -- names


@pytest.mark.parametrize("name", ["a", "eth0", "wn0-0123456789a", "br_x.1", "x" * 15])
def test_good_names_are_taken_as_they_are(name: str) -> None:
    assert nl.validate_name(name) == name.encode()


@pytest.mark.parametrize(
    "name",
    ["", "x" * 16, "a/b", "a b", "a\tb", "a\nb", "a\0b", "a:b", "veth%d", ".", "..", "é", "a\x7f"],
)
def test_bad_names_are_refused_clearly(name: str) -> None:
    with pytest.raises(ValueError, match="bad interface name"):
        nl.validate_name(name)


def test_no_request_is_sent_for_a_bad_name() -> None:
    kernel = FakeKernel([])  # any send fails the test
    link = connect(kernel)
    with pytest.raises(ValueError, match="bad interface name"):
        link.create_bridge("bad name")
    with pytest.raises(ValueError, match="bad interface name"):
        link.create_veth("ok", "x" * 16)
    with pytest.raises(ValueError, match="bad interface name"):
        link.link_index("a/b")
    with pytest.raises(ValueError, match="not both"):
        link.create_veth("a", "b", peer_netns_pid=1, peer_netns_fd=3)
    with pytest.raises(ValueError, match="nothing to set"):
        link.set_link(3)
    with pytest.raises(ValueError, match="bad interface index"):
        link.delete_link(0)
    assert kernel.requests == []


# -- attributes and messages

attr_lists = st.lists(st.tuples(st.integers(0, 0x3FFF), st.binary(max_size=40)), max_size=8)


@given(attr_lists)
def test_attributes_round_trip_padded_to_4_bytes(attrs: list[tuple[int, bytes]]) -> None:
    packed = [nl.pack_attr(kind, payload) for kind, payload in attrs]
    assert all(len(p) % 4 == 0 for p in packed)
    assert nl.parse_attrs(b"".join(packed)) == dict(attrs)  # the last of a type counts


def test_attribute_flag_bits_are_masked_off() -> None:
    nested = nl.pack_attr(0x8000 | nl.IFLA_LINKINFO, b"abcd")
    assert nl.parse_attrs(nested) == {nl.IFLA_LINKINFO: b"abcd"}


@pytest.mark.parametrize(
    "data",
    [
        b"\x08\x00",  # half a header
        struct.pack("=HH", 3, 1),  # shorter than its header
        struct.pack("=HH", 12, 1) + b"abcd",  # longer than what is there
        nl.pack_attr(1, b"abcd") + b"\0\0",  # stray bytes
    ],
)
def test_malformed_attributes_are_refused(data: bytes) -> None:
    with pytest.raises(Malformed):
        nl.parse_attrs(data)


def test_strings_must_be_nul_terminated_once() -> None:
    assert nl.parse_str(b"eth0\0") == "eth0"
    for bad in (b"eth0", b"et\0h0\0", b""):
        with pytest.raises(Malformed):
            nl.parse_str(bad)
    with pytest.raises(Malformed):
        nl.parse_u32(b"\1\0\0")


def test_messages_round_trip() -> None:
    one = nl.pack_message(nl.RTM_NEWLINK, 2, 7, b"abcd")
    two = nl.pack_message(nl.NLMSG_DONE, 2, 7, b"\0\0\0\0")
    assert nl.parse_messages(one + two) == [
        Message(nl.RTM_NEWLINK, 2, 7, 0, b"abcd"),
        Message(nl.NLMSG_DONE, 2, 7, 0, b"\0\0\0\0"),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"\0" * 8,  # half a header
        struct.pack("=IHHII", 15, 3, 0, 1, 0),  # shorter than its header
        struct.pack("=IHHII", 24, 3, 0, 1, 0) + b"abcd",  # longer than what is there
    ],
)
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(Malformed):
        nl.parse_messages(data)


def error_message(code: int, text: str = "", *, capped: bool = True, seq: int = 1) -> Message:
    request = nl.pack_message(nl.RTM_NEWLINK, 5, seq, b"x" * 16)
    payload = ERROR_HEAD.pack(-code) + (request[:16] if capped else request)
    flags = nl.NLM_F_CAPPED if capped else 0
    if text:
        payload += nl.pack_attr(1, text.encode() + b"\0")  # NLMSGERR_ATTR_MSG
        flags |= nl.NLM_F_ACK_TLVS
    return Message(nl.NLMSG_ERROR, flags, seq, PORT, payload)


def test_errors_and_acks_are_decoded_with_the_kernels_explanation() -> None:
    assert nl.parse_error(error_message(0)) == (0, "")
    assert nl.parse_error(error_message(errno.EEXIST)) == (errno.EEXIST, "")
    assert nl.parse_error(error_message(errno.EINVAL, "bad thing")) == (errno.EINVAL, "bad thing")
    uncapped = error_message(errno.EINVAL, "bad thing", capped=False)
    assert nl.parse_error(uncapped) == (errno.EINVAL, "bad thing")


def test_malformed_errors_are_refused() -> None:
    with pytest.raises(Malformed):
        nl.parse_error(Message(nl.NLMSG_ERROR, 0, 1, PORT, b"\0" * 19))
    with pytest.raises(Malformed, match="positive"):
        nl.parse_error(Message(nl.NLMSG_ERROR, 0x100, 1, PORT, ERROR_HEAD.pack(5) + b"\0" * 16))


def link_payload(
    index: int, name: str, *, kind: str = "", master: int = 0, up: bool = False
) -> bytes:
    attrs = nl.pack_attr(nl.IFLA_IFNAME, name.encode() + b"\0")
    if kind:
        info = nl.pack_attr(nl.IFLA_INFO_KIND, kind.encode() + b"\0")
        attrs += nl.pack_attr(nl.IFLA_LINKINFO | 0x8000, info)
    if master:
        attrs += nl.pack_attr(nl.IFLA_MASTER, struct.pack("=I", master))
    return IFINFO.pack(0, 1, index, 0x1043 if up else 0x1002, 0) + attrs


def test_links_are_decoded() -> None:
    assert nl.parse_link(link_payload(1, "lo", up=True)) == Link(1, "lo", "", 0, True)
    veth = link_payload(7, "wn0-a", kind="veth", master=5)
    assert nl.parse_link(veth) == Link(7, "wn0-a", "veth", 5, False)
    with pytest.raises(Malformed, match="no name"):
        nl.parse_link(IFINFO.pack(0, 1, 3, 0, 0))
    with pytest.raises(Malformed):
        nl.parse_link(b"\0" * 15)


# -- the exchange, against a scripted kernel

Reply = Callable[[int], list[bytes]]  # request's seq -> the datagrams the kernel answers


class FakeKernel:
    """Stands in for the socket: records requests, answers each with the next scripted reply."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.requests: list[Message] = []
        self.queue: list[tuple[bytes, int, int]] = []  # datagram, msg_flags, sender port
        self.closed = False

    def sendto(self, data: bytes, address: tuple[int, int]) -> int:
        assert address == (0, 0)
        (request,) = nl.parse_messages(data)
        self.requests.append(request)
        assert self.replies, f"unexpected request {request}"
        for datagram in self.replies.pop(0)(request.seq):
            self.queue.append((datagram, 0, 0))
        return len(data)

    def recvmsg(self, size: int) -> tuple[bytes, list[object], int, tuple[int, int]]:
        assert size == 64 * 1024
        if not self.queue:
            raise TimeoutError("timed out")
        data, flags, sender = self.queue.pop(0)
        return data, [], flags, (sender, 0)

    def close(self) -> None:
        self.closed = True


def connect(kernel: FakeKernel) -> Netlink:
    link = Netlink()
    assert link._sock is not None
    link._sock.close()
    link._sock = cast(socket.socket, kernel)
    link._port = PORT
    return link


def msg(kind: int, flags: int, seq: int, payload: bytes, port: int = PORT) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, port) + payload


def error_datagram(seq: int, code: int = 0, text: str = "") -> bytes:
    error = error_message(code, text, seq=seq)
    return msg(error.type, error.flags, seq, error.payload)


def ack(code: int = 0, text: str = "") -> Reply:
    return lambda seq: [error_datagram(seq, code, text)]


def test_a_change_is_acked_and_sequence_numbers_increase() -> None:
    kernel = FakeKernel([ack(), ack()])
    link = connect(kernel)
    link.set_link(3, up=True, master=5)
    link.delete_link(3)
    setlink, dellink = kernel.requests
    assert (setlink.type, setlink.flags) == (nl.RTM_SETLINK, nl.NLM_F_REQUEST | nl.NLM_F_ACK)
    assert IFINFO.unpack_from(setlink.payload) == (0, 0, 3, nl.IFF_UP, nl.IFF_UP)
    assert nl.parse_attrs(setlink.payload[16:]) == {nl.IFLA_MASTER: struct.pack("=I", 5)}
    assert (dellink.type, dellink.seq) == (nl.RTM_DELLINK, setlink.seq + 1)


def test_set_link_down_and_release_from_master() -> None:
    kernel = FakeKernel([ack()])
    connect(kernel).set_link(3, up=False, master=0)
    (request,) = kernel.requests
    assert IFINFO.unpack_from(request.payload) == (0, 0, 3, 0, nl.IFF_UP)
    assert nl.parse_attrs(request.payload[16:]) == {nl.IFLA_MASTER: b"\0\0\0\0"}


def lookup(index: int, name: str) -> Reply:
    return lambda seq: [
        msg(nl.RTM_NEWLINK, 0, seq, link_payload(index, name)) + error_datagram(seq),
    ]


def test_create_veth_encodes_the_peer_and_its_namespace() -> None:
    kernel = FakeKernel([ack(), lookup(9, "wn0-a")])
    assert connect(kernel).create_veth("wn0-a", "eth0", peer_netns_fd=7) == 9
    create, get = kernel.requests
    creating = nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE | nl.NLM_F_EXCL
    assert (create.type, create.flags) == (nl.RTM_NEWLINK, creating)
    attrs = nl.parse_attrs(create.payload[16:])
    assert attrs[nl.IFLA_IFNAME] == b"wn0-a\0"
    info = nl.parse_attrs(attrs[nl.IFLA_LINKINFO])
    assert info[nl.IFLA_INFO_KIND] == b"veth\0"
    peer = nl.parse_attrs(info[nl.IFLA_INFO_DATA])[nl.VETH_INFO_PEER]
    assert IFINFO.unpack_from(peer) == (0, 0, 0, 0, 0)
    assert nl.parse_attrs(peer[16:]) == {
        nl.IFLA_IFNAME: b"eth0\0",
        nl.IFLA_NET_NS_FD: struct.pack("=I", 7),
    }
    assert (get.type, nl.parse_attrs(get.payload[16:])) == (
        nl.RTM_GETLINK,
        {nl.IFLA_IFNAME: b"wn0-a\0"},
    )


def test_create_veth_with_a_pid_namespace() -> None:
    kernel = FakeKernel([ack(), lookup(9, "v")])
    connect(kernel).create_veth("v", "p", peer_netns_pid=1234)
    info = nl.parse_attrs(nl.parse_attrs(kernel.requests[0].payload[16:])[nl.IFLA_LINKINFO])
    peer = nl.parse_attrs(info[nl.IFLA_INFO_DATA])[nl.VETH_INFO_PEER]
    assert nl.parse_attrs(peer[16:])[nl.IFLA_NET_NS_PID] == struct.pack("=I", 1234)


def test_set_bridge_port_isolated_is_encoded_as_ip_does() -> None:
    kernel = FakeKernel([ack()])
    connect(kernel).set_bridge_port(4, isolated=True)
    (request,) = kernel.requests
    assert (request.type, request.flags) == (nl.RTM_NEWLINK, nl.NLM_F_REQUEST | nl.NLM_F_ACK)
    assert IFINFO.unpack_from(request.payload)[2] == 4
    info = nl.parse_attrs(nl.parse_attrs(request.payload[16:])[nl.IFLA_LINKINFO])
    assert info[nl.IFLA_INFO_SLAVE_KIND] == b"bridge\0"
    assert nl.parse_attrs(info[nl.IFLA_INFO_SLAVE_DATA]) == {nl.IFLA_BRPORT_ISOLATED: b"\1"}


def test_add_address_and_default_route_are_encoded() -> None:
    kernel = FakeKernel([ack(), ack(), ack()])
    link = connect(kernel)
    link.add_address(4, ipaddress.IPv4Interface("10.1.2.3/24"))
    link.add_address(4, ipaddress.IPv4Interface("10.9.9.9/32"))
    link.add_default_route(ipaddress.IPv4Address("10.1.2.1"))
    address, host, route = kernel.requests
    assert address.type == nl.RTM_NEWADDR
    assert struct.unpack_from("=BBBBI", address.payload) == (socket.AF_INET, 24, 0, 0, 4)
    assert nl.parse_attrs(address.payload[8:]) == {
        nl.IFA_LOCAL: bytes([10, 1, 2, 3]),
        nl.IFA_ADDRESS: bytes([10, 1, 2, 3]),
        nl.IFA_BROADCAST: bytes([10, 1, 2, 255]),
    }
    assert nl.IFA_BROADCAST not in nl.parse_attrs(host.payload[8:])
    assert route.type == nl.RTM_NEWROUTE
    assert struct.unpack_from("=BBBBBBBBI", route.payload) == (
        socket.AF_INET,
        0,
        0,
        0,
        nl.RT_TABLE_MAIN,
        nl.RTPROT_BOOT,
        0,
        nl.RTN_UNICAST,
        0,
    )
    assert nl.parse_attrs(route.payload[12:]) == {nl.RTA_GATEWAY: bytes([10, 1, 2, 1])}


def dump(*datagrams: list[bytes], intr: bool = False) -> Reply:
    """A dump reply: each datagram holds the given link payloads, NLMSG_DONE ends the last."""
    multi = nl.NLM_F_MULTI | (nl.NLM_F_DUMP_INTR if intr else 0)

    def reply(seq: int) -> list[bytes]:
        out = [b"".join(msg(nl.RTM_NEWLINK, multi, seq, p) for p in links) for links in datagrams]
        out[-1] += msg(nl.NLMSG_DONE, multi, seq, b"\0\0\0\0")
        return out

    return reply


def test_a_dump_reads_every_datagram_until_done() -> None:
    lo, eth0, br = (
        link_payload(1, "lo", up=True),
        link_payload(2, "eth0"),
        link_payload(3, "br", kind="bridge"),
    )
    kernel = FakeKernel([dump([lo, eth0], [br])])
    assert connect(kernel).links() == [
        Link(1, "lo", "", 0, True),
        Link(2, "eth0", "", 0, False),
        Link(3, "br", "bridge", 0, False),
    ]
    (request,) = kernel.requests
    expected = nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_DUMP
    assert (request.type, request.flags, request.payload) == (nl.RTM_GETLINK, expected, bytes(16))


def test_a_dump_interrupted_by_changes_is_read_to_its_end_and_retried() -> None:
    lo = link_payload(1, "lo")
    kernel = FakeKernel([dump([lo], [lo], intr=True), dump([lo])])
    link = connect(kernel)
    assert link.links() == [Link(1, "lo", "", 0, False)]
    assert len(kernel.requests) == 2
    kernel = FakeKernel([dump([lo], intr=True)] * 3)
    link = connect(kernel)
    with pytest.raises(NetlinkError, match="links changed during the dump") as e:
        link.links()
    assert e.value.errno == errno.EINTR
    assert kernel.queue == []  # each dump was read to its end


def test_a_failed_dump_reports_the_kernels_error() -> None:
    kernel = FakeKernel([lambda seq: [error_datagram(seq, errno.EINVAL, "strict check failed")]])
    with pytest.raises(NetlinkError) as e:
        connect(kernel).links()
    assert e.value.errno == errno.EINVAL
    assert e.value.strerror == "list links: Invalid argument (strict check failed)"


def test_a_lookup_of_a_missing_link_is_none() -> None:
    kernel = FakeKernel([ack(errno.ENODEV), lookup(5, "other")])
    link = connect(kernel)
    assert link.link_index("missing") is None
    assert link.link_index("alias") is None  # found by an alternative name: not its name


def test_a_kernel_error_names_the_operation_and_leaves_the_socket_usable() -> None:
    kernel = FakeKernel([ack(errno.EEXIST), ack()])
    link = connect(kernel)
    with pytest.raises(NetlinkError) as e:
        link.create_bridge("wn0")
    assert e.value.errno == errno.EEXIST
    assert e.value.strerror == "create bridge wn0: File exists"
    link.delete_link(5)
    assert not kernel.closed


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (lambda seq: [error_datagram(seq + 1)], "sequence number"),
        (lambda seq: [msg(nl.NLMSG_ERROR, 0x100, seq, bytes(20), port=PORT + 1)], "for port"),
        (
            lambda seq: [msg(nl.RTM_NEWLINK, 0, seq, link_payload(1, "lo")) + error_datagram(seq)],
            "unexpected message of type 16",
        ),
        (lambda seq: [error_datagram(seq) + error_datagram(seq)], "after the end"),
        (lambda seq: [msg(nl.NLMSG_DONE, 2, seq, bytes(4))], "unexpected message of type 3"),
        (lambda seq: [msg(4, 0, seq, b"")], "unexpected message of type 4"),  # NLMSG_OVERRUN
        (lambda seq: [error_datagram(seq)[:-1]], "does not fit"),
        (lambda seq: [b""], "empty datagram"),
    ],
)
def test_a_reply_that_breaks_the_protocol_is_an_error_and_closes_the_socket(
    reply: Reply, problem: str
) -> None:
    kernel = FakeKernel([reply])
    link = connect(kernel)
    with pytest.raises(NetlinkError, match=f"delete link 3: .*{problem}") as e:
        link.delete_link(3)
    assert e.value.errno == errno.EPROTO
    assert kernel.closed
    with pytest.raises(NetlinkError, match="closed") as e:
        link.delete_link(3)
    assert e.value.errno == errno.EBADF


def test_no_reply_in_time_is_an_error_and_closes_the_socket() -> None:
    kernel = FakeKernel([lambda seq: []])  # the fake's recvmsg times out at once
    with pytest.raises(NetlinkError, match="delete link 3: no reply in") as e:
        connect(kernel).delete_link(3)
    assert e.value.errno == errno.ETIMEDOUT
    assert kernel.closed


def test_a_truncated_datagram_or_one_not_from_the_kernel_is_an_error() -> None:
    for flags, sender, problem in [(socket.MSG_TRUNC, 0, "over 65536 bytes"), (0, 77, "port 77")]:
        kernel = FakeKernel([lambda seq: []])
        link = connect(kernel)
        kernel.queue.append((error_datagram(1), flags, sender))
        with pytest.raises(NetlinkError, match=problem) as e:
            link.delete_link(3)
        assert e.value.errno == errno.EPROTO


def test_a_lookup_must_answer_exactly_one_link() -> None:
    kernel = FakeKernel([ack()])
    with pytest.raises(NetlinkError, match="0 links in reply to a lookup"):
        connect(kernel).link_index("eth0")


def test_a_dump_message_must_be_flagged_multi() -> None:
    kernel = FakeKernel([lambda seq: [msg(nl.RTM_NEWLINK, 0, seq, link_payload(1, "lo"))]])
    with pytest.raises(NetlinkError, match="a link message with flags 0x0"):
        connect(kernel).links()
