"""nexusd/integrations/link.py: settled writes, the link's clients, session tags, a closed link."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nexusd.integrations.link import Link, check_tag, settle

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # settle() is asyncio's, as the frameworks are


async def test_settle_finishes_the_write_then_raises_the_cancellation() -> None:
    done = asyncio.Event()
    release = asyncio.Event()

    async def write() -> str:
        await release.wait()
        done.set()
        return "stored"

    task = asyncio.create_task(settle(write()))
    await asyncio.sleep(0)  # let it start waiting
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done()  # the cancellation waits for the write
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done.is_set()
    assert await settle(write()) == "stored"  # uncancelled: the result


def test_link_refuses_what_is_not_a_client() -> None:
    with pytest.raises(TypeError, match="Client or AsyncClient, not dict"):
        Link(None, {}, adapter="X")  # type: ignore[arg-type]


def test_a_session_tag_is_checked_before_any_call() -> None:
    assert check_tag("chat-42", what="session_id", adapter="X") == "chat-42"
    with pytest.raises(ValueError, match=r"X: session_id must be 1 to 256 characters .*not 300"):
        check_tag("s" * 300, what="session_id", adapter="X")
    with pytest.raises(ValueError, match="not 0"):
        check_tag("", what="key", adapter="X")
    with pytest.raises(TypeError, match="a str, not int"):
        check_tag(42, what="session_id", adapter="X")


async def test_a_closed_link_says_so(short_dir: Path) -> None:
    from nexusd import AsyncClient, Client

    for client in (None, Client(short_dir / "s.sock"), AsyncClient(short_dir / "s.sock")):
        link = Link(short_dir / "s.sock" if client is None else None, client, adapter="Thing")
        link.close()
        link.close()  # idempotent
        with pytest.raises(RuntimeError, match=r"^Thing is closed$"):
            await link.call(Client.ping)
        with pytest.raises(RuntimeError, match=r"^Thing is closed$"):
            link.run(iter([]))  # type: ignore[arg-type]
