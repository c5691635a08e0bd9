"""Network rules with nftables: one ``table inet phloem_<hash of the data dir>`` per
platform, installed at start (replacing a stale copy in the same transaction), changed by
set elements, deleted at stop.

    firewall = NftablesFirewall("/usr/sbin/nft", Path("/var/lib/phloem"),
                                ConfinedUids.for_base(1_500_000))
    await firewall.start(shared_ports=[8787], functions={1_500_001: {25432, 25433}})

The table (``nft list table inet phloem_…``) holds:

* chain ``output`` (hook output): packets of a socket owned by a confined uid (the build
  uid and the isolates' range) go to ``confined``; every other packet, and packets without
  a socket (the resets and ICMP errors the kernel answers with), pass untouched;
* chain ``confined``: 169.254.0.0/16 refused; non-local destinations accepted; on local
  destinations (``fib daddr type local``: 127.0.0.0/8, ::1, the host's own addresses) DNS
  (53) accepted, the build uid refused, an isolate uid accepted only to a port in
  ``function_ports`` (``uid . port``) or ``shared_ports`` (the gateway), else refused;
* chain ``refuse``: TCP gets a reset, anything else ICMP port-unreachable, so a client
  fails at once instead of waiting for a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phloem.firewall.base import ACTIVE, ConfinedUids, FirewallError

log = logging.getLogger("phloem.firewall")

TABLE_PREFIX = "phloem_"
NFT_TIMEOUT_S = 30
#: The kernel keeps at most 256 bytes of a table comment.
_COMMENT_MAX = 250
_COMMENT_RE = re.compile(r'^\s*comment "phloem uid_base=(\d+)(?: data_dir=(.*))?"$', re.M)


def table_name(data_dir: Path) -> str:
    """The table of the platform on ``data_dir``: two platforms on one machine get two."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return f"{TABLE_PREFIX}{digest}"


def _elements(items: Iterable[str]) -> str:
    listed = ", ".join(items)
    return f"elements = {{ {listed} }}" if listed else ""


def _pairs(uid: int, ports: Iterable[int]) -> list[str]:
    return [f"{uid} . {port}" for port in sorted(ports)]


def _comment(uids: ConfinedUids, data_dir: Path) -> str:
    """Who owns the table, so another platform can tell a leftover from a live one."""
    comment = f"phloem uid_base={uids.isolate_first}"
    with_dir = f"{comment} data_dir={data_dir.resolve()}"
    if len(with_dir) <= _COMMENT_MAX and '"' not in with_dir and "\n" not in with_dir:
        return with_dir
    return comment


def render_table(table: str, uids: ConfinedUids, shared_ports: Iterable[int],
                 functions: Mapping[int, Iterable[int]], comment: str) -> str:
    """An ``nft -f`` script that replaces ``table`` (or creates it) in one transaction."""
    pairs = [p for uid in sorted(functions) for p in _pairs(uid, functions[uid])]
    shared = [str(p) for p in sorted(set(shared_ports))]
    # "table" first creates it if missing, so the delete cannot fail on a fresh machine.
    return f"""table inet {table}
delete table inet {table}
table inet {table} {{
    comment "{comment}"
    set function_ports {{
        type uid . inet_service
        {_elements(pairs)}
    }}
    set shared_ports {{
        type inet_service
        {_elements(shared)}
    }}
    chain output {{
        type filter hook output priority filter; policy accept;
        meta skuid {uids.first}-{uids.last} jump confined
    }}
    chain confined {{
        ip daddr 169.254.0.0/16 jump refuse
        fib daddr type != local accept
        meta l4proto {{ tcp, udp }} th dport 53 accept
        meta skuid {uids.build} jump refuse
        meta l4proto {{ tcp, udp }} meta skuid . th dport @function_ports accept
        meta l4proto {{ tcp, udp }} th dport @shared_ports accept
        jump refuse
    }}
    chain refuse {{
        meta l4proto tcp reject with tcp reset
        reject
    }}
}}
"""


def run_nft(nft: str, script: str | None = None, *args: str) -> str:
    """Run ``nft -f -`` on ``script`` (or ``nft args``); its output, or FirewallError
    with nft's own error lines."""
    cmd = [nft, "-f", "-"] if script is not None else [nft, *args]
    try:
        proc = subprocess.run(cmd, input=script, capture_output=True, text=True,
                              timeout=NFT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"could not run {nft}: {exc}") from None
    if proc.returncode != 0:
        errors = [line.split("Error:", 1)[1].strip() for line in proc.stderr.splitlines()
                  if "Error:" in line]
        raise FirewallError("nft: " + ("; ".join(dict.fromkeys(errors))
                                       or proc.stderr.strip()
                                       or f"exited with {proc.returncode}"))
    return proc.stdout


@dataclass(frozen=True)
class InstalledTable:
    """A phloem table found in the kernel, and whose it is (from its comment)."""

    name: str
    uid_base: int | None
    data_dir: str | None


