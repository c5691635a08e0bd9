"""The artifact store's disk full (issue 11): an upload that does not fit is a clear 507,
leaves nothing half-written, and the deployment being served is untouched.

The disk is really full: the platform's ``artifacts`` directory is an 8 MiB tmpfs mounted
before ``phloem up`` starts (root only), and the uploads are larger than what is left.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phloem.testing import PlatformProcess, free_port, host_of, new_data_dir
from tests.conftest import Reliability

APPS = Path(__file__).parent.parent / "apps"
MiB = 1024 * 1024
STORE_MIB = 8


@pytest.fixture
def small_store() -> Iterator[PlatformProcess]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    p = PlatformProcess(new_data_dir(), free_port(), free_port())
    store = p.data_dir / "artifacts"
    store.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_MIB}m,mode=0700",
                    "phloem-test-artifacts", str(store)], check=True)
    try:
        p.launch()
        p.wait_ready()
        yield p
    finally:
        if p.running:
            p.stop()
        subprocess.run(["umount", str(store)], check=True)
        p.cleanup()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_full_artifact_store_is_a_507_and_serving_goes_on(
        small_store: PlatformProcess, reliability: Reliability) -> None:
    p = small_store
    store = p.data_dir / "artifacts"
    fn = p.deploy("full", APPS / "envprobe")  # a few KiB: it fits
    assert fn["status"] == "ready"
    free_before = free_bytes(store)
    assert free_before < STORE_MIB * MiB
    rounds, passed, slowest = 0, 0, 0.0
    with p.api() as api, p.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/").status_code == 200
        # Larger than the whole store, then just over what is free; with and without
        # Content-Length (the second streams chunked).
        for size, chunked in ((12 * MiB, False), (12 * MiB, True),
                              (free_before + MiB, False), (free_before + MiB, True)):
            rounds += 1
            data = os.urandom(size)
            sha = hashlib.sha256(data).hexdigest()
            body = iter([data[i:i + MiB] for i in range(0, size, MiB)]) if chunked else data
            started = time.monotonic()
            resp = api.put(f"/artifacts/{sha}", content=body)
            slowest = max(slowest, time.monotonic() - started)
            assert resp.status_code == 507, resp.text
            error = resp.json()["error"]
            assert error["code"] == "insufficient_storage"
            assert "no space left" in error["message"]
            # Nothing half-written: no artifact, no temporary file, the space is back.
            assert api.head(f"/artifacts/{sha}").status_code == 404
            assert not list((store / "tmp").iterdir())
            assert free_bytes(store) == free_before
            refused = api.post("/branches/main/functions/full/deployments",
                               json={"artifact_sha256": sha, "entry": "main:app"})
            assert refused.status_code == 400
            assert refused.json()["error"]["field"] == "artifact_sha256"
            # The serving deployment is untouched.
            assert gw.get("/").status_code == 200
            assert api.get("/branches/main/functions/full").json()["deployment_id"] == (
                fn["deployment_id"])
            passed += 1
        # Once there is room again (here: an upload that fits), uploads work.
        small = os.urandom(MiB)
        sha = hashlib.sha256(small).hexdigest()
        assert api.put(f"/artifacts/{sha}", content=small).status_code == 201
        assert api.head(f"/artifacts/{sha}").status_code == 200
    reliability.record(rounds=rounds, passed=passed,
                       figure=f"507 in {slowest * 1000:.0f} ms max, 0 bytes left behind, "
                              "function served throughout")
