"""What the clients check before sending: the frame fits, the connection is still open."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from nexusd import AsyncClient, Client
from nexusd.wire.errors import TooLarge
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
    from nexusd.wire.errors import ConnectionLost

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


# ── what the clients cannot encode is the caller's BadRequest (issue 9, CLI findings) ──
from typing import Any  # noqa: E402  (this section is appended to the module)


def _unsendable() -> list[tuple[str, dict[str, Any], str]]:
    """(method, arguments, the field named): each raised msgspec's or dict()'s error before."""
    return [
        ("append", {"meta": "notadict"}, "meta"),
        ("append", {"meta": [("a", 1)]}, "meta"),
        ("append", {"meta": {"when": object()}}, "meta"),
        ("append", {"meta": {"n": 10**30}}, "meta"),
        (
            "append_many",
            {"messages": [("u", "ok"), {"role": "u", "content": "x", "meta": "s"}]},
            "messages[1].meta",
        ),
        (
            "append_many",
            {"messages": [{"role": "u", "content": "x", "meta": {"n": -(2**70)}}]},
            "messages[0].meta",
        ),
        ("append_many", {"messages": ["ab"]}, "messages[0]"),
        ("append_many", {"messages": [{"role": "u"}]}, "messages[0]"),
        ("get_history", {"before_id": 99999999999999999999999}, "before_id"),
        ("get_history", {"after_id": -(2**64)}, "after_id"),
        ("get_history", {"limit": 2**64}, "limit"),
    ]


def _call_args(method: str, kwargs: dict[str, Any], tag: str) -> tuple[list[Any], dict[str, Any]]:
    if method == "append":
        return ["user", "x"], {**kwargs, "session_tag": tag}
    if method == "append_many":
        return [kwargs["messages"]], {"session_tag": tag}
    return [tag], kwargs


def test_blocking_client_refuses_what_it_cannot_encode(small_frames: Daemon) -> None:
    from nexusd.wire.errors import BadRequest

    with Client(small_frames.socket) as c:
        for method, kwargs, field in _unsendable():
            args, kw = _call_args(method, kwargs, "unsendable")
            with pytest.raises(BadRequest) as info:
                getattr(c, method)(*args, **kw)
            assert info.value.field == field, (method, kwargs, info.value.message)
            assert info.value.message.startswith(field), info.value.message
        assert c.message_count("unsendable") == 0  # nothing was sent; the connection is fine


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_client_refuses_what_it_cannot_encode(small_frames: Daemon, backend: str) -> None:
    from nexusd.wire.errors import BadRequest

    async def main() -> None:
        async with AsyncClient(small_frames.socket, retry_for=0) as c:
            for method, kwargs, field in _unsendable():
                args, kw = _call_args(method, kwargs, f"unsendable-{backend}")
                with pytest.raises(BadRequest) as info:
                    await getattr(c, method)(*args, **kw)
                assert info.value.field == field, (method, kwargs, info.value.message)
            assert await c.message_count(f"unsendable-{backend}") == 0

    anyio.run(main, backend=backend)


def test_unusable_socket_paths_are_named_plainly(short_dir: Path) -> None:
    from nexusd.wire.errors import BadRequest, DaemonNotRunning

    with pytest.raises(BadRequest, match="socket_path must not be empty"):
        Client("")  # was Path("") == ".": "connection refused" on the working directory
    with pytest.raises(BadRequest, match="at most 107 bytes"):
        AsyncClient("/tmp/" + "x" * 120)
    with pytest.raises(DaemonNotRunning) as info:
        Client(short_dir).ping()
    assert f"{short_dir} is not a socket (it is a directory)" in info.value.message
    assert "nexusd serve" not in info.value.message  # starting a daemon would not help

    async def main() -> None:
        with pytest.raises(DaemonNotRunning, match="is not a socket"):
            async with AsyncClient(short_dir):
                pass

    anyio.run(main, backend="asyncio")


# ── adversarial findings: absurd timeouts, lone surrogates ──────────────────
@pytest.mark.parametrize("timeout", [1e12, 86_400.5, 0, -1, float("nan"), float("inf"), "5"])
def test_timeouts_out_of_range_are_refused_when_the_client_is_made(timeout: Any) -> None:
    """1e12 overflowed time_t in settimeout, after connecting: a bare OverflowError."""
    from nexusd.wire.errors import BadRequest

    for cls in (Client, AsyncClient):
        with pytest.raises(BadRequest, match="timeout must be") as info:
            cls("/tmp/none.sock", timeout=timeout)
        assert info.value.field == "timeout"
    assert Client("/tmp/none.sock", timeout=86_400).timeout == 86_400
    assert AsyncClient("/tmp/none.sock", timeout=None).timeout is None


def test_lone_surrogates_are_refused_in_plain_words(small_frames: Daemon) -> None:
    from nexusd.wire.errors import BadRequest

    cases: list[tuple[dict[str, Any], str]] = [
        ({"meta": {"\ud800": 1}}, "meta"),
        ({"meta": {"a": ["ok", "\udc80"]}}, "meta"),
        ({"content": "caf\udce9"}, "content"),
        ({"role": "\udfff"}, "role"),
    ]
    with Client(small_frames.socket) as c:
        for kwargs, field in cases:
            args = {"role": "user", "content": "x", "session_tag": "surrogates", **kwargs}
            with pytest.raises(BadRequest) as info:
                c.append(**args)
            assert info.value.field == field, info.value.message
            assert "lone surrogate" in info.value.message and "codec" not in info.value.message
        assert c.message_count("surrogates") == 0


@pytest.mark.parametrize("retry_for", [float("nan"), -1, float("inf"), "30", True])
def test_retry_for_out_of_range_is_refused_when_the_client_is_made(retry_for: object) -> None:
    from nexusd.wire.errors import BadRequest

    with pytest.raises(BadRequest) as info:
        Client("/tmp/unused.sock", retry_for=retry_for)  # type: ignore[arg-type]
    assert info.value.field == "retry_for"
    with pytest.raises(BadRequest):
        AsyncClient("/tmp/unused.sock", retry_for=retry_for)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_client_with_retries_off_fails_once_then_reconnects(
    short_dir: Path, backend: str
) -> None:
    from nexusd.wire.errors import ConnectionLost

    d = _new_daemon(short_dir).start()

    async def main() -> None:
        async with AsyncClient(d.socket, retry_for=0) as c:
            await c.append("user", "two", session_tag="u")
            assert await anyio.to_thread.run_sync(d.stop) == 0
            await anyio.to_thread.run_sync(d.start)
            # The link saw the close while idle: one call fails, nothing is sent...
            with pytest.raises(ConnectionLost):
                await c.pop("u")
            # ...and the next reconnects (the popped message is still there).
            popped = await c.pop("u")
            assert popped is not None and popped.content == "two"

    try:
        anyio.run(main, backend=backend)
    finally:
        d.stop()
