"""Import throughput, measured (issue 13): a 1,000,000-line export file into a fresh daemon.

    python benchmarks/imports.py [--rows 1000000] [--runs 3] [--json benchmarks/imports.json]

The file is export's JSON Lines (``id``, ``session_tag``, ``role``,
``content``, ``timestamp``, ``meta``): 100 sessions of 10,000 messages in
tag and id order, chat-like content of 40-400 characters, a ``meta`` on one
message in ten.  Each run, for ``search = false`` and ``search = true`` (the
default): a daemon with ``synchronous=full`` and ``max_messages = 0`` (so no
row is pruned) on a fresh database; ``nexusd.client.transfer.import_messages``
of the whole file (rows/s over the call's wall time, the file read included);
then the same file again, which must store nothing (its rows/s too).  The
daemon's and this process's CPU seconds are recorded for each import, which
says which side is the bottleneck.  The summary gives the median and range
over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

from nexusd import Client
from nexusd.client.transfer import import_messages

WORDS = [
    *[
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "it",
        "for",
        "you",
        "was",
        "on",
        "are",
        "with",
        "as",
        "be",
        "at",
        "this",
    ]
]
WORDS += [f"w{i}" for i in range(2000)]


#: Requests in flight (--window) and messages per request (--batch).
WINDOW = 4
BATCH = 10_000


def make_file(path: Path, rows: int, sessions: int = 100) -> None:
    rng = random.Random(13)
    per = rows // sessions
    enc = msgspec.json.encode
    mid = 0
    with open(path, "wb", buffering=4 << 20) as f:
        for s in range(sessions):
            tag = f"chat-{s:04d}"
            for i in range(per):
                mid += 1
                content = " ".join(rng.choices(WORDS, k=rng.randint(8, 70)))
                line = {
                    "id": mid,
                    "session_tag": tag,
                    "role": "user" if i % 2 == 0 else "assistant",
                    "content": content,
                    "timestamp": f"2026-01-{1 + s % 28:02d}T{i // 3600 % 24:02d}:"
                    f"{i // 60 % 60:02d}:{i % 60:02d}.{mid % 1000000:06d}Z",
                    "meta": {"model": "m1", "tokens": len(content) // 4} if i % 10 == 0 else None,
                }
                f.write(enc(line) + b"\n")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (the event loop's tid is ``pid``)."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_import(sock: Path, path: Path, pid: int) -> dict[str, Any]:
    with Client(sock, timeout=300) as c, open(path, "rb") as f:
        s0 = c.stats()
        th0 = thread_cpu(pid)
        d0, c0, t0 = bench.cpu_of(pid), own_cpu(), time.perf_counter()
        done = import_messages(c, f, window=WINDOW, batch_rows=BATCH)
        wall = time.perf_counter() - t0
        d1, c1 = bench.cpu_of(pid), own_cpu()
        th1 = thread_cpu(pid)
        s1 = c.stats()
    spent = {t: th1[t] - th0.get(t, 0.0) for t in th1}
    loop = spent.pop(pid, 0.0)
    busiest = max(spent.values(), default=0.0)
    batches = s1["batches_committed"] - s0["batches_committed"]
    return {
        "rows": done.messages,
        "stored": done.stored,
        "present": done.present,
        "seconds": round(wall, 3),
        "rows_per_s": round(done.messages / wall),
        "daemon_cpu_s": round(d1 - d0, 2),
        "client_cpu_s": round(c1 - c0, 2),
        # The daemon's CPU by thread: the event loop (decoding, checks, replies)
        # and its busiest other thread (the writer's SQLite connection).
        "daemon_loop_cpu_s": round(loop, 2),
        "daemon_writer_cpu_s": round(busiest, 2),
        # The writer's side: transactions, rows per transaction, and how long
        # one took (stats' percentiles are over the daemon's recent commits).
        "transactions": batches,
        "rows_per_transaction": round(done.messages / batches) if batches else None,
        "commit_latency_p50_ms": s1["commit_latency_p50_ms"],
        "commit_latency_p99_ms": s1["commit_latency_p99_ms"],
    }


def one_run(base: Path, path: Path, search: bool) -> dict[str, Any]:
    part = base / f"search-{search}"
    part.mkdir()
    args = ("--synchronous", "full", "--max-messages", "0", "--search", str(search).lower())
    with bench.Daemon(part, *args) as d:
        assert d.proc is not None
        first = timed_import(d.sock, path, d.proc.pid)
        second = timed_import(d.sock, path, d.proc.pid)
    shutil.rmtree(part, ignore_errors=True)
    return {"first": first, "again": second}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("search_off", "search_on"):
        for which in ("first", "again"):
            if mode not in runs[0]:
                continue
            vals = [r[mode][which]["rows_per_s"] for r in runs]
            out[f"{mode}.{which}"] = {
                "median_rows_per_s": statistics.median(vals),
                "min": min(vals),
                "max": max(vals),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--window", type=int, default=4, help="requests in flight")
    ap.add_argument("--batch", type=int, default=10_000, help="messages per request")
    ap.add_argument("--only", choices=("off", "on"), help="search off or on only")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/imports.json"))
    args = ap.parse_args()
    global WINDOW, BATCH
    WINDOW, BATCH = args.window, args.batch
    base = Path(tempfile.mkdtemp(prefix="nximp", dir="/tmp"))
    try:
        path = base / "export.jsonl"
        t0 = time.perf_counter()
        make_file(path, args.rows)
        size = path.stat().st_size
        print(f"file: {args.rows} lines, {size / 2**20:.0f} MiB ({time.perf_counter() - t0:.1f} s)")
        runs = []
        for i in range(args.runs):
            run: dict[str, Any] = {}
            modes = {"off": (False,), "on": (True,), None: (False, True)}[args.only]
            for search in modes:
                key = "search_on" if search else "search_off"
                run[key] = one_run(base, path, search)
                print(f"run {i + 1}/{args.runs} {key}: {json.dumps(run[key])}", flush=True)
            runs.append(run)
        summary = summarise(runs)
        for k, v in summary.items():
            print(f"{k}: {v}")
        result = {
            "rows": args.rows,
            "file_mib": round(size / 2**20),
            "window": WINDOW,
            "batch": BATCH,
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "runs": runs,
        }
        args.json.write_text(json.dumps({**result, "summary": summary}, indent=1))
        print(f"results: {args.json}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
