"""A small rtnetlink client (NETLINK_ROUTE, standard library only).

The runner uses it to give jobs a network: a bridge on the host, one veth pair per job whose
peer end goes straight into the job's network namespace, an address and a default route. Only
the few requests it needs are here, and each is checked strictly: every request asks for an
ack, every reply must come from the kernel to this socket with the request's sequence number and
an expected type, reads are bounded, and anything else is an error that also closes the socket
(it might hold the rest of a reply no later request must mistake for its own).

The formats are those of <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>,
<linux/if_addr.h> and <linux/veth.h>: integers in host byte order, IPv4 addresses in network
order, attributes (type-length-value) padded to 4 bytes.

A Netlink is not thread-safe: give each thread its own.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple

# <linux/netlink.h>
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10  # errors do not echo our request back
_NETLINK_EXT_ACK = 11  # errors may carry the kernel's explanation (NLMSGERR_ATTR_MSG)
_NETLINK_GET_STRICT_CHK = 12  # the kernel rejects dump requests it would not fully honour
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in an error: the request is not echoed
NLM_F_ACK_TLVS = 0x200  # in an error or NLMSG_DONE: attributes follow
_NLMSGERR_ATTR_MSG = 1
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

# <linux/rtnetlink.h>, <linux/if_link.h>, <linux/if_addr.h>, <linux/veth.h>
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
IFLA_IFNAME = 3
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_NET_NS_PID = 19
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_INFO_SLAVE_KIND = 4
IFLA_INFO_SLAVE_DATA = 5
IFLA_BRPORT_ISOLATED = 33
VETH_INFO_PEER = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3  # what `ip route add` uses
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
IFF_UP = 0x1

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, port id
_ATTR = struct.Struct("=HH")  # rtattr/nlattr: length, type
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefix length, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst/src len, tos, table, protocol,
#                                              scope, type, flags
_INT = struct.Struct("=i")
_U32 = struct.Struct("=I")

_RECV_SIZE = 64 * 1024  # bigger than any datagram the kernel sends here (dumps use <= 32 KiB)
# Only replies to our one outstanding request arrive (the socket joins no multicast group):
# room for a few of the largest dump datagrams is plenty.
_RCVBUF = 256 * 1024
# rtnetlink requests are carried out within send(), so the reply is queued when recv() starts;
# the timeout only bounds the wait should the kernel, against its contract, never answer.
_TIMEOUT = 30.0
_DUMP_ATTEMPTS = 3  # a dump interrupted by concurrent changes is retried this many times
_IFNAME_MAX = 15  # IFNAMSIZ less the NUL


class NetlinkError(OSError):
    """The kernel refused a request (errno is its error), or the exchange itself failed."""


class Malformed(Exception):
    """A message that breaks the netlink protocol; reported as NetlinkError(EPROTO)."""


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str  # "veth", "bridge", ... ; "" when the link has no IFLA_INFO_KIND (lo, most NICs)
    master: int  # ifindex of the master (a bridge), 0 if none
    up: bool  # IFF_UP: administratively up


class Message(NamedTuple):
    type: int
    flags: int
    seq: int
    port: int
    payload: bytes


def validate_name(name: str) -> bytes:
    """The interface name as the kernel takes it, or ValueError.

    Stricter than the kernel's own check: 1 to 15 printable ASCII characters (so no
    whitespace, NUL or control characters), none of '/' and ':' (which the kernel refuses) nor
    '%' (which it would take as a template such as "veth%d" and replace by a number), and not
    "." or "..".
    """
    if (
        not 1 <= len(name) <= _IFNAME_MAX
        or name in (".", "..")
        or any(not "!" <= c <= "~" or c in "/:%" for c in name)
    ):
        raise ValueError(
            f"bad interface name {name!r}: need 1 to {_IFNAME_MAX} printable ASCII characters,"
            " none of / : %, and not . or .."
        )
    return name.encode("ascii")


def _align(length: int) -> int:
    return (length + 3) & ~3


def pack_attr(kind: int, payload: bytes) -> bytes:
    """One attribute: header, payload, zero padding to 4 bytes."""
    length = _ATTR.size + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"netlink attribute {kind} too long: {len(payload)} bytes")
    return _ATTR.pack(length, kind) + payload + bytes(_align(length) - length)


def _str_attr(kind: int, value: bytes) -> bytes:
    return pack_attr(kind, value + b"\0")


def _u32_attr(kind: int, value: int) -> bytes:
    return pack_attr(kind, _U32.pack(value))


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes by type (flag bits masked off) to payload (padding removed); for a type
    given twice the last one counts, as in the kernel. Raises Malformed."""
    attrs: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if len(data) - pos < _ATTR.size:
            raise Malformed(f"{len(data) - pos} stray bytes after the attributes")
        length, kind = _ATTR.unpack_from(data, pos)
        if length < _ATTR.size or pos + length > len(data):
            raise Malformed(f"attribute {kind} of length {length} does not fit its message")
        attrs[kind & _NLA_TYPE_MASK] = data[pos + _ATTR.size : pos + length]
        pos += _align(length)
    return attrs


