"""contrib/systemd/phloem.service: systemd accepts it, it may bind 443/80 without root
(CAP_NET_BIND_SERVICE), and none of the hardening that would break the sandboxes is on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from phloem.testing import PHLOEM, REPO

UNIT = REPO / "contrib" / "systemd" / "phloem.service"


def settings() -> dict[str, str]:
    """The unit's active (uncommented) ``Key=value`` lines."""
    out: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_unit_keeps_the_sandbox_working_and_may_bind_low_ports() -> None:
    keys = settings()
    assert keys["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert keys["Delegate"] == "yes" and keys["NoNewPrivileges"] == "yes"
    # Each of these breaks a part of phloem (see the comments in the unit).
    for breaking in ("CapabilityBoundingSet", "RestrictNamespaces", "ProtectControlGroups",
                     "MemoryDenyWriteExecute", "PrivateDevices", "ProtectKernelTunables",
                     "SystemCallFilter", "User", "DynamicUser"):
        assert breaking not in keys, breaking
    assert keys["ProtectSystem"] == "true"  # not full/strict: it writes /etc/passwd once


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (package systemd)")
def test_systemd_analyze_verify_accepts_it(tmp_path: Path) -> None:
    """~1 s: every key known and well-formed (the ExecStart pointed at this checkout's
    phloem, which verify requires to exist)."""
    unit = tmp_path / "phloem.service"
    unit.write_text(UNIT.read_text().replace("/opt/phloem/.venv/bin/phloem", PHLOEM))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    # verify exits 0 on unknown keys and bad values too, only saying so on stderr.
    complaints = [line for line in done.stderr.splitlines() if str(unit) in line]
    assert complaints == [], done.stderr
