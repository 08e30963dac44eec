"""laiontools.web.policy: which addresses and URLs a crawl may reach (no network)."""

from __future__ import annotations

import ipaddress

import pytest

from laiontools.contracts.uids import normalize_url
from laiontools.web.policy import (
    canonical_host,
    check_url,
    embedded_ipv4,
    host_ip,
    is_blocked_ip,
    parse_numeric_ipv4,
)

STRICT = {"allow_private_network": False, "allow_networks": [], "resolve_hosts": False, "max_url_length": 2048}


@pytest.mark.parametrize("spelling", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1", "017700000001", "127.0.0.1."])
def test_numeric_spellings_of_loopback(spelling):
    assert parse_numeric_ipv4(spelling) == ipaddress.IPv4Address("127.0.0.1")


def test_numeric_spellings_match_inet_aton():
    # independent reference: the C library's inet_aton reads the same BSD forms
    import socket

    for s in ("2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0", "10.1", "0xa.0.0.1", "8.8.2056", "3232235777"):
        assert parse_numeric_ipv4(s) == ipaddress.IPv4Address(socket.inet_aton(s)), s


def test_names_and_bad_numbers():
    for name in ("example.com", "cdn1.example.com", "0xcafe.com", "123.example", "deadbeef", "0x1g"):
        assert parse_numeric_ipv4(name) is None, name
    for bad in ("1.2.3.4.5", "256.1.1.1", "1.2.65536", "0x1g.1", "09.1.1.1"):
        with pytest.raises(ValueError):
            parse_numeric_ipv4(bad)
    assert host_ip("[::1]") == ipaddress.IPv6Address("::1")


@pytest.mark.parametrize("addr", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "100.127.255.254",
    "0.0.0.0", "0.1.2.3", "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1",
    "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    "2002:7f00:1::1",         # 6to4 carrying 127.0.0.1
    "2002:a9fe:a9fe::1",      # 6to4 carrying 169.254.169.254
    "64:ff9b::a00:1",         # NAT64 carrying 10.0.0.1
    "64:ff9b::6440:1",        # NAT64 carrying 100.64.0.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
])
def test_non_global_addresses_are_blocked(addr):
    assert is_blocked_ip(ipaddress.ip_address(addr)), addr


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
                                  "2002:808:808::1", "64:ff9b::808:808", "::ffff:8.8.8.8"])
def test_global_addresses_pass(addr):
    assert not is_blocked_ip(ipaddress.ip_address(addr)), addr


def test_embedded_ipv4_decoding():
    assert embedded_ipv4(ipaddress.ip_address("2002:7f00:1::1")) == [ipaddress.IPv4Address("127.0.0.1")]
    assert embedded_ipv4(ipaddress.ip_address("64:ff9b::c0a8:101")) == [ipaddress.IPv4Address("192.168.1.1")]
    server, client = embedded_ipv4(ipaddress.ip_address("2001:0:4136:e378:8000:63bf:3fff:fdd2"))
    assert (str(server), str(client)) == ("65.54.227.120", "192.0.2.45")


def test_allow_networks_opt_in_is_exact():
    lo = ["127.0.0.0/8"]
    assert not is_blocked_ip(ipaddress.ip_address("127.0.0.5"), lo)
    assert not is_blocked_ip(ipaddress.ip_address("::ffff:127.0.0.5"), lo)
    assert not is_blocked_ip(ipaddress.ip_address("2002:7f00:1::1"), lo)  # its inner address is allowed
    assert is_blocked_ip(ipaddress.ip_address("10.0.0.1"), lo)
    assert is_blocked_ip(ipaddress.ip_address("100.64.0.1"), lo)
    assert is_blocked_ip(ipaddress.ip_address("::1"), lo)  # an IPv4 network never allows IPv6 loopback


def test_check_url_rejects_numeric_spellings_as_private():
    reason = lambda u: (check_url(normalize_url(u), STRICT) or (None, None))
    for spelling in ("2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0", "100.64.0.1", "[64:ff9b::a9fe:a9fe]",
                     "[2002:a9fe:a9fe::]", "[::ffff:7f00:1]", "0x0a.0.0.1", "3232235777"):
        r, msg = reason(f"http://{spelling}/a.jpg")
        assert r == "private_address", (spelling, r, msg)
    r, msg = reason("http://2130706433/a.jpg")
    assert "127.0.0.1" in msg  # the message names the address the spelling means
    assert reason("http://1.2.3.4.5/a.jpg")[0] == "invalid_url"
    assert reason("http://134744072/a.jpg")[0] is None  # 8.8.8.8 spelled as one number: a global address
    # the test allow-list admits loopback, whatever the spelling, and nothing else
    lo = {**STRICT, "allow_networks": ["127.0.0.0/8"]}
    assert check_url("http://2130706433:8000/a.jpg", lo) is None
    assert check_url("http://0xa000001/a.jpg", lo)[0] == "private_address"


