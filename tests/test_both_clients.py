"""The same scenarios against both clients: blocking, and async on asyncio and on trio.

The blocking client is generated from the async one (scripts/unasync.py), so
they should behave alike; these are the cases where hand-written twins had
drifted (issue 10): a reply that does not decode, a timeout of 0, reconnecting
after a daemon restart (and the first-contact rule), and backups.  Each
scenario is written once, as a coroutine over an ``AsyncClient``-shaped
object; for the blocking client that object calls :class:`Client` inline.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import nexusd
from nexusd import AsyncClient, BadRequest, Client, ConnectionLost, DaemonNotRunning
from nexusd.wire import protocol as p
from nexusd.wire.framing import FrameDecoder, encode_frame
from tests.conftest import Daemon, _new_daemon

FLAVORS = ["blocking", "asyncio", "trio"]
#: Every test on a daemon runs against SQLite and PostgreSQL storage (tests/conftest.py).
BOTH_BACKENDS = True


class Blocking:
    """A :class:`Client` with the async client's shape: every method awaitable, run inline."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_client", Client(*args, **kwargs))

    async def __aenter__(self) -> Blocking:
        self._client.__enter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._client.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return attr(*args, **kwargs)

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._client, name, value)


def make(flavor: str, *args: Any, **kwargs: Any) -> Any:
    return Blocking(*args, **kwargs) if flavor == "blocking" else AsyncClient(*args, **kwargs)


def run(flavor: str, scenario: Callable[[], Awaitable[None]]) -> None:
    anyio.run(scenario, backend="trio" if flavor == "trio" else "asyncio")


class FakeDaemon:
    """A hand-written server on a real Unix socket, in a thread.

    ``answer(request, n)`` gets each request (decoded MessagePack) and how many
    came before it, and returns the bytes to send back (framing included), or
    None to stay silent.  A connection left silent is closed after ``linger``
    seconds, so a client that waits forever fails the test instead of hanging it.
    """

    def __init__(
        self, path: Path, answer: Callable[[dict[str, Any], int], bytes | None], linger: float = 5.0
    ) -> None:
        self.answer, self.linger = answer, linger
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.listener.settimeout(0.05)  # how often the accept loop looks at `stopping`
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        frames = FrameDecoder(1 << 20)
        conn.settimeout(self.linger)
        with conn:
            try:
                while data := conn.recv(65536):
                    for body in frames.feed(data):
                        request = msgspec.msgpack.decode(body)
                        out = self.answer(request, len(self.requests))
                        self.requests.append(request)
                        if out is not None:
                            conn.sendall(out)
            except OSError:
                return

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.listener.close()


@pytest.fixture
def fake(short_dir: Path) -> Iterator[Callable[..., FakeDaemon]]:
    made: list[FakeDaemon] = []

    def start(answer: Callable[[dict[str, Any], int], bytes | None]) -> FakeDaemon:
        made.append(FakeDaemon(short_dir / "fake.sock", answer))
        return made[-1]

    yield start
    for f in made:
        f.close()


def pong(request: dict[str, Any]) -> bytes:
    return encode_frame(p.encoder.encode(p.PingReply(id=request["id"])))


#: A frame whose body is not MessagePack at all (0xc1 is never used).
GARBAGE = encode_frame(b"\xc1\xc1\xc1")
#: Well-formed MessagePack that is no reply the protocol has.
NOT_A_REPLY = encode_frame(msgspec.msgpack.encode({"op": "no_such_reply", "id": 1}))


# ── a reply that does not decode ─────────────────────────────────────────────
@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("bad", [GARBAGE, NOT_A_REPLY], ids=["garbage", "not_a_reply"])
def test_an_undecodable_reply_is_connection_lost_and_the_next_call_reconnects(
    flavor: str, bad: bytes, fake: Callable[..., FakeDaemon], short_dir: Path
) -> None:
    server = fake(lambda req, n: bad if n == 0 else pong(req))

    async def scenario() -> None:
        async with make(flavor, short_dir / "fake.sock", retry_for=0) as c:
            with pytest.raises(ConnectionLost, match="bad reply"):
                await c.ping()
            await c.ping()  # a new connection, answered properly
        assert server.connections == 2

    run(flavor, scenario)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_with_retries_an_undecodable_reply_is_resent_on_a_new_connection(
    flavor: str, fake: Callable[..., FakeDaemon], short_dir: Path
) -> None:
    server = fake(lambda req, n: GARBAGE if n == 0 else pong(req))

    async def scenario() -> None:
        async with make(flavor, short_dir / "fake.sock", retry_for=5) as c:
            await c.ping()  # ping is safe to resend
        assert [r["op"] for r in server.requests] == ["ping", "ping"]
        assert server.connections == 2

    run(flavor, scenario)


