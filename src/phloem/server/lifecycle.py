"""What running the platform as a process takes, beside the platform itself: the event
loop, the descriptor limit, the allocator, the stop signals and the heap once start-up is
done.
``Platform.run`` (and ``Platform.serve(own_process=True)``) use these, in the shape of
uvicorn's ``Server.run``/``serve``/``capture_signals``.

    install_uvloop()
    raise_fd_limit()
    keep_large_blocks_on_heap()
    with capture_signals(on_stop=platform.request_stop, on_force=platform.force_exit):
        ...                     # first SIGINT/SIGTERM: on_stop; any later one: on_force
    freeze_startup_heap()       # once start-up is done
    collector = asyncio.create_task(collect_garbage_every(GC_INTERVAL_S))

The messages ``phloem up`` prints go to :data:`out` (the readiness line, which tests and
scripts wait for) and :data:`err` (progress and errors).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import resource
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

log = logging.getLogger("phloem.gc")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Exit status after a forced exit (a second signal), as a shell reports an interrupt.
FORCED_EXIT_STATUS = 130


def install_uvloop() -> None:
    """uvloop for the loop ``asyncio.run`` makes next, when installed."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def raise_fd_limit() -> None:
    """Every open stream costs the gateway two descriptors: use all we may have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap, not from mmap; the heap's top is given back to
#: the system above TRIM_THRESHOLD, twice that (the ratio glibc's own adjustment keeps).
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def keep_large_blocks_on_heap() -> bool:
    """Serve blocks up to :data:`MMAP_THRESHOLD` from the heap; whether it could (glibc
    only). uvloop's TLS transport decrypts each arrival into a new 256 KiB bytes object
    and shrinks it to what came (a few hundred bytes for a request): above glibc's
    initial threshold (128 KiB), that is an mmap, an mremap and a munmap per request,
    about 11 us of the ~25 us a small TLS request costs the gateway here, until a large
    mapped block happens to be freed and glibc raises the threshold by itself. Set once,
    so that it never depends on what start-up happened to free."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # another C library: nothing to tune
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


@contextmanager
def capture_signals(on_stop: Callable[[], None],
                    on_force: Callable[[], None]) -> Iterator[None]:
    """Within the block, the first SIGINT or SIGTERM calls ``on_stop`` (a graceful stop)
    and every later one ``on_force`` (which should not return). Needs a running loop,
    in the main thread."""
    loop = asyncio.get_running_loop()
    received = 0

    def handle() -> None:
        nonlocal received
        received += 1
        (on_stop if received == 1 else on_force)()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, handle)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def freeze_startup_heap() -> None:
    """What start-up built lives for the whole run: keep it out of every collection, and
    make full collections rare (with thousands of streams they paused the loop for
    hundreds of ms)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 1000)

#: Seconds between full collections while serving. Closed streams leave cyclic garbage
#: (about 25 objects each, thousands a minute under churn); with the raised thresholds
#: above CPython reached it rarely, and RSS grew ~1.6 MiB/min in bench/soak.py. A full
#: collection skips the frozen start-up heap, so it costs tens of ms once a minute.
GC_INTERVAL_S = 60.0
#: A collection slower than this is logged as a warning (it paused the event loop).
GC_SLOW_MS = 250.0


async def collect_garbage_every(interval_s: float) -> None:
    """Run a full collection every ``interval_s`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        started = time.perf_counter()
        found = gc.collect()
        ms = (time.perf_counter() - started) * 1e3
        (log.warning if ms > GC_SLOW_MS else log.debug)(
            "gc: a full collection freed %d objects in %.1f ms", found, ms)
