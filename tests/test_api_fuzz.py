"""schemathesis over the control API's OpenAPI document (issue 11, item 3): every case
must get a declared status, a body matching the declared schema and content type, a 405
with ``Allow`` for undeclared methods, 401 without the key, and never a 5xx.

The run is bounded (``MAX_EXAMPLES`` per operation and phase, one worker) and goes to a
platform of its own: it deletes and resets branches and functions. Half of the path
parameters name things that exist (a deployed function, its branch, deployment and
artifact), so the cases get past the 404s into the routes' own checks. Set
``PHLOEM_FUZZ_SEED`` to replay a run (the seed is in the failure message).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis import engine
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events

from phloem.testing import PlatformProcess, platform_process
from tests.conftest import Reliability

APPS = Path(__file__).parent / "apps"
MAX_EXAMPLES = 12
#: A run takes about a minute on the 2-core CI machine; far more means something hangs.
TIME_BUDGET_S = 240


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[tuple[PlatformProcess, dict[str, Any]]]:
    with platform_process() as p:
        fn = p.deploy("fuzzed", APPS / "envprobe")
        yield p, fn


def fuzz_config(p: PlatformProcess, fn: dict[str, Any], seed: int) -> SchemathesisConfig:
    deployment = fn["latest_deployment"]
    known = {"ref": ["main", fn["branch_id"]], "slug": [fn["slug"]],
             "deployment_id": [deployment["id"]], "sha256": [deployment["artifact_sha256"]]}
    return SchemathesisConfig.from_dict({
        "seed": seed,
        "headers": {"Authorization": f"Bearer {p.credentials['api_key']}"},
        "workers": 1,
        "request-timeout": 30,
        "generation": {"max-examples": MAX_EXAMPLES},
        "dictionaries": {name: {"values": values} for name, values in known.items()},
        "parameters": {
            **{f"path.{name}": {"dictionary": name, "probability": 0.5} for name in known},
            # A followed log of a function that exists streams until the client leaves.
            "query.follow": "false",
        },
        "operations": [{
            # Its body is only schema-valid in part: the entry's form depends on the
            # runtime, the artifact must have been uploaded and env names must not be
            # reserved, rules the server checks and answers with a named 400.
            "include-path": "/api/v1/branches/{ref}/functions/{slug}/deployments",
            "checks": {"positive_data_acceptance": {
                "expected-statuses": ["2xx", "400", "404", "409"]}},
        }, {
            # A cron expression and a trigger's name are checked by the server (named 400).
            "include-path": "/api/v1/branches/{ref}/triggers",
            "checks": {"positive_data_acceptance": {
                "expected-statuses": ["2xx", "400", "404"]}},
        }, {
            # Service names and each service's config are checked by the server (a named
            # 400: unknown, or not provided by this platform).
            "include-path": "/api/v1/branches/{ref}/services",
            "checks": {"positive_data_acceptance": {
                "expected-statuses": ["2xx", "400", "404", "409"]}},
        }],
    })


def test_fuzzing_finds_no_server_error_nor_undeclared_response(
        fuzzed: tuple[PlatformProcess, dict[str, Any]], reliability: Reliability) -> None:
    p, fn = fuzzed
    seed = int(os.environ.get("PHLOEM_FUZZ_SEED") or random.randrange(2**32))
    schema = schemathesis.openapi.from_url(
        f"http://127.0.0.1:{p.api_port}/api/v1/openapi.json", config=fuzz_config(p, fn, seed))
    cases: set[str] = set()
    failures: list[str] = []
    server_errors = 0
    started = time.monotonic()
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            recorder = event.recorder
            cases.update(recorder.cases)
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures.append(f"{recorder.label}: {check.name}: {failure.title}: "
                                        f"{failure.message}\n  {check.failure_info.code_sample}")
                interaction = recorder.interactions.get(case_id)
                if interaction and interaction.response and interaction.response.status_code >= 500:
                    server_errors += 1
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"schemathesis error: {event}")
    elapsed = time.monotonic() - started
    reliability.record(rounds=len(cases), passed=len(cases) - len(failures),
                       figure=f"{server_errors} server errors, {len(failures)} failures in "
                              f"{len(cases)} cases ({elapsed:.0f} s)")
    assert len(cases) > 200, f"only {len(cases)} cases ran (seed {seed})"
    assert not failures, f"seed {seed}, {len(failures)} failures:\n" + "\n".join(
        sorted(set(failures)))
    assert server_errors == 0
    assert elapsed < TIME_BUDGET_S
    # The platform is still whole: the deployed function answers through the API.
    with p.api() as api:
        assert api.get("/health").status_code == 200
