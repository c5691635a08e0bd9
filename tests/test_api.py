"""The control API seen from outside: auth, OpenAPI, errors, artifacts."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from phloem.control.api import MAX_JSON_BODY_BYTES
from phloem.control.artifacts import MAX_ARTIFACT_BYTES
from phloem.testing import PlatformProcess
from tests.conftest import Reliability

MiB = 1024 * 1024


def test_openapi_document(platform: PlatformProcess) -> None:
    doc = httpx.get(f"http://127.0.0.1:{platform.api_port}/api/v1/openapi.json").json()
    assert doc["info"]["title"] == "phloem"
    assert "/api/v1/branches/{ref}/functions/{slug}/deployments" in doc["paths"]


def test_errors_are_declared_and_405_names_the_methods(platform: PlatformProcess) -> None:
    base = f"http://127.0.0.1:{platform.api_port}/api/v1"
    doc = httpx.get(f"{base}/openapi.json").json()
    deploy = doc["paths"]["/api/v1/branches/{ref}/functions/{slug}/deployments"]["post"]
    assert {"400", "401", "404", "413"} <= set(deploy["responses"])
    assert "422" not in deploy["responses"]  # validation errors are 400s
    assert deploy["security"] == [{"apiKey": ["deploy"]}]  # the scope it needs
    assert "security" not in doc["paths"]["/api/v1/health"]["get"]
    with platform.api() as api:
        resp = api.request("TRACE", "/branches/main")
        assert resp.status_code == 405
        # Every route of the path, not only the first Starlette matched.
        assert resp.headers["allow"] == "DELETE, GET, PATCH"
        assert resp.json()["error"]["code"] == "method_not_allowed"
        unknown = api.post("/branches", json={"name": "x", "copy_function": True})
        assert unknown.status_code == 400
        assert unknown.json()["error"]["field"] == "copy_function"
        loose = api.post("/branches", json={"name": "x", "copy_functions": 0})
        assert loose.status_code == 400
        assert loose.json()["error"]["field"] == "copy_functions"


def test_requests_need_the_api_key(platform: PlatformProcess) -> None:
    base = f"http://127.0.0.1:{platform.api_port}/api/v1"
    assert httpx.get(f"{base}/health").status_code == 200
    missing = httpx.get(f"{base}/branches")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    wrong = httpx.get(f"{base}/branches", headers={"Authorization": "Bearer phk_nope"})
    assert wrong.status_code == 401


def test_api_key_is_stored_hashed(platform: PlatformProcess) -> None:
    key = platform.credentials["api_key"]
    mode = (platform.data_dir / "credentials.json").stat().st_mode & 0o777
    assert mode == 0o600
    # Nothing under the system cluster holds the key in clear text.
    needle = key.encode()
    for path in (platform.data_dir / "system").rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path


def test_artifact_upload_checks_hash(platform: PlatformProcess) -> None:
    data = b"not really a tarball"
    sha = hashlib.sha256(data).hexdigest()
    with platform.api() as api:
        # RFC 9110 9.3.4: a PUT whose content is inconsistent with its target is a 409.
        wrong = api.put(f"/artifacts/{'0' * 64}", content=data)
        assert wrong.status_code == 409
        assert wrong.json()["error"] == {"code": "sha256_mismatch", "field": "sha256",
                                         "message": wrong.json()["error"]["message"]}
        malformed = api.put("/artifacts/ABC", content=data)
        assert malformed.status_code == 400
        assert malformed.json()["error"]["field"] == "sha256"
        assert api.put(f"/artifacts/{sha}", content=data).status_code == 201
        assert api.head(f"/artifacts/{sha}").status_code == 200
        bad = api.post("/branches/main/functions/x/deployments",
                       json={"artifact_sha256": "f" * 64, "entry": "main:app"})
        assert bad.status_code == 400
        assert bad.json()["error"]["field"] == "artifact_sha256"


def test_unknown_branch_is_404_with_code(platform: PlatformProcess) -> None:
    with platform.api() as api:
        resp = api.get("/branches/nope/functions")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "branch_not_found"


def test_metrics_count_requests_and_cold_starts(platform: PlatformProcess) -> None:
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    from phloem.testing import host_of

    fn = platform.deploy("metered", Path(__file__).parent / "apps" / "envprobe")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        for _ in range(3):
            assert gw.get("/").status_code == 200
    scraped = platform.metrics()
    assert scraped.status_code == 200
    text = scraped.text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    labels = (("branch", fn["branch_id"]), ("function", "metered"))
    assert samples[("phloem_requests_total", tuple(sorted((*labels, ("status", "200")))))] == 3
    assert samples[("phloem_cold_starts_total", labels)] == 1
    assert samples[("phloem_isolates", labels)] == 1


def test_metrics_need_the_api_key_or_the_scrape_token(platform: PlatformProcess) -> None:
    """/metrics names every branch and function: not for anyone who can reach the port."""
    url = f"http://127.0.0.1:{platform.api_port}/metrics"
    for headers in ({}, {"Authorization": "Bearer phk_nope"},
                    {"Authorization": f"Bearer {platform.metrics_token}x"},
                    {"Authorization": f"Basic {platform.metrics_token}"},
                    {"Authorization": "Bearer"}):
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 401, headers
        assert refused.json()["error"]["code"] == "unauthorized"
        assert "phloem_" not in refused.text
    for token in (platform.credentials["api_key"], platform.metrics_token):
        ok = platform.metrics(token)
        assert ok.status_code == 200
        assert ok.headers["content-type"].startswith("text/plain")
        assert "# TYPE phloem_requests_total counter" in ok.text
    # The scrape token is good for /metrics only.
    status = httpx.get(f"http://127.0.0.1:{platform.api_port}/api/v1/status",
                       headers={"Authorization": f"Bearer {platform.metrics_token}"})
    assert status.status_code == 401


def test_bad_input_is_a_named_4xx_never_a_500(platform: PlatformProcess) -> None:
    """Inputs the reliability review found answered with 500 (issue 11, item 3)."""
    fn = platform.deploy("badinput", Path(__file__).parent / "apps" / "envprobe")
    latest = platform.cli_json("functions", "get", "badinput")["latest_deployment"]
    with platform.api() as api:
        dep = api.get(f"/deployments/{latest['id']}").raise_for_status().json()
        assert api.get("/branches/ma%00in").status_code == 404
        url = "/branches/main/functions/badinput/deployments"
        body = {"artifact_sha256": "z" * 64, "entry": "main:app"}
        resp = api.post(url, json=body)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["field"] == "artifact_sha256"
        for bad in ("1e309", "NaN", "Infinity", "-Infinity"):
            # Python's json reads these non-standard numbers; a client may send them.
            content = ('{"artifact_sha256": "' + dep["artifact_sha256"] + '", "entry": '
                       '"main:app", "limits": {"ttfb_timeout_s": ' + bad + '}}')
            resp = api.post(url, content=content,
                            headers={"Content-Type": "application/json"})
            assert resp.status_code in (400, 422), (bad, resp.text)
        for since in ("nan", "inf", "-inf"):
            resp = api.get("/branches/main/functions/badinput/logs",
                           params={"since": since})
            assert resp.status_code in (400, 422), (since, resp.text)
    # Nothing of the refused requests took effect: the function serves as before.
    after = platform.cli_json("functions", "get", "badinput")
    assert after["deployment_id"] == fn["deployment_id"]


# -- abuse: bodies (issue 11, item 1) -------------------------------------------------
def memory_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


class PeakRss:
    """Peak resident memory of a process over a block, in MiB: the kernel's high-water
    mark (VmHWM), reset on entry by writing 5 to clear_refs (root)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.growth = 0.0

    def __enter__(self) -> PeakRss:
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")
        self.before = memory_kib(self.pid, "VmRSS") / 1024
        return self

    def __exit__(self, *_: object) -> None:
        self.growth = memory_kib(self.pid, "VmHWM") / 1024 - self.before


