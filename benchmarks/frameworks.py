"""The Agents SDK's sessions side by side (issue 14): NexusSession against SQLiteSession.

    python benchmarks/frameworks.py [--turns 200] [--runs 3] [--json benchmarks/frameworks.json]

What an agent process does with its session, from 1 and from 8 processes at once:
each process keeps its own conversation (``session_id`` = its number), first
filled with 200 items (not timed), then, ``--turns`` times: ``add_items`` of
one turn (5 to 20 items: the user's message, tool calls and their outputs, the
answer; 60 to 600 characters of text each, seeded) and ``get_items(limit=200)``,
the history a run reads before calling its model.  Each call is timed alone
(``time.perf_counter`` around the ``await``).

* ``nexusd``: :class:`~nexusd.integrations.openai_agents.NexusSession` over a
  daemon with the default settings (``synchronous=full``, search on, pruning
  off here: ``--max-messages 0``, as SQLiteSession never prunes).
* ``sqlite``: the SDK's own ``SQLiteSession`` on one file shared by the
  processes (WAL, its defaults: ``synchronous=FULL``, a 5 s busy timeout).

Every exception a call raises is counted by its first line (``database is
locked`` among them) and the call goes on with the next turn; the stored items
are counted after, against what was acknowledged (rows lost).  Processes start
together: each imports, connects and fills its session, says so, and waits for
the word to go.  Per configuration: calls/s over all processes, p50/p99 of
each call, errors, lost items; the summary gives the median and range of
``--runs`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

PREFILL = 200
#: nexusd: NexusSession(socket=...), its blocking client in a worker thread (the default);
#: nexusd-async: NexusSession(client=AsyncClient) on the event loop; sqlite: SQLiteSession.
STORES = ("nexusd", "nexusd-async", "sqlite")
WORDS = ["the", "order", "was", "shipped", "on", "tuesday", "and", "should", "arrive", "by"]


def _text(rng: random.Random) -> str:
    n = rng.randint(60, 600)
    out: list[str] = []
    size = 0
    while size < n:
        out.append(rng.choice(WORDS))
        size += len(out[-1]) + 1
    return " ".join(out)


def turn(rng: random.Random, who: int, n: int) -> list[dict[str, Any]]:
    """One agent turn of 5-20 items, shaped as the Responses API's."""
    items: list[dict[str, Any]] = [{"role": "user", "content": _text(rng)}]
    calls = (rng.randint(5, 20) - 2) // 2
    for c in range(calls):
        call_id = f"call_{who}_{n}_{c}"
        items.append(
            {
                "type": "function_call",
                "call_id": call_id,
                "name": "lookup",
                "arguments": json.dumps({"q": _text(rng)[:80]}),
                "id": f"fc_{call_id}",
                "status": "completed",
            }
        )
        items.append({"type": "function_call_output", "call_id": call_id, "output": _text(rng)})
    items.append(
        {
            "id": f"msg_{who}_{n}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": _text(rng), "annotations": []}],
        }
    )
    return items


# ── one worker process ────────────────────────────────────────────────────────
async def work(store: str, where: str, who: int, turns: int) -> dict[str, Any]:
    if store.startswith("nexusd"):
        from nexusd import AsyncClient
        from nexusd.integrations.openai_agents import NexusSession

        if store == "nexusd-async":  # on an AsyncClient of this event loop, no worker thread
            async with AsyncClient(where) as client:
                return await calls(NexusSession(f"w{who}", client=client), who, turns)
        return await calls(NexusSession(f"w{who}", socket=where), who, turns)
    from agents import SQLiteSession

    return await calls(SQLiteSession(f"w{who}", where), who, turns)


async def calls(session: Any, who: int, turns: int) -> dict[str, Any]:
    rng = random.Random(who)
    errors: Counter[str] = Counter()
    await session.add_items([it for n in range(40) for it in turn(rng, who, -n)][:PREFILL])
    print("ready", flush=True)
    sys.stdin.readline()  # the word to go
    adds: list[float] = []
    gets: list[float] = []
    acked = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for n in range(turns):
        items = turn(rng, who, n)
        try:
            t = time.perf_counter()
            await session.add_items(items)
            adds.append(time.perf_counter() - t)
            acked += len(items)
        except Exception as exc:  # counted: what users of this store would see
            errors[f"add_items: {type(exc).__name__}: {str(exc).splitlines()[0]}"] += 1
        try:
            t = time.perf_counter()
            got = await session.get_items(limit=200)
            gets.append(time.perf_counter() - t)
            assert len(got) == 200
        except Exception as exc:
            errors[f"get_items: {type(exc).__name__}: {str(exc).splitlines()[0]}"] += 1
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stored = len(await session.get_items()) - PREFILL
    session.close()
    return {
        "adds": adds,
        "gets": gets,
        "wall": wall,
        "cpu": cpu,
        "errors": dict(errors),
        "acked": acked,
        "stored": stored,
    }


