"""Export and import (issue 13 items 6 and 7), against real daemons.

Two daemons are shared by the module (a source and a fresh destination);
each test uses its own session tags.  The CLI is run where its own behaviour
(exit codes, ``FILE:LINE`` errors, ``-o``) is under test, the Python API
(:mod:`nexusd.client.transfer`) elsewhere, which is faster.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nexusd import Client
from nexusd.client.transfer import ImportFailed, export_messages, import_messages
from nexusd.client.transfer_rows import BatchMaker, Limits
from tests.conftest import (
    Daemon,
    _new_daemon,
    as_uid,
    backend_storage,
    run_cli,
    wait_for_socket,
    write_config,
)

#: Export and import through daemons on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


@pytest.fixture(scope="module")
def pair(backend: str) -> Iterator[tuple[Daemon, Daemon]]:
    base = Path(tempfile.mkdtemp(prefix="nxt", dir="/tmp"))
    (base / "a").mkdir()
    (base / "b").mkdir()
    with backend_storage(backend) as one, backend_storage(backend) as two:
        src = _new_daemon(base / "a", storage=one).start(wait=False)
        dst = _new_daemon(base / "b", storage=two).start()
        try:
            wait_for_socket(src.socket, src.proc)  # the two started side by side
            yield src, dst
        finally:
            src.stop()
            dst.stop()
            shutil.rmtree(base, ignore_errors=True)


def _fields(msgs: list[Any]) -> list[tuple[Any, ...]]:
    return [(m.session_tag, m.role, m.content, m.timestamp, m.meta) for m in msgs]


def _export(client: Client, tags: list[str], **kw: Any) -> bytes:
    buf = io.BytesIO()
    export_messages(client, buf, sessions=tags, **kw)
    return buf.getvalue()


def _import(client: Client, data: bytes, **kw: Any) -> Any:
    return import_messages(client, io.BytesIO(data), **kw)


ODD = [
    ("user", "plain"),
    ("assistant", "ünïcödé 😀 東京 สวัสดี\u202eRTL"),
    ("tool", "control \x00\x01\x1b[31m\x7f\t\r\nand newlines\n\n"),
    ("user", "```\n# not a heading\n````\n"),
    ("system", ""),
    ("ρόλος", '{"json": "in content"}\\'),
]


def _fill(c: Client, tag: str) -> None:
    # PostgreSQL's text cannot hold NUL (refused there, docs/scaling.md): every
    # other odd character goes through both backends.
    nul_free = str(c.stats()["storage"]).startswith("postgresql")
    for i, (role, content) in enumerate(ODD):
        content = content.replace("\x00", "") if nul_free else content
        c.append(role, content, session_tag=tag, meta={"i": i, "ü": [1.5, None]} if i % 2 else None)
    c.append("user", "dated", session_tag=tag, timestamp="2020-02-29T23:59:59.123456789+05:30")


def test_round_trip_every_field_and_again_stores_nothing(
    pair: tuple[Daemon, Daemon], tag: str, tmp_path: Path
) -> None:
    src, dst = pair
    tags = [f"{tag}-b", f"{tag}-a", f"{tag} ✓ \n"]
    with Client(src.socket) as c:
        for t in tags:
            _fill(c, t)
        before = {t: c.get_history(t, 1000) for t in tags}
    out = tmp_path / "x.jsonl"
    chosen = [arg for t in tags for arg in ("--session", t)]
    r = run_cli("export", *chosen, "-o", str(out), "--socket", str(src.socket))
    assert r.returncode == 0, r.stderr
    assert os.stat(out).st_mode & 0o777 == 0o600
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["session_tag"] for x in lines] == [t for t in sorted(tags) for _ in range(7)]
    assert set(lines[0]) == {"id", "session_tag", "role", "content", "timestamp", "meta"}
    first = run_cli("import", str(out), "--json", "--socket", str(dst.socket))
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""  # no progress bar on a pipe
    assert json.loads(first.stdout)["stored"] == 21
    with Client(dst.socket) as d:
        for t in tags:
            got = d.get_history(t, 1000)
            assert _fields(got) == _fields(before[t])
            assert [m.id for m in got] == sorted(m.id for m in got)
        again = run_cli("import", str(out), "--json", "--socket", str(dst.socket))
        summary = json.loads(again.stdout)
        assert (summary["stored"], summary["already_present"]) == (0, 21)
        assert [d.message_count(t) for t in tags] == [7, 7, 7]
        # And the destination exports the same lines, ids aside.
        strip = [{k: v for k, v in x.items() if k != "id"} for x in lines]
        back = [json.loads(x) for x in _export(d, tags).splitlines()]
        assert [{k: v for k, v in x.items() if k != "id"} for x in back] == strip


def test_session_map_and_keys_per_target(pair: tuple[Daemon, Daemon], tag: str) -> None:
    src, dst = pair
    with Client(src.socket) as c:
        _fill(c, tag)
        data = _export(c, [tag])
    with Client(dst.socket) as d:
        s = _import(d, data, session_map={tag: f"{tag}-new"})
        assert (s.stored, s.per_session) == (7, {f"{tag}-new": 7})
        assert d.message_count(tag) == 0
        assert _import(d, data, session_map={tag: f"{tag}-new"}).stored == 0
        assert _import(d, data).stored == 7  # another target session: keys are per session
        assert _fields(d.get_history(f"{tag}-new"))[0][1:] == _fields(d.get_history(tag))[0][1:]


def test_minimal_form(pair: tuple[Daemon, Daemon], tag: str) -> None:
    _, dst = pair
    lines = [
        {"role": "user", "content": "same"},
        {"role": "user", "content": "same"},  # a repeated line is a second message
        {"role": "user", "content": "between"},
        {"role": "user", "content": "same"},  # and a third, apart from the others
        {"role": "assistant", "content": "x", "session_tag": f"{tag}-o", "meta": {"a": 1}},
        {"role": "user", "content": "t", "timestamp": "2026-01-01T01:00:00+01:00"},
        {"role": "user", "content": "n", "session_tag": None, "timestamp": None, "meta": None},
    ]
    data = b"\n".join(json.dumps(x).encode() for x in lines) + b"\n\n  \n"
    with Client(dst.socket) as d:
        s = _import(d, data, default_session=tag)
        assert (s.stored, s.lines) == (7, 9)
        got = d.get_history(tag)
        assert [m.content for m in got] == ["same", "same", "between", "same", "t", "n"]
        assert got[4].timestamp == "2026-01-01T00:00:00.000000Z"
        assert d.get_history(f"{tag}-o")[0].meta == {"a": 1}
        assert _import(d, data, default_session=tag).stored == 0
        # One more identical line is new: the fourth of its kind.
        assert _import(d, data + data[: data.index(b"\n") + 1], default_session=tag).stored == 1


def _bad_file(tag: str, bad: str) -> str:
    rows = [
        json.dumps({"role": "user", "content": f"a{i}", "session_tag": f"{tag}-a"})
        for i in range(300)
    ]
    rows += [
        json.dumps({"role": "user", "content": f"b{i}", "session_tag": f"{tag}-b"})
        for i in range(300)
    ]
    rows += [
        json.dumps({"role": "user", "content": f"c{i}", "session_tag": f"{tag}-c"})
        for i in range(10)
    ]
    return "\n".join([*rows, bad, rows[0]]) + "\n"


_DEEP = '{"role": "u", "content": "x", "meta": {"k": %s}}'


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ('{"role": "' + "r" * 65 + '", "content": "x"}', "role is 65 characters"),
        ('{"role": "user", "content": "x"', "not a JSON object"),
        ('{"role": "user"}', "missing field content"),
        ('{"role": "user", "content": 5}', "content: expected `str`"),
        ('{"role": "u", "content": "x", "timestamp": "07:41:50"}', "RFC 3339"),
        ('{"role": "u", "content": "x", "meta": {"n": 99999999999999999999}}', "64 bits"),
        ('{"role": "u", "content": "x", "colour": 1}', "unknown field colour"),
        ('{"role": "u", "content": "\\ud800"}', "lone surrogate"),
        # Far past what the decoder or an encoder can recurse through: one line, not a
        # RecursionError (100,000 fails in the decoder, 500 in what came after it).
        pytest.param(
            _DEEP % ('{"a":' * 100_000 + "1" + "}" * 100_000), "nests more than 32", id="deep"
        ),
        pytest.param(_DEEP % ("[" * 500 + "]" * 500), "nests more than 32", id="deep500"),
    ],
)
def test_bad_line_number_and_whole_batches_before_it(
    pair: tuple[Daemon, Daemon], tag: str, tmp_path: Path, bad: str, says: str
) -> None:
    _, dst = pair
    f = tmp_path / "bad.jsonl"
    f.write_text(_bad_file(tag, bad))
    r = run_cli("import", str(f), "--socket", str(dst.socket))
    assert r.returncode == 2
    assert r.stderr.startswith(f"nexusd: {f}:611: "), r.stderr
    assert says in r.stderr and "lines 1-600 are stored" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    with Client(dst.socket) as d:
        assert [d.message_count(f"{tag}-{s}") for s in "abc"] == [300, 300, 0]
    dry = run_cli("import", str(f), "--dry-run", "--socket", str(dst.socket))
    assert dry.returncode == 2 and f"{f}:611: " in dry.stderr and "nothing written" in dry.stderr


def test_meta_nests_32_levels_as_the_daemon_allows(pair: tuple[Daemon, Daemon], tag: str) -> None:
    _, dst = pair

    def line(levels: int) -> bytes:  # meta itself is the first level
        inner = "[" * (levels - 1) + "]" * (levels - 1)
        return (_DEEP % inner).encode()

    with Client(dst.socket) as d:
        assert _import(d, line(32), default_session=tag).stored == 1
        with pytest.raises(ImportFailed, match="nests more than 32 levels") as e:
            _import(d, line(33), default_session=tag)
        assert e.value.line == 1


def _peak_cli(*args: str) -> tuple[int, str, int]:
    """Run the CLI; its exit code, stderr and peak RSS in KiB (its own, from wait4)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexusd", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    return proc.returncode, err, usage.ru_maxrss


