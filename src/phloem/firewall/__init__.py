"""Network rules for isolates and builds: which local ports they may reach.

    firewall = choose_firewall(settings)        # nftables as root with nft, else none
    await firewall.start(shared_ports=[settings.gateway_port], functions={uid: ports})
    firewall.state                              # "active" or "unavailable: <why>"
"""

from __future__ import annotations

import os
import shutil

from phloem.firewall.base import ACTIVE, ConfinedUids, Firewall, FirewallError
from phloem.firewall.nftables import NftablesFirewall, table_name
from phloem.firewall.none import NoFirewall
from phloem.system.settings import Settings

__all__ = ["ACTIVE", "ConfinedUids", "Firewall", "FirewallError", "NftablesFirewall",
           "NoFirewall", "choose_firewall", "find_nft", "table_name"]


def find_nft() -> str | None:
    """``nft`` on PATH, else in the sbin directories root's PATH may lack."""
    found = shutil.which("nft")
    if found:
        return found
    for path in ("/usr/sbin/nft", "/sbin/nft"):
        if os.access(path, os.X_OK):
            return path
    return None


def choose_firewall(settings: Settings) -> Firewall:
    """The backend that can work here; a ``NoFirewall`` names what is missing."""
    if not settings.firewall:
        return NoFirewall("turned off (--no-firewall or PHLOEM_FIREWALL=false)")
    if os.geteuid() != 0:
        return NoFirewall("phloem is not running as root, so isolates run as phloem's own "
                          "user and no rule can tell them apart")
    nft = find_nft()
    if nft is None:
        return NoFirewall("nft not found: install Debian's nftables package "
                          "(scripts/install does)")
    return NftablesFirewall(nft, settings.data_dir,
                            ConfinedUids.for_base(settings.isolate_uid_base))
