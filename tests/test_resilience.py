"""Shutdown, single instance, backpressure, connection limits, start-up faults, backups.

All against real ``nexusd serve`` processes over real sockets.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import msgspec

from nexusd import Client
from nexusd.storage.schema import SCHEMA_VERSION, integrity_check
from nexusd.wire.framing import encode_frame
from tests.conftest import (
    Daemon,
    RawSync,
    _new_daemon,
    only_connection,
    rss_bytes,
    run_cli,
    write_config,
)


def _frames(n: int, start: int = 0, tag: str = "nexus", size: int = 20) -> bytes:
    return b"".join(
        encode_frame(
            msgspec.msgpack.encode(
                {
                    "op": "append",
                    "id": i,
                    "role": "u",
                    "content": f"{i}:" + "x" * size,
                    "session_tag": tag,
                }
            )
        )
        for i in range(start, start + n)
    )


def _stored_ids(db: Path) -> set[int]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM nexus_messages")}
    finally:
        conn.close()


# ── graceful shutdown ─────────────────────────────────────────────────────────
def test_sigterm_with_thousands_in_flight_answers_every_request(short_dir: Path) -> None:
    cfg = write_config(short_dir / "c.toml", max_messages=0, queue_size=500)
    d = _new_daemon(short_dir, "--config", str(cfg), commit_delay=0.002).start()
    conns = [RawSync(d.socket, timeout=30) for _ in range(6)]
    per = 1000
    for k, c in enumerate(conns):
        c.sock.sendall(_frames(per, start=k * per))
    first = conns[0].recv()  # the storm is being committed
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    replies = [first] + [
        r for k, c in enumerate(conns) for r in (c.recv() for _ in range(per - (k == 0)))
    ]
    for c in conns:
        assert c.closed_by_peer()  # and then the daemon hangs up
    assert d.proc.wait(30) == 0
    assert len(replies) == 6 * per  # nobody got silence
    ok = [r["message_id"] for r in replies if r["op"] == "append"]
    codes = {r["code"] for r in replies if r["op"] == "error"}
    assert codes <= {"unavailable"}
    assert set(ok) <= _stored_ids(d.db)  # every success is stored
    assert not d.socket.exists()
    wal = Path(f"{d.db}-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed (TRUNCATE)
    print(f"shutdown: {len(ok)} committed, {len(replies) - len(ok)} unavailable, 0 silent")


def test_second_daemon_on_the_same_database_names_the_holder(daemon: Daemon) -> None:
    assert daemon.proc is not None
    r = run_cli("serve", "--db", str(daemon.db), "--socket", str(daemon.dir / "other.sock"))
    assert r.returncode == 1
    assert f"pid {daemon.proc.pid}" in r.stderr and str(daemon.db) in r.stderr
    assert "Traceback" not in r.stderr
    assert daemon.cli("ping").returncode == 0


# ── backpressure and overload ─────────────────────────────────────────────────
def test_slow_writer_full_queue_gives_overloaded_while_reads_flow(short_dir: Path) -> None:
    cfg = write_config(short_dir / "c.toml", queue_size=4, batch_max=2, enqueue_timeout=0.05)
    d = _new_daemon(short_dir, "--config", str(cfg), commit_delay=0.2).start()
    try:
        writers = [RawSync(d.socket, timeout=30) for _ in range(4)]
        for k, w in enumerate(writers):
            w.sock.sendall(_frames(10, start=k * 100))
        reader = RawSync(d.socket)
        st = reader.call({"op": "stats", "id": 1})["stats"]
        assert st["queue_depth"] > 0  # writes are queued up behind the slow writer ...
        h = reader.call({"op": "history", "id": 2, "limit": 5})
        assert h["op"] == "history"  # ... and reads are answered meanwhile
        replies = [w.recv() for w in writers for _ in range(10)]
        over = [r for r in replies if r["op"] == "error"]
        assert over and all(r["code"] == "overloaded" for r in over)
        assert all(r["retry_after"] and r["retry_after"] > 0 for r in over)
        assert any(r["op"] == "append" for r in replies)
    finally:
        d.stop()


def test_rss_stays_bounded_under_a_flood_from_clients_that_never_read(short_dir: Path) -> None:
    d = _new_daemon(short_dir).start()
    assert d.proc is not None
    try:
        baseline = rss_bytes(d.proc.pid)
        sent = [0] * 20
        finished = [False] * 20
        stop = threading.Event()

        def flood(k: int) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket))
            s.settimeout(1.0)
            chunk = _frames(500, tag=f"flood{k}", size=200)
            try:
                while not stop.is_set() and sent[k] < 10_000:
                    s.sendall(chunk)  # never reads a single reply
                    sent[k] += 500
            except (TimeoutError, OSError):
                pass  # the daemon stopped reading us: backpressure
            finally:
                finished[k] = True
                stop.wait(20)  # keep the connection (and its unread replies) open
                s.close()

        threads = [threading.Thread(target=flood, args=(k,)) for k in range(20)]
        for t in threads:
            t.start()
        peak = baseline
        deadline = time.monotonic() + 15
        with Client(d.socket) as good:
            while time.monotonic() < deadline and any(t.is_alive() for t in threads):
                peak = max(peak, rss_bytes(d.proc.pid))
                assert good.message_count("nobody") == 0  # a well-behaved client is served
                if all(finished):
                    break
                time.sleep(0.05)  # sampling interval of the RSS probe
            peak = max(peak, rss_bytes(d.proc.pid))
            stop.set()
            for t in threads:
                t.join()
            good.ping()  # raises unless the daemon still answers
        print(
            f"flood: {sum(sent)} appends offered by 20 non-reading clients; "
            f"RSS {baseline >> 20} MiB -> peak {peak >> 20} MiB"
        )
        assert sum(sent) >= 100_000 or peak - baseline < 150 * 2**20
        assert peak - baseline < 150 * 2**20
    finally:
        d.stop()


def test_connection_cap_refuses_the_excess_with_overloaded(short_dir: Path) -> None:
    cfg = write_config(short_dir / "c.toml", max_connections=3, max_connections_per_uid=3)
    d = _new_daemon(short_dir, "--config", str(cfg)).start()
    try:
        first = only_connection(RawSync(d.socket))
        held = [first, RawSync(d.socket), RawSync(d.socket)]
        for c in held:
            assert c.call({"op": "ping", "id": 1})["op"] == "ping"
        extra = RawSync(d.socket)
        err = extra.recv()
        assert err["code"] == "overloaded" and err["id"] is None
        assert extra.closed_by_peer()
        held[0].close()
        deadline = time.monotonic() + 10
        while True:  # the freed slot becomes usable (poll with a deadline)
            c = RawSync(d.socket)
            try:
                reply = c.call({"op": "ping", "id": 2})
            except OSError:
                reply = {"op": "refused"}
            if reply["op"] == "ping" or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert reply["op"] == "ping"
    finally:
        d.stop()


def test_half_a_frame_then_silence_is_cut_off(short_dir: Path) -> None:
    cfg = write_config(short_dir / "c.toml", frame_timeout=0.3)
    d = _new_daemon(short_dir, "--config", str(cfg)).start()
    try:
        staller = RawSync(d.socket, timeout=10)
        staller.sock.sendall(struct.pack(">I", 100) + b"\x85")  # 1 byte of 100
        started = time.monotonic()
        assert staller.closed_by_peer()
        assert time.monotonic() - started < 9
        idle = RawSync(d.socket)  # a quiet connection *between* frames is left alone
        assert idle.call({"op": "ping", "id": 1})["op"] == "ping"
    finally:
        d.stop()


def test_per_connection_in_flight_limit(short_dir: Path) -> None:
    cfg = write_config(short_dir / "c.toml", max_inflight=8)
    d = _new_daemon(short_dir, "--config", str(cfg), commit_delay=0.02).start()
    try:
        greedy = RawSync(d.socket)
        greedy.sock.sendall(_frames(200))
        watcher = RawSync(d.socket)
        seen = max(
            watcher.call({"op": "stats", "id": i})["stats"]["requests_in_flight"] for i in range(20)
        )
        assert seen <= 8 + 1  # the greedy connection's 8, plus the stats call itself
        assert [greedy.recv()["op"] for _ in range(200)].count("append") == 200
    finally:
        d.stop()


# ── storage faults at start-up ────────────────────────────────────────────────
def test_corrupt_database_is_reported_and_left_untouched(short_dir: Path) -> None:
    db = short_dir / "nexus.db"
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE nexus_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, role TEXT NOT NULL, "
        "content TEXT NOT NULL, timestamp TEXT NOT NULL, session_tag TEXT NOT NULL DEFAULT 'nexus')"
    )
    conn.execute("CREATE INDEX idx_nexus_session ON nexus_messages(session_tag)")
    conn.executemany(
        "INSERT INTO nexus_messages (role, content, timestamp, session_tag) VALUES (?,?,?,?)",
        [("u", "x" * 500, "t", f"s{i}") for i in range(200)],
    )
    conn.commit()
    conn.close()
    data = bytearray(db.read_bytes())
    page = 4096
    for off in range(2 * page, len(data) - page, page):  # scramble pages past the schema
        data[off + 8 : off + 200] = os.urandom(192)
    db.write_bytes(bytes(data))
    before = db.read_bytes()
    r = run_cli("serve", "--db", str(db), "--socket", str(short_dir / "s.sock"))
    assert r.returncode == 1
    assert "quick_check" in r.stderr or "malformed" in r.stderr
    assert "Traceback" not in r.stderr
    assert db.read_bytes() == before
    check = run_cli("check", "--db", str(db))
    assert check.returncode == 1 and "DAMAGED" in check.stdout


def test_check_reports_a_sound_database(daemon: Daemon) -> None:
    daemon.cli("append", "u", "x")
    r = run_cli("check", "--db", str(daemon.db))
    assert (
        r.returncode == 0
        and f": ok (schema {SCHEMA_VERSION}, 1 messages in 1 sessions)" in r.stdout
    )


# ── backups ───────────────────────────────────────────────────────────────────
def test_backup_while_writes_continue_holds_every_row_acked_before(short_dir: Path) -> None:
    d = _new_daemon(short_dir, "--max-messages", "0").start()
    try:
        with Client(d.socket) as c:
            before = {
                c.append("u", f"before {i}", session_tag=f"s{i % 7}"): f"before {i}"
                for i in range(3000)
            }
            stop = threading.Event()
            during: list[int] = []

            def keep_writing() -> None:
                with Client(d.socket) as w:
                    while not stop.is_set():
                        during.append(w.append("u", "during"))

            t = threading.Thread(target=keep_writing)
            t.start()
            try:
                dest = short_dir / "backup.db"
                r = run_cli("backup", str(dest), "--socket", str(d.socket))
                assert r.returncode == 0, r.stderr
            finally:
                stop.set()
                t.join()
        assert during, "writes continued during the backup"
        assert integrity_check(dest) == ["ok"]
        conn = sqlite3.connect(dest)
        rows = dict(conn.execute("SELECT id, content FROM nexus_messages").fetchall())
        conn.close()
        assert all(rows.get(i) == text for i, text in before.items())
        assert not list(short_dir.glob(".nexusd-backup-*"))  # the snapshot was removed
        assert not Path(f"{dest}.partial").exists()
    finally:
        d.stop()


def test_backup_api_reports_progress(daemon: Daemon, short_dir: Path) -> None:
    seen: list[tuple[int, int]] = []
    with Client(daemon.socket) as c:
        c.append_many([("u", "x" * 10_000)] * 50)
        size = c.backup(short_dir / "b.db", progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1] == (size, size)
    assert (short_dir / "b.db").stat().st_size == size


def test_big_replies_to_a_client_that_never_reads_stay_bounded(short_dir: Path) -> None:
    d = _new_daemon(short_dir, "--max-messages", "0").start()
    assert d.proc is not None
    try:
        with Client(d.socket) as c:
            c.append_many([("u", "z" * 100_000)] * 40)  # a 4 MB history page
        baseline = rss_bytes(d.proc.pid)
        greedy = RawSync(d.socket, timeout=2)
        frames = b"".join(
            encode_frame(msgspec.msgpack.encode({"op": "history", "id": i, "limit": 40}))
            for i in range(300)
        )
        try:
            greedy.sock.sendall(frames)  # 300 pages asked for, none read
        except TimeoutError:
            pass  # the daemon stopped reading us: that is the point
        samples = [baseline]
        stop = threading.Event()

        def sample() -> None:  # the RSS probe, every 20 ms while the daemon works
            assert d.proc is not None
            while not stop.wait(0.02):
                samples.append(rss_bytes(d.proc.pid))

        probe = threading.Thread(target=sample)
        probe.start()
        try:
            with Client(d.socket) as good:
                for _ in range(20):  # other clients are still served meanwhile
                    assert good.message_count() == 40
            stop.wait(3)  # long enough for 300 unbounded pages to pile up (~1.2 GB)
        finally:
            stop.set()
            probe.join()
        peak = max(samples)
        print(f"300 unread 4 MB pages: RSS {baseline >> 20} MiB -> peak {peak >> 20} MiB")
        assert peak - baseline < 200 * 2**20  # not 300 x 4 MB
        greedy.close()
    finally:
        d.stop()
