"""The Python isolate host: serve one ASGI app on an inherited Unix socket.

Runs inside the isolate, as the function's uid, with only the standard library, uvicorn
(and httptools/uvloop) and the user's packages importable, so it must import nothing else
from phloem.

    python -m phloem.runtimes.python.host --app main:app --fd 3 --ready-fd 4
    python -m phloem.runtimes.python.host --app main:app --check

Isolates forked from the zygote (``phloem.runtimes.python.zygote``) skip the interpreter
start and call ``run`` directly, so both kinds start the app through the same code.

SIGINT (eviction, shutdown, redeploy) is uvicorn's: it stops accepting, finishes open
requests, waits for ``wait_until`` work (each piece within its budget, as the Node host
does) and runs the app's lifespan shutdown, which is where users close their pools. A
second SIGINT exits without waiting (the Node host's second signal, too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import ctypes
import importlib
import inspect
import io
import os
import signal
import socket
import sys
import traceback
from typing import Any

PR_SET_PDEATHSIG = 1


class EntryError(Exception):
    pass


def load_app(entry: str) -> Any:
    """Import ``module:attr`` (``attr`` may be dotted) and check it is an ASGI app."""
    module_name, _, attr = entry.partition(":")
    if not module_name or not attr:
        raise EntryError(f"entry: must look like 'module:attr' (got {entry!r})")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise EntryError(f"entry: module {module_name!r} not found in the "
                             "function's source") from exc
        raise
    app: Any = module
    for part in attr.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise EntryError(
                f"entry: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if inspect.isclass(app) or not callable(app):
        raise EntryError(f"entry: {entry!r} is not an ASGI app (not a callable instance "
                         f"or function; got {type(app).__name__})")
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else app.__call__
    if not inspect.iscoroutinefunction(call):
        raise EntryError(f"entry: {entry!r} is not an ASGI app: it is not an async "
                         "callable (WSGI apps such as Flask are not supported)")
    return app


def _die_with_parent() -> None:
    # If the platform is SIGKILLed, its isolates must not linger holding sockets.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    parent = os.environ.get("PHLOEM_SUPERVISOR_PID")
    if parent and os.getppid() != int(parent):
        os._exit(1)


_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "phloem_request_id", default=None)


class _TaggedStream(io.TextIOBase):
    """stdout/stderr that prefix each line written during a request with its
    ``X-Request-Id``, so the function's logs tie output to requests."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.at_line_start = True

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        rid = _request_id.get()
        if rid is None:
            self.inner.write(text)
        else:
            for piece in text.splitlines(keepends=True):
                if self.at_line_start:
                    self.inner.write(f"[rid={rid}] ")
                self.inner.write(piece)
                self.at_line_start = piece.endswith("\n")
            return len(text)
        self.at_line_start = text.endswith("\n") if text else self.at_line_start
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def fileno(self) -> int:
        return int(self.inner.fileno())


def _with_request_ids(app: Any) -> Any:
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            for name, value in scope.get("headers", ()):
                if name == b"x-request-id":
                    token = _request_id.set(value.decode("latin-1"))
                    try:
                        return await app(scope, receive, send)  # type: ignore[no-any-return]
                    finally:
                        _request_id.reset(token)
        return await app(scope, receive, send)  # type: ignore[no-any-return]

    return wrapped


def serve(app: Any, fd: int, ready_fd: int | None) -> None:
    import uvicorn

    from phloem import functions

    def notify(busy: bool) -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"W" if busy else b"D")

    functions.set_notifier(notify)
    sys.stdout = _TaggedStream(sys.stdout)
    sys.stderr = _TaggedStream(sys.stderr)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            # wait_until work runs to completion (within its budget) before the app's
            # shutdown hooks close what it may be using.
            shutdown_hooks = self.lifespan.shutdown

            async def shutdown() -> None:
                # A second SIGINT (force_exit) gives up on the work and the hooks and
                # exits, as the Node host does; the supervisor SIGKILLs after its limit.
                drained = asyncio.ensure_future(functions.drain())
                while not drained.done() and not self.force_exit:
                    await asyncio.wait({drained}, timeout=0.1)
                if not self.force_exit:
                    await shutdown_hooks()

            self.lifespan.shutdown = shutdown
            if self.started and ready_fd is not None:
                os.write(ready_fd, b"R")

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    config = uvicorn.Config(
        _with_request_ids(app), fd=fd, loop=loop, http="httptools", lifespan="auto",
        access_log=False,
        log_level=os.environ.get("PHLOEM_LOG_LEVEL", "warning"), proxy_headers=False,
        server_header=False, date_header=True, timeout_keep_alive=3600,
        timeout_graceful_shutdown=None,
    )
    Server(config).run()


def _import_entry(entry: str) -> Any:
    """The app, or ``None`` after printing why it cannot be imported."""
    sys.path.insert(0, os.getcwd())
    try:
        return load_app(entry)
    except EntryError as exc:
        print(str(exc), file=sys.stderr)
    except BaseException:
        print(f"entry: importing {entry!r} raised:", file=sys.stderr)
        traceback.print_exc()
    return None


def run(entry: str, fd: int, ready_fd: int | None) -> int:
    """Import the app and serve it until SIGINT; the exit code. Shared by this module's
    ``main`` (a spawned interpreter) and the zygote's forked children, so both start an
    app exactly alike."""
    app = _import_entry(entry)
    if app is None:
        return 3
    serve(app, fd, ready_fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phloem-python-host")
    parser.add_argument("--app", required=True)
    parser.add_argument("--fd", type=int)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if _import_entry(args.app) is not None else 3
    if args.fd is None:
        parser.error("--fd is required unless --check")
    _die_with_parent()
    return run(args.app, args.fd, args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