def parse_str(value: bytes) -> str:
    """A NUL-terminated string attribute. Raises Malformed."""
    if not value.endswith(b"\0") or b"\0" in value[:-1]:
        raise Malformed(f"string attribute {value!r} is not NUL-terminated")
    return os.fsdecode(value[:-1])


def parse_u32(value: bytes) -> int:
    """A 32-bit attribute. Raises Malformed."""
    if len(value) != _U32.size:
        raise Malformed(f"32-bit attribute of {len(value)} bytes")
    return int(_U32.unpack(value)[0])


def pack_message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """A request: header (the port id 0 lets the kernel fill in ours) and body."""
    return _HEADER.pack(_HEADER.size + len(body), kind, flags, seq, 0) + body


def parse_messages(data: bytes) -> list[Message]:
    """The messages of one datagram. Raises Malformed."""
    messages = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _HEADER.size:
            raise Malformed(f"{len(data) - pos} stray bytes after the messages")
        length, kind, flags, seq, port = _HEADER.unpack_from(data, pos)
        if length < _HEADER.size or pos + length > len(data):
            raise Malformed(f"message of type {kind} and length {length} does not fit")
        messages.append(Message(kind, flags, seq, port, data[pos + _HEADER.size : pos + length]))
        pos += _align(length)
    return messages


def parse_error(message: Message) -> tuple[int, str]:
    """(errno, the kernel's explanation or "") of an NLMSG_ERROR; errno 0 is an ack.
    Raises Malformed."""
    payload = message.payload
    if len(payload) < _INT.size + _HEADER.size:
        raise Malformed(f"error message of {len(payload)} bytes")
    (error,) = _INT.unpack_from(payload)
    if error > 0:
        raise Malformed(f"error message with a positive error {error}")
    tlvs = _INT.size + _HEADER.size  # struct nlmsgerr
    if not message.flags & NLM_F_CAPPED:  # the request is echoed in full
        tlvs = _INT.size + _align(_HEADER.unpack_from(payload, _INT.size)[0])
        if tlvs > len(payload):
            raise Malformed("error message shorter than the request it echoes")
    return -error, _explanation(message, payload[tlvs:])


def parse_done(message: Message) -> tuple[int, str]:
    """(errno, the kernel's explanation or "") of the NLMSG_DONE that ends a dump; errno 0 is
    success. Raises Malformed."""
    if len(message.payload) < _INT.size:
        raise Malformed(f"done message of {len(message.payload)} bytes")
    (error,) = _INT.unpack_from(message.payload)
    if error > 0:
        raise Malformed(f"done message with a positive error {error}")
    return -error, _explanation(message, message.payload[_INT.size :])


def _explanation(message: Message, tlvs: bytes) -> str:
    if not message.flags & NLM_F_ACK_TLVS:
        return ""
    text = parse_attrs(tlvs).get(_NLMSGERR_ATTR_MSG)
    return "" if text is None else parse_str(text)


