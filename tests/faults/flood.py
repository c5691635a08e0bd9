"""A connection-flood client, run as its own process (one process may open at most
RLIMIT_NOFILE sockets, so a flood of 20,000 takes several).

    python flood.py PORT COUNT 127.0.0.10 127.0.0.11 ...

Opens COUNT TCP connections to 127.0.0.1:PORT, each bound to the next source address in
turn, and sends half of them the start of a request head (never finished), the other half
nothing. Prints ``opened N`` once every connect finished (N succeeded), then holds them
until its stdin closes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import socket
import sys
import time

PARTIAL = b"GET / HTTP/1.1\r\nHost: flood.fn.localhost\r\nUser-Agent: flood\r\n"
IP_BIND_ADDRESS_NO_PORT = 24  # the port is picked at connect: 4-tuples, not (ip, port)
CONNECT_DEADLINE_S = 60.0


def main() -> None:
    port, count, sources = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ep = select.epoll()
    pending: dict[int, socket.socket] = {}
    done: list[socket.socket] = []
    for i in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((sources[i % len(sources)], 0))
        s.setblocking(False)
        rc = s.connect_ex(("127.0.0.1", port))
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            continue
        pending[s.fileno()] = s
        ep.register(s.fileno(), select.EPOLLOUT)
    deadline = time.monotonic() + CONNECT_DEADLINE_S
    while pending and time.monotonic() < deadline:
        for fd, _ in ep.poll(1.0, maxevents=4096):
            s = pending.pop(fd)
            ep.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                s.close()
                continue
            if len(done) % 2 == 0:
                with contextlib.suppress(OSError):
                    s.send(PARTIAL)
            done.append(s)
    for s in pending.values():
        s.close()
    print(f"opened {len(done)}", flush=True)
    sys.stdin.read()
    os._exit(0)  # closing 5,000 sockets one by one is slow: the kernel does it at exit


if __name__ == "__main__":
    main()
