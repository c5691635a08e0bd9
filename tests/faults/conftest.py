from __future__ import annotations

from collections.abc import Iterator

import pytest

from phloem.testing import REPO, platform_process
from tests.faults.killing import Killer

PROBE = REPO / "tests" / "apps" / "envprobe"


@pytest.fixture(scope="module")
def killer() -> Iterator[Killer]:
    """A platform with the envprobe function deployed as "probe", and its ``Killer``: one
    per module, so each platform-kill module runs on its own platform and xdist worker."""
    with platform_process() as p:
        p.deploy("probe", PROBE)
        yield Killer(p)
