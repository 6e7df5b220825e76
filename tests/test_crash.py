"""Kill -9 under a write storm, restart, and account for every acknowledged row.

Each round: concurrent clients append (single and ``append_many``) to a real
daemon, which is SIGKILLed at a random moment and restarted on the same
files.  Then: every acknowledged id holds exactly the content sent, the
database passes ``integrity_check``, and every ``append_many`` whose answer
never came is wholly present or wholly absent.  The seed is printed; replay a
failure with ``NEXUSD_CRASH_SEED=<seed>``.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from nexusd import AsyncClient, NexusError
from nexusd.storage.schema import integrity_check
from tests.conftest import _new_daemon

pytestmark = pytest.mark.anyio
ROUNDS = int(os.environ.get("NEXUSD_CRASH_ROUNDS", "4"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Ledger:
    acked: dict[int, str] = field(default_factory=dict)
    unacked_batches: list[list[str]] = field(default_factory=list)
    unacked_singles: list[str] = field(default_factory=list)


async def _storm(
    socket: Path, rng: random.Random, ledger: Ledger, round_no: int, worker: int
) -> None:
    # retry_for=0: a client must see the kill, not paper over it.
    try:
        async with AsyncClient(socket, retry_for=0) as c:
            n = 0
            while True:
                n += 1
                tag = f"r{round_no}-w{worker % 3}"
                if rng.random() < 0.3:
                    contents = [f"{round_no}/{worker}/{n}/{i}" for i in range(rng.randint(2, 40))]
                    try:
                        ids = await c.append_many([("user", x) for x in contents], session_tag=tag)
                    except NexusError:
                        ledger.unacked_batches.append(contents)
                        return
                    ledger.acked.update(zip(ids, contents, strict=True))
                else:
                    content = f"{round_no}/{worker}/{n}" + "x" * rng.randint(0, 2000)
                    try:
                        mid = await c.append("assistant", content, session_tag=tag)
                    except NexusError:
                        ledger.unacked_singles.append(content)
                        return
                    ledger.acked[mid] = content
    except NexusError:
        return  # could not even connect: the daemon is already gone


def _stored(db: Path) -> dict[int, str]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT id, content FROM nexus_messages").fetchall())
    finally:
        conn.close()


async def test_sigkill_under_write_storm_loses_nothing_acknowledged(short_dir: Path) -> None:
    seed = int(os.environ.get("NEXUSD_CRASH_SEED", random.randrange(2**32)))
    print(f"crash test seed: {seed} (replay with NEXUSD_CRASH_SEED={seed})")
    rng = random.Random(seed)
    d = _new_daemon(short_dir, "--max-messages", "0")
    ledger = Ledger()
    total_unacked_batches = 0
    for round_no in range(ROUNDS):
        d.start()
        kill_after = rng.uniform(0.05, 0.6)
        async with anyio.create_task_group() as tg:
            for w in range(8):
                tg.start_soon(_storm, d.socket, random.Random(rng.random()), ledger, round_no, w)
            await anyio.sleep(kill_after)  # the random kill point, not a wait-for-readiness
            assert d.proc is not None
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
        # Restart on the same files: it must come up and serve.
        d.start()
        async with AsyncClient(d.socket) as c:
            await c.ping()
        stored = _stored(d.db)
        missing = [i for i in ledger.acked if i not in stored]
        assert not missing, f"seed {seed}: acknowledged ids lost: {missing[:10]}"
        wrong = [i for i, text in ledger.acked.items() if stored[i] != text]
        assert not wrong, f"seed {seed}: acknowledged rows altered: {wrong[:10]}"
        assert integrity_check(d.db) == ["ok"]
        present = set(stored.values())
        for batch in ledger.unacked_batches:
            found = sum(x in present for x in batch)
            assert found in (0, len(batch)), (
                f"seed {seed}: half a batch stored ({found}/{len(batch)})"
            )
        total_unacked_batches += len(ledger.unacked_batches)
        ledger.unacked_batches.clear()
        assert d.stop() == 0
    print(
        f"crash test: {ROUNDS} rounds, {len(ledger.acked)} rows acknowledged, 0 lost, "
        f"{total_unacked_batches} unacknowledged batches all-or-nothing"
    )
    assert len(ledger.acked) > 100  # the storm really stormed
