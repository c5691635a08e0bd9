"""phloem.gateway.proxies: which peers are trusted proxies."""

from __future__ import annotations

import pytest

from phloem.gateway.proxies import TrustedProxies, parse_networks
from phloem.gateway.server import GatewayConfig


def test_membership() -> None:
    trusted = TrustedProxies(["10.0.0.0/8, 192.168.1.7", "fd00::/8"])
    assert "10.200.3.4" in trusted
    assert "192.168.1.7" in trusted
    assert "192.168.1.8" not in trusted
    assert "::ffff:10.1.2.3" in trusted  # an IPv4 peer on a dual-stack listener
    assert "fd12::1" in trusted
    assert "fe80::1%eth0" not in trusted
    assert "11.0.0.1" not in trusted
    assert "not an address" not in trusted
    assert "" not in trusted


def test_empty_list_trusts_nobody() -> None:
    nobody = TrustedProxies()
    assert not nobody
    assert "127.0.0.1" not in nobody
    assert not GatewayConfig().trusted
    assert GatewayConfig(trusted_proxies=("127.0.0.1/32",)).trusted


@pytest.mark.parametrize("bad", ["10.0.0.300/8", "10.0.0.1/8", "localhost", "10.0.0.0/33"])
def test_bad_networks_name_the_setting_and_the_rule(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^trusted_proxies: .* is not an IP address or a "
                                         r"network in CIDR notation"):
        parse_networks([bad])
    with pytest.raises(ValueError, match="trusted_proxies"):
        GatewayConfig(trusted_proxies=(bad,))
