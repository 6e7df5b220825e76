"""The floor from the other side: what section P's targets against Redis would need.

Run: ``python benchmarks/floor.py [--seconds S] [--json PATH]`` (Redis as for
``bench.py``, from ``.[bench]`` and ``redis-server`` on PATH).

Section P measures N processes, each appending through its own client, against
Redis in the same shape.  This measures, in one run, what bounds nexusd there
from below, with nothing of the daemon in the way:

- **T** nexusd's own write transaction, :func:`nexusd.storage.writes.run`, in
  this bare process (no socket, no event loop, no thread hop, no client):
  ``k`` single-row appends to ``k`` of 64 sessions pre-filled to 500 rows,
  each with its own client-style idempotency key (``k`` processes send ``k``
  key prefixes), exact pruning at 500, COMMIT under ``synchronous=FULL``.
  Its rows/s at ``k = N`` is what any daemon built on this transaction could
  acknowledge from N closed-loop processes if it batched all of them into
  every commit at zero cost of its own and the clients cost nothing.
- **T** again, with two storage levers applied: without the idempotency-key
  index (``nokey``: no key stored, nothing looked up) and with 1 KiB pages
  (``page1k``, a database created with ``page_size=1024``).
- **F** an append-only file: 250 bytes per row appended and ``fdatasync``'d
  once per batch, the way Redis's ``appendfsync always`` makes a write durable.
- **R** Redis with N processes, each ``XADD … MAXLEN 500`` in a loop through
  blocking redis-py (the same workers as section P).

The table gives rows/s for each and T / R, within this run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import procs  # the sibling module: python benchmarks/floor.py

from nexusd.storage import writes
from nexusd.storage.base import Insert, Op
from nexusd.storage.editing import Retentions
from nexusd.storage.schema import open_writer

KS = (1, 2, 4, 8, 32)
VARIANTS = ("keys", "nokey", "page1k")
CONTENT = "x" * 200
SESSIONS = 64
KEEP = 500
NOW = "2026-01-01T00:00:00.000000Z"


def template(base: Path, variant: str) -> Path:
    """64 sessions of 500 rows (keyed, unless ``nokey``), checkpointed: the steady state."""
    db = base / f"template-{variant}.db"
    if variant == "page1k":
        with sqlite3.connect(db) as c:
            c.execute("PRAGMA page_size=1024")
            c.execute("VACUUM")
    conn = open_writer(db, synchronous="full", wal_autocheckpoint=8000)
    if variant == "nokey":
        conn.execute("DROP INDEX idx_nexus_idem")
    prefixes = [secrets.token_urlsafe(9) for _ in range(32)]
    rows = [
        (CONTENT, f"s{s}", None if variant == "nokey" else f"{prefixes[i % 32]}{i:010x}")
        for s in range(SESSIONS)
        for i in range(KEEP)
    ]
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO nexus_messages (role, content, timestamp, session_tag, idem_key)"
        f" VALUES ('user', ?, '{NOW}', ?, ?)",
        rows,
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db


def transaction_rate(base: Path, variant: str, k: int, secs: float) -> dict[str, float]:
    """Commits of ``k`` appends for ``secs`` seconds: rows/s and CPU µs per row."""
    work = Path(tempfile.mkdtemp(dir=base))
    db = work / "n.db"
    shutil.copy(base / f"template-{variant}.db", db)
    conn = open_writer(db, synchronous="full", wal_autocheckpoint=8000)
    prefixes = [secrets.token_urlsafe(9) for _ in range(k)]
    cache = writes.CountCache()
    keep = Retentions(KEEP, 0.0)
    counter = 0

    def commit() -> None:
        nonlocal counter
        ops: list[Op] = []
        for j in range(k):
            counter += 1
            key = None if variant == "nokey" else f"{prefixes[j]}{counter:010x}"
            ops.append(Insert(f"s{counter % SESSIONS}", [("user", CONTENT, None, None, key)]))
        writes.run(
            conn, ops, now=NOW, clock=time.time(), counts_cache=cache, retentions=keep, lookup=False
        )

    for _ in range(50):  # warm the page cache and the count cache
        commit()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < secs:
        commit()
        n += 1
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    conn.close()
    shutil.rmtree(work)
    return {"rows_s": round(n * k / dt), "cpu_us_row": round(cpu / (n * k) * 1e6, 1)}


def append_file_rate(base: Path, k: int, secs: float) -> dict[str, float]:
    """Append ``k`` times 250 bytes and ``fdatasync``, for ``secs`` seconds: rows/s."""
    path = base / "aof"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    chunk = b"x" * 250 * k
    n, t0 = 0, time.perf_counter()
    try:
        while time.perf_counter() - t0 < secs:
            os.write(fd, chunk)
            os.fdatasync(fd)
            n += 1
    finally:
        os.close(fd)
        path.unlink()
    return {"rows_s": round(n * k / (time.perf_counter() - t0))}


def run(secs: float, ks: tuple[int, ...] = KS) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="nxfloor", dir="/tmp"))
    out: dict[str, Any] = {"seconds_per_point": secs, "k": list(ks), "points": {}}
    try:
        for variant in VARIANTS:
            template(base, variant)
        ctx = procs.context()
        with procs.redis_server(base) as (rsock, rproc):
            out["redis"] = procs.prefill_redis(rsock)
            for k in ks:
                point: dict[str, Any] = {}
                for variant in VARIANTS:
                    point[variant] = transaction_rate(base, variant, k, secs)
                point["file"] = append_file_rate(base, k, secs)
                r = procs.run_point(ctx, "redis", "blocking", rsock, k, secs, rproc.pid)
                point["redis"] = {"rows_s": r["per_s"], "cpu_us_msg": r["cpu_us_per_msg"]}
                out["points"][str(k)] = point
                print(f"  k={k}: {json.dumps(point)}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def table(res: dict[str, Any]) -> str:
    lines = [
        "| k = processes | T rows/s | T nokey | T page1k | F append+fdatasync | Redis /s"
        " | T / Redis | T nokey / Redis |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in res["k"]:
        p = res["points"][str(k)]
        redis = p["redis"]["rows_s"] or 1
        lines.append(
            f"| {k} | {p['keys']['rows_s']} | {p['nokey']['rows_s']} | {p['page1k']['rows_s']}"
            f" | {p['file']['rows_s']} | {p['redis']['rows_s']:.0f}"
            f" | {p['keys']['rows_s'] / redis:.2f} | {p['nokey']['rows_s'] / redis:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="the floor under section P (see the module docstring)")
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per point")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/floor.json"))
    args = ap.parse_args()
    missing = procs.redis_missing()
    if missing:
        raise SystemExit(f"floor.py: {missing}")
    res = run(args.seconds)
    args.json.write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
