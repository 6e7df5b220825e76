"""Watch and search, measured (issue 12): what following and finding cost, and how fast.

    python benchmarks/live.py [--seconds 3] [--runs 3] [--json benchmarks/live.json]
    python benchmarks/live.py --only W        # one section: W, M, F or Q

Each section starts its own daemon (synchronous=FULL) on a fresh database:

  W  100 watchers on one session (4 processes of 25 connections) while 32 tasks
     of one AsyncClient append to it: every watcher must receive every message;
     commit-to-delivery latency (delivery wall time minus the message's stored
     timestamp, which is taken when its transaction begins: an upper bound);
     append throughput against the same 32 tasks with no watcher, same run.
  M  1,000 watches that never read (16 connections with a 4 KiB receive
     buffer), while 32 tasks append for the window: the daemon's peak RSS
     against its RSS before, and how many watches ended ``lagged``.
  F  search's upkeep: append throughput with ``search = true`` against
     ``search = false``, one daemon each, back to back: 32 tasks on one
     AsyncClient, then 8 and 32 processes with a blocking Client each
     (benchmarks/procs.py); prose content (~30 words), so the index has work.
  Q  search speed: 1,000,000 messages of prose (a 20,000-word Zipf
     vocabulary), indexed by the daemon at start (the build is timed); then
     two-word plain queries (``limit=20``), best match first and newest first,
     p50/p99 over 300 queries each, words drawn from the vocabulary's top 500.

Every figure is reported per run; the summary gives the median and range over
``--runs`` runs, and ratios are taken within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import random
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import procs as procs_mod

from nexusd import AsyncClient, Client
from nexusd.storage.schema import open_writer
from nexusd.wire.framing import FrameDecoder, encode_frame

WORDS = [f"w{i}" for i in range(20_000)]
_rng = random.Random(12)
# Zipf-like: a few words are common (cumulative weights, computed once).
_CUM = list(itertools.accumulate(1 / (i + 1) for i in range(len(WORDS))))


def prose(rng: random.Random, n: int = 30) -> str:
    return " ".join(rng.choices(WORDS, cum_weights=_CUM, k=n))


CONTENT = prose(_rng)


def rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _ts(stamp: str) -> float:
    return datetime.fromisoformat(stamp[:-1] + "+00:00").timestamp()


# ── W: watchers that read ───────────────────────────────────────────────────
class _Msg(msgspec.Struct):
    id: int
    timestamp: str


class _Frame(msgspec.Struct, tag_field="op", tag="watch"):
    id: int
    messages: list[_Msg] = []
    live: bool = False


class _Error(msgspec.Struct, tag_field="op", tag="error"):
    code: str


_decode_frame = msgspec.msgpack.Decoder(_Frame | _Error).decode
#: Every this many messages a watcher notes when it got it (cheap enough for 100 watchers).
SAMPLE = 7


def watcher_process(sock: str, n: int, ready: Any, stop_at: Any, out: Any) -> None:
    """``n`` watch connections: each counts its messages, notes delivery times of a sample."""

    async def main() -> None:
        counts = [0] * n
        seen: list[tuple[int, float]] = []
        errors: list[str] = []

        async def one(i: int) -> None:
            r, w = await asyncio.open_unix_connection(sock)
            req = {"op": "watch", "id": 1, "session_tag": "w"}
            w.write(encode_frame(msgspec.msgpack.encode(req)))
            dec = FrameDecoder(1 << 24)
            live = False
            last = 0
            while True:
                data = await r.read(1 << 16)
                if not data:
                    errors.append("closed")
                    return
                now = time.time()
                for body in dec.feed(data):
                    f = _decode_frame(body)
                    if type(f) is _Error:
                        errors.append(f.code)
                        return
                    assert type(f) is _Frame
                    if f.live and not live:
                        live = True
                        ready.put(1)
                    for m in f.messages:
                        counts[i] += 1
                        last = m.id
                        if m.id % SAMPLE == 0:
                            seen.append((m.id, now))
                target = stop_at.value
                if target and last >= target:
                    w.close()
                    return

        await asyncio.gather(*(one(i) for i in range(n)))
        out.put((counts, seen, errors))

    asyncio.run(main())


async def section_w(base: Path, secs: float, watchers: int = 100) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    res: dict[str, Any] = {}
    with bench.Daemon(base) as d:
        async with AsyncClient(d.sock) as c:
            ids: list[int] = []
            acked: dict[int, float] = {}

            async def append(t: int) -> None:
                mid = await c.append("user", CONTENT, session_tag="w")
                ids.append(mid)
                if mid % SAMPLE == 0:
                    acked[mid] = time.time()

            cpu = procs_mod.cpu_seconds
            assert d.proc is not None
            c0 = cpu(d.proc.pid), cpu(os.getpid())
            res["none"] = await bench.timed_tasks(32, secs, append)
            c1 = cpu(d.proc.pid), cpu(os.getpid())
            res["none"]["daemon_cpu_us_per_msg"] = round((c1[0] - c0[0]) / len(ids) * 1e6, 1)
            res["none"]["appender_cpu_us_per_msg"] = round((c1[1] - c0[1]) / len(ids) * 1e6, 1)
            ready, out = ctx.Queue(), ctx.Queue()
            stop_at = ctx.Value("q", 0)
            per = watchers // 4
            workers = [
                ctx.Process(target=watcher_process, args=(str(d.sock), per, ready, stop_at, out))
                for _ in range(4)
            ]
            for p in workers:
                p.start()
            for _ in range(per * 4):
                ready.get(timeout=60)
            ids.clear()
            pids = [p.pid or 0 for p in workers]
            w0 = cpu(d.proc.pid), cpu(os.getpid()), sum(cpu(pid) for pid in pids)
            res["watched"] = await bench.timed_tasks(32, secs, append)
            w1 = cpu(d.proc.pid), cpu(os.getpid()), sum(cpu(pid) for pid in pids)
            n = len(ids)
            res["watched"]["daemon_cpu_us_per_msg"] = round((w1[0] - w0[0]) / n * 1e6, 1)
            res["watched"]["appender_cpu_us_per_msg"] = round((w1[1] - w0[1]) / n * 1e6, 1)
            res["watched"]["watchers_cpu_us_per_msg"] = round((w1[2] - w0[2]) / n * 1e6, 1)
            stop_at.value = max(ids)
            await c.append("user", "the end", session_tag="w")  # wakes every watcher
            results = [out.get(timeout=120) for _ in workers]
            for p in workers:
                p.join(30)
            stats = await c.stats()
            stamps = {
                m.id: _ts(m.timestamp) for m in await c.get_history("w", 500) if m.id in acked
            }
    counts = [n for r in results for n in r[0]]
    seen = [x for r in results for x in r[1] if x[0] in acked]
    # Delivery after the append's answer arrived (the commit is a little before).
    lat = sorted(t - acked[i] for i, t in seen)
    # Delivery after the transaction began (its timestamp): an upper bound.
    bound = sorted(t - stamps[i] for i, t in seen if i in stamps)
    res["appended"] = len(ids)
    res["watchers"] = len(counts)
    res["min_received"] = min(counts)
    res["every_watcher_got_every_message"] = min(counts) >= len(ids)
    res["errors"] = [e for r in results for e in r[2]]
    res["lagged"] = stats["watches_lagged"]
    res["after_ack_p50_ms"] = round(bench.pct(lat, 0.50) * 1e3, 2)
    res["after_ack_p99_ms"] = round(bench.pct(lat, 0.99) * 1e3, 2)
    res["after_begin_p50_ms"] = round(bench.pct(bound, 0.50) * 1e3, 2)
    res["after_begin_p99_ms"] = round(bench.pct(bound, 0.99) * 1e3, 2)
    res["samples"] = len(lat)
    res["throughput_ratio"] = round(res["watched"]["per_s"] / res["none"]["per_s"], 3)
    return res


# ── M: watchers that never read ─────────────────────────────────────────────
async def section_m(base: Path, secs: float, watches: int = 1000) -> dict[str, Any]:
    res: dict[str, Any] = {}
    with bench.Daemon(base) as d:
        assert d.proc is not None
        pid = d.proc.pid
        socks = []
        for i in range(0, watches, 63):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(str(d.sock))
            for rid in range(i, min(i + 63, watches)):
                req = {"op": "watch", "id": rid, "session_tag": f"m{rid % 4}"}
                s.sendall(encode_frame(msgspec.msgpack.encode(req)))
            socks.append(s)
        async with AsyncClient(d.sock) as c:
            with anyio.fail_after(60):  # a poll of the daemon's count, with a deadline
                while (await c.stats())["watches"] < watches:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            res["rss_before_mib"] = round(rss(pid) / 2**20, 1)
            peak = [0]

            async def sample() -> None:
                while True:
                    peak[0] = max(peak[0], rss(pid))
                    await anyio.sleep(0.1)

            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                res["appends"] = await bench.timed_tasks(
                    32, secs * 3, lambda t: c.append("user", CONTENT, session_tag=f"m{t % 4}")
                )
                tg.cancel_scope.cancel()
            stats = await c.stats()
        res["rss_peak_mib"] = round(peak[0] / 2**20, 1)
        res["lagged"] = stats["watches_lagged"]
        res["open_after"] = stats["watches"]
        for s in socks:
            s.close()
    return res


# ── F: what the index costs the writers ─────────────────────────────────────
async def section_f(base: Path, secs: float) -> dict[str, Any]:
    import procs

    res: dict[str, Any] = {}
    os.environ["NEXUSD_BENCH_CONTENT"] = CONTENT  # for the processes (read at import)
    ctx = procs.context()
    for search in ("false", "true"):
        run = base / f"f-{search}"
        run.mkdir()
        with bench.Daemon(run, "--search", search) as d:
            assert d.proc is not None
            point: dict[str, Any] = {}
            async with AsyncClient(d.sock) as c:
                point["tasks32"] = await bench.timed_tasks(
                    32, secs, lambda t: c.append("user", CONTENT, session_tag=f"s{t % 64}")
                )
            for n in (8, 32):
                point[f"procs{n}"] = await anyio.to_thread.run_sync(
                    procs.run_point, ctx, "nexusd", "blocking", d.sock, n, secs, d.proc.pid
                )
            res[f"search_{search}"] = point
    off, on = res["search_false"], res["search_true"]
    res["ratio"] = {k: round(on[k]["per_s"] / off[k]["per_s"], 3) for k in off}
    return res


# ── Q: how fast a search answers ────────────────────────────────────────────
def fill_prose(db: Path, rows: int) -> None:
    rng = random.Random(7)
    conn = open_writer(db)
    conn.execute("BEGIN")
    for start in range(0, rows, 50_000):
        conn.executemany(
            "INSERT INTO nexus_messages (role, content, timestamp, session_tag)"
            " VALUES ('user', ?, '2026-01-01T00:00:00.000000Z', ?)",
            [(prose(rng), f"q{i % 1000}") for i in range(start, min(rows, start + 50_000))],
        )
    conn.execute("COMMIT")
    conn.close()


async def section_q(base: Path, rows: int, queries: int = 300) -> dict[str, Any]:
    (base / "q").mkdir()
    t0 = time.perf_counter()
    fill_prose(base / "q" / "nexus.db", rows)
    res: dict[str, Any] = {"rows": rows, "fill_s": round(time.perf_counter() - t0, 1)}
    with bench.Daemon(base / "q", "--max-messages", "0") as d:
        t0 = time.perf_counter()
        with Client(d.sock) as c:
            while c.stats()["search"] != "ready":
                time.sleep(0.2)
            res["index_build_s"] = round(time.perf_counter() - t0, 1)
            rng = random.Random(3)
            orders: tuple[Literal["rank", "newest"], ...] = ("rank", "newest")
            for order in orders:
                lat, hits = [], []
                for _ in range(queries):
                    q = " ".join(rng.sample(WORDS[:500], 2))
                    t1 = time.perf_counter()
                    found = c.search(q, limit=20, order=order)
                    lat.append(time.perf_counter() - t1)
                    hits.append(len(found))
                lat.sort()
                res[order] = {
                    "p50_ms": round(bench.pct(lat, 0.5) * 1e3, 2),
                    "p99_ms": round(bench.pct(lat, 0.99) * 1e3, 2),
                    "max_ms": round(lat[-1] * 1e3, 2),
                    "mean_hits": round(statistics.mean(hits), 1),
                }
        res["db_mib"] = round(sum(f.stat().st_size for f in (base / "q").glob("nexus.db*")) / 2**20)
    return res


async def one_run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="nxlive", dir="/tmp"))
    out: dict[str, Any] = {}
    try:
        for name in args.only or "WMFQ":
            part = base / name
            part.mkdir()
            print(f"  {name} ...", flush=True)
            if name == "Q":
                out[name] = await section_q(part, args.rows)
            elif name == "W":
                out[name] = await section_w(part, args.seconds)
            elif name == "M":
                out[name] = await section_m(part, args.seconds)
            else:
                out[name] = await section_f(part, args.seconds)
            print(f"  {name}: {json.dumps(out[name], default=str)[:600]}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1_000_000, help="messages in section Q")
    ap.add_argument("--only", help="sections to run, e.g. WF")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/live.json"))
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runs = []
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", flush=True)
        runs.append(anyio.run(one_run, args, backend="asyncio"))
    args.json.write_text(json.dumps({"runs": runs}, indent=1, default=str))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
