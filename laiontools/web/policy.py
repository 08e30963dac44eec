"""Which URLs and addresses a crawl of strangers' URLs may reach: one policy for prepare and fetch.

prepare calls :func:`check_url` on every normalized URL (no network unless ``resolve_hosts``);
the fetch calls :func:`is_blocked_ip` on every address it is about to connect to, on every
redirect hop. Both read the same rules from here, so the catalog's ``rejected_private_address``
and the fetch's connect-time refusal cannot disagree.

The address rule is "global unicast only": an address is refused unless it is globally routable
(Python's ``is_global``, which excludes RFC 1918, loopback, link-local, 100.64.0.0/10 carrier-grade
NAT, 0.0.0.0/8, 240.0.0.0/4, documentation and benchmarking ranges, ULA, ...) and not multicast.
IPv6 forms that carry an IPv4 address (IPv4-mapped, 6to4 ``2002::/16``, Teredo ``2001::/32``,
NAT64 ``64:ff9b::/96``) are refused when the IPv4 inside them is. ``allow_networks`` opts
listed networks back in (tests and the demo serve on 127.0.0.0/8).

Host names are canonicalized the way browsers (WHATWG URL) and ``inet_aton`` read them before the
check: ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1`` and ``0`` are IPv4 addresses, not
names, so prepare rejects them as private instead of leaving them to connect time.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Names that always mean this machine or its private network: refused without a DNS query.
PRIVATE_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
PRIVATE_SUFFIXES = (".localhost", ".local", ".internal")
# Special-use names that never resolve (RFC 2606 / RFC 6761): refused without a DNS query.
NEVER_RESOLVE = (".invalid", ".test", ".example")

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo server + client, NAT64)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    out: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    if ip in _NAT64:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def _in_any(ip: IPAddress, networks: Iterable[str]) -> bool:
    for n in networks:
        net = ipaddress.ip_network(n, strict=False)
        if ip.version == net.version and ip in net:
            return True
    return False


def _not_global(ip: IPAddress) -> bool:
    # is_global misses multicast (224/4 is "global" to Python); the other flags are already implied
    # by not is_global but are kept explicit for readers checking a specific range.
    return bool(not ip.is_global or ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_reserved
                or ip.is_unspecified or ip.is_private or getattr(ip, "is_site_local", False))


def is_blocked_ip(ip: IPAddress, allow_networks: Iterable[str] = ()) -> bool:
    """True unless `ip` is a global unicast address (and every IPv4 it embeds is too).

    An address (or the IPv4 inside an IPv4-mapped address) in `allow_networks` is allowed.
    """
    nets = tuple(allow_networks)
    inner = embedded_ipv4(ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:a.b.c.d is a.b.c.d on the wire
        inner = []
    if _in_any(ip, nets):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64:
        # 64:ff9b::/96 lies inside ::/8, which Python calls reserved; the translator forwards to the
        # IPv4 inside, so that address alone decides.
        return any(_not_global(v4) and not _in_any(v4, nets) for v4 in inner)
    if _not_global(ip):
        return True
    return any(_not_global(v4) and not _in_any(v4, nets) for v4 in inner)


def _ipv4_number(part: str) -> int:
    """One dotted part as inet_aton / WHATWG read it: 0x.. hex, leading-0 octal, else decimal."""
    if part[:2].lower() == "0x":
        digits = part[2:]
        return int(digits, 16) if digits else 0
    if len(part) > 1 and part[0] == "0":
        return int(part[1:], 8)
    return int(part, 10)


def parse_numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a numeric host spelling means, None if `host` is a name.

    Follows the WHATWG URL host parser: a host whose last label is a number is an IPv4 address in
    one of the BSD forms (``a``, ``a.b``, ``a.b.c``, ``a.b.c.d``, each part decimal, 0x-hex or
    0-octal; the last part fills the remaining bytes). Raises ValueError when it looks numeric but
    is not a valid address (``1.2.3.4.5``, ``0x1g``, ``256.1.1.1``), which browsers refuse too.
    """
    labels = host.split(".")
    if labels and labels[-1] == "" and len(labels) > 1:
        labels = labels[:-1]  # "127.0.0.1." is the same host
    last = labels[-1] if labels else ""
    if not last or not _looks_numeric(last):
        return None
    if len(labels) > 4:
        raise ValueError(f"{host}: more than 4 numeric parts")
    try:
        nums = [_ipv4_number(p) for p in labels]
    except ValueError as e:
        raise ValueError(f"{host}: not a valid numeric IPv4 address") from e
    if any(n > 255 for n in nums[:-1]) or nums[-1] >= 256 ** (5 - len(nums)):
        raise ValueError(f"{host}: a part of the numeric IPv4 address is out of range")
    value = nums[-1]
    for i, n in enumerate(nums[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _looks_numeric(label: str) -> bool:
    if label[:2].lower() == "0x":
        return all(c in "0123456789abcdefABCDEF" for c in label[2:])
    return label.isascii() and label.isdigit()


def host_ip(host: str) -> IPAddress | None:
    """The address a URL host denotes literally (IPv6, dotted or numeric IPv4), None for a name.

    Raises ValueError for a numeric spelling that is not an address.
    """
    h = host.strip("[]")
    try:
        return ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        pass
    return parse_numeric_ipv4(h)


def bad_host_name(name: str) -> str | None:
    """Why the ASCII host name `name` (no trailing dot) cannot be looked up, or None: an empty label
    (``a..b``), a label over 63 characters (what the IDNA codec, and so getaddrinfo, refuses), or a
    control character or space (http.client refuses those only after the address check). Checked
    directly: the codec costs more than the rest of a URL's check."""
    if not name.isprintable() or " " in name:
        return "a control character or a space"
    for label in name.split("."):
        if not label:
            return "an empty label"
        if len(label) > 63:
            return f"a label of {len(label)} characters, over 63"
    return None


def canonical_host(host: str) -> str:
    """`host` as the connection reaches it, for comparing hosts (the blocklist): an address in its
    standard form (every numeric IPv4 spelling inet_aton / getaddrinfo accept as a dotted quad, IPv6
    compressed, brackets and zone dropped), a name IDNA-encoded as getaddrinfo and http.client encode
    it (``ｌｏｃａｌｈｏｓｔ`` is ``localhost``, ``bücher.de`` is ``xn--bcher-kva.de``), lower-cased,
    without a trailing dot. A name the IDNA codec refuses is kept as written (lower-cased): no
    connection can be made to it either."""
    h = host.strip("[]")
    try:
        ip = host_ip(h)
    except ValueError:
        ip = None
    if ip is None:
        with contextlib.suppress(UnicodeError):
            h = h.encode("idna").decode("ascii")
        h = h.lower().rstrip(".")
        try:
            ip = host_ip(h)  # fullwidth digits are digits after IDNA: "１２７．０．０．１" is 127.0.0.1
        except ValueError:
            ip = None
    return h if ip is None else str(ip)


def resolve_all(host: str, port: int | None = None) -> list[str]:
    """Every address `host` resolves to (getaddrinfo), scope ids stripped. Raises OSError."""
    return [ai[4][0].split("%", 1)[0] for ai in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)]


def check_url(url: str | None, policy: Mapping[str, Any], dns_cache: dict[str, Any] | None = None) -> tuple[str, str] | None:
    """None if the (normalized) URL may be fetched, else (reason, message).

    `policy` keys: max_url_length, allow_private_network, allow_networks, resolve_hosts (optional:
    resolve names and refuse those resolving to a blocked address; `dns_cache` memoizes that).
    Reasons: null_url, url_too_long, invalid_url, bad_scheme, unresolvable_host, private_address.
    """
    if not url:
        return "null_url", "URL is null or empty"
    if len(url) > policy["max_url_length"]:
        return "url_too_long", f"URL has {len(url)} characters, over the limit of {policy['max_url_length']}"
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port  # raises ValueError on a bad port
    except ValueError as e:
        return "invalid_url", f"URL cannot be parsed: {e}"
    if port == 0:
        return "invalid_url", "URL names port 0, where no server listens"
    if parts.scheme not in ("http", "https"):
        return "bad_scheme", f"scheme {parts.scheme + ':' if parts.scheme else '(none)'} is not http or https"
    if not host:
        return "invalid_url", "URL has no host"
    try:
        ip = host_ip(host)
    except ValueError as e:
        return "invalid_url", f"host is a malformed numeric address ({e})"
    # The host as the connection reaches it (IDNA, as getaddrinfo encodes it): "ｌｏｃａｌｈｏｓｔ" is
    # localhost and "１２７．０．０．１" is 127.0.0.1, refused here as private, not only at connect time. Only a
    # non-ASCII name needs the IDNA codec, which costs more than the rest of this check (every row of a
    # prepare passes here: 8 us a URL with it for non-ASCII names only, 20 us with it for every name).
    if ip is None and not host.isascii():
        canon = canonical_host(host)
        if not canon.isascii():  # the IDNA codec refused it: no connection can be made to it
            return "invalid_url", f"host {host!r} is not a valid host name (IDNA cannot encode it)"
        with contextlib.suppress(ValueError):
            ip = host_ip(canon)
    else:
        canon = str(ip) if ip is not None else host.rstrip(".")
    if ip is None:
        bad = bad_host_name(canon)
        if bad:
            return "invalid_url", f"host {host!r} is not a valid host name ({bad})"
    if canon.endswith(NEVER_RESOLVE) or canon in ("invalid", "test", "example"):
        return "unresolvable_host", f"host {host} is a special-use name that never resolves (RFC 6761)"
    if policy["allow_private_network"]:
        return None
    nets = policy.get("allow_networks") or ()
    if ip is not None:
        if is_blocked_ip(ip, nets):
            spelled = "" if str(ip) == host.strip("[]") else f" (= {ip})"
            return "private_address", f"host {host}{spelled} is not a global address (private, loopback, link-local, shared or reserved)"
        return None
    name = canon
    spelled = "" if name == host.rstrip(".") else f" (= {name})"
    if name in PRIVATE_NAMES or name.endswith(PRIVATE_SUFFIXES):
        return "private_address", f"host {host}{spelled} names a local or internal machine"
    if policy.get("resolve_hosts"):
        cache = dns_cache if dns_cache is not None else {}
        if name not in cache:
            try:
                cache[name] = resolve_all(name)
            except OSError as e:
                cache[name] = e
        res = cache[name]
        if isinstance(res, OSError):
            return "unresolvable_host", f"host {host} does not resolve ({res})"
        if any(is_blocked_ip(ipaddress.ip_address(a), nets) for a in res):
            return "private_address", f"host {host} resolves to a non-global address"
    return None


def host_of(url: str | None) -> str:
    """The key of the per-host limits (fetch's ``HostGate`` / ``HostScheduler``) and of prepare's host
    layout: the URL's lower-cased host name, '' if it has none or cannot be parsed."""
    try:
        return (urlsplit(url or "").hostname or "").lower()
    except ValueError:
        return ""
