"""nexusd benchmark: side by side with the v1 store, Redis and the SQLite ceiling.

    python benchmarks/bench.py [--quick] [--json results.json] [--plot chart.png]

Starts its own daemon on a temporary, pre-filled database (so pruning is
active), then measures in one run on this machine:

  A  acknowledged single appends/s from 1, 8, 32, 128, 256 tasks (synchronous=FULL),
     sharing one AsyncClient and with a connection each; p50/p99 latency per call
  B  rows/s with append_many batches of 100
  C  get_history(limit=200) p50/p99 while A runs at 32 tasks
  D  the v1 NexusStore (loaded from ../shared/seed at run time), 1 thread and 8,
     with its errors and lost rows
  E  the ceiling: sqlite3 executemany of the same rows, same table and indexes,
     one transaction, synchronous=FULL
  R  when redis-server is on PATH: A's workload as XADD ... MAXLEN 500 through
     redis-py's asyncio client over a Unix socket, appendfsync always
  P  many processes (benchmarks/procs.py): 1 to 128 processes, each with its own
     blocking Client or AsyncClient, against Redis with the same, back to back
  S  scaling: message size, batch size, database size (1k vs 1M rows)

Everything runs on loopback Unix sockets, bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import procs  # the sibling module: python benchmarks/bench.py

from nexusd import AsyncClient
from nexusd.storage.schema import open_writer

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT.parent / "shared" / "seed" / "nexus_store_v1.py"
CONCURRENCY = (1, 8, 32, 128, 256)
SESSIONS = 64
PREFILL = 500  # rows per session: every append prunes one
CONTENT = "x" * 200


# ── helpers ───────────────────────────────────────────────────────────────────
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(n: int, seconds: float, lat: list[float]) -> dict[str, Any]:
    return {
        "ops": n,
        "seconds": round(seconds, 3),
        "per_s": round(n / seconds, 1) if seconds else 0.0,
        "p50_ms": round(pct(lat, 0.50) * 1e3, 3),
        "p99_ms": round(pct(lat, 0.99) * 1e3, 3),
    }


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_socket(path: Path, proc: subprocess.Popen[bytes], deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise TimeoutError(path)


def prefill(db: Path, sessions: int, per: int) -> None:
    conn = open_writer(db)
    rows = [
        ("user", CONTENT, "2026-01-01T00:00:00.000000Z", f"s{i}")
        for i in range(sessions)
        for _ in range(per)
    ]
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO nexus_messages (role, content, timestamp, session_tag) VALUES (?, ?, ?, ?)",
        rows,
    )
    conn.execute("COMMIT")
    conn.close()


def serve_command(db: Path, sock: Path, *args: str) -> list[str]:
    """The ``nexusd serve`` command line for a daemon on these files (soak.py uses it too)."""
    return [sys.executable, "-m", "nexusd", "serve", "--db", str(db), "--socket", str(sock), *args]


class Daemon:
    def __init__(self, base: Path, *args: str) -> None:
        self.db = base / "nexus.db"
        self.sock = base / "nexusd.sock"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Daemon:
        cmd = serve_command(self.db, self.sock, "--log-level", "warning", *self.args)
        self.proc = subprocess.Popen(cmd)
        wait_socket(self.sock, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


async def timed_tasks(
    tasks: int, seconds: float, op: Callable[[int], Awaitable[Any]], warmup: float = 0.3
) -> dict[str, float]:
    """Run ``op(task)`` in a loop from ``tasks`` tasks; measure after a warm-up."""
    lat: list[float] = []
    done = [0]
    start = time.perf_counter() + warmup
    end = start + seconds
    perf = time.perf_counter

    async def worker(t: int) -> None:
        while True:
            t0 = perf()
            if t0 >= end:
                return
            await op(t)
            t1 = perf()
            if t0 >= start:
                lat.append(t1 - t0)
                done[0] += 1

    async with anyio.create_task_group() as tg:
        for t in range(tasks):
            tg.start_soon(worker, t)
    return summary(done[0], perf() - start, lat)


# ── A, B, C: nexusd ──────────────────────────────────────────────────────────
async def bench_nexusd(sock: Path, secs: float, conc: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"A_shared": {}, "A_own": {}}
    for n in conc:
        async with AsyncClient(sock) as c:
            out["A_shared"][str(n)] = await timed_tasks(
                n, secs, lambda t: c.append("user", CONTENT, session_tag=f"s{t % SESSIONS}")
            )
        async with contextlib.AsyncExitStack() as stack:  # closes them in LIFO order
            clients = [await stack.enter_async_context(AsyncClient(sock)) for _ in range(n)]
            out["A_own"][str(n)] = await timed_tasks(
                n,
                secs,
                lambda t: clients[t].append("user", CONTENT, session_tag=f"s{t % SESSIONS}"),
            )
        print(
            f"  A {n:>3} tasks: shared {out['A_shared'][str(n)]['per_s']:>8.0f}/s "
            f"p99 {out['A_shared'][str(n)]['p99_ms']:.2f} ms | own {out['A_own'][str(n)]['per_s']:>8.0f}/s "
            f"p99 {out['A_own'][str(n)]['p99_ms']:.2f} ms",
            flush=True,
        )

    # C: history latency while A runs at 32 tasks on another connection.
    async with AsyncClient(sock) as w, AsyncClient(sock) as r:
        result: dict[str, Any] = {}

        async def load() -> None:
            result["A"] = await timed_tasks(
                32, secs, lambda t: w.append("user", CONTENT, session_tag=f"s{t % SESSIONS}")
            )

        async def reads() -> None:
            result["C"] = await timed_tasks(1, secs, lambda t: r.get_history("s1", 200))

        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            tg.start_soon(reads)
    out["C"] = result["C"]
    out["C_under_load"] = result["A"]
    print(
        f"  C history(200) under A@32: p50 {out['C']['p50_ms']:.2f} ms "
        f"p99 {out['C']['p99_ms']:.2f} ms",
        flush=True,
    )
    async with AsyncClient(sock) as c:
        out["daemon_stats"] = await c.stats()
    return out


async def bench_batched(base: Path, secs: float) -> dict[str, Any]:
    """B on a database in the same state as E's: freshly pre-filled, its own daemon."""
    (base / "b").mkdir()
    prefill(base / "b" / "nexus.db", SESSIONS, PREFILL)
    batch = [("user", CONTENT)] * 100
    with Daemon(base / "b") as d:
        async with AsyncClient(d.sock) as c:
            b = await timed_tasks(16, secs, lambda t: c.append_many(batch, session_tag=f"s{t}"))
    b["rows_per_s"] = round(b["per_s"] * 100, 1)
    print(f"  B append_many(100): {b['rows_per_s']:.0f} rows/s", flush=True)
    return b