def test_a_huge_line_without_newline_is_refused_within_bounded_memory(
    pair: tuple[Daemon, Daemon], tag: str, tmp_path: Path
) -> None:
    _, dst = pair
    f = tmp_path / "huge.jsonl"
    good = _bad_file(tag, "").splitlines()[:610]  # 600 lines that get sent, 10 that do not
    with f.open("wb") as fh:
        fh.write("\n".join(good).encode() + b'\n{"role": "u", "content": "')
        fh.write(b"x" * (50 * 1024 * 1024))  # 50 MiB, and no newline ever
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(good) + "\n{}\n")
    code, err, peak = _peak_cli("import", "--dry-run", str(f), "--socket", str(dst.socket))
    assert code == 2, err
    assert err == (
        f"nexusd: {f}:611: line is longer than 6750208 bytes, the most a message within the "
        "daemon's limits takes as JSON (6 x (max_content + max_meta) + 64 KiB) "
        "(checked only, nothing written)\n"
    )
    base_code, base_err, base = _peak_cli(
        "import", "--dry-run", str(small), "--socket", str(dst.socket)
    )
    assert base_code == 2 and ":611: missing field role" in base_err
    # The line is read up to the bound (6.4 MiB) and no further: not 50 MiB.
    assert peak - base < 24 * 1024, (peak, base)
    # The real import stores the whole batches before it, as for any bad line.
    r = run_cli("import", str(f), "--socket", str(dst.socket))
    assert r.returncode == 2 and "(lines 1-600 are stored;" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    with Client(dst.socket) as d:
        assert [d.message_count(f"{tag}-{s}") for s in "abc"] == [300, 300, 0]


