"""A connection-flood client, run as its own process (one process may open at most
RLIMIT_NOFILE sockets, so a flood of 20,000 takes several).

    python flood.py PORT COUNT 127.0.0.10 127.0.0.11 ...

Opens COUNT TCP connections to 127.0.0.1:PORT, each bound to the next source address in
turn, and sends each the start of a request head (never finished). Prints
``opened N unacked U`` once every connect finished (N succeeded) and every connection
reached the server (its kernel acknowledged the head, or the server closed it; U did not
within the deadline): under SYN cookies, a connection that overflowed the accept queue
exists only on this side until its data gets through. Then holds them until its stdin
closes.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import resource
import select
import socket
import sys
import termios
import time

PARTIAL = b"GET / HTTP/1.1\r\nHost: flood.fn.localhost\r\nUser-Agent: flood\r\n"
IP_BIND_ADDRESS_NO_PORT = 24  # the port is picked at connect: 4-tuples, not (ip, port)
CONNECT_DEADLINE_S = 60.0
TCP_ESTABLISHED = 1  # tcp_info.tcpi_state


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
            with contextlib.suppress(OSError):
                s.send(PARTIAL)
            done.append(s)
    for s in pending.values():
        s.close()
    unacked = done
    while unacked and time.monotonic() < deadline:
        unacked = [s for s in unacked if not _reached(s)]
        if unacked:
            time.sleep(0.1)  # retransmissions take their time; polled with a deadline
    print(f"opened {len(done)} unacked {len(unacked)}", flush=True)
    sys.stdin.read()
    os._exit(0)  # closing 5,000 sockets one by one is slow: the kernel does it at exit


def _reached(s: socket.socket) -> bool:
    """The server has the connection: it acknowledged the head, or closed it."""
    if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED:
        return True  # reset or closed by the server (evicted, refused)
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, buf)  # bytes sent, not yet acknowledged
    return buf[0] == 0


if __name__ == "__main__":
    main()
