"""A conversation's life, measured (issue 13): removing a million rows while others append.

    python benchmarks/lifecycle.py [--rows 1000000] [--runs 3] [--json benchmarks/lifecycle.json]
    python benchmarks/lifecycle.py --only C      # one section: C or E

Each run copies one prepared database (``--rows`` messages of prose, ~30
words each, in the session ``big``, with the full-text index built), starts a
daemon on it (synchronous=FULL, search on: the defaults), and has 8 tasks of
one AsyncClient append to 8 other sessions throughout:

  C  ``clear("big")``: how long the clear takes to answer, how long the
     background sweep takes to delete the rows, and the other sessions'
     append latency (p50/p99) and rate before the clear (a 3 s baseline) and
     while the sweep runs.
  E  retention by age: the same rows, committed two days ago (their commit
     marks moved back), and a daemon started with ``max_age = "1d"``: how long
     until they are gone, and the appends' latency and rate meanwhile (the
     baseline is the 3 s after).

The issue's bound: appends in other sessions keep p99 <= 10 ms while a
million rows are removed.  Every figure is per run; the summary gives the
median and range over the runs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
from live import prose

from nexusd import AsyncClient
from nexusd.storage import index as fts
from nexusd.storage.schema import open_writer

WRITERS = 8
BASELINE_S = 3.0


def prepare(db: Path, rows: int) -> float:
    """A database of ``rows`` prose messages in ``big``, indexed; seconds it took."""
    t0 = time.perf_counter()
    conn = open_writer(db)
    fts.ensure(conn)  # empty: complete at once, and the triggers index what follows
    conn.close()
    conn = sqlite3.connect(db, isolation_level=None)  # not the writer: triggers index
    rng = random.Random(7)
    conn.execute("BEGIN")
    for start in range(0, rows, 50_000):
        conn.executemany(
            "INSERT INTO nexus_messages (role, content, timestamp, session_tag)"
            " VALUES ('user', ?, '2026-01-01T00:00:00.000000Z', 'big')",
            [(prose(rng),) for _ in range(start, min(rows, start + 50_000))],
        )
    conn.execute("COMMIT")
    conn.execute(
        "INSERT INTO nexus_marks (second, last_id, at)"
        " SELECT CAST(strftime('%s', 'now') AS INTEGER), max(id),"
        " (julianday('now') - 2440587.5) * 86400.0 FROM nexus_messages WHERE true"
        " ON CONFLICT (second) DO UPDATE SET last_id = excluded.last_id"
    )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - t0


def stored(db: Path, tag: str = "big") -> int:
    with sqlite3.connect(db) as conn:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM nexus_messages WHERE session_tag = ?", (tag,)
            ).fetchone()[0]
        )


class Appenders:
    """8 tasks appending to their own sessions; latencies kept by phase."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.phase = "warmup"
        self.lat: dict[str, list[float]] = {}
        self.span: dict[str, list[float]] = {}
        self.stop = False

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        if self.phase in self.span:
            self.span[self.phase][1] = now
        self.phase = phase
        self.lat.setdefault(phase, [])
        self.span[phase] = [now, now]

    async def task(self, t: int) -> None:
        perf = time.perf_counter
        while not self.stop:
            t0 = perf()
            phase = self.phase
            await self.client.append("user", "a reply of a few words", session_tag=f"w{t}")
            if phase == self.phase:
                self.lat.setdefault(phase, []).append(perf() - t0)

    def report(self, phase: str) -> dict[str, Any]:
        lat = self.lat.get(phase, [])
        secs = self.span[phase][1] - self.span[phase][0]
        return bench.summary(len(lat), secs, lat)