# ── D: the v1 store ──────────────────────────────────────────────────────────
def load_v1() -> Any:
    if not SEED.exists():
        return None
    spec = importlib.util.spec_from_file_location("nexus_store_v1", SEED)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_v1(base: Path, secs: float, threads: int) -> dict[str, Any]:
    v1 = load_v1()
    if v1 is None:
        return {"skipped": f"{SEED} not found"}
    db = base / f"v1-{threads}.db"
    prefill(db, SESSIONS, PREFILL)  # same pre-filled shape; v1's DDL is a no-op on it
    store = v1.NexusStore(db)
    acked: dict[int, tuple[str, str]] = {}
    errors: list[str] = []
    bad_ids: list[Any] = []
    lat: list[float] = []
    lock = threading.Lock()
    end = time.perf_counter() + secs

    def work(t: int) -> None:
        i = 0
        while time.perf_counter() < end:
            i += 1
            content = f"{t}:{i}:" + CONTENT
            tag = f"s{t % SESSIONS}"
            t0 = time.perf_counter()
            try:
                rid = store.append("user", content, session_tag=tag)
            except Exception as exc:  # v1 raises all sorts when threads share it
                with lock:
                    errors.append(type(exc).__name__)
                continue
            with lock:
                lat.append(time.perf_counter() - t0)
                if not isinstance(rid, int) or rid in acked:
                    bad_ids.append(rid)  # an "ack" that names no row of ours
                else:
                    acked[rid] = (tag, content)

    started = time.perf_counter()
    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    elapsed = time.perf_counter() - started
    store.close()
    conn = sqlite3.connect(db)
    stored = dict(conn.execute("SELECT id, content FROM nexus_messages").fetchall())
    conn.close()
    # Rows v1 may legitimately have pruned: anything but the newest 500 of a session.
    keep: dict[str, list[int]] = {}
    for rid, (tag, _) in acked.items():
        keep.setdefault(tag, []).append(rid)
    should = {rid for ids in keep.values() for rid in sorted(ids)[-PREFILL:]}
    lost = sum(1 for rid in should if stored.get(rid) != acked[rid][1]) + len(bad_ids)
    res = summary(len(acked) + len(bad_ids), elapsed, lat)
    res.update(
        errors=len(errors), error_kinds=sorted(set(errors)), lost_rows=lost, bad_ids=len(bad_ids)
    )
    return res


