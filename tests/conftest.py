from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from phloem.testing import PlatformProcess, platform_process

TRUSTED_PROXY = "127.0.0.2/32"


@pytest.fixture(scope="session")
def platform() -> Iterator[PlatformProcess]:
    """One running platform shared by the tests that do not restart it. It trusts
    127.0.0.2 as a proxy in front of its gateway (clients on 127.0.0.1 are not)."""
    with platform_process(["--trusted-proxy", TRUSTED_PROXY]) as p:
        yield p


@dataclass
class Reliability:
    """One row of the README's reliability table, written by a fault or abuse test.

        def test_isolate_kill(reliability):
            ...
            reliability.record(rounds=100, passed=ok, figure="502 within 38 ms (max)")

    ``scripts/reliability`` runs those tests with ``PHLOEM_RELIABILITY_OUT`` set and turns
    the rows into the table; without it the row only goes to pytest's user properties.
    """

    test: str
    rows: list[dict[str, object]] = field(default_factory=list)

    def record(self, *, rounds: int, passed: int, figure: str) -> None:
        row = {"test": self.test, "rounds": rounds, "passed": passed, "figure": figure}
        out = os.environ.get("PHLOEM_RELIABILITY_OUT")
        if out:
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        self.rows.append(row)


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Reliability]:
    rec = Reliability(request.node.nodeid)
    yield rec
    for row in rec.rows:
        request.node.user_properties.append(("reliability", row))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test that records a reliability row is selectable with -m reliability.
    for item in items:
        if "reliability" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.reliability)
