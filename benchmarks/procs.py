"""Section P of the benchmark: many processes, each with its own connection.

Imported by bench.py (``python benchmarks/bench.py``), which runs it against
the daemon it already started.  For 1, 2, 4, 8, 32 and 128 processes, each
process opens one client (a blocking ``nexusd.Client``, or an ``AsyncClient``
driven by one task) and appends 200-byte messages in a loop, round-robin over
the 64 pre-filled sessions; Redis, when installed, gets the same workload at
the same point, back to back: ``XADD s<k> MAXLEN 500 * ...`` with
``appendfsync always`` through redis-py (hiredis when installed) over a Unix
socket, blocking ``redis.Redis`` and ``redis.asyncio``.

The workers are forked from a forkserver that has imported the clients once
(it runs no threads and no event loop), so 128 of them start in a second or
two on a small machine.  Each connects, reports ready and waits; the parent
releases them together, lets them warm up, then measures for the same window
in all of them: acknowledged calls/s summed over processes, p50/p99 per call
over the merged samples, and, from before/after the window, the server's CPU
(utime+stime from /proc) per message, each client's own CPU per call (its
process time over the window) and, for nexusd, the mean batch size
(rows committed / batches committed, from the daemon's ``stats``).
"""

from __future__ import annotations

import array
import contextlib
import multiprocessing
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from multiprocessing.context import ForkServerContext
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

PROCESSES = (1, 2, 4, 8, 32, 128)
KINDS = ("blocking", "async")
SESSIONS = 64
MAXLEN = 500  # the daemon's default retention, and Redis's MAXLEN
#: What each append stores (benchmarks/live.py sets prose, to measure search's upkeep).
CONTENT = os.environ.get("NEXUSD_BENCH_CONTENT", "x" * 200)
TAGS = [f"s{k}" for k in range(SESSIONS)]
FIELDS: dict[Any, Any] = {"role": "user", "content": CONTENT}
WARMUP = 0.3
READY_TIMEOUT = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ── the workers (run in the forked processes) ────────────────────────────────
def _loop_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


class _Meter:
    """One worker's window: which session each call goes to, each call's latency, the CPU.

    ``next()`` is called before every call: it records the call before it (if
    that one started inside the window) and gives the next call's session, or
    None once the window is over.
    """

    def __init__(self, start: _Start, index: int) -> None:
        self.begin = start.value + WARMUP
        self.end = self.begin + start.secs
        self.lat = array.array("d")
        self.n = 0
        self._i = index
        self._t0 = 0.0
        self._cpu0 = 0.0

    def next(self) -> str | None:
        now = time.monotonic()
        if self._t0 >= self.begin:
            self.lat.append(now - self._t0)
            self.n += 1
        if now >= self.end:
            return None
        if not self.n and now >= self.begin:
            self._cpu0 = time.process_time()
        self._t0 = now
        tag = TAGS[self._i % SESSIONS]
        self._i += 1
        return tag

    def result(self) -> tuple[int, array.array[float], float]:
        return self.n, self.lat, time.process_time() - self._cpu0 if self.n else 0.0


def _blocking(system: str, sock: str, index: int, ready: Any, go: Event, start: _Start) -> Any:
    with contextlib.ExitStack() as stack:
        if system == "nexusd":
            from nexusd import Client

            client: Any = stack.enter_context(Client(sock))

            def call(tag: str) -> object:
                return client.append("user", CONTENT, session_tag=tag)

        else:
            import redis

            client = stack.enter_context(redis.Redis(unix_socket_path=sock))
            client.ping()

            def call(tag: str) -> object:
                return client.xadd(tag, FIELDS, maxlen=MAXLEN, approximate=False)

        ready.put(("ready", index))
        go.wait()
        meter = _Meter(start, index)
        while (tag := meter.next()) is not None:
            call(tag)
    return meter.result()


def _async(system: str, sock: str, index: int, ready: Any, go: Event, start: _Start) -> Any:
    import anyio

    async def run() -> Any:
        async with contextlib.AsyncExitStack() as stack:
            if system == "nexusd":
                from nexusd import AsyncClient

                client: Any = await stack.enter_async_context(AsyncClient(sock))

                async def call(tag: str) -> object:
                    return await client.append("user", CONTENT, session_tag=tag)

            else:
                import redis.asyncio as aioredis

                client = await stack.enter_async_context(aioredis.Redis(unix_socket_path=sock))
                await client.ping()

                async def call(tag: str) -> object:
                    return await client.xadd(tag, FIELDS, maxlen=MAXLEN, approximate=False)

            ready.put(("ready", index))
            go.wait()  # nothing else runs on this loop yet: blocking it is harmless
            meter = _Meter(start, index)
            while (tag := meter.next()) is not None:
                await call(tag)
        return meter.result()

    return anyio.run(run, backend="asyncio", backend_options=_loop_options())