# ── E: the SQLite ceiling ────────────────────────────────────────────────────
def bench_ceiling(base: Path, rows: int) -> dict[str, Any]:
    db = base / "ceiling.db"
    prefill(db, SESSIONS, PREFILL)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")
    data = [
        ("user", CONTENT, "2026-01-01T00:00:00.000000Z", f"s{i % SESSIONS}", None, f"k{i}")
        for i in range(rows)
    ]
    t0 = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO nexus_messages (role, content, timestamp, session_tag, meta, idem_key) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        data,
    )
    conn.execute("COMMIT")
    dt = time.perf_counter() - t0
    conn.close()
    return {"rows": rows, "seconds": round(dt, 3), "rows_per_s": round(rows / dt, 1)}


# ── R: Redis ─────────────────────────────────────────────────────────────────
async def bench_redis(base: Path, secs: float, conc: tuple[int, ...]) -> dict[str, Any]:
    skip = procs.redis_missing()
    if skip:
        return {"skipped": skip}
    import redis.asyncio as aioredis

    out: dict[str, Any] = {"A_shared": {}}
    with procs.redis_server(base) as (sock, _):
        for n in conc:
            client = aioredis.Redis(unix_socket_path=str(sock), max_connections=max(n, 1))
            try:
                out["A_shared"][str(n)] = await timed_tasks(
                    n,
                    secs,
                    lambda t: client.xadd(
                        f"s{t % SESSIONS}",
                        {"role": "user", "content": CONTENT},
                        maxlen=PREFILL,
                        approximate=False,
                    ),
                )
            finally:
                await client.aclose()
            print(
                f"  R {n:>3} tasks: {out['A_shared'][str(n)]['per_s']:>8.0f}/s "
                f"p99 {out['A_shared'][str(n)]['p99_ms']:.2f} ms",
                flush=True,
            )
    return out