def installed_tables(nft: str) -> list[InstalledTable]:
    """Every phloem table in the kernel now (tables removed meanwhile are left out)."""
    names = re.findall(rf"^table inet ({TABLE_PREFIX}[0-9a-f]+)$",
                       run_nft(nft, None, "list", "tables"), re.M)
    found = []
    for name in names:
        try:
            listing = run_nft(nft, None, "list", "table", "inet", name)
        except FirewallError:
            continue
        owner = _COMMENT_RE.search(listing)
        found.append(InstalledTable(name, int(owner.group(1)) if owner else None,
                                    owner.group(2) if owner else None))
    return found


class NftablesFirewall:
    def __init__(self, nft: str, data_dir: Path, uids: ConfinedUids) -> None:
        self.nft = nft
        self.data_dir = data_dir
        self.uids = uids
        self.table = table_name(data_dir)
        self._functions: dict[int, frozenset[int]] = {}
        self._installed = False
        self._state = "unavailable: not started"
        # One nft transaction at a time, so the in-memory copy of the sets stays exact.
        self._lock = asyncio.Lock()

    @property
    def state(self) -> str:
        return self._state

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self._state, "backend": "nftables",
                               "table": f"inet {self.table}"}
        if self._installed:
            out["functions"] = len(self._functions)
        return out

    # -- lifecycle -------------------------------------------------------------
    async def start(self, shared_ports: Iterable[int],
                    functions: Mapping[int, Iterable[int]]) -> None:
        wanted = {uid: frozenset(ports) for uid, ports in functions.items()}
        script = render_table(self.table, self.uids, shared_ports, wanted,
                              _comment(self.uids, self.data_dir))
        async with self._lock:
            try:
                await asyncio.to_thread(self._sweep_others)
                await asyncio.to_thread(run_nft, self.nft, script)
            except FirewallError as exc:
                self._state = f"unavailable: could not install table inet {self.table}: {exc}"
                return
            self._functions = wanted
            self._installed = True
            self._state = ACTIVE

    async def stop(self) -> None:
        async with self._lock:
            if not self._installed:
                return
            try:
                await asyncio.to_thread(run_nft, self.nft, _drop_script(self.table))
            except FirewallError as exc:
                log.warning("firewall: could not remove table inet %s: %s", self.table, exc)
                return
            self._installed = False
            self._functions = {}
            self._state = "unavailable: stopped"

    # -- functions ---------------------------------------------------------------
    async def allow_function(self, uid: int, ports: Iterable[int]) -> None:
        wanted = frozenset(ports)
        async with self._lock:
            old = self._functions.get(uid, frozenset())
            if not self._installed or (uid in self._functions and old == wanted):
                return
            await self._change(uid, old, wanted, f"allow uid {uid} ports {sorted(wanted)}")

    async def forget_function(self, uid: int) -> None:
        async with self._lock:
            if not self._installed or uid not in self._functions:
                return
            await self._change(uid, self._functions[uid], None, f"forget uid {uid}")

    async def _change(self, uid: int, old: frozenset[int], new: frozenset[int] | None,
                      what: str) -> None:
        lines = []
        if old:
            lines.append(f"delete element inet {self.table} function_ports "
                         f"{{ {', '.join(_pairs(uid, old))} }}")
        if new:
            lines.append(f"add element inet {self.table} function_ports "
                         f"{{ {', '.join(_pairs(uid, new))} }}")
        try:
            if lines:  # one transaction: no moment with neither the old ports nor the new
                await asyncio.to_thread(run_nft, self.nft, "\n".join(lines) + "\n")
        except FirewallError as exc:
            self._state = f"failing: could not {what}: {exc}"
            log.warning("firewall: could not %s: %s", what, exc)
            return
        if new is None:
            self._functions.pop(uid, None)
        else:
            self._functions[uid] = new

    # -- other platforms' tables -------------------------------------------------
    def _sweep_others(self) -> None:
        """Remove tables of other platforms whose data dir is gone (killed runs, e.g. of
        tests), and warn about live ones confining the same uids: each platform's rules
        would refuse the other's isolates their database ports."""
        try:
            tables = installed_tables(self.nft)
        except FirewallError:
            return  # start() reports the real problem
        for t in tables:
            if t.name == self.table or t.uid_base is None:
                continue
            name, data_dir = t.name, t.data_dir
            if data_dir and not os.path.isdir(data_dir):
                try:
                    run_nft(self.nft, _drop_script(name))
                    log.info("firewall: removed table inet %s of %s (gone)", name, data_dir)
                except FirewallError as exc:
                    log.info("firewall: could not remove leftover table %s: %s", name, exc)
                continue
            other = ConfinedUids.for_base(t.uid_base)
            if other.first <= self.uids.last and self.uids.first <= other.last:
                log.warning(
                    "firewall: another phloem (%s, table inet %s) confines isolate uids "
                    "overlapping ours (%d-%d): its rules refuse our isolates their "
                    "databases and ours refuse its; give each platform its own "
                    "--isolate-uid-base", data_dir or "data dir unknown", name,
                    self.uids.first, self.uids.last)


def _drop_script(table: str) -> str:
    # Create-then-delete: removing a table that is already gone is not an error.
    return f"table inet {table}\ndelete table inet {table}\n"
