"""The two memory floods of issue 9, item 5, at full size, by hand (not a unit test).

    python benchmarks/floods.py frames  [--code DIR] [--conns 1000] [--config TOML]
    python benchmarks/floods.py history [--code DIR] [--conns 100]

frames:  N connections each send a 4 MiB frame header and all but the last byte
         of its body, and hold it.
history: N connections each ask for 16 pages of ~4 MB of history and never read.

Meanwhile a well-behaved client pings in a loop.  Prints the daemon's RSS
(baseline, peak, 3 s after the flooders left), the pings answered and their
p50/p99 latency.  ``--code`` runs the daemon from another checkout (e.g. a
``git worktree`` of the old code).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

from nexusd.wire.framing import FrameDecoder, encode_frame

MiB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def call(s: socket.socket, dec: FrameDecoder, req: dict[str, object]) -> dict[str, object]:
    s.sendall(encode_frame(msgspec.msgpack.encode(req)))
    while True:
        frames = dec.feed(s.recv(1 << 20))
        if frames:
            return msgspec.msgpack.decode(frames[0])  # type: ignore[no-any-return]


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("flood", choices=["frames", "history"])
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--conns", type=int)
    ap.add_argument("--config")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="nxf", dir="/tmp"))
    sock = base / "s.sock"
    cmd = [sys.executable, "-m", "nexusd", "serve", "--db", str(base / "nexus.db")]
    cmd += ["--socket", str(sock), "--max-messages", "0"]
    if args.config:
        cmd += ["--config", args.config]
    env = {**os.environ, "PYTHONPATH": args.code}
    proc = subprocess.Popen(cmd, cwd=args.code, env=env, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 15
        while True:
            try:
                connect(sock).close()
                break
            except OSError:
                assert time.monotonic() < end and proc.poll() is None
                time.sleep(0.05)
        good = connect(sock)
        gdec = FrameDecoder(64 * MiB)
        if args.flood == "history":
            for _ in range(2):  # 40 x 100 kB = one ~4 MB page
                call(
                    good,
                    gdec,
                    {
                        "op": "append_many",
                        "id": 1,
                        "messages": [{"role": "u", "content": "z" * 100_000} for _ in range(20)],
                    },
                )
        time.sleep(1)
        baseline = rss(proc.pid)
        stop = threading.Event()
        lat: list[float] = []
        errors: list[str] = []

        def pinger() -> None:
            i = 0
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    r = call(good, gdec, {"op": "ping", "id": i})
                except OSError as exc:
                    errors.append(repr(exc))
                    return
                lat.append(time.perf_counter() - t)
                if r.get("op") != "ping":
                    errors.append(str(r))
                i += 1
                time.sleep(0.01)

        samples = [baseline]

        def sampler() -> None:
            while not stop.wait(0.05):
                samples.append(rss(proc.pid))

        threads = [threading.Thread(target=pinger), threading.Thread(target=sampler)]
        for t in threads:
            t.start()
        conns: list[socket.socket] = []
        refused = 0
        if args.flood == "frames":
            n = args.conns or 1000
            body = memoryview(struct.pack(">I", 4 * MiB) + bytes(4 * MiB - 1))
            rest: list[memoryview | None] = []
            for _ in range(n):
                try:
                    s = connect(sock)
                except OSError:
                    refused += 1
                    continue
                s.setblocking(False)
                conns.append(s)
                rest.append(body)
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                moved = False
                for k, s in enumerate(conns):
                    r = rest[k]
                    if r is None or not r:
                        continue
                    try:
                        sent = s.send(r)
                    except BlockingIOError:
                        continue
                    except OSError:
                        rest[k] = None  # refused or cut by the daemon
                        refused += 1
                        continue
                    rest[k] = r[sent:]
                    moved = True
                if not moved:
                    time.sleep(0.01)
            whole = sum(1 for r in rest if r is not None and not r)
            detail = f"{whole} frames sent but the last byte"
        else:
            n = args.conns or 100
            asks = b"".join(
                encode_frame(msgspec.msgpack.encode({"op": "history", "id": i, "limit": 40}))
                for i in range(16)
            )
            for _ in range(n):
                s = connect(sock)
                s.settimeout(2)
                try:
                    s.sendall(asks)
                except OSError:
                    refused += 1
                conns.append(s)
            time.sleep(args.seconds)
            detail = "16 x 4 MB pages asked per connection"
        peak = max(samples)
        for s in conns:
            s.close()
        time.sleep(3)
        after = rss(proc.pid)
        stop.set()
        for t in threads:
            t.join()
        lat.sort()
        p99 = lat[int(len(lat) * 0.99) - 1] if lat else float("nan")
        print(
            f"{args.flood}: {len(conns)} conns ({refused} refused/cut), {detail}; "
            f"RSS {baseline / MiB:.0f} MiB -> peak {peak / MiB:.0f} MiB -> after {after / MiB:.0f} MiB; "
            f"{len(lat)} pings answered, p50 {statistics.median(lat) * 1000 if lat else 0:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms; errors {errors[:2]}"
        )
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