class _Start:
    """The shared start time (monotonic clock, the same in every process) and the window."""

    def __init__(self, ctx: ForkServerContext, secs: float) -> None:
        self._value = ctx.Value("d", 0.0, lock=False)
        self.secs = secs

    @property
    def value(self) -> float:
        return float(self._value.value)

    @value.setter
    def value(self, v: float) -> None:
        self._value.value = v


def worker(
    system: str, kind: str, sock: str, index: int, ready: Any, go: Event, start: _Start
) -> None:
    """One process: connect, report ready, wait for the release, append for the window."""
    try:
        run = _blocking if kind == "blocking" else _async
        n, lat, cpu = run(system, sock, index, ready, go, start)
        ready.put(("done", index, n, lat.tobytes(), None, cpu))
    except BaseException as exc:  # reported, not raised: the parent counts it
        ready.put(("done", index, 0, b"", f"{type(exc).__name__}: {exc}", 0.0))


# ── the parent ───────────────────────────────────────────────────────────────
def cpu_seconds(pid: int) -> float:
    """utime+stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def context() -> ForkServerContext:
    """A forkserver that imported the clients once; its forks start fast and small."""
    ctx = multiprocessing.get_context("forkserver")
    assert isinstance(ctx, ForkServerContext)
    ctx.set_forkserver_preload(
        ["__main__", "procs", "nexusd.client", "anyio", "redis", "redis.asyncio", "hiredis"]
    )
    return ctx


def run_point(
    ctx: ForkServerContext,
    system: str,
    kind: str,
    sock: Path,
    n: int,
    secs: float,
    server_pid: int,
    stats: Any = None,
) -> dict[str, Any]:
    """``n`` processes of one client kind against one server; ``stats()`` gives nexusd's counters."""
    ready: Any = ctx.Queue()
    go = ctx.Event()
    start = _Start(ctx, secs)
    procs = [
        ctx.Process(target=worker, args=(system, kind, str(sock), i, ready, go, start), daemon=True)
        for i in range(n)
    ]
    for p in procs:
        p.start()
    results: list[tuple[Any, ...]] = []
    try:
        waiting = n
        deadline = time.monotonic() + READY_TIMEOUT
        while waiting:  # a worker that failed to connect reports "done" instead
            msg = ready.get(timeout=max(0.1, deadline - time.monotonic()))
            if msg[0] == "done":
                results.append(msg)
            waiting -= 1
        start.value = time.monotonic() + 0.05
        go.set()
        begin = start.value + WARMUP
        time.sleep(max(0.0, begin - time.monotonic()))
        cpu0, st0 = cpu_seconds(server_pid), stats() if stats else None
        time.sleep(max(0.0, begin + secs - time.monotonic()))
        cpu1, st1 = cpu_seconds(server_pid), stats() if stats else None
        while len(results) < n:
            results.append(ready.get(timeout=READY_TIMEOUT))
    finally:
        go.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        ready.close()
    ops = sum(r[2] for r in results)
    lat: list[float] = []
    for r in results:
        a = array.array("d")
        a.frombytes(r[3])
        lat.extend(a)
    errors = [r[4] for r in results if r[4]]
    client_cpu = sum(r[5] for r in results)
    out: dict[str, Any] = {
        "processes": n,
        "ops": ops,
        "seconds": secs,
        "per_s": round(ops / secs, 1),
        "p50_ms": round(_pct(lat, 0.50) * 1e3, 3),
        "p99_ms": round(_pct(lat, 0.99) * 1e3, 3),
        "server_cpu_s": round(cpu1 - cpu0, 3),
        "cpu_us_per_msg": round((cpu1 - cpu0) / ops * 1e6, 1) if ops else None,
        "client_cpu_us_per_call": round(client_cpu / ops * 1e6, 1) if ops else None,
        "errors": len(errors),
    }
    if errors:
        out["first_error"] = errors[0]
    if st0 is not None and st1 is not None:
        batches = st1["batches_committed"] - st0["batches_committed"]
        rows = st1["rows_committed"] - st0["rows_committed"]
        out["batches"] = batches
        out["mean_batch"] = round(rows / batches, 2) if batches else None
    return out


