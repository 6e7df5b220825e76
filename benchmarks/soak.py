"""Soak test: mixed load against a real daemon that is killed and restarted.

Runs for a bounded time (and a bounded number of requests), loopback only:
clients append (single and batched), read and count while a killer SIGKILLs
or SIGTERMs the daemon at random moments and starts it again on the same
files.  At the end every acknowledged row is checked against the database.

    python benchmarks/soak.py --duration 180

Prints requests served, errors by code, acknowledged rows verified, rows
lost (must be 0) and duplicated (must be 0).  Exit status 1 if any were.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from bench import serve_command, wait_socket  # the sibling script: python benchmarks/soak.py

from nexusd import AsyncClient, NexusError
from nexusd.storage.schema import integrity_check


class Daemon:
    def __init__(self, base: Path) -> None:
        self.db = base / "nexus.db"
        self.socket = base / "nexusd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = open(base / "daemon.log", "ab")

    def start(self) -> None:
        cmd = serve_command(self.db, self.socket, "--max-messages", "0", "--shutdown-timeout", "5")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        wait_socket(self.socket, self.proc, deadline=20)

    def stop(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)


async def client(
    d: Daemon,
    n: int,
    rng: random.Random,
    end: float,
    stats: dict[str, int],
    errors: collections.Counter[str],
    acked: dict[int, str],
    budget: list[int],
) -> None:
    async with AsyncClient(d.socket, retry_for=15) as c:
        i = 0
        while time.monotonic() < end and budget[0] > 0:
            budget[0] -= 1
            i += 1
            tag = f"soak-{n % 5}"
            roll = rng.random()
            try:
                if roll < 0.65:
                    text = f"{n}:{i}:" + "m" * rng.randint(0, 400)
                    acked[await c.append("user", text, session_tag=tag)] = text
                elif roll < 0.75:
                    texts = [f"{n}:{i}:{k}" for k in range(rng.randint(2, 50))]
                    ids = await c.append_many([("assistant", t) for t in texts], session_tag=tag)
                    acked.update(zip(ids, texts, strict=True))
                elif roll < 0.95:
                    await c.get_history(tag, limit=rng.choice([1, 20, 200]))
                else:
                    await (c.message_count(tag) if rng.random() < 0.5 else c.sessions())
                stats["served"] += 1
            except NexusError as exc:
                errors[exc.code] += 1


async def killer(d: Daemon, rng: random.Random, end: float, every: float, kills: list[str]) -> None:
    while True:
        pause = rng.expovariate(1 / every)
        if time.monotonic() + pause >= end:
            return
        await anyio.sleep(pause)
        how = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM])
        await anyio.to_thread.run_sync(d.stop, how)
        kills.append(signal.Signals(how).name)
        await anyio.to_thread.run_sync(d.start)


async def soak(args: argparse.Namespace) -> int:
    base = Path(args.dir or tempfile.mkdtemp(prefix="nxsoak", dir="/tmp"))
    rng = random.Random(args.seed)
    d = Daemon(base)
    d.start()
    stats: dict[str, int] = collections.defaultdict(int)
    errors: collections.Counter[str] = collections.Counter()
    acked: dict[int, str] = {}
    kills: list[str] = []
    budget = [args.max_requests]
    started = time.monotonic()
    end = started + args.duration
    async with anyio.create_task_group() as tg:
        tg.start_soon(killer, d, random.Random(rng.random()), end, args.kill_every, kills)
        for n in range(args.clients):
            tg.start_soon(
                client, d, n, random.Random(rng.random()), end, stats, errors, acked, budget
            )
    elapsed = time.monotonic() - started
    d.stop(signal.SIGTERM)

    conn = sqlite3.connect(d.db)
    rows = dict(conn.execute("SELECT id, content FROM nexus_messages").fetchall())
    contents = collections.Counter(conn.execute("SELECT content FROM nexus_messages").fetchall())
    conn.close()
    lost = [i for i, text in acked.items() if rows.get(i) != text]
    duplicated = sum(n - 1 for n in contents.values() if n > 1)
    integrity = integrity_check(d.db)

    print(f"soak: {elapsed:.0f} s, {args.clients} clients, seed {args.seed}, data in {base}")
    print(f"  daemon kills/restarts : {len(kills)} ({collections.Counter(kills)})")
    print(f"  requests served       : {stats['served']} ({stats['served'] / elapsed:.0f}/s)")
    print(f"  errors by code        : {dict(errors) or 'none'}")
    print(f"  acked rows verified   : {len(acked) - len(lost)} of {len(acked)}")
    print(f"  rows lost             : {len(lost)}")
    print(f"  rows duplicated       : {duplicated}")
    print(f"  integrity_check       : {'ok' if integrity == ['ok'] else integrity[:3]}")
    return 1 if lost or duplicated or integrity != ["ok"] else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--kill-every", type=float, default=10.0, help="mean seconds between kills")
    ap.add_argument("--max-requests", type=int, default=5_000_000, help="stop after this many")
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    ap.add_argument("--dir", help="where to keep the database (default: a new temp dir)")
    args = ap.parse_args()
    sys.exit(anyio.run(soak, args))


if __name__ == "__main__":
    main()
