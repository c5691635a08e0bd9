from __future__ import annotations

from collections.abc import Iterator

import pytest

from phloem.testing import PlatformProcess, platform_process


@pytest.fixture(scope="session")
def platform() -> Iterator[PlatformProcess]:
    """One running platform shared by the tests that do not restart it."""
    with platform_process() as p:
        yield p