@contextlib.contextmanager
def redis_server(base: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """redis-server on a Unix socket in ``base``, AOF with ``appendfsync always``, no RDB."""
    server = shutil.which("redis-server")
    if server is None:
        raise FileNotFoundError("redis-server")
    sock = base / "redis.sock"
    cmd = [server, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
    cmd += ["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--dir", str(base)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"redis-server did not start (exit {proc.poll()})")
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    break
                except OSError:
                    time.sleep(0.02)
        yield sock, proc
    finally:
        proc.terminate()
        proc.wait(30)


def redis_missing() -> str | None:
    """Why Redis is skipped, or None."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py not installed (pip install '.[bench]')"
    if shutil.which("redis-server") is None:
        return "redis-server not on PATH"
    return None


def prefill_redis(sock: Path) -> dict[str, Any]:
    """Every stream at MAXLEN, like the daemon's pre-filled sessions: each XADD trims one."""
    import redis

    r = redis.Redis(unix_socket_path=str(sock))
    pipe = r.pipeline(transaction=False)
    for tag in TAGS:
        for _ in range(MAXLEN):
            pipe.xadd(tag, FIELDS, maxlen=MAXLEN, approximate=False)
    pipe.execute()
    info = r.info("server")
    r.close()
    import redis.utils

    return {"version": info.get("redis_version"), "hiredis": bool(redis.utils.HIREDIS_AVAILABLE)}


def run(
    base: Path, sock: Path, daemon_pid: int, secs: float, counts: tuple[int, ...] = PROCESSES
) -> dict[str, Any]:
    """Section P against the running daemon at ``sock``; Redis started here when installed."""
    from nexusd import Client

    ctx = context()
    out: dict[str, Any] = {"processes": list(counts), "seconds_per_point": secs}
    out["nexusd"] = {k: {} for k in KINDS}
    out["loop"] = "uvloop" if _loop_options() else "asyncio"
    skip = redis_missing()
    if skip:
        out["redis"] = {"skipped": skip}
        print(f"  P Redis skipped: {skip}", flush=True)
    else:
        out["redis"] = {k: {} for k in KINDS}
    with contextlib.ExitStack() as stack:
        admin = stack.enter_context(Client(sock))
        rsock: Path | None = None
        rpid = 0
        if not skip:
            (base / "procs-redis").mkdir()
            rsock, rproc = stack.enter_context(redis_server(base / "procs-redis"))
            rpid = rproc.pid
            out["redis"].update(prefill_redis(rsock))
        for kind in KINDS:
            for n in counts:
                a = run_point(ctx, "nexusd", kind, sock, n, secs, daemon_pid, admin.stats)
                out["nexusd"][kind][str(n)] = a
                line = (
                    f"  P {kind:>8} {n:>3} procs: nexusd {a['per_s']:>7.0f}/s "
                    f"p99 {a['p99_ms']:6.2f} ms batch {a['mean_batch']} "
                    f"{a['cpu_us_per_msg']} µs/msg"
                )
                if rsock is not None:
                    r = run_point(ctx, "redis", kind, rsock, n, secs, rpid)
                    out["redis"][kind][str(n)] = r
                    line += (
                        f" | Redis {r['per_s']:>7.0f}/s p99 {r['p99_ms']:6.2f} ms "
                        f"{r['cpu_us_per_msg']} µs/msg"
                    )
                for res in (a, out["redis"].get(kind, {}).get(str(n), {})):
                    if res.get("errors"):
                        line += f" [{res['errors']} errors: {res['first_error']}]"
                print(line, flush=True)
    return out


# ── report ───────────────────────────────────────────────────────────────────
def table(p: dict[str, Any]) -> str:
    """One table per client kind, processes down the side."""
    lines: list[str] = []
    redis = p["redis"]
    for kind in KINDS:
        lines += [
            "" if lines else f"P many processes, one connection each ({p['loop']} for async):",
            f"{kind} clients:",
            "| processes | nexusd /s | p50 ms | p99 ms | batch | server CPU µs/msg | client CPU µs/call"
            " | Redis /s | p50 ms | p99 ms | server CPU µs/msg | client CPU µs/call | nexusd / Redis |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n in p["processes"]:
            a = p["nexusd"][kind][str(n)]
            r = redis.get(kind, {}).get(str(n))
            row = (
                f"| {n} | {a['per_s']:.0f} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | "
                f"{a['mean_batch']} | {a['cpu_us_per_msg']} | {a.get('client_cpu_us_per_call')} | "
            )
            if r:
                ratio = f"{a['per_s'] / r['per_s']:.2f}" if r["per_s"] else "-"
                row += (
                    f"{r['per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                    f"{r['cpu_us_per_msg']} | {r.get('client_cpu_us_per_call')} | {ratio} |"
                )
            else:
                row += "- | - | - | - | - | - |"
            lines.append(row)
    if "skipped" in redis:
        lines.append(f"Redis skipped: {redis['skipped']}")
    else:
        lines.append(f"Redis {redis.get('version')}, hiredis {redis.get('hiredis')}")
    return "\n".join(lines)


def plot(p: dict[str, Any], ax1: Any, ax2: Any) -> None:
    """Throughput and p99 against processes, nexusd and Redis, both client kinds."""
    xs = p["processes"]
    for system, marker in (("nexusd", "o"), ("redis", "s")):
        for kind, style in (("blocking", "-"), ("async", "--")):
            pts = p[system].get(kind)
            if not pts:
                continue
            label = f"{'nexusd' if system == 'nexusd' else 'Redis XADD'}, {kind} client each"
            ax1.plot(xs, [pts[str(n)]["per_s"] for n in xs], marker + style, label=label)
            ax2.plot(xs, [pts[str(n)]["p99_ms"] for n in xs], marker + style, label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("processes (one connection each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("acknowledged appends / s, summed")
    ax1.set_title("Many processes: throughput")
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 per append (ms)")
    ax2.set_title("Many processes: p99 latency")
