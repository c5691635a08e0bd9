"""Long-lived children that must not outlive the platform (PostgreSQL, PgBouncer).

    proc = spawn_tied([postgres, "-D", pgdata], signal.SIGINT, cwd="/",
                      stdin=subprocess.DEVNULL, **owner.popen_kwargs())

A child spawned here gets ``PR_SET_PDEATHSIG``: the kernel sends it ``death_signal``
when the platform dies, however it dies (SIGKILL, OOM kill, a crash), so a killed
``phloem up`` does not leave its databases and poolers running unsupervised until the
next start. (The next start still sweeps, see ``phloem.server.leftovers``: the signal asks for a
clean shutdown, which can take a moment, and a platform of an older version did not tie
its children.)

The parent-death signal follows the *thread* that forked, not the process, so every
tied child is forked by one keeper thread that lives as long as the process: a child
started from a worker thread that later exits would otherwise be signalled while the
platform runs on. It is set after the privilege drop (a credential change clears it)
and before the exec; a child whose parent died before that point exits at once.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PR_SET_PDEATHSIG = 1

# Resolved before any fork: the child only calls it.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_keeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phloem-lifeline")


def _tie(death_signal: int, parent: int) -> None:
    """In the child between fork and exec (after setuid/setgid): die with ``parent``."""
    zero = ctypes.c_ulong(0)
    if _prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(death_signal), zero, zero,
              zero) != 0:
        os._exit(70)
    if os.getppid() != parent:  # the platform died before the tie held
        os._exit(70)


def spawn_tied(argv: Sequence[str], death_signal: int,
               **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **popen_kwargs)``, the child sent ``death_signal`` when
    this process dies. Raises what Popen raises (``OSError`` when argv cannot run)."""
    if "preexec_fn" in popen_kwargs:
        raise ValueError("preexec_fn: spawn_tied sets its own")
    parent = os.getpid()

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(list(argv), preexec_fn=lambda: _tie(death_signal, parent),
                                **popen_kwargs)

    return _keeper.submit(start).result()


__all__ = ["spawn_tied"]