def parse_link(payload: bytes) -> Link:
    """An RTM_NEWLINK message's body. Raises Malformed."""
    if len(payload) < _IFINFO.size:
        raise Malformed(f"link message of {len(payload)} bytes")
    _family, _type, index, flags, _change = _IFINFO.unpack_from(payload)
    attrs = parse_attrs(payload[_IFINFO.size :])
    if IFLA_IFNAME not in attrs:
        raise Malformed(f"link {index} has no name")
    kind = ""
    if IFLA_LINKINFO in attrs:
        info = parse_attrs(attrs[IFLA_LINKINFO])
        if IFLA_INFO_KIND in info:
            kind = parse_str(info[IFLA_INFO_KIND])
    master = parse_u32(attrs[IFLA_MASTER]) if IFLA_MASTER in attrs else 0
    return Link(index, parse_str(attrs[IFLA_IFNAME]), kind, master, bool(flags & IFF_UP))


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)


def _check_index(index: int) -> int:
    if not 0 < index <= 0x7FFFFFFF:
        raise ValueError(f"bad interface index {index}")
    return index


_ACKED = NLM_F_REQUEST | NLM_F_ACK
_CREATE = _ACKED | NLM_F_CREATE | NLM_F_EXCL


class Netlink:
    """One NETLINK_ROUTE socket. Requests act in the network namespace the calling process
    was in when the socket was created.

    The open socket holds that namespace: one opened inside a job's namespace keeps it, and
    the job's veth pair with it, after the job's last process is gone, until it is closed.
    """

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
            sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)
            sock.setsockopt(_SOL_NETLINK, _NETLINK_GET_STRICT_CHK, 1)
            sock.bind((0, 0))  # the kernel picks our port id
            sock.settimeout(_TIMEOUT)
            self._port: int = sock.getsockname()[0]
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock  # not inherited across exec (Python's default)
        self._seq = 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Netlink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- queries

    def links(self) -> list[Link]:
        """Every link of the namespace (an RTM_GETLINK dump)."""
        for attempt in range(_DUMP_ATTEMPTS):
            try:
                return self._request("list links", RTM_GETLINK, _ACKED | NLM_F_DUMP, _ifinfo())
            except NetlinkError as e:  # EINTR: links changed during the dump
                if e.errno != errno.EINTR or attempt == _DUMP_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def link_index(self, name: str) -> int | None:
        """The index of the link whose name is ``name``; None if there is none."""
        body = _ifinfo() + _str_attr(IFLA_IFNAME, validate_name(name))
        try:
            (link,) = self._request(f"look up link {name}", RTM_GETLINK, _ACKED, body)
        except NetlinkError as e:
            if e.errno == errno.ENODEV:
                return None
            raise
        # The kernel also finds a link by an alternative name ("ip link property add altname").
        return link.index if link.name == name else None

    # -- changes

    def create_bridge(self, name: str) -> int:
        """Create a bridge, down, and return its index; NetlinkError(EEXIST) if the name is
        taken."""
        what = f"create bridge {name}"
        linkinfo = _str_attr(IFLA_INFO_KIND, b"bridge")
        body = _ifinfo() + _str_attr(IFLA_IFNAME, validate_name(name))
        self._request(what, RTM_NEWLINK, _CREATE, body + pack_attr(IFLA_LINKINFO, linkinfo))
        return self._created(what, name)

    def create_veth(
        self,
        name: str,
        peer: str,
        *,
        peer_netns_pid: int | None = None,
        peer_netns_fd: int | None = None,
    ) -> int:
        """Create a veth pair, both ends down, and return the index of ``name``, the end that
        stays in this namespace. The ``peer`` end is created here too, or directly in the
        network namespace of process ``peer_netns_pid`` or of the namespace file descriptor
        ``peer_netns_fd`` (of /run/netns/NAME or /proc/PID/ns/net, say; it stays open)."""
        what = f"create veth {name}"
        raw_name = validate_name(name)
        peer_attrs = _str_attr(IFLA_IFNAME, validate_name(peer))
        if peer_netns_pid is not None and peer_netns_fd is not None:
            raise ValueError(f"{what}: give peer_netns_pid or peer_netns_fd, not both")
        if peer_netns_pid is not None:
            if peer_netns_pid <= 0:
                raise ValueError(f"{what}: bad peer_netns_pid {peer_netns_pid}")
            peer_attrs += _u32_attr(IFLA_NET_NS_PID, peer_netns_pid)
        if peer_netns_fd is not None:
            if not 0 <= peer_netns_fd <= 0x7FFFFFFF:
                raise ValueError(f"{what}: bad peer_netns_fd {peer_netns_fd}")
            peer_attrs += _u32_attr(IFLA_NET_NS_FD, peer_netns_fd)
        # The peer is described like a link of its own: an ifinfomsg and its attributes.
        data = pack_attr(VETH_INFO_PEER, _ifinfo() + peer_attrs)
        linkinfo = _str_attr(IFLA_INFO_KIND, b"veth") + pack_attr(IFLA_INFO_DATA, data)
        body = _ifinfo() + _str_attr(IFLA_IFNAME, raw_name)
        self._request(what, RTM_NEWLINK, _CREATE, body + pack_attr(IFLA_LINKINFO, linkinfo))
        return self._created(what, name)

    def set_link(self, index: int, *, up: bool | None = None, master: int | None = None) -> None:
        """Set a link up or down, and/or enslave it to the link ``master`` (0: release it)."""
        changes = []
        flags = change = 0
        attrs = b""
        if up is not None:
            changes.append("up" if up else "down")
            flags, change = (IFF_UP if up else 0), IFF_UP
        if master is not None:
            if master != 0:
                _check_index(master)
            changes.append(f"master {master}")
            attrs = _u32_attr(IFLA_MASTER, master)
        if not changes:
            raise ValueError(f"set link {index}: nothing to set")
        what = f"set link {index} {' '.join(changes)}"
        body = _ifinfo(_check_index(index), flags, change) + attrs
        self._request(what, RTM_SETLINK, _ACKED, body)

    def set_bridge_port(self, index: int, *, isolated: bool) -> None:
        """Set the bridge port ``index`` isolated or not: isolated ports forward only to ports
        that are not, such as the bridge itself (`ip link set dev X type bridge_slave
        isolated on`)."""
        what = f"set bridge port {index} isolated {'on' if isolated else 'off'}"
        port = pack_attr(IFLA_INFO_SLAVE_DATA, pack_attr(IFLA_BRPORT_ISOLATED, bytes([isolated])))
        linkinfo = _str_attr(IFLA_INFO_SLAVE_KIND, b"bridge") + port
        body = _ifinfo(_check_index(index)) + pack_attr(IFLA_LINKINFO, linkinfo)
        # RTM_NEWLINK without NLM_F_CREATE changes an existing link; RTM_SETLINK would ignore
        # IFLA_LINKINFO.
        self._request(what, RTM_NEWLINK, _ACKED, body)

    def add_address(self, index: int, address: ipaddress.IPv4Interface) -> None:
        """Add an IPv4 address (with the broadcast address of its network, but for /31 and
        /32) to a link; NetlinkError(EEXIST) if the link has it already."""
        what = f"add address {address} to link {index}"
        local = address.ip.packed
        attrs = pack_attr(IFA_LOCAL, local) + pack_attr(IFA_ADDRESS, local)
        if address.network.prefixlen <= 30:
            attrs += pack_attr(IFA_BROADCAST, address.network.broadcast_address.packed)
        head = _IFADDR.pack(
            socket.AF_INET, address.network.prefixlen, 0, RT_SCOPE_UNIVERSE, _check_index(index)
        )
        self._request(what, RTM_NEWADDR, _CREATE, head + attrs)

    def add_default_route(self, gateway: ipaddress.IPv4Address) -> None:
        """Add a default route via ``gateway`` to the main table; the gateway must be on the
        network of an address of a link that is up. NetlinkError(EEXIST) if there is one."""
        what = f"add default route via {gateway}"
        head = _RTMSG.pack(
            socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
        )
        self._request(what, RTM_NEWROUTE, _CREATE, head + pack_attr(RTA_GATEWAY, gateway.packed))

    def delete_link(self, index: int) -> None:
        """Delete a link; deleting either end of a veth pair deletes both."""
        self._request(f"delete link {index}", RTM_DELLINK, _ACKED, _ifinfo(_check_index(index)))

    # -- the exchange

    def _created(self, what: str, name: str) -> int:
        index = self.link_index(name)
        if index is None:  # someone else deleted or renamed it already
            raise NetlinkError(errno.ENODEV, f"{what}: gone right after its creation")
        return index

    def _request(self, what: str, kind: int, flags: int, body: bytes) -> list[Link]:
        """Send one request and read its whole reply: the links it lists, then the ack."""
        sock = self._sock
        if sock is None:
            raise NetlinkError(errno.EBADF, f"{what}: the netlink socket is closed")
        self._seq = self._seq % 0xFFFFFFFF + 1  # 1, 2, ... never 0
        try:
            error, explanation, links = self._exchange(sock, self._seq, kind, flags, body)
        except Malformed as e:
            self.close()
            raise NetlinkError(errno.EPROTO, f"{what}: {e}") from None
        except TimeoutError:
            self.close()
            raise NetlinkError(errno.ETIMEDOUT, f"{what}: no reply in {_TIMEOUT} s") from None
        except OSError as e:  # ENOBUFS, say
            self.close()
            raise NetlinkError(e.errno, f"{what}: {e.strerror}") from None
        except BaseException:  # KeyboardInterrupt, say: part of the reply may still be queued
            self.close()
            raise
        if error:
            text = os.strerror(error) + (f" ({explanation})" if explanation else "")
            raise NetlinkError(error, f"{what}: {text}")
        return links

    def _exchange(
        self, sock: socket.socket, seq: int, kind: int, flags: int, body: bytes
    ) -> tuple[int, str, list[Link]]:
        """(errno, the kernel's explanation, links listed) for one request. Only RTM_GETLINK
        requests are answered by anything before their end: one link, or with NLM_F_DUMP
        any number, each flagged NLM_F_MULTI, and then NLMSG_DONE (the kernel sends no ack
        for a dump, NLM_F_ACK or not)."""
        request = pack_message(kind, flags, seq, body)
        if sock.sendto(request, (0, 0)) != len(request):
            raise Malformed("short send")
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        links: list[Link] = []
        interrupted = False
        while True:
            data, _, msg_flags, (sender, _groups) = sock.recvmsg(_RECV_SIZE)
            if msg_flags & socket.MSG_TRUNC:
                raise Malformed(f"a datagram over {_RECV_SIZE} bytes")
            if sender != 0:
                raise Malformed(f"a datagram from port {sender}, not from the kernel")
            messages = parse_messages(data)
            if not messages:
                raise Malformed("an empty datagram")
            for position, message in enumerate(messages, 1):
                if message.seq != seq or message.port != self._port:
                    raise Malformed(
                        f"a reply with sequence number {message.seq} for port {message.port},"
                        f" expected {seq} for {self._port}"
                    )
                interrupted |= bool(message.flags & NLM_F_DUMP_INTR)
                if message.type == NLMSG_ERROR or (dump and message.type == NLMSG_DONE):
                    if position != len(messages):
                        raise Malformed("messages after the end of the reply")
                    if message.type == NLMSG_ERROR:
                        error, explanation = parse_error(message)
                    else:
                        error, explanation = parse_done(message)
                    if dump and interrupted and not error:
                        return errno.EINTR, "links changed during the dump", []
                    if not dump and kind == RTM_GETLINK and not error and len(links) != 1:
                        raise Malformed(f"{len(links)} links in reply to a lookup")
                    return error, explanation, links
                if kind != RTM_GETLINK or message.type != RTM_NEWLINK:
                    raise Malformed(f"an unexpected message of type {message.type}")
                if dump != bool(message.flags & NLM_F_MULTI):
                    raise Malformed(f"a link message with flags {message.flags:#x}")
                links.append(parse_link(message.payload))