class Body:
    """A request body of ``n`` MiB made on the fly (the test holds 1 MiB of it), counting
    what the client got to send before the server stopped it."""

    def __init__(self, n: int, block: bytes = b"x" * MiB) -> None:
        self.n, self.block, self.sent = n, block, 0

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.n):
            yield self.block
            self.sent += 1


def test_unauthenticated_huge_bodies_are_refused_unread(platform: PlatformProcess,
                                                        reliability: Reliability) -> None:
    """The key is checked before any of the body is read: 400 MB from anyone gets a 401,
    the platform's memory stays flat and the rest of the body is never read."""
    pid = platform.proc.pid if platform.proc else 0
    base = f"http://127.0.0.1:{platform.api_port}/api/v1"
    rounds, passed, growths, sent = 0, 0, [], []
    for url, length in ((f"{base}/branches", True), (f"{base}/branches", False),
                        (f"{base}/artifacts/{'0' * 64}", True)):
        body = Body(400)
        headers = {"Content-Length": str(400 * MiB)} if length else {}
        with PeakRss(pid) as rss:
            resp = httpx.request("PUT" if "artifacts" in url else "POST", url, content=body,
                                 headers=headers, timeout=60)
        rounds += 1
        growths.append(rss.growth)
        sent.append(body.sent)
        assert resp.status_code == 401, (url, resp.text)
        assert resp.json()["error"]["code"] == "unauthorized"
        assert resp.headers["connection"] == "close"
        assert rss.growth < 32, f"phloem up grew {rss.growth:.0f} MiB for a refused body"
        assert body.sent < 100, f"the platform read {body.sent} MiB of a refused body"
        passed += 1
    reliability.record(rounds=rounds, passed=passed,
                       figure=f"401 for 400 MiB bodies; RSS +{max(growths):.1f} MiB max, "
                              f"{max(sent)} MiB sent before the close")


