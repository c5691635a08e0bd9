"""The auth server's process (``AuthServer``) with a real Node process standing in for
server.mjs (same protocol: the socket as LISTEN_FD, "ready" on READY_FD): its output goes
to auth.log, rotated by size as function logs are, and a server that fails to start says
why in one line. No platform: ~2 s."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import pytest

from phloem.services.auth.process import AuthServer, AuthServerError, ServerSpec
from phloem.system.identity import Identity
from phloem.testing import wait_for_async

#: Prints LINES numbered lines, then fails with FAIL if set, else serves and logs requests.
STAND_IN = """
import http from "node:http";
import fs from "node:fs";
for (let i = 0; i < Number(process.env.LINES || 0); i++) {
  console.log(`[neon-auth] line ${i} ` + "x".repeat(80));
}
if (process.env.FAIL) {
  console.error(`[neon-auth] failed: error: ${process.env.FAIL}\\n    at main (server.mjs:9:9)`);
  process.exit(1);
}
const server = http.createServer((req, res) => {
  console.log(`[neon-auth] request ${req.url}`);
  res.end("ok");
});
server.listen({ fd: Number(process.env.LISTEN_FD) }, () => {
  fs.writeSync(Number(process.env.READY_FD), "ready\\n");
});
process.on("SIGTERM", () => process.exit(0));
"""


def spec(tmp_path: Path, env: dict[str, str], rotate_bytes: int = 10 * 2**20) -> ServerSpec:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on PATH")
    (tmp_path / "server.mjs").write_text(STAND_IN)
    return ServerSpec(node=Path(node), root=tmp_path, socket=tmp_path / "http.sock",
                      log_file=tmp_path / "auth.log", env=env, identity=Identity.current(),
                      log_rotate_bytes=rotate_bytes, log_keep=2)


def get(path: Path, target: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


async def test_the_log_rotates_by_size_keeping_the_newest_lines(tmp_path: Path) -> None:
    server = AuthServer(spec(tmp_path, {"LINES": "60"}, rotate_bytes=2000))
    log = tmp_path / "auth.log"
    await server.start(timeout=30)
    try:
        assert (await asyncio.to_thread(get, server.spec.socket, "/after")).endswith(b"ok")
        await wait_for_async(lambda: log.exists() and "request /after" in log.read_text(), 10,
                 "the request's line in auth.log")
    finally:
        await server.stop()
    files = sorted(p.name for p in tmp_path.glob("auth.log*"))
    assert files == ["auth.log", "auth.log.1", "auth.log.2"]  # keep=2: older ones went
    older, newer = (tmp_path / "auth.log.2").read_text(), (tmp_path / "auth.log.1").read_text()
    lines = (older + newer + log.read_text()).splitlines()
    # Each file stays near its size (it rotates after the line that passes it), the
    # lines run on in order across them, and each starts with its timestamp.
    assert all(p.stat().st_size < 2000 + 200 for p in tmp_path.glob("auth.log*"))
    numbers = [int(ln.split()[3]) for ln in lines if " line " in ln]
    assert numbers == list(range(numbers[0], 60)) and numbers[0] > 0
    assert lines[-1].endswith("[neon-auth] request /after")
    assert all(ln[:4].isdigit() and ln[23:25] == "Z " for ln in lines), lines[:2]


async def test_a_server_that_fails_says_why_in_one_line(tmp_path: Path) -> None:
    server = AuthServer(spec(tmp_path, {"LINES": "3", "FAIL": "the table is wrong"}))
    with pytest.raises(AuthServerError) as info:
        await server.start(timeout=30)
    assert info.value.reason == ("the server exited with 1 before it listened: error: "
                                 "the table is wrong")
    assert "at main (server.mjs:9:9)" in str(info.value)  # the message has the tail
    assert not server.running and not server.spec.socket.exists()
    assert "[neon-auth] failed: error: the table is wrong" in (tmp_path / "auth.log").read_text()
