"""nsd's decoding of rtnetlink replies (nsd/net/rtnl_wire.py) on messages built here:
the fields nsd reads, attributes it does not read skipped, and a malformed attribute
ending the walk instead of reading past the message. The integration tier runs the
same decoders against the kernel itself."""

from __future__ import annotations

import socket
import struct
from ipaddress import ip_address, ip_network

import pytest

from nsd.net.rtnl import address, network
from nsd.net.rtnl_wire import (
    IFA_ADDRESS,
    IFA_LOCAL,
    IFADDRMSG,
    IFINFOMSG,
    IFLA_IFNAME,
    IFLA_INFO_KIND,
    IFLA_LINK,
    IFLA_LINK_NETNSID,
    IFLA_LINKINFO,
    IFLA_MTU,
    NLATTR,
    RTA_DST,
    RTA_OIF,
    RTMSG,
    decode_addr,
    decode_link,
    decode_link_name,
    decode_route,
    nlattr,
)

IFLA_TXQLEN = 13  # one of the attributes nsd does not read
IFLA_STATS64 = 23


def link_message(*attrs: bytes) -> memoryview:
    return memoryview(IFINFOMSG.pack(socket.AF_UNSPEC, 1, 7, 0x1043, 0) + b"".join(attrs))


FULL = (
    nlattr(IFLA_IFNAME, b"nsd1000\0"),
    nlattr(IFLA_TXQLEN, struct.pack("=I", 1000)),
    nlattr(IFLA_MTU, struct.pack("=I", 1500)),
    nlattr(IFLA_LINK, struct.pack("=I", 2)),
    nlattr(IFLA_STATS64, bytes(200)),
    nlattr(IFLA_LINKINFO, nlattr(IFLA_INFO_KIND, b"veth\0") + nlattr(2, bytes(8))),
    nlattr(IFLA_LINK_NETNSID, struct.pack("=i", 0)),
)


def test_a_link_message_gives_the_fields_nsd_reads_and_nothing_else() -> None:
    msg = link_message(*FULL)
    link = decode_link(msg, 0, len(msg))
    assert link.fields == {"family": 0, "index": 7, "flags": 0x1043, "change": 0}
    assert link.attrs == {
        "IFLA_IFNAME": "nsd1000",
        "IFLA_MTU": 1500,
        "IFLA_LINK": 2,
        "IFLA_INFO_KIND": "veth",
        "IFLA_LINK_NETNSID": 0,
    }
    assert decode_link_name(msg, 0, len(msg)).attrs == {"IFLA_IFNAME": "nsd1000"}


@pytest.mark.parametrize("bad_length", [0, 3, 5000])
def test_a_malformed_attribute_ends_the_walk(bad_length: int) -> None:
    # What came before it is kept; nothing is read past the message.
    broken = NLATTR.pack(bad_length, IFLA_MTU) + struct.pack("=I", 9000)
    msg = link_message(FULL[0], broken, *FULL[2:])
    assert decode_link(msg, 0, len(msg)).attrs == {"IFLA_IFNAME": "nsd1000"}


def test_every_truncation_decodes_without_reading_past_the_end() -> None:
    whole = link_message(*FULL)
    for end in range(IFINFOMSG.size, len(whole) + 1):
        link = decode_link(whole, 0, end)  # must not raise
        assert link["index"] == 7
        assert set(link.attrs) <= {
            "IFLA_IFNAME",
            "IFLA_MTU",
            "IFLA_LINK",
            "IFLA_INFO_KIND",
            "IFLA_LINK_NETNSID",
        }


@pytest.mark.parametrize(
    "text", ["100.64.0.1", "0.0.0.0", "fe80::1", "fd40:34c3:c29f:4::1", "::", "::ffff:1.2.3.4"]
)
def test_addresses_parsed_from_their_packed_form_equal_ipaddress(text: str) -> None:
    assert address(text) == ip_address(text)
    assert address(text) is address(text)  # parsed once
    plen = 64 if ":" in text else 24
    assert network(text, plen) == ip_network(f"{text}/{plen}", strict=False)


AF_MPLS = 28
RTNL_FAMILY_IPMR = 128


@pytest.mark.parametrize("family", [AF_MPLS, RTNL_FAMILY_IPMR])
def test_other_families_in_an_unspec_dump_decode_without_addresses(family: int) -> None:
    # An AF_UNSPEC route dump also has MPLS routes (4-byte labels, 3 bytes here) and
    # multicast routing entries: decoded without addresses, never an exception.
    head = RTMSG.pack(family, 20, 0, 0, 254, 3, 0, 1, 0)
    msg = memoryview(head + nlattr(RTA_DST, bytes(3)) + nlattr(RTA_OIF, struct.pack("=I", 4)))
    route = decode_route(msg, 0, len(msg))
    assert route["family"] == family and route.attrs == {"RTA_OIF": 4}


def test_an_address_of_the_wrong_size_is_left_out() -> None:
    head = IFADDRMSG.pack(socket.AF_INET, 32, 0, 0, 5)
    msg = memoryview(
        head + nlattr(IFA_ADDRESS, bytes(16)) + nlattr(IFA_LOCAL, bytes([100, 64, 0, 1]))
    )
    assert decode_addr(msg, 0, len(msg)).attrs == {"IFA_LOCAL": "100.64.0.1"}
