"""The control API seen from outside: auth, OpenAPI, errors, artifacts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from phloem.testing import PlatformProcess


def test_openapi_document(platform: PlatformProcess) -> None:
    doc = httpx.get(f"http://127.0.0.1:{platform.api_port}/api/v1/openapi.json").json()
    assert doc["info"]["title"] == "phloem"
    assert "/api/v1/branches/{ref}/functions/{slug}/deployments" in doc["paths"]


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


def test_status_reports_components(platform: PlatformProcess) -> None:
    data = platform.cli_json("status")
    assert data["components"]["system_database"] == "running"
    assert data["components"]["gateway"]["state"] == "running"
    main = next(b for b in data["branches"] if b["name"] == "main")
    assert main["database"] == "running"
    assert main["pooler"] == "running"
    text = platform.cli("status").stdout
    assert "gateway" in text
    assert "branch main" in text


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
