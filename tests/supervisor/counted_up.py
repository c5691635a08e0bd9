"""``phloem up`` that tells a test what it holds: started as
``python counted_up.py up ...`` with ``PHLOEM_TEST_COUNT_SOCKET`` set, it answers each
connection to that Unix socket with a JSON ``{"objects": {type: count}, "blocks": n}``
(after a full collection), from a thread of its own, so nothing in the platform changes.

Only objects made after start-up are seen: ``phloem up`` freezes (``gc.freeze``) what it
built before ``ready.``, and ``gc.get_objects`` leaves frozen objects out. Growth is what
tests look for, and everything churn makes comes later."""

from __future__ import annotations

import collections
import gc
import json
import os
import socket
import sys
import threading

from phloem.cli.main import main


def _serve(path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    while True:
        conn, _ = server.accept()
        with conn:
            gc.collect()
            objects = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            reply = {"objects": objects, "blocks": sys.getallocatedblocks()}
            conn.sendall(json.dumps(reply).encode())


if __name__ == "__main__":
    threading.Thread(target=_serve, args=(os.environ["PHLOEM_TEST_COUNT_SOCKET"],),
                     daemon=True, name="object-counter").start()
    sys.argv[0] = "phloem"
    main()