def test_minimal_keys_memory_is_flat() -> None:
    """Distinct minimal lines cost no memory each (the keys' counters are fixed)."""
    limits = dataclasses.replace(Limits(), max_batch=50)  # small open batch: little noise
    maker = BatchMaker(limits)

    def feed(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            maker.add(b'{"role":"u","content":"m%d"}' % i, i + 1)

    tracemalloc.start()
    try:
        feed(0, 2_000)
        before = tracemalloc.get_traced_memory()[0]
        feed(2_000, 17_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000, grown  # a digest map would hold 15,000 more entries: megabytes


def test_bad_utf8_and_stdin(pair: tuple[Daemon, Daemon], tag: str, tmp_path: Path) -> None:
    _, dst = pair
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(b'{"role":"u","content":"ok"}\n{"role":"u","content":"\xff"}\n')
    r = run_cli("import", str(raw), "--session", tag, "--socket", str(dst.socket))
    assert r.returncode == 2 and ":2: not UTF-8 text (byte 0xff" in r.stderr
    ok = run_cli("import", "-", "--session", tag, "--socket", str(dst.socket),
                 input='{"role":"u","content":"from stdin"}\n')  # fmt: skip
    assert ok.returncode == 0 and "1 stored" in ok.stdout and ok.stderr == ""


def test_dry_run_writes_nothing(pair: tuple[Daemon, Daemon], tag: str, tmp_path: Path) -> None:
    _, dst = pair
    f = tmp_path / "d.jsonl"
    f.write_text(_bad_file(tag, '{"role": "u", "content": "fine"}'))
    r = run_cli("import", str(f), "--dry-run", "--json", "--socket", str(dst.socket))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["sessions"] == {f"{tag}-a": 301, f"{tag}-b": 300, f"{tag}-c": 10, "nexus": 1}
    assert (got["dry_run"], got["stored"]) == (True, 0)
    with Client(dst.socket) as d:
        assert [d.message_count(f"{tag}-{s}") for s in "abc"] == [0, 0, 0]


def test_markdown_transcript(pair: tuple[Daemon, Daemon], tag: str) -> None:
    src, _ = pair
    with Client(src.socket) as c:
        _fill(c, tag)
        c.append("user", "x", session_tag=f"{tag}-2")
        md = _export(c, [f"{tag}-2", tag], format="markdown").decode()
    heads = [x for x in md.splitlines() if x.startswith("# S")]
    assert heads == [f"# Session `{tag}`", f"# Session `{tag}-2`"]
    assert md.count("\n## `") == 8
    assert "## `assistant` · " in md and " · id " in md
    # The fence outlasts the content's own backticks: its ``` and # lines stay text.
    assert "`````text\n```\n# not a heading\n````\n`````\n" in md
    assert 'meta: `{"i":1,"ü":[1.5,null]}`' in md


def test_since_until(pair: tuple[Daemon, Daemon], tag: str) -> None:
    src, _ = pair
    with Client(src.socket) as c:
        for day in (1, 2, 3, 4):
            c.append("user", f"d{day}", session_tag=tag, timestamp=f"2026-03-0{day}T12:00:00Z")

        def contents(**kw: Any) -> list[str]:
            return [json.loads(x)["content"] for x in _export(c, [tag], **kw).splitlines()]

        assert contents(since="2026-03-02T12:00:00Z") == ["d2", "d3", "d4"]
        assert contents(until="2026-03-03T12:00:00Z") == ["d1", "d2"]
        assert contents(since="2026-03-02T13:00:00+01:00", until="2026-03-04T00:00:00Z") == [
            "d2",
            "d3",
        ]
    r = run_cli("export", "--session", tag, "--since", "yesterday", "--socket", str(src.socket))
    assert r.returncode == 2 and "since must be an RFC 3339" in r.stderr


def test_output_is_atomic(pair: tuple[Daemon, Daemon], tag: str, tmp_path: Path) -> None:
    src, _ = pair
    dest = tmp_path / "keep.jsonl"
    dest.write_text("old\n")
    r = run_cli("export", "--all", "-o", str(dest), "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 3
    assert dest.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["keep.jsonl"]
    r = run_cli("export", "-o", str(dest), "--socket", str(src.socket))
    assert r.returncode == 2 and "--session TAG" in r.stderr
    r = run_cli("export", "--all", "-o", str(tmp_path), "--socket", str(src.socket))
    assert r.returncode == 2 and "is a directory" in r.stderr
    with Client(src.socket) as c:
        c.append("user", "fresh", session_tag=tag)
    r = run_cli("export", "--session", tag, "-o", str(dest), "--socket", str(src.socket))
    assert r.returncode == 0 and "wrote 1 messages" in r.stderr
    assert json.loads(dest.read_text())["content"] == "fresh"
    assert sorted(os.listdir(tmp_path)) == ["keep.jsonl"]


def test_limits_big_content_and_frame_splitting(short_dir: Path, tmp_path: Path) -> None:
    cfg = write_config(short_dir / "c.toml", max_frame=65536, max_content=16384, max_meta=4096)
    d = _new_daemon(short_dir, "--config", str(cfg)).start()
    try:
        big = "😀" * 4096  # exactly max_content bytes of UTF-8
        rows = [
            {
                "role": "r" * 64,
                "content": big,
                "session_tag": "t" * 256,
                "meta": {"k": "v" * 4088},
            }
            for _ in range(12)  # 12 x 20 KiB: several frames of 64 KiB
        ]
        data = b"".join(json.dumps(x).encode() + b"\n" for x in rows)
        with Client(d.socket) as c:
            s = _import(c, data)
            assert (s.stored, s.batches >= 4) == (12, True)
            got = c.get_history("t" * 256)
            assert [m.content for m in got] == [big] * 12 and got[0].meta == rows[0]["meta"]
            over = json.dumps({"role": "u", "content": big + "x"}).encode() + b"\n"
            with pytest.raises(ImportFailed) as e:
                _import(c, data + over)
            assert e.value.line == 13 and "16385 bytes" in e.value.message
            # Each line was a batch of its own (frame budget); line 12's was still
            # open when line 13 failed, so it was not sent.
            assert e.value.summary.stored_through == 11
            meta = json.dumps({"role": "u", "content": "x", "meta": {"k": "v" * 4089}})
            with pytest.raises(ImportFailed, match="4097 bytes as JSON"):
                _import(c, meta.encode())
    finally:
        d.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
def test_a_namespaced_peer_exports_only_its_own(short_dir: Path) -> None:
    short_dir.chmod(0o755)
    one, two = 61011, 61012
    cfg = write_config(short_dir / "c.toml", socket_mode="0666", isolate_peers=True)
    cfg.write_text(cfg.read_text() + f"allow_uids = [{one}, {two}]\n")
    d = _new_daemon(short_dir, "--config", str(cfg)).start()
    try:
        for uid in (one, two):
            req = {"op": "append", "id": 1, "role": "user", "content": f"of {uid}"}
            (ok,) = as_uid(uid, d.socket, [{**req, "session_tag": f"s{uid}"}])
            assert ok["op"] == "append", ok
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become `one`, export everything it may see
            code = 1
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(one)
                os.setuid(one)
                with Client(d.socket) as c:
                    os.write(w, _export_all(c))
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as fh:
            data = fh.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        lines = [json.loads(x) for x in data.splitlines()]
        assert [(x["session_tag"], x["content"]) for x in lines] == [(f"s{one}", f"of {one}")]
    finally:
        d.stop()


def _export_all(c: Client) -> bytes:
    buf = io.BytesIO()
    export_messages(c, buf)
    return buf.getvalue()


def test_the_python_functions_say_what_to_pass_instead() -> None:
    """An AsyncClient or a text-mode file is a TypeError that says what to do, not a
    failure deep inside."""
    import io

    from nexusd import AsyncClient, Client
    from nexusd.client.transfer import export_messages, import_messages

    with pytest.raises(TypeError, match=r"blocking nexusd\.Client"):
        export_messages(AsyncClient("/tmp/nx-none.sock"), io.BytesIO())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="binary file"):
        export_messages(Client("/tmp/nx-none.sock"), io.StringIO())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="binary file"):
        import_messages(Client("/tmp/nx-none.sock"), io.StringIO())  # type: ignore[arg-type]