# ── S: scaling ───────────────────────────────────────────────────────────────
async def bench_scaling(base: Path, secs: float) -> dict[str, Any]:
    out: dict[str, Any] = {"message_size": {}, "batch_size": {}, "db_size": {}}
    with Daemon(base / "scale", "--max-messages", "500") as d:
        async with AsyncClient(d.sock) as c:
            for size in (100, 1_000, 10_000, 100_000):
                text = "y" * size
                out["message_size"][str(size)] = await timed_tasks(
                    32, secs, lambda t: c.append("user", text, session_tag=f"m{t % 8}")
                )
                print(
                    f"  S message {size:>6} B @32: {out['message_size'][str(size)]['per_s']:.0f}/s",
                    flush=True,
                )
            # Up to the retention cap: a larger append_many is refused (its own
            # oldest rows would be pruned by the commit that stores them).
            for bs in (1, 10, 100, 500):
                batch = [("user", CONTENT)] * bs
                r = await timed_tasks(4, secs, lambda t: c.append_many(batch, session_tag=f"b{t}"))
                r["rows_per_s"] = round(r["per_s"] * bs, 1)
                out["batch_size"][str(bs)] = r
                print(f"  S batch {bs:>4}: {r['rows_per_s']:.0f} rows/s", flush=True)
    for rows in (1_000, 1_000_000):
        d_base = base / f"db{rows}"
        d_base.mkdir()
        prefill(d_base / "nexus.db", max(1, rows // 500), 500)
        with Daemon(d_base, "--max-messages", "500") as d:
            async with AsyncClient(d.sock) as c:
                a = await timed_tasks(
                    32, secs, lambda t: c.append("user", CONTENT, session_tag=f"s{t % 2}")
                )
                h = await timed_tasks(1, secs, lambda t: c.get_history("s1", 200))
        out["db_size"][str(rows)] = {"append_32": a, "history_200": h}
        print(
            f"  S db {rows:>7} rows: append@32 {a['per_s']:.0f}/s p99 {a['p99_ms']:.2f} ms, "
            f"history p99 {h['p99_ms']:.2f} ms",
            flush=True,
        )
    return out


# ── report ───────────────────────────────────────────────────────────────────
def table(res: dict[str, Any]) -> str:
    a, d, r = res["nexusd"], res["v1"], res.get("redis", {})
    d1 = d.get("1", {}).get("per_s")
    lines = [
        "| tasks | nexusd shared /s | p50 ms | p99 ms | nexusd conn-each /s | p50 ms | p99 ms | Redis /s | p99 ms | A/D | A/R |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in res["concurrency"]:
        s, o = a["A_shared"][str(n)], a["A_own"][str(n)]
        rr = r.get("A_shared", {}).get(str(n))
        ad = f"{s['per_s'] / d1:.1f}x" if d1 else "-"
        ar = f"{s['per_s'] / rr['per_s']:.2f}x" if rr else "-"
        lines.append(
            f"| {n} | {s['per_s']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {o['per_s']:.0f} | "
            f"{o['p50_ms']:.2f} | {o['p99_ms']:.2f} | {rr['per_s'] if rr else '-'} | "
            f"{rr['p99_ms'] if rr else '-'} | {ad} | {ar} |"
        )
    b, e = a["B"], res["ceiling"]
    lines += [
        "",
        f"B append_many(100): {b['rows_per_s']:.0f} rows/s; E sqlite3 executemany ceiling: "
        f"{e['rows_per_s']:.0f} rows/s; B/E = {b['rows_per_s'] / e['rows_per_s']:.2f}",
        f"C get_history(200) under A@32: p50 {a['C']['p50_ms']:.2f} ms, p99 {a['C']['p99_ms']:.2f} ms",
    ]
    for k in ("1", "8"):
        v = d.get(k, {})
        if "per_s" in v:
            lines.append(
                f"D v1 NexusStore, {k} thread(s): {v['per_s']:.0f}/s, p99 {v['p99_ms']:.2f} ms, "
                f"errors {v['errors']} {v['error_kinds']}, lost rows {v['lost_rows']}"
            )
    return "\n".join(lines)


def scaling_table(sc: dict[str, Any]) -> str:
    lines = ["| message size (B) | appends/s @32 | p99 ms |", "|---:|---:|---:|"]
    for size, r in sc["message_size"].items():
        lines.append(f"| {size} | {r['per_s']:.0f} | {r['p99_ms']:.2f} |")
    lines += ["", "| append_many batch | rows/s (4 tasks) | p99 ms per call |", "|---:|---:|---:|"]
    for bs, r in sc["batch_size"].items():
        lines.append(f"| {bs} | {r['rows_per_s']:.0f} | {r['p99_ms']:.2f} |")
    lines += [
        "",
        "| rows in database | appends/s @32 | p99 ms | history(200) p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for rows, r in sc["db_size"].items():
        a, h = r["append_32"], r["history_200"]
        lines.append(
            f"| {rows} | {a['per_s']:.0f} | {a['p99_ms']:.2f} | {h['p50_ms']:.2f} | {h['p99_ms']:.2f} |"
        )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = res["concurrency"]
    rows = 2 if "procs" in res else 1
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.5 * rows), squeeze=False)
    ax1, ax2 = axes[0]
    if "procs" in res:
        procs.plot(res["procs"], axes[1][0], axes[1][1])
    a = res["nexusd"]
    ax1.plot(
        conc,
        [a["A_shared"][str(n)]["per_s"] for n in conc],
        "o-",
        label="nexusd (one shared client)",
    )
    ax1.plot(
        conc, [a["A_own"][str(n)]["per_s"] for n in conc], "o--", label="nexusd (connection each)"
    )
    if "A_shared" in res.get("redis", {}):
        ax1.plot(
            conc,
            [res["redis"]["A_shared"][str(n)]["per_s"] for n in conc],
            "s-",
            label="Redis XADD, appendfsync always",
        )
    for k, style in (("1", ":"), ("8", "-.")):
        v = res["v1"].get(k, {})
        if "per_s" in v:
            ax1.axhline(v["per_s"], linestyle=style, color="gray", label=f"v1 store, {k} thread(s)")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrent tasks")
    ax1.set_ylabel("acknowledged appends / s (synchronous=FULL)")
    ax1.set_title("Throughput")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(conc, [a["A_shared"][str(n)]["p50_ms"] for n in conc], "o-", label="nexusd p50")
    ax2.plot(conc, [a["A_shared"][str(n)]["p99_ms"] for n in conc], "o--", label="nexusd p99")
    if "A_shared" in res.get("redis", {}):
        ax2.plot(
            conc,
            [res["redis"]["A_shared"][str(n)]["p50_ms"] for n in conc],
            "s-",
            label="Redis p50",
        )
        ax2.plot(
            conc,
            [res["redis"]["A_shared"][str(n)]["p99_ms"] for n in conc],
            "s--",
            label="Redis p99",
        )
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent tasks")
    ax2.set_ylabel("latency per append (ms)")
    ax2.set_title("Latency")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"nexusd benchmark — {res['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    secs = 1.0 if args.quick else args.seconds
    conc = CONCURRENCY
    base = Path(tempfile.mkdtemp(prefix="nxbench", dir="/tmp"))
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "concurrency": list(conc),
        "seconds_per_point": secs,
    }
    try:
        print("nexusd (synchronous=FULL, pre-filled: pruning active)", flush=True)
        prefill(base / "nexus.db", SESSIONS, PREFILL)
        with Daemon(base) as d:
            if not args.procs_only:
                res["nexusd"] = await bench_nexusd(d.sock, secs, conc)
            if not args.no_procs:
                print("many processes, one connection each (P)", flush=True)
                assert d.proc is not None
                res["procs"] = await anyio.to_thread.run_sync(
                    procs.run, base, d.sock, d.proc.pid, secs, args.processes
                )
        if args.procs_only:
            return res
        res["nexusd"]["B"] = await bench_batched(base, secs)
        print("v1 NexusStore", flush=True)
        res["v1"] = {}
        for threads in (1, 8):
            res["v1"][str(threads)] = await anyio.to_thread.run_sync(bench_v1, base, secs, threads)
            print(f"  D {threads} thread(s): {res['v1'][str(threads)]}", flush=True)
        res["ceiling"] = bench_ceiling(base, 200_000)
        print(f"  E ceiling: {res['ceiling']}", flush=True)
        print("Redis", flush=True)
        res["redis"] = await bench_redis(base, secs, conc)
        if not args.no_scaling:
            print("scaling", flush=True)
            (base / "scale").mkdir()
            res["scaling"] = await bench_scaling(base, secs)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="nexusd benchmark (see the module docstring)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per point")
    ap.add_argument("--quick", action="store_true", help="1 s per point")
    ap.add_argument("--no-scaling", action="store_true", help="skip the scaling runs (S)")
    sections = ap.add_mutually_exclusive_group()
    sections.add_argument(
        "--no-procs", action="store_true", help="skip the many-processes runs (P)"
    )
    sections.add_argument(
        "--procs-only", action="store_true", help="run only the many-processes section (P)"
    )
    ap.add_argument(
        "--processes",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=procs.PROCESSES,
        help="process counts of section P, comma-separated (default: %(default)s)",
    )
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results.json"))
    ap.add_argument("--plot", type=Path, nargs="?", const=Path("benchmarks/results.png"))
    args = ap.parse_args()
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    res = anyio.run(main_async, args, backend="asyncio", backend_options=options)
    args.json.write_text(json.dumps(res, indent=1, default=str))
    if not args.procs_only:
        print()
        print(table(res))
    if "procs" in res:
        print()
        print(procs.table(res["procs"]))
    if "scaling" in res:
        print()
        print(scaling_table(res["scaling"]))
    if args.plot and "nexusd" in res:
        plot(res, args.plot)
        print(f"chart: {args.plot}")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