async def with_appenders(d: bench.Daemon, body: Any, *, baseline_first: bool) -> dict[str, Any]:
    """Appends run throughout; ``body`` marks the "during" phase.  The baseline (3 s
    of the same appends with nothing removed) is taken before it, or after it when
    removal starts with the daemon (retention by age)."""
    async with AsyncClient(d.sock) as c:
        apps = Appenders(c)
        res: dict[str, Any] = {}
        async with anyio.create_task_group() as tg:
            for t in range(WRITERS):
                tg.start_soon(apps.task, t)
            if baseline_first:
                await anyio.sleep(0.5)
                apps.enter("baseline")
                await anyio.sleep(BASELINE_S)
            res.update(await body(c, apps))
            if not baseline_first:
                apps.enter("baseline")
                await anyio.sleep(BASELINE_S)
            apps.enter("end")
            apps.stop = True
        res["appends_baseline"] = apps.report("baseline")
        res["appends_during"] = apps.report("during")
        res["p99_ratio"] = round(
            res["appends_during"]["p99_ms"] / res["appends_baseline"]["p99_ms"], 2
        )
        res["rate_ratio"] = round(
            res["appends_during"]["per_s"] / res["appends_baseline"]["per_s"], 2
        )
        return res


async def section_c(run: Path, template: Path, rows: int) -> dict[str, Any]:
    shutil.copy(template, run / "nexus.db")
    with bench.Daemon(run, "--max-messages", "0") as d:

        async def body(c: AsyncClient, apps: Appenders) -> dict[str, Any]:
            apps.enter("during")
            t0 = time.perf_counter()
            cleared = await c.clear("big")
            answered = time.perf_counter() - t0
            assert cleared == rows, cleared
            assert await c.message_count("big") == 0
            while (await c.stats())["rows_swept"] < rows:  # noqa: ASYNC110 (another process)
                await anyio.sleep(0.05)
            return {
                "clear_answer_ms": round(answered * 1e3, 2),
                "sweep_s": round(time.perf_counter() - t0, 2),
            }

        res = await with_appenders(d, body, baseline_first=True)
    assert stored(run / "nexus.db") == 0
    return res


async def section_e(run: Path, template: Path, rows: int) -> dict[str, Any]:
    db = run / "nexus.db"
    shutil.copy(template, db)
    with sqlite3.connect(db) as conn:  # committed two days ago
        conn.execute("UPDATE nexus_marks SET second = second - 172800, at = at - 172800")
    with bench.Daemon(run, "--max-messages", "0", "--max-age", "1d") as d:
        started = time.perf_counter()

        async def body(c: AsyncClient, apps: Appenders) -> dict[str, Any]:
            apps.enter("during")  # the rows go from the daemon's start
            while (await c.stats())["rows_expired"] < rows:  # noqa: ASYNC110 (another process)
                await anyio.sleep(0.05)
            return {"expire_s": round(time.perf_counter() - started, 2)}

        res = await with_appenders(d, body, baseline_first=False)
    assert stored(db) == 0
    return res


async def one_run(args: argparse.Namespace, template: Path) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="nxlife", dir="/tmp"))
    out: dict[str, Any] = {}
    try:
        for name in args.only or "CE":
            part = base / name
            part.mkdir()
            fn = section_c if name == "C" else section_e
            out[name] = await fn(part, template, args.rows)
            print(f"  {name}: {json.dumps(out[name])}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def fold(values: list[Any]) -> Any:
        if all(isinstance(v, dict) for v in values):
            return {k: fold([v[k] for v in values]) for k in values[0]}
        if all(isinstance(v, int | float) for v in values):
            return {"median": statistics.median(values), "min": min(values), "max": max(values)}
        return values

    return {k: fold([r[k] for r in runs]) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", help="sections to run: C, E")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    keep = Path(tempfile.mkdtemp(prefix="nxtpl", dir="/tmp"))
    try:
        template = keep / "nexus.db"
        print(f"preparing {args.rows} rows ...", flush=True)
        took = prepare(template, args.rows)
        print(f"  prepared in {took:.1f} s", flush=True)
        runs = []
        for i in range(args.runs):
            print(f"run {i + 1}/{args.runs}", flush=True)
            runs.append(anyio.run(one_run, args, template))
    finally:
        shutil.rmtree(keep, ignore_errors=True)
    result = {"rows": args.rows, "writers": WRITERS, "runs": runs, "summary": _summary(runs)}
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
