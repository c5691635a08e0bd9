"""Which peers may tell the gateway who the client is.

Behind a load balancer the gateway's peer is the balancer, and only the balancer knows the
client's address, scheme and host: it says so in ``X-Forwarded-*`` headers. Those headers
are honoured only from peers in the configured networks; from anyone else they are
replaced by what the gateway sees itself (see :func:`phloem.gateway.http.upstream_request_head`).

    trusted = TrustedProxies(["10.0.0.0/8", "127.0.0.1"])
    "10.1.2.3" in trusted          # True
    "::ffff:10.1.2.3" in trusted   # True: an IPv4 peer on a dual-stack socket
    bool(TrustedProxies())         # False: nothing to check per connection

The list is parsed once; a check runs once per client connection, never per request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["TrustedProxies", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RULE = ("an IP address or a network in CIDR notation without host bits "
        "(e.g. 127.0.0.1, 10.0.0.0/8, ::1/128)")


def parse_networks(values: Iterable[str], name: str = "trusted_proxies") -> tuple[Network, ...]:
    """Parse CIDR strings (commas also separate entries); a bad one raises ValueError
    naming ``name`` and the rule."""
    out: list[Network] = []
    for value in values:
        for part in value.split(","):
            text = part.strip()
            if not text:
                continue
            try:
                out.append(ipaddress.ip_network(text, strict=True))
            except ValueError as exc:
                raise ValueError(f"{name}: {text!r} is not {RULE}: {exc}") from None
    return tuple(out)


class TrustedProxies:
    __slots__ = ("networks",)

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.networks = parse_networks(values)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str) or not self.networks:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]!r})"