def test_bodies_over_their_cap_get_413_unread(platform: PlatformProcess,
                                              reliability: Reliability) -> None:
    pid = platform.proc.pid if platform.proc else 0
    over_json = MAX_JSON_BODY_BYTES // MiB + 1
    over_artifact = MAX_ARTIFACT_BYTES // MiB + 50
    cases = [  # (method, path, MiB, with Content-Length)
        ("POST", "/branches", over_json, True),
        ("POST", "/branches", 300, False),        # chunked: counted as it streams
        ("POST", "/branches/main/functions/x/deployments", 300, True),
        ("POST", "/env-digest", 300, False),
        ("PUT", f"/artifacts/{'1' * 64}", over_artifact, True),
        ("PUT", f"/artifacts/{'1' * 64}", over_artifact, False),
    ]
    growths = []
    with platform.api() as api:
        for method, path, mib, length in cases:
            body = Body(mib)
            headers = {"Content-Length": str(mib * MiB)} if length else {}
            with PeakRss(pid) as rss:
                resp = api.request(method, path, content=body, headers=headers)
            growths.append(rss.growth)
            assert resp.status_code == 413, (method, path, length, resp.text)
            assert resp.json()["error"]["code"] == "payload_too_large"
            assert resp.headers["connection"] == "close"
            assert rss.growth < 32, (method, path, rss.growth)
            if length:
                assert body.sent < 100, f"{path}: {body.sent} MiB read past a Content-Length"
            else:  # stopped right after the cap, not at the end
                cap = MAX_ARTIFACT_BYTES if method == "PUT" else MAX_JSON_BODY_BYTES
                assert body.sent < cap // MiB + 64, (path, body.sent)
        # The cap is in the OpenAPI document, with the 413 and its error model.
        doc = api.get("/openapi.json").json()
    for path, op in (("/api/v1/branches", "post"), ("/api/v1/artifacts/{sha256}", "put")):
        declared = doc["paths"][path][op]["responses"]["413"]
        assert declared["content"]["application/json"]["schema"]["$ref"].endswith("ErrorOut")
    assert f"at most {MAX_JSON_BODY_BYTES} bytes" in (
        doc["paths"]["/api/v1/branches"]["post"]["requestBody"]["description"])
    assert f"at most {MAX_ARTIFACT_BYTES} bytes" in (
        doc["paths"]["/api/v1/artifacts/{sha256}"]["put"]["requestBody"]["description"])
    assert not list((platform.data_dir / "artifacts" / "tmp").iterdir())
    reliability.record(rounds=len(cases), passed=len(cases),
                       figure=f"413 before/while reading; RSS +{max(growths):.1f} MiB max")


def test_large_upload_streams_off_the_event_loop(platform: PlatformProcess,
                                                 reliability: Reliability) -> None:
    """A 95 MiB artifact: phloem up's memory grows by far less than its size, and the
    gateway (same event loop) keeps answering promptly all through the upload."""
    pid = platform.proc.pid if platform.proc else 0
    size_mib = 95
    block = os.urandom(MiB)
    body = Body(size_mib, block)
    sha = hashlib.sha256(block * size_mib).hexdigest()
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        # Any request through the gateway: an unknown host is answered by its own code.
        with platform.gateway("nothing.fn.localhost", timeout=10) as gw:
            while not done.is_set():
                started = time.monotonic()
                assert gw.get("/").status_code == 404
                latencies.append(time.monotonic() - started)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    with platform.api() as api, PeakRss(pid) as rss:
        prober.start()
        try:
            started = time.monotonic()
            resp = api.put(f"/artifacts/{sha}", content=body)
            upload_s = time.monotonic() - started
        finally:
            done.set()
            prober.join()
    assert resp.status_code == 201, resp.text
    assert resp.json() == {"sha256": sha, "size": size_mib * MiB}
    stored = platform.data_dir / "artifacts" / "sha256" / sha[:2] / f"{sha}.tar.gz"
    assert stored.stat().st_size == size_mib * MiB
    assert not list((platform.data_dir / "artifacts" / "tmp").iterdir())
    assert rss.growth < 32, f"phloem up grew {rss.growth:.0f} MiB for a {size_mib} MiB upload"
    assert len(latencies) >= 5, f"only {len(latencies)} gateway requests in {upload_s:.1f} s"
    slowest = max(latencies)
    assert slowest < 0.5, f"the gateway took {slowest * 1000:.0f} ms during the upload"
    reliability.record(rounds=len(latencies), passed=sum(t < 0.5 for t in latencies),
                       figure=f"{size_mib} MiB upload: RSS +{rss.growth:.1f} MiB, gateway "
                              f"{slowest * 1000:.0f} ms max over {len(latencies)} requests")
