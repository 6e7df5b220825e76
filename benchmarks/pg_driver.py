"""psycopg 3 against asyncpg on nexusd's write shapes: the numbers behind "why psycopg".

    python benchmarks/pg_driver.py [--seconds 1.5] [--runs 3] [--json benchmarks/pg_driver.json]

Against a durable cluster of its own (pg.py's: fsync on, Unix socket), one
connection per driver, one task, the same table and rows:

  one        one-row INSERT in autocommit (the server's implicit transaction):
             one round trip with either driver
  txn        the writer's shape for one append: BEGIN; pg_advisory_xact_lock;
             INSERT ... RETURNING id; COMMIT. psycopg in pipeline mode sends it
             in one round trip; asyncpg has no pipeline: four
  batch100   100 rows in one transaction under the lock: psycopg as one INSERT
             from unnest() arrays (what writes.py does) and executemany (pipelined);
             asyncpg as the same unnest() INSERT, executemany and
             copy_records_to_table
  batch100 unnest binary  psycopg with %b placeholders (arrays sent in binary,
             as asyncpg always does; copy.py does this, writes.py's text
             arrays do not)
  batch100 copy  psycopg's COPY FROM STDIN, for comparison with asyncpg's copy

each with synchronous_commit on (a WAL fsync per commit: what nexusd runs) and
off (the round trips and the drivers' own CPU, without the disk). Figures:
transactions/s, p50/p99, and the client's CPU per transaction (process time),
median (min-max) over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from pg import cluster

LOCK = 7_000_001
ROW = ("s1", "user", "x" * 200)
DDL = (
    "CREATE TABLE IF NOT EXISTS t (id bigserial PRIMARY KEY, session_tag text NOT NULL, "
    "role text NOT NULL, content text NOT NULL)"
)
INS = "INSERT INTO t (session_tag, role, content) VALUES (%s, %s, %s) RETURNING id"
INS_A = "INSERT INTO t (session_tag, role, content) VALUES ($1, $2, $3) RETURNING id"
UNNEST = (
    "INSERT INTO t (session_tag, role, content) SELECT * FROM unnest({}::text[], "
    "{}::text[], {}::text[]) RETURNING id"
)
TAGS, ROLES, CONTENTS = ([r[i] for r in [ROW] * 100] for i in range(3))


def pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


async def timed(secs: float, op: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    for _ in range(5):  # warm-up: prepared statements, caches
        await op()
    lat: list[float] = []
    cpu0, end = time.process_time(), time.perf_counter() + secs
    while (t0 := time.perf_counter()) < end:
        await op()
        lat.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    return {
        "per_s": round(len(lat) / sum(lat), 1),
        "p50_ms": round(pct(lat, 0.5) * 1e3, 3),
        "p99_ms": round(pct(lat, 0.99) * 1e3, 3),
        "client_cpu_us": round(cpu / len(lat) * 1e6, 1),
    }


async def psycopg_points(url: str, sync: str, secs: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"SET synchronous_commit = {sync}".encode())  # fixed text

        async def one() -> None:
            await (await conn.execute(INS, ROW)).fetchone()

        async def txn() -> None:
            async with conn.pipeline(), conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
                cur = await conn.execute(INS, ROW)
            await cur.fetchone()

        async def unnest() -> None:
            async with conn.pipeline(), conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
                cur = await conn.execute(UNNEST.format("%s", "%s", "%s"), (TAGS, ROLES, CONTENTS))
            await cur.fetchall()

        async def unnest_b() -> None:  # the arrays dumped in binary, as copy.py does
            async with conn.pipeline(), conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
                cur = await conn.execute(UNNEST.format("%b", "%b", "%b"), (TAGS, ROLES, CONTENTS))
            await cur.fetchall()

        async def many() -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
                async with conn.cursor() as cur:
                    await cur.executemany(INS, [ROW] * 100, returning=True)

        async def copy() -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
                async with (
                    conn.cursor() as cur,
                    cur.copy("COPY t (session_tag, role, content) FROM STDIN") as cp,
                ):
                    for row in [ROW] * 100:
                        await cp.write_row(row)

        out["one"] = await timed(secs, one)
        out["txn"] = await timed(secs, txn)
        out["batch100 unnest"] = await timed(secs, unnest)
        out["batch100 unnest binary"] = await timed(secs, unnest_b)
        out["batch100 executemany"] = await timed(secs, many)
        out["batch100 copy"] = await timed(secs, copy)
    return out


async def asyncpg_points(url: str, sync: str, secs: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    host = url.split("host=", 1)[1]
    conn = await asyncpg.connect(host=host, user="nexusd", database="postgres")
    try:
        await conn.execute(f"SET synchronous_commit = {sync}")

        async def one() -> None:
            await conn.fetchval(INS_A, *ROW)

        async def txn() -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
                await conn.fetchval(INS_A, *ROW)

        async def unnest() -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
                await conn.fetch(UNNEST.format("$1", "$2", "$3"), TAGS, ROLES, CONTENTS)

        async def many() -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
                await conn.executemany(INS_A, [ROW] * 100)  # no RETURNING in executemany

        async def copy() -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
                await conn.copy_records_to_table(
                    "t", records=[ROW] * 100, columns=["session_tag", "role", "content"]
                )

        out["one"] = await timed(secs, one)
        out["txn"] = await timed(secs, txn)
        out["batch100 unnest"] = await timed(secs, unnest)
        out["batch100 unnest binary"] = out["batch100 unnest"]  # asyncpg: always binary
        out["batch100 executemany"] = await timed(secs, many)
        out["batch100 copy"] = await timed(secs, copy)
    finally:
        await conn.close()
    return out


async def run(url: str, secs: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(DDL)
    for sync in ("on", "off"):
        out[sync] = {
            "psycopg": await psycopg_points(url, sync, secs),
            "asyncpg": await asyncpg_points(url, sync, secs),
        }
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("TRUNCATE t")
    return out


def report(res: dict[str, Any]) -> str:
    runs = res["runs"]

    def cell(sync: str, drv: str, point: str, key: str, fmt: str) -> str:
        vals = [float(r[sync][drv][point][key]) for r in runs]
        m = statistics.median(vals)
        return f"{m:{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})"

    lines = [
        "| synchronous_commit | workload | psycopg tx/s | p50 ms | client µs/tx "
        "| asyncpg tx/s | p50 ms | client µs/tx |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for sync in ("on", "off"):
        for point in runs[0][sync]["psycopg"]:
            row = [sync, point]
            for drv in ("psycopg", "asyncpg"):
                row += [
                    cell(sync, drv, point, "per_s", ".0f"),
                    cell(sync, drv, point, "p50_ms", ".3f"),
                    cell(sync, drv, point, "client_cpu_us", ".0f"),
                ]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"1-min load average per run: {', '.join(f'{x:.2f}' for x in res['load'])}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="psycopg vs asyncpg (see the docstring)")
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/pg_driver.json"))
    args = ap.parse_args()
    res: dict[str, Any] = {
        "versions": {"psycopg": psycopg.__version__, "asyncpg": asyncpg.__version__},
        "libpq": psycopg.pq.version(),
        "psycopg_impl": psycopg.pq.__impl__,
        "runs": [],
        "load": [],
    }
    base = Path(tempfile.mkdtemp(prefix="nxpgdriver", dir="/tmp"))
    try:
        with cluster(base) as (url, _):
            for _ in range(args.runs):
                res["load"].append(os.getloadavg()[0])
                res["runs"].append(asyncio.run(run(url, args.seconds)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    args.json.write_text(json.dumps(res, indent=1))
    print(report(res))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
