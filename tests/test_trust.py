"""Clients talk only to a daemon run by a trusted uid, and say so when they may not (issue 9: 9, 13).

The fake daemon is a forked child that switched to uid 65534 and counts the
bytes each connection sends it; a client that refuses must have sent none.
"""

from __future__ import annotations

import os
import select
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from nexusd import AsyncClient, Client, Forbidden
from nexusd.wire.errors import Timeout
from tests.conftest import Daemon, run_cli
from tests.test_backups import run_as

OTHER_UID = 65534


@dataclass
class ForeignServer:
    """A socket listened on by another uid; ``received()`` is bytes per finished connection."""

    path: Path
    pid: int
    results: int  # read end of a pipe: one line per closed connection

    def received(self, timeout: float = 10.0) -> int:
        ready, _, _ = select.select([self.results], [], [], timeout)
        assert ready, "the fake server reported nothing"
        line = b""
        while not line.endswith(b"\n"):
            line += os.read(self.results, 1)
        return int(line)


def _serve_as(uid: int, path: Path, ready: int, results: int) -> None:  # pragma: no cover
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(16)
    os.write(ready, b"R")
    while True:
        conn, _ = srv.accept()
        n = 0
        while chunk := conn.recv(65536):
            n += len(chunk)
        conn.close()
        os.write(results, f"{n}\n".encode())


@pytest.fixture
def foreign(short_dir: Path) -> Iterator[ForeignServer]:
    if os.getuid() != 0:
        pytest.skip("needs root to run a server as another uid")
    os.chmod(short_dir, 0o777)  # so uid 65534 may create its socket there
    path = short_dir / "f.sock"
    ready_r, ready_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(ready_r)
            os.close(res_r)
            _serve_as(OTHER_UID, path, ready_w, res_w)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(res_w)
    try:
        ready, _, _ = select.select([ready_r], [], [], 10)
        assert ready and os.read(ready_r, 1) == b"R", "the fake server did not start"
        assert path.stat().st_uid == OTHER_UID
        yield ForeignServer(path, pid, res_r)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(res_r)


def test_blocking_client_refuses_a_server_of_another_uid(foreign: ForeignServer) -> None:
    c = Client(foreign.path, retry_for=0)
    with pytest.raises(Forbidden) as info:
        c.ping()
    assert f"uid {OTHER_UID}" in info.value.message and "NEXUSD_TRUSTED_UIDS" in info.value.message
    c.close()
    assert foreign.received() == 0  # not one byte


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_client_refuses_a_server_of_another_uid(foreign: ForeignServer, backend: str) -> None:
    async def main() -> None:
        with pytest.raises(Forbidden, match=f"uid {OTHER_UID}"):
            async with AsyncClient(foreign.path, retry_for=0) as c:
                await c.ping()

    anyio.run(main, backend=backend)
    assert foreign.received() == 0


def test_cli_and_compat_refuse_a_server_of_another_uid(foreign: ForeignServer) -> None:
    r = run_cli("count", "--socket", str(foreign.path))
    assert r.returncode == 1, r.stderr
    assert f"uid {OTHER_UID}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert foreign.received() == 0
    from nexusd.client.compat import NexusStore

    store = NexusStore(socket_path=foreign.path)
    with pytest.raises(Forbidden):
        store.message_count()
    store.close()
    assert foreign.received() == 0


def test_a_uid_trusted_explicitly_is_talked_to(
    foreign: ForeignServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: with the uid trusted, the same client does send (and waits for a reply)."""
    c = Client(foreign.path, timeout=0.3, retry_for=0, trusted_uids=[OTHER_UID])
    with pytest.raises(Timeout):
        c.ping()
    c.close()
    assert foreign.received() > 0
    monkeypatch.setenv("NEXUSD_TRUSTED_UIDS", f"12345, {OTHER_UID}")
    c = Client(foreign.path, timeout=0.3, retry_for=0)
    with pytest.raises(Timeout):
        c.ping()
    c.close()
    assert foreign.received() > 0


def test_own_daemon_is_trusted(shared_daemon: Daemon) -> None:
    with Client(shared_daemon.socket) as c:
        c.ping()


def test_a_socket_the_user_may_not_open_says_permission_denied(daemon: Daemon) -> None:
    """Not "daemon not running": the socket is there, the user is not allowed to open it."""
    from nexusd import cli

    os.chmod(daemon.dir, 0o755)  # the directory may be searched; the socket is 0600
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    rc, err = run_as(OTHER_UID, lambda: cli.main(["ping", "--socket", str(daemon.socket)]))
    assert rc == 1, err
    assert "permission denied" in err and "not running" not in err
    assert len(err.strip().splitlines()) == 1
