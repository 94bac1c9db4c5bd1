"""Which addresses an image may be fetched from: public unicast ones, and what the operator allow-lists.

:func:`checked_addresses` resolves a host once and refuses it if any of its addresses is not
allowed; the fetcher (:mod:`.fetch`) connects to those addresses and no others.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Callable, List, Optional, Union

from ..errors import ImageError
from .limits import ImageLimits, normalize_host


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def address_refusal(address: Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]) -> Optional[str]:
    """Why an address is not fetched from by default, or ``None`` for a public unicast address.

    IPv6 addresses that embed an IPv4 one (IPv4-mapped, 6to4, NAT64) are judged by it too.

    >>> address_refusal("93.184.215.14") is None, address_refusal("2606:4700:4700::1111") is None
    (True, True)
    >>> [address_refusal(a) for a in ("127.0.0.1", "169.254.169.254", "10.1.2.3", "0.0.0.0", "224.0.0.1")]
    ['loopback', 'link-local', 'private', 'unspecified', 'multicast']
    >>> [address_refusal(a) for a in ("::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "2002:a9fe:a9fe::1")]
    ['loopback', 'link-local', 'private', 'loopback (IPv4-mapped 127.0.0.1)', 'link-local (6to4 169.254.169.254)']
    >>> address_refusal("100.64.0.1"), address_refusal("240.0.0.1")
    ('not globally routable', 'reserved')
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if ip.version == 6:
        embedded = [("IPv4-mapped", ip.ipv4_mapped), ("6to4", ip.sixtofour)]
        if ip in _NAT64:
            embedded.append(("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
        if ip.teredo:
            embedded.append(("Teredo", ip.teredo[1]))
        for label, inner in embedded:
            if inner is not None:
                why = address_refusal(inner)
                if why is not None:
                    return f"{why} ({label} {inner})"
        if ip in _NAT64_LOCAL:
            return "private (local-use NAT64)"
        if ip.ipv4_mapped is not None:
            return None
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


@functools.lru_cache(maxsize=256)
def _network(entry: str):
    return ipaddress.ip_network(entry)


def host_allowed(host: str, address: str, limits: ImageLimits) -> bool:
    """Whether the operator's allow-list covers this host name or address.

    >>> limits = ImageLimits(allow_hosts=("127.0.0.1/32", "images.internal"))
    >>> host_allowed("x.test", "127.0.0.1", limits), host_allowed("x.test", "::ffff:127.0.0.1", limits)
    (True, True)
    >>> host_allowed("Images.Internal.", "10.9.9.9", limits), host_allowed("x.test", "127.0.0.2", limits)
    (True, False)
    """
    name = normalize_host(host)
    ip = ipaddress.ip_address(address)
    candidates = [ip] + ([ip.ipv4_mapped] if ip.version == 6 and ip.ipv4_mapped else [])
    for entry in limits.allow_hosts:
        if "/" in entry:
            net = _network(entry)
            if any(c.version == net.version and c in net for c in candidates):
                return True
        elif entry == name:
            return True
    return False


def checked_addresses(host: str, port: int, limits: ImageLimits, label: str,
                      resolve: Callable[[str, int], List[str]]) -> List[str]:
    """``host``'s addresses (``resolve``d once, unless it is one), refusing the host if any of them
    is not allowed: the fetcher connects to these and no others."""
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError, ValueError) as e:
            raise ImageError(f"{label}: cannot resolve host {host!r} ({e})") from None
    if not addresses:
        raise ImageError(f"{label}: host {host!r} has no IPv4/IPv6 address")
    for address in addresses:
        try:
            why = address_refusal(address)
        except ValueError:
            why = "not an IP address"
        if why is not None and not host_allowed(host, address, limits):
            shown = f"host {host!r} resolves to" if address != host else "host"
            raise ImageError(
                f"{label}: {shown} the {why} address {address}, which is not fetched from "
                f"(server-side request forgery guard); the operator can allow it with the launch "
                f"option image_allow_hosts or the environment variable XLV_IMAGE_ALLOW_HOSTS"
            )
    return addresses
