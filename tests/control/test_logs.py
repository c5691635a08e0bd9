"""Function log files: where they go, and what they leave alone."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from phloem.control.logs import FunctionLogs


def test_writing_a_log_never_changes_the_mode_of_directories_above_it(tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # as /tmp is for `phloem dev`'s temporary log dir
    shared.mkdir()
    os.chmod(shared, 0o1777)
    log = shared / "phloem-dev-x" / "api.log"
    logs = FunctionLogs()
    try:
        logs.write(log, "iso-1", "stdout", "hello")
        logs.flush()
    finally:
        logs.close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    assert log.read_text().rstrip().endswith("iso-1 stdout hello")
