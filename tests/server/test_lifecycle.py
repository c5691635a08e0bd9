"""What the platform's process sets up for itself (phloem.server.lifecycle)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A fresh interpreter allocates what uvloop's TLS transport allocates per read (a 256 KiB
# bytes object, shrunk to what came) and prints how many blocks glibc then holds mapped
# (mallinfo2's hblks) beyond those it held before.
PROBE = """
import ctypes, sys
from phloem.server.lifecycle import keep_large_blocks_on_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert keep_large_blocks_on_heap()
before = libc.mallinfo2().hblks
held = [bytearray(256 * 1024) for _ in range(4)]
print(libc.mallinfo2().hblks - before)
"""


def _mapped_blocks(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_blocks_stay_on_the_heap() -> None:
    # Untuned, each 256 KiB block is a mapping of its own (an mmap and a munmap per TLS
    # read); tuned, none is.
    assert _mapped_blocks("default") == 4
    assert _mapped_blocks("tuned") == 0
