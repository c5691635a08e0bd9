"""Where the gateway spends its CPU per request: py-spy samples ``phloem up`` while wrk
loads one function (one isolate) through it, then prints the functions with the largest
share of the sampled CPU, by own time (the leaf frame) and inclusive (anywhere on the
stack), beside the gateway's CPU per request over the same run (user and kernel) and, when
``perf`` is there (root), its system calls per request.

    .venv/bin/python bench/gateway_profile.py                       # fixed upstream, 256 conns
    .venv/bin/python bench/gateway_profile.py --upstream python --connections 32 --seconds 20
    .venv/bin/python bench/gateway_profile.py --py-spy /path/to/py-spy --top 30 --native

Needs wrk and py-spy (not a dependency of phloem: ``pip install py-spy`` into any
environment and pass ``--py-spy`` if it is not on PATH). Samples are taken without
stopping the process (``--nonblocking``) and only while a thread is running (py-spy leaves
idle samples out), so shares are of the CPU time the sampler saw; time inside uvloop's C
code with no Python frame above the event loop shows as ``run_forever``'s own time.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _load import run_wrk
from _procs import CLOCK_TICKS, exit_on_signals, http_get

from phloem.testing import host_of, platform_process

HERE = Path(__file__).resolve().parent
APPS = {"fixed": HERE / "apps" / "fixed", "python": HERE / "apps" / "minimal"}


def say(text: str = "") -> None:
    print(text, flush=True)


def parse_collapsed(text: str) -> tuple[collections.Counter[str], collections.Counter[str],
                                        int]:
    """(own samples per frame, inclusive samples per frame, total samples) of py-spy's raw
    (collapsed stack) output: ``frame;frame;...;leaf count`` per line."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return own, inclusive, total


SYSCALLS = ("read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
            "epoll_wait", "epoll_pwait", "epoll_ctl", "accept4", "close", "getpid")


def perf_syscalls(pid: int, seconds: float) -> subprocess.Popen[str] | None:
    """``perf stat`` counting ``pid``'s system calls for ``seconds`` (None without perf)."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    events = ",".join(["raw_syscalls:sys_enter",
                       *(f"syscalls:sys_enter_{name}" for name in SYSCALLS)])
    return subprocess.Popen([perf, "stat", "-x", ",", "-e", events, "-p", str(pid), "--",
                             "sleep", str(seconds)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def read_perf(proc: subprocess.Popen[str]) -> dict[str, int]:
    """event -> count from ``perf stat -x ,`` output (events it could not count left out)."""
    _, err = proc.communicate(timeout=60)
    counts = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():
            counts[fields[2].rsplit("sys_enter_", 1)[-1].replace("raw_syscalls:", "")
                   ] = int(fields[0])
    return counts


def user_system(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def short(frame: str) -> str:
    """``name (path:line)`` with the path cut after site-packages/ or src/."""
    name, _, where = frame.partition(" (")
    for cut in ("site-packages/", "/src/", "/lib/python3"):
        if cut in where:
            where = where.split(cut, 1)[1]
            break
    return f"{name} ({where}" if where else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--upstream", choices=sorted(APPS), default="fixed")
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--py-spy", default=shutil.which("py-spy"),
                        help="the py-spy executable (default: the one on PATH)")
    parser.add_argument("--save", type=Path, help="also keep py-spy's raw output here")
    parser.add_argument("--native", action="store_true",
                        help="C frames too (uvloop, libc): py-spy then stops the process "
                        "for each sample, which slows it")
    args = parser.parse_args(argv)
    if not args.py_spy or not Path(args.py_spy).exists():
        say("py-spy not found: pip install py-spy, then pass --py-spy PATH if not on PATH")
        return 2
    if shutil.which("wrk") is None:
        say("wrk not found: apt-get install -y wrk")
        return 2
    with exit_on_signals(), platform_process() as p, \
            tempfile.TemporaryDirectory(prefix="phloem-profile-") as tmp:
        assert p.proc is not None
        pid = p.proc.pid
        fn = p.deploy("prof", APPS[args.upstream], "--limit", "max_isolates=1")
        host = host_of(fn["invocation_url"])
        status, _ = http_get(port=p.gateway_port, host=host)
        if status != 200:
            raise RuntimeError(f"phloem answered {status}")
        url = f"http://127.0.0.1:{p.gateway_port}/"
        run_wrk(url, connections=args.connections, duration=2, host=host)  # warm the pool
        out = Path(tmp) / "raw.txt"
        spy = subprocess.Popen(
            [args.py_spy, "record", "--pid", str(pid), "--format", "raw", "--output",
             str(out), "--duration", str(args.seconds), "--rate", str(args.rate),
             *([] if args.native else ["--nonblocking"]), "--function",
             *(["--native"] if args.native else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # py-spy attaches; the wrk run is a little shorter than its window
        perf = perf_syscalls(pid, args.seconds - 1)
        user0, sys0 = user_system(pid)
        r = run_wrk(url, connections=args.connections, duration=args.seconds - 1, host=host)
        user1, sys1 = user_system(pid)
        per = 1e6 / max(r.requests, 1)
        cpu_us = (user1 - user0 + sys1 - sys0) * per
        split = f"user {(user1 - user0) * per:.1f} us + kernel {(sys1 - sys0) * per:.1f} us"
        syscalls = read_perf(perf) if perf else {}
        _, err = spy.communicate(timeout=args.seconds + 60)
        if spy.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {err}")
        raw = out.read_text()
        if args.save:
            args.save.write_text(raw)
    own, inclusive, total = parse_collapsed(raw)
    say(f"gateway profile: {args.upstream} upstream, wrk -t1 -c{args.connections} "
        f"{args.seconds - 1} s: {r.rps:,.0f} req/s, gateway CPU {cpu_us:.1f} us/request "
        f"({split}); {total:,} py-spy samples at {args.rate}/s")
    if syscalls:
        # perf counted over its own window (about the wrk run's): per request of that run.
        say("system calls per request (perf stat, all threads of phloem up): "
            + ", ".join(f"{name} {n / max(r.requests, 1):.2f}"
                        for name, n in sorted(syscalls.items(), key=lambda kv: -kv[1]) if n))
    for title, counts in (("own time (leaf frame)", own), ("inclusive", inclusive)):
        say(f"\ntop {args.top} by {title}: share of samples, us/request at that share")
        for frame, n in counts.most_common(args.top):
            share = n / total
            say(f"  {share:6.1%}  {share * cpu_us:5.1f} us  {short(frame)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