# ── the runs ──────────────────────────────────────────────────────────────────
def bench_cpu(daemon: bench.Daemon | None) -> float:
    """The daemon's CPU seconds so far; 0 for no daemon."""
    return 0.0 if daemon is None or daemon.proc is None else bench.cpu_of(daemon.proc.pid)


def one(store: str, procs: int, turns: int, base: Path) -> dict[str, Any]:
    part = base / f"{store}-{procs}"
    part.mkdir()
    nexusd = store.startswith("nexusd")
    daemon = bench.Daemon(part, "--max-messages", "0") if nexusd else None
    where = str(daemon.sock if daemon else part / "agents.db")
    if daemon:
        daemon.__enter__()
    try:
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", store, where, str(w), str(turns)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for w in range(procs)
        ]
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        daemon_cpu = bench_cpu(daemon)
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        results = [json.loads(w.communicate(timeout=600)[0]) for w in workers]
        # From the word to go to the last worker's last call (not its exit).
        wall = max(r["wall"] for r in results)
        daemon_cpu = bench_cpu(daemon) - daemon_cpu
    finally:
        if daemon:
            daemon.__exit__()
    adds = [x for r in results for x in r["adds"]]
    gets = [x for r in results for x in r["gets"]]
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    return {
        "store": store,
        "procs": procs,
        "turns_per_s": round(len(adds) / wall, 1),
        "add_items": bench.summary(len(adds), wall, adds),
        "get_items_200": bench.summary(len(gets), wall, gets),
        "errors": dict(errors),
        "lost": sum(r["acked"] - r["stored"] for r in results),
        # CPU per turn (one add_items and one get_items), in ms: where the time goes.
        "cpu_ms_per_turn": {
            "processes": round(sum(r["cpu"] for r in results) / len(adds) * 1e3, 3),
            "daemon": round(daemon_cpu / len(adds) * 1e3, 3),
        },
    }


def table(runs: list[list[dict[str, Any]]]) -> str:
    lines = [
        "| store | procs | turns/s | add_items p50 / p99 ms | get_items(200) p50 / p99 ms"
        " | CPU ms/turn, processes + daemon | errors | lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, first in enumerate(runs[0]):
        rows = [r[i] for r in runs]

        def med(get: Any, rows: list[dict[str, Any]] = rows) -> str:
            vals = [get(r) for r in rows]
            return f"{statistics.median(vals):g} ({min(vals):g}-{max(vals):g})"

        lines.append(
            f"| {first['store']} | {first['procs']} | {med(lambda r: r['turns_per_s'])}"
            f" | {med(lambda r: r['add_items']['p50_ms'])} / {med(lambda r: r['add_items']['p99_ms'])}"
            f" | {med(lambda r: r['get_items_200']['p50_ms'])}"
            f" / {med(lambda r: r['get_items_200']['p99_ms'])}"
            f" | {med(lambda r: r['cpu_ms_per_turn']['processes'])}"
            f" + {med(lambda r: r['cpu_ms_per_turn']['daemon'])}"
            f" | {sum(sum(r['errors'].values()) for r in rows)}"
            f" | {sum(r['lost'] for r in rows)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--stores", nargs="+", default=list(STORES), choices=STORES)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/frameworks.json"))
    ap.add_argument("--worker", nargs=4, metavar=("STORE", "WHERE", "WHO", "TURNS"))
    args = ap.parse_args()
    if args.worker:
        store, where, who, turns = args.worker
        print(json.dumps(asyncio.run(work(store, where, int(who), int(turns)))))
        return
    runs = []
    for i in range(args.runs):
        base = Path(tempfile.mkdtemp(prefix="nxfw", dir="/tmp"))
        try:
            run = [
                one(store, procs, args.turns, base) for procs in args.procs for store in args.stores
            ]
        finally:
            shutil.rmtree(base, ignore_errors=True)
        for r in run:
            print(f"run {i + 1}: {json.dumps(r)}", flush=True)
        runs.append(run)
    print(table(runs))
    args.json.write_text(json.dumps({"runs": runs, "table": table(runs)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
