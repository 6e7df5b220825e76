"""What the clients check before sending: the frame fits, the connection is still open."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from nexusd import AsyncClient, Client
from nexusd.errors import TooLarge
from tests.conftest import Daemon, _new_daemon, write_config


@pytest.fixture(scope="module")
def small_frames() -> object:
    """A daemon whose frames are 64 KiB (the smallest allowed)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="nxg", dir="/tmp"))
    cfg = write_config(base / "c.toml", max_meta=16384, idle_timeout=0.5)
    d = _new_daemon(base, "--config", str(cfg), "--max-frame", "65536", "--max-content", "40000")
    d.start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def _accepted(d: Daemon) -> int:
    with Client(d.socket) as c:
        return int(c.stats()["connections_accepted"])


def test_blocking_client_refuses_a_frame_over_max_frame_without_sending_it(
    small_frames: Daemon,
) -> None:
    d = small_frames
    with Client(d.socket) as c:
        before = _accepted(d)
        with pytest.raises(TooLarge) as info:
            c.append("user", "x" * 100_000)  # "Broken pipe" before: the daemon cut it off
        assert "max_frame" in info.value.message and "65536" in info.value.message
        with pytest.raises(TooLarge):
            c.append_many([("user", "y" * 30_000)] * 3)
        c.ping()  # the same connection is still fine
        assert c.append("user", "small") > 0
        assert _accepted(d) == before + 1  # no reconnect happened (only _accepted's own)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_client_refuses_a_frame_over_max_frame_without_sending_it(
    small_frames: Daemon, backend: str
) -> None:
    async def main() -> None:
        async with AsyncClient(small_frames.socket, retry_for=0) as c:
            with pytest.raises(TooLarge, match="max_frame"):
                await c.append("user", "x" * 100_000)
            await c.ping()
            assert await c.append("user", "after") > 0

    anyio.run(main, backend=backend)


def test_blocking_client_reconnects_before_sending_to_a_connection_the_daemon_closed(
    short_dir: Path,
) -> None:
    """pop is never resent: it must not be handed to a connection already closed."""
    d = _new_daemon(short_dir).start()
    try:
        with Client(d.socket) as c:
            c.append("user", "one", session_tag="t")
            assert d.stop() == 0
            d.start()  # the client's connection is now closed at the other end
            with Client(d.socket) as other:
                other.append("user", "two", session_tag="t")
            popped = c.pop("t")  # ConnectionLost before: it was sent into the closed socket
            assert popped is not None and popped.content == "two"
            assert c.clear("t") == 1
    finally:
        d.stop()


def test_blocking_client_survives_the_daemons_idle_timeout(small_frames: Daemon) -> None:
    d = small_frames
    with Client(d.socket) as c:
        c.append("user", "idle", session_tag="idle")
        with Client(d.socket) as probe:
            # Wait (bounded) until the daemon has closed c's connection for idleness.
            end = time.monotonic() + 10
            while probe.stats()["connections"] > 1 and time.monotonic() < end:
                time.sleep(0.05)  # poll interval of a deadline loop
            if probe.stats()["connections"] > 1:
                pytest.skip("this daemon does not enforce idle_timeout yet")
        popped = c.pop("idle")
        assert popped is not None and popped.content == "idle"


def test_with_retries_off_a_closed_connection_fails_once_then_reconnects(
    short_dir: Path,
) -> None:
    """retry_for=0: no silent reconnect (a stopped daemon stays stopped under socket
    activation); nothing is sent on the dead connection, and the next call reconnects."""
    from nexusd.errors import ConnectionLost

    d = _new_daemon(short_dir).start()
    try:
        with Client(d.socket, retry_for=0) as c:
            c.append("user", "one", session_tag="t")
            assert d.stop() == 0
            d.start()
            with pytest.raises(ConnectionLost, match="next call reconnects"):
                c.pop("t")
            popped = c.pop("t")
            assert popped is not None and popped.content == "one"
    finally:
        d.stop()