# ── timeout 0 ────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("flavor", FLAVORS)
def test_timeout_zero_is_refused_when_the_client_is_made(flavor: str, short_dir: Path) -> None:
    """The documented meaning: a timeout is None (no bound) or seconds > 0."""
    with pytest.raises(BadRequest, match="timeout must be None") as err:
        make(flavor, short_dir / "unused.sock", timeout=0)
    assert err.value.field == "timeout"


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_deadline_of_zero_expires_at_once_on_every_transport(
    flavor: str, fake: Callable[..., FakeDaemon], short_dir: Path
) -> None:
    """Set afterwards, 0 is still a bound (only None means none): the call times out."""
    fake(lambda req, n: None)  # never answers (and hangs up after 5 s)

    async def scenario() -> None:
        async with make(flavor, short_dir / "fake.sock", retry_for=0) as c:
            c.timeout = 0
            started = time.monotonic()
            with pytest.raises(nexusd.Timeout):
                await c.ping()
            assert time.monotonic() - started < 2.5

    run(flavor, scenario)


# ── reconnecting after a restart, and first contact ──────────────────────────
@pytest.mark.parametrize("flavor", FLAVORS)
def test_calls_survive_a_daemon_restart(
    flavor: str, short_dir: Path, daemon_storage: str | None
) -> None:
    d = _new_daemon(short_dir, storage=daemon_storage).start()

    async def scenario() -> None:
        async with make(flavor, d.socket) as c:
            await c.append("user", "one", session_tag="t")
            # (in a thread: an async program's loop keeps running meanwhile)
            assert await anyio.to_thread.run_sync(d.stop) == 0
            await anyio.to_thread.run_sync(d.start)
            # The old connection is dead: noticed before sending, reopened.
            await c.append("user", "two", session_tag="t")
            assert await anyio.to_thread.run_sync(d.stop) == 0
            # Down while the call starts: retried until the daemon is back.
            starter = threading.Thread(target=d.start)
            starter.start()
            try:
                await c.append("user", "three", session_tag="t")
            finally:
                starter.join()
            history = await c.get_history("t")
            assert [m.content for m in history] == ["one", "two", "three"]

    try:
        run(flavor, scenario)
    finally:
        d.stop()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_with_retries_off_a_restart_fails_one_call_then_reconnects(
    flavor: str, short_dir: Path, daemon_storage: str | None
) -> None:
    d = _new_daemon(short_dir, storage=daemon_storage).start()

    async def scenario() -> None:
        async with make(flavor, d.socket, retry_for=0) as c:
            await c.append("user", "one", session_tag="t")
            assert await anyio.to_thread.run_sync(d.stop) == 0
            await anyio.to_thread.run_sync(d.start)
            # Closed while idle: this call fails, nothing sent; the next reconnects.
            with pytest.raises(ConnectionLost, match="next call reconnects"):
                await c.pop("t")
            popped = await c.pop("t")
            assert popped is not None and popped.content == "one"

    try:
        run(flavor, scenario)
    finally:
        d.stop()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_daemon_that_was_never_reached_is_not_waited_for(flavor: str, short_dir: Path) -> None:
    """First contact: no retries (retry_for is 30 s) when nothing ever answered."""

    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(DaemonNotRunning, match="nexusd serve"):
            async with make(flavor, short_dir / "none.sock"):
                pass
        if flavor == "blocking":  # it may also be used without `with`: first use connects
            with pytest.raises(DaemonNotRunning):
                Client(short_dir / "none.sock").ping()
        assert time.monotonic() - started < 5

    run(flavor, scenario)


# ── backup ───────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("flavor", FLAVORS)
def test_backup_to_a_file_and_never_over_the_live_database(
    flavor: str, daemon: Daemon, tmp_path: Path, backend: str
) -> None:
    if backend == "postgres":
        return _backup_refused_with_postgres(flavor, daemon, tmp_path)
    dest = tmp_path / "copy.db"
    seen: list[tuple[int, int]] = []

    async def scenario() -> None:
        async with make(flavor, daemon.socket) as c:
            await c.append_many([("user", f"m{i}") for i in range(50)], session_tag="b")
            size = await c.backup(dest, progress=lambda done, total: seen.append((done, total)))
            assert size == dest.stat().st_size and seen[-1] == (size, size)
            with pytest.raises(BadRequest, match="live database") as err:
                await c.backup(daemon.db)
            assert err.value.field == "dest"
            assert await c.message_count("b") == 50  # the live file untouched

    run(flavor, scenario)
    conn = sqlite3.connect(dest)
    try:
        count = conn.execute("SELECT count(*) FROM nexus_messages WHERE session_tag = 'b'")
        assert count.fetchone() == (50,)
    finally:
        conn.close()
    assert dest.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["copy.db"]  # no temporary file left


def _backup_refused_with_postgres(flavor: str, daemon: Daemon, tmp_path: Path) -> None:
    """PostgreSQL's own tools back it up (docs/scaling.md): said at once, nothing written."""
    dest = tmp_path / "copy.db"

    async def scenario() -> None:
        async with make(flavor, daemon.socket) as c:
            await c.append_many([("user", f"m{i}") for i in range(5)], session_tag="b")
            started = time.monotonic()
            with pytest.raises(nexusd.Unavailable, match="pg_dump"):
                await c.backup(dest)
            assert time.monotonic() - started < 5  # a refusal, not retried for retry_for
            assert await c.message_count("b") == 5

    run(flavor, scenario)
    assert list(tmp_path.iterdir()) == []