def test_check_url_reads_a_unicode_spelled_host_as_the_connection_does():
    # Fullwidth digits, an ideographic full stop or fullwidth letters spell 127.0.0.1 or localhost once
    # IDNA-encoded, as getaddrinfo encodes a name: prepare passed them and only the fetch refused them (as
    # failed_download "blocked"); they are rejected_private_address like every other spelling (found by a
    # hostile-web walk). A real IDN stays allowed.
    reason = lambda u: (check_url(normalize_url(u), STRICT) or (None, None))
    for spelling, means in (("１２７.０.０.１", "127.0.0.1"), ("127。0。0。1", "127.0.0.1"), ("１２７．０．０．１", "127.0.0.1"),
                            ("ｌｏｃａｌｈｏｓｔ", "localhost"), ("foo.ｌｏｃａｌｈｏｓｔ", "foo.localhost")):
        r, msg = reason(f"http://{spelling}/a.jpg")
        assert r == "private_address" and f"(= {means})" in msg, (spelling, r, msg)
    assert reason("http://bücher.de/a.jpg") == (None, None)
    assert reason("http://ｅｘａｍｐｌｅ/a.jpg")[0] == "unresolvable_host"  # RFC 6761's, spelled in fullwidth


def test_canonical_host_is_the_host_the_connection_reaches():
    import socket

    for spelling in ("2130706433", "0x7f000001", "0177.0.0.1", "127.1", "１２７．０．０．１", "０ｘ７ｆ０００００１"):
        # independent reference: getaddrinfo (inet_aton after IDNA) reaches the same address
        assert canonical_host(spelling) == socket.getaddrinfo(spelling, 80, socket.AF_INET)[0][4][0] == "127.0.0.1", spelling
    assert canonical_host("127.0.0.1.") == "127.0.0.1"  # as the fetch's host_ip reads it
    assert canonical_host("ｌｏｃａｌｈｏｓｔ") == canonical_host("LOCALHOST.") == "localhost"
    assert canonical_host("Bücher.DE") == canonical_host("xn--bcher-kva.de.") == "xn--bcher-kva.de"
    assert canonical_host("[2001:DB8:0:0::1]") == canonical_host("2001:db8::1") == "2001:db8::1"
    assert canonical_host("fe80::1%eth0") == "fe80::1"
    assert canonical_host("a..Example.org") == "a..example.org"  # IDNA refuses it: kept, lower-cased


def test_a_host_name_no_lookup_can_take_is_an_invalid_url_in_prepare():
    """An empty label, a label over 63 characters, a name IDNA cannot encode, a control character or a
    space: no connection can be made to such a host, so prepare rejects the row as invalid_url instead of
    accepting it for the fetch to fail with `DNS:` (found by a hostile-web walk). The reference for the
    labels is Python's IDNA codec, which getaddrinfo's callers use; names it takes stay accepted."""
    reason = lambda u: (check_url(normalize_url(u), STRICT) or (None, None))
    names = ["a..example.org", "x" * 64 + ".example.org", "x" * 63 + ".example.org", "example.org.", "a.b-c.d", "bücher..de",
             "é" * 70 + ".de", "bücher.de", ".example.org", "y" * 63]
    for name in names:
        try:
            name.encode("idna")
            codec_takes = True
        except UnicodeError:
            codec_takes = False
        r, msg = reason(f"http://{name}/a.jpg")
        assert (r != "invalid_url") == codec_takes, (name, r, msg)
        if not codec_takes:
            assert "is not a valid host name" in msg, msg
    for name in ("exa\x00mple.org", "exa mple.org", "exa\x7fmple.org"):  # (a tab is dropped by the URL parser, as browsers do)
        r, msg = reason(f"http://{name}/a.jpg")
        assert r == "invalid_url" and "a control character or a space" in msg, (name, r, msg)
