"""The gateway's CPU per request, two builds side by side: each build's ``phloem up`` serves
one function (one isolate: by default an upstream that answers at once, ``--app node``
the minimal Hono app), and wrk loads them in turn, alternating, so a
noisy shared machine hits both alike. Each run prints req/s and the ``phloem up`` process's
CPU per request (user + kernel, from /proc; the isolate is another process), then the
median of each build.

    .venv/bin/python bench/gateway_ab.py --base /work/wt-base/.venv/bin/phloem
    .venv/bin/python bench/gateway_ab.py --base A/phloem --new B/phloem --rounds 5 -c 256
    .venv/bin/python bench/gateway_ab.py --base A/phloem --app node

``--new`` defaults to this environment's ``phloem``. Needs wrk.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

from _load import run_wrk
from _procs import CLOCK_TICKS, exit_on_signals, http_get

from phloem.testing import PHLOEM, PlatformProcess, free_port, host_of, new_data_dir

APPS = Path(__file__).resolve().parent / "apps"
# The function each build serves: an upstream that answers at once (the gateway is what is
# measured), or the minimal Hono app (Node's response head: four fields, Connection
# among them).
APP_DIRS = {"fixed": APPS / "fixed", "node": APPS / "node-minimal"}


class _Build(PlatformProcess):
    """A platform run by another installation's ``phloem`` executable."""

    exe: str = PHLOEM

    def args(self) -> list[str]:
        return [self.exe, *super().args()[1:]]


@contextlib.contextmanager
def serving(exe: str, app: Path) -> Iterator[tuple[_Build, str]]:
    p = _Build(new_data_dir(), free_port(), free_port())
    p.exe = exe
    p.launch()
    try:
        p.wait_ready()
        fn = p.deploy("ab", app, "--limit", "max_isolates=1")
        host = host_of(fn["invocation_url"])
        status, _ = http_get(port=p.gateway_port, host=host)
        if status != 200:
            raise RuntimeError(f"{exe} answered {status}")
        yield p, host
    finally:
        p.cleanup()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, kernel) CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def describe(user: float, kernel: float, rps: float) -> str:
    return (f"{rps:8,.0f} req/s  {user + kernel:5.1f} us/request "
            f"(user {user:4.1f} + kernel {kernel:4.1f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--base", required=True, help="the baseline's phloem executable")
    parser.add_argument("--new", default=PHLOEM, help="the candidate's (default: this one)")
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--app", choices=sorted(APP_DIRS), default="fixed",
                        help="the function both builds serve (default: fixed)")
    args = parser.parse_args(argv)
    app = APP_DIRS[args.app]
    # (user us, kernel us, req/s) per run
    results: dict[str, list[tuple[float, float, float]]] = {"base": [], "new": []}
    with exit_on_signals(), serving(args.base, app) as base, \
            serving(args.new, app) as new:
        builds = {"base": base, "new": new}
        for p, host in builds.values():  # warm the pools
            run_wrk(f"http://127.0.0.1:{p.gateway_port}/", connections=args.connections,
                    duration=2, host=host)
        for n in range(args.rounds):
            order = ("base", "new") if n % 2 == 0 else ("new", "base")
            for name in order:
                p, host = builds[name]
                assert p.proc is not None
                user0, sys0 = cpu_seconds(p.proc.pid)
                r = run_wrk(f"http://127.0.0.1:{p.gateway_port}/",
                            connections=args.connections, duration=args.seconds, host=host)
                user1, sys1 = cpu_seconds(p.proc.pid)
                per = 1e6 / max(r.requests, 1)
                run = ((user1 - user0) * per, (sys1 - sys0) * per, r.rps)
                results[name].append(run)
                print(f"round {n + 1} {name:4}: {describe(*run)}"
                      f"{'  ' + r.errors if r.errors else ''}", flush=True)
    for name, runs in results.items():
        print(f"median {name:4}: " + describe(*(statistics.median(r[i] for r in runs)
                                                for i in range(3))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
