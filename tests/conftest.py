from __future__ import annotations

from collections.abc import Iterator

import pytest

from phloem.testing import PlatformProcess, platform_process

TRUSTED_PROXY = "127.0.0.2/32"


@pytest.fixture(scope="session")
def platform() -> Iterator[PlatformProcess]:
    """One running platform shared by the tests that do not restart it. It trusts
    127.0.0.2 as a proxy in front of its gateway (clients on 127.0.0.1 are not)."""
    with platform_process(["--trusted-proxy", TRUSTED_PROXY]) as p:
        yield p
