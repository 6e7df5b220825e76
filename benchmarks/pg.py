"""PostgreSQL beside SQLite: bench.py's sections on both backends, in one run.

    python benchmarks/pg.py [--seconds 2] [--runs 3] [--json benchmarks/pg.json]

Starts its own DURABLE PostgreSQL cluster (initdb in a temporary directory as
the ``postgres`` user, Unix socket only, fsync on, synchronous_commit = on,
full_page_writes on: not scripts/with-postgres, which turns fsync off), then,
per run and per backend, real daemons (``nexusd serve --storage URL``; SQLite
daemons with their defaults, synchronous=FULL), each on a fresh store
pre-filled to the retention cap (64 sessions x 500 rows: every append prunes):

  A   acknowledged single appends from 1, 8, 32, 128 tasks sharing one client
  P8  single appends from 8 processes, one AsyncClient each (procs.run_point)
  B   append_many(100) rows/s from 16 tasks
  C   history(200) p50/p99 while 32 tasks append
  T   two daemons on one PostgreSQL database, 32 tasks on each at once
      (SQLite has no counterpart: one database file belongs to one daemon)

Each point: calls/s, p50/p99 per call, daemon CPU per message, mean batch
(rows per commit, from the daemon's stats) and, for PostgreSQL, the server's
CPU per message and WAL fsyncs per second (pg_stat_wal). The load average is
recorded before and after each run (the machine is shared). With --runs N the
report gives each figure as median (min-max) over the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import procs
from bench import CONTENT, PREFILL, SESSIONS, cpu_of, serve_command, timed_tasks, wait_socket

from nexusd import AsyncClient, Client

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
CONCURRENCY = (1, 8, 32, 128)
INITDB = ("-E", "UTF8", "--locale=C.UTF-8")
START = ("-w", "-t", "60", "start", "-o")
#: More server settings, e.g. "-c shared_preload_libraries=pg_stat_statements".
EXTRA = os.environ.get("NEXUSD_BENCH_PG_OPTS", "")


# ── the durable cluster ──────────────────────────────────────────────────────
@contextlib.contextmanager
def cluster(base: Path) -> Iterator[tuple[str, Path]]:
    """A durable cluster in ``base``: yields (superuser URL of db postgres, data dir)."""
    owner = "postgres" if os.getuid() == 0 else ""
    run_as = ["runuser", "-u", owner, "--"] if owner else []
    base.mkdir(parents=True, exist_ok=True)
    if owner:
        shutil.chown(base, owner)
    data = base / "data"
    subprocess.run(
        [*run_as, str(PG_BIN / "initdb"), "-D", str(data), "-U", "nexusd", "-A", "trust", *INITDB],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    opts = (
        f"-c listen_addresses='' -c unix_socket_directories='{base}' -c fsync=on "
        "-c synchronous_commit=on -c full_page_writes=on -c max_connections=200 "
        "-c shared_buffers=128MB " + EXTRA
    )
    subprocess.run(
        [
            *run_as,
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(base / "server.log"),
            *START,
            opts,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield f"postgresql://nexusd@/postgres?host={base}", data
    finally:
        subprocess.run(
            [*run_as, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            stdout=subprocess.DEVNULL,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


def postmaster_pid(data: Path) -> int:
    return int((data / "postmaster.pid").read_text().split()[0])


def pg_cpu(pid: int) -> float:
    """CPU seconds of the postmaster and every backend it forked (all of the server)."""
    total = cpu_of(pid)
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == pid:
                total += cpu_of(int(p.name))
        except (OSError, IndexError):
            continue  # gone meanwhile
    return total


def pg_sql(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def wal_syncs(url: str) -> int:
    return int(pg_sql(url, "SELECT wal_sync FROM pg_stat_wal")[0][0])


# ── daemons ──────────────────────────────────────────────────────────────────
@contextlib.contextmanager
def daemon(base: Path, storage: str) -> Iterator[tuple[Path, int]]:
    """``nexusd serve`` on ``storage`` ("" = SQLite in ``base``): yields (socket, pid)."""
    base.mkdir(parents=True, exist_ok=True)
    sock = base / "nexusd.sock"
    extra = ["--storage", storage] if storage else []
    cmd = serve_command(base / "nexus.db", sock, "--log-level", "warning", *extra)
    proc = subprocess.Popen(cmd)
    try:
        wait_socket(sock, proc)
        yield sock, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


async def prefill(sock: Path) -> None:
    """Every session at the retention cap, through the daemon (same on both backends)."""
    async with AsyncClient(sock) as c:
        rows = [("user", CONTENT)] * PREFILL
        for i in range(SESSIONS):
            await c.append_many(rows, session_tag=f"s{i}")


async def settled(sock: Path, deadline: float = 120) -> None:
    """Wait for the daemon's search index build to end: it would share the point's CPU."""
    end = time.monotonic() + deadline
    async with AsyncClient(sock) as c:
        while time.monotonic() < end:
            status = (await c.stats())["search"]
            if status in ("ready", "off"):
                return
            await anyio.sleep(0.1)
    raise TimeoutError(f"search index at {sock} still {status}")


class Meter:
    """Daemon CPU, its batches and (PostgreSQL) server CPU and WAL fsyncs over one point."""

    def __init__(self, pids: list[int], socks: list[Path], pg: tuple[str, int] | None) -> None:
        self.pids, self.socks, self.pg = pids, socks, pg

    async def sample(self) -> dict[str, float]:
        s: dict[str, float] = {"t": time.perf_counter(), "batches": 0, "rows": 0}
        for sock in self.socks:
            async with AsyncClient(sock) as c:
                st = await c.stats()
            s["batches"] += st["batches_committed"]
            s["rows"] += st["rows_committed"]
        s["cpu"] = sum(cpu_of(p) for p in self.pids)
        if self.pg:
            s["pg_cpu"] = pg_cpu(self.pg[1])
            s["wal_sync"] = wal_syncs(self.pg[0])
        return s

    def add(self, res: dict[str, Any], a: dict[str, float], b: dict[str, float]) -> None:
        # Per row committed between the samples (the daemon's own count): the same
        # interval as the CPU readings, warm-up included; append_many counts 100.
        dt = b["t"] - a["t"]
        batches = b["batches"] - a["batches"]
        rows = b["rows"] - a["rows"] or 1
        res["daemon_cpu_us_per_row"] = round((b["cpu"] - a["cpu"]) / rows * 1e6, 1)
        res["daemon_cpu_pct"] = round((b["cpu"] - a["cpu"]) / dt * 100, 1)
        res["mean_batch"] = round((b["rows"] - a["rows"]) / batches, 2) if batches else None
        res["commits_per_s"] = round(batches / dt, 1)
        if "pg_cpu" in a:
            res["pg_cpu_us_per_row"] = round((b["pg_cpu"] - a["pg_cpu"]) / rows * 1e6, 1)
            res["pg_cpu_pct"] = round((b["pg_cpu"] - a["pg_cpu"]) / dt * 100, 1)
            res["wal_syncs_per_s"] = round((b["wal_sync"] - a["wal_sync"]) / dt, 1)


async def measured(meter: Meter, coro: Any) -> dict[str, Any]:
    a = await meter.sample()
    res: dict[str, Any] = await coro
    b = await meter.sample()
    meter.add(res, a, b)
    return res


def append_op(c: AsyncClient) -> Any:
    return lambda t: c.append("user", CONTENT, session_tag=f"s{t % SESSIONS}")


# ── one backend, one run ─────────────────────────────────────────────────────
async def backend_run(
    base: Path, storage: str, pg: tuple[str, int] | None, secs: float
) -> dict[str, Any]:
    out: dict[str, Any] = {"A": {}}
    with daemon(base / "d1", storage) as (sock, pid):
        await prefill(sock)
        await settled(sock)
        meter = Meter([pid], [sock], pg)
        async with AsyncClient(sock) as c:
            for n in CONCURRENCY:
                out["A"][str(n)] = r = await measured(meter, timed_tasks(n, secs, append_op(c)))
                print(f"    A {n:>3}: {r['per_s']:>6.0f}/s p99 {r['p99_ms']:.1f} ms", flush=True)
        # P8: 8 processes; run_point calls stats() at the window's two ends.
        ctx = procs.context()
        samples: list[dict[str, Any]] = []
        with Client(sock) as admin:

            def stats() -> dict[str, Any]:
                st = dict(admin.stats())
                if pg is not None:
                    st["pg_cpu"], st["wal_sync"] = pg_cpu(pg[1]), wal_syncs(pg[0])
                st["t"] = time.perf_counter()
                samples.append(st)
                return st

            r = await anyio.to_thread.run_sync(
                lambda: procs.run_point(ctx, "nexusd", "async", sock, 8, secs, pid, stats)
            )
        r["daemon_cpu_us_per_row"] = r["cpu_us_per_msg"]
        if pg is not None and len(samples) == 2 and r["ops"]:
            a, b = samples
            dt = b["t"] - a["t"]
            r["pg_cpu_us_per_row"] = round((b["pg_cpu"] - a["pg_cpu"]) / r["ops"] * 1e6, 1)
            r["wal_syncs_per_s"] = round((b["wal_sync"] - a["wal_sync"]) / dt, 1)
        out["P8"] = r
        print(f"    P8: {r['per_s']:>6.0f}/s p99 {r['p99_ms']:.1f} ms", flush=True)
        batch = [("user", CONTENT)] * 100
        async with AsyncClient(sock) as c:
            r = await measured(
                meter,
                timed_tasks(16, secs, lambda t: c.append_many(batch, session_tag=f"s{t}")),
            )
        r["rows_per_s"] = round(r["per_s"] * 100, 1)
        out["B"] = r
        print(f"    B: {r['rows_per_s']:.0f} rows/s", flush=True)
        async with AsyncClient(sock) as w, AsyncClient(sock) as rd:
            res: dict[str, Any] = {}

            async def load() -> None:
                res["A"] = await timed_tasks(32, secs, append_op(w))

            async def reads() -> None:
                res["C"] = await timed_tasks(1, secs, lambda t: rd.get_history("s1", 200))

            async with anyio.create_task_group() as tg:
                tg.start_soon(load)
                tg.start_soon(reads)
        out["C"] = res["C"]
        out["C_load"] = res["A"]
        print(
            f"    C: history p50 {res['C']['p50_ms']:.2f} p99 {res['C']['p99_ms']:.2f}", flush=True
        )
        if pg is not None:
            with daemon(base / "d2", storage) as (sock2, pid2):
                await settled(sock2)
                out["T"] = await two_daemons(
                    Meter([pid, pid2], [sock, sock2], pg), sock, sock2, secs
                )
    return out


async def two_daemons(meter: Meter, s1: Path, s2: Path, secs: float) -> dict[str, Any]:
    async with AsyncClient(s1) as c1, AsyncClient(s2) as c2:
        res: dict[str, Any] = {}
        a = await meter.sample()

        async def one(key: str, c: AsyncClient) -> None:
            res[key] = await timed_tasks(32, secs, append_op(c))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "d1", c1)
            tg.start_soon(one, "d2", c2)
        b = await meter.sample()
    total = {
        "ops": res["d1"]["ops"] + res["d2"]["ops"],
        "per_s": round(res["d1"]["per_s"] + res["d2"]["per_s"], 1),
        "p50_ms": max(res["d1"]["p50_ms"], res["d2"]["p50_ms"]),
        "p99_ms": max(res["d1"]["p99_ms"], res["d2"]["p99_ms"]),
    }
    meter.add(total, a, b)
    print(
        f"    T: {total['per_s']:.0f}/s (d1 {res['d1']['per_s']:.0f}, d2 {res['d2']['per_s']:.0f})"
    )
    return {"total": total, **res}


async def one_run(base: Path, url: str, pid: int, secs: float, i: int) -> dict[str, Any]:
    out: dict[str, Any] = {"load_before": os.getloadavg()}
    db = f"bench{i}"
    pg_sql(url, f"CREATE DATABASE {db}")
    dburl = url.replace("/postgres?", f"/{db}?")
    print(f"  run {i}: sqlite", flush=True)
    out["sqlite"] = await backend_run(base / f"sqlite{i}", "", None, secs)
    print(f"  run {i}: postgresql", flush=True)
    out["postgresql"] = await backend_run(base / f"pg{i}", dburl, (dburl, pid), secs)
    out["load_after"] = os.getloadavg()
    return out


# ── report ───────────────────────────────────────────────────────────────────
def med(runs: list[dict[str, Any]], path: tuple[str, ...], key: str, fmt: str = ".0f") -> str:
    vals: list[float] = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v.get(p, {}) if isinstance(v, dict) else {}
        if isinstance(v, dict) and v.get(key) is not None:
            vals.append(float(v[key]))
    if not vals:
        return "-"
    m = statistics.median(vals)
    if len(vals) == 1:
        return format(m, fmt)
    return f"{m:{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})"


def report(res: dict[str, Any]) -> str:
    runs = res["runs"]
    lines = [
        "| section | backend | per s | p50 ms | p99 ms | rows/commit | daemon CPU µs/row "
        "| PG server CPU µs/row | WAL fsyncs/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    points: list[tuple[str, tuple[str, ...]]] = [
        (f"A {n} tasks", ("A", str(n))) for n in CONCURRENCY
    ]
    points += [("8 processes", ("P8",)), ("append_many(100) (rows/s)", ("B",))]
    points += [("appends beside C", ("C_load",)), ("history(200) under load", ("C",))]
    points += [("two daemons (sum)", ("T", "total"))]
    for label, path in points:
        for be in ("sqlite", "postgresql"):
            if label.startswith("two") and be == "sqlite":
                lines.append(f"| {label} | sqlite | no counterpart: one file, one daemon |||||||")
                continue
            p = (be, *path)
            rate = "rows_per_s" if path == ("B",) else "per_s"
            lines.append(
                f"| {label} | {be} | {med(runs, p, rate)} | {med(runs, p, 'p50_ms', '.2f')} "
                f"| {med(runs, p, 'p99_ms', '.2f')} | {med(runs, p, 'mean_batch', '.1f')} "
                f"| {med(runs, p, 'daemon_cpu_us_per_row')} | {med(runs, p, 'pg_cpu_us_per_row')} "
                f"| {med(runs, p, 'wal_syncs_per_s')} |"
            )
    loads = [f"{r['load_before'][0]:.2f}->{r['load_after'][0]:.2f}" for r in runs]
    lines.append("")
    lines.append(f"1-min load average per run (before->after): {', '.join(loads)}")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="nxpgbench", dir="/tmp"))
    res: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
        "seconds_per_point": args.seconds,
        "postgres": "15, fsync=on, synchronous_commit=on, full_page_writes=on, Unix socket",
        "runs": [],
    }
    try:
        with cluster(Path(tempfile.mkdtemp(prefix="nxpgdurable", dir="/tmp"))) as (url, data):
            pid = postmaster_pid(data)
            res["server_version"] = pg_sql(url, "SHOW server_version")[0][0]
            for i in range(args.runs):
                res["runs"].append(await one_run(base, url, pid, args.seconds, i))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="nexusd on PostgreSQL vs SQLite (see the docstring)")
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per point")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/pg.json"))
    args = ap.parse_args()
    res = anyio.run(main_async, args, backend="asyncio")
    args.json.write_text(json.dumps(res, indent=1, default=str))
    print()
    print(report(res))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
