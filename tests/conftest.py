"""Shared fixtures: short socket paths, a real daemon subprocess, an in-process server.

AF_UNIX paths are limited to 108 bytes, so sockets live in a short directory
under /tmp rather than pytest's deep tmp_path.  Readiness is polled with a
deadline (never a bare sleep).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from nexusd.daemon.config import Config
from nexusd.daemon.server import Server

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "nexus_store_v1.py"
SLOW_DAEMON = Path(__file__).resolve().parent / "slow_daemon.py"


def pytest_configure(config: pytest.Config) -> None:
    """Settings inherited by every process the run starts (xdist workers, daemons, CLIs).

    One hash seed for the whole run, still random from run to run: pytest-xdist's
    workers must collect the same test ids, and some ids print sets.  Compiled
    bytecode is kept, outside the tree, even where $PYTHONDONTWRITEBYTECODE is set:
    without it each of the hundreds of daemons and CLI calls compiles nexusd anew
    (about 0.1 s of CPU a daemon start) and pytest rewrites every test module.
    """
    os.environ.setdefault("PYTHONHASHSEED", str(random.randrange(1, 2**32)))
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None or sys.dont_write_bytecode:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        prefix = os.environ.setdefault("PYTHONPYCACHEPREFIX", str(cache / "nexusd-tests"))
        sys.pycache_prefix = prefix
        sys.dont_write_bytecode = False


@contextmanager
def short_temp_dir() -> Iterator[Path]:
    """A new directory with a short path under /tmp (for sockets), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="nx", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with short_temp_dir() as d:
        yield d


def wait_for_socket(
    path: Path, proc: subprocess.Popen[bytes] | None = None, deadline: float = 15.0
) -> None:
    """Poll until ``path`` accepts a connection (or the process died, or time ran out)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            out = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"daemon exited with {proc.returncode}: {out}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return
        except OSError:
            time.sleep(0.02)  # poll interval of a deadline loop, not a wait-for-it sleep
        finally:
            s.close()
    raise TimeoutError(f"{path} did not accept connections within {deadline}s")


@dataclass
class Daemon:
    """A real ``nexusd serve`` subprocess."""

    dir: Path
    db: Path
    socket: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    #: Test hook (tests/slow_daemon.py): seconds the writer sleeps in every batch.
    commit_delay: float = 0.0
    #: ``--storage``: a postgresql:// URL, or None for SQLite at ``db``.
    storage: str | None = None

    def command(self, *extra: str) -> list[str]:
        """The ``nexusd serve`` command line for this daemon's files."""
        if self.commit_delay:
            program = [sys.executable, str(SLOW_DAEMON), str(self.commit_delay)]
        else:
            program = [sys.executable, "-m", "nexusd"]
        return [
            *program,
            "serve",
            "--db",
            str(self.db),
            "--socket",
            str(self.socket),
            *(["--storage", self.storage] if self.storage else []),
            *self.args,
            *extra,
        ]

    def start(self, *extra: str, env: dict[str, str] | None = None, wait: bool = True) -> Daemon:
        """Spawn it (``env`` adds to this process's environment) and wait for its socket."""
        self.proc = subprocess.Popen(
            self.command(*extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        if wait:
            wait_for_socket(self.socket, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.proc.stderr and not self.proc.stderr.closed:  # stop() may come twice
            self.log = self.proc.stderr.read().decode()
            self.proc.stderr.close()  # else a ResourceWarning when it is collected
        return rc

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--socket", str(self.socket), input=input)


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -c code`` in the repository, ``env`` added to this process's environment."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, **(env or {})},
    )


def hide_package(package: str) -> str:
    """Code to run first in such a process: ``package`` (and its submodules) cannot be
    imported, as when it is not installed."""
    return (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] == {package!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
    )


def run_cli(
    *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexusd", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _new_daemon(
    base: Path, *args: str, commit_delay: float = 0.0, storage: str | None = None
) -> Daemon:
    return Daemon(
        dir=base,
        db=base / "nexus.db",
        socket=base / "s.sock",
        args=list(args),
        commit_delay=commit_delay,
        storage=storage,
    )


#: The storage backends a test module runs against when it sets ``BOTH_BACKENDS = True``.
BACKENDS = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """In a module with ``BOTH_BACKENDS = True``, every test whose fixtures reach
    ``backend`` (``daemon``, ``shared_daemon``) runs once per backend (one shared
    daemon per module and backend)."""
    if getattr(metafunc.module, "BOTH_BACKENDS", False) and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS, indirect=True, scope="module")


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """The storage backend of this module's daemons: "sqlite" unless parametrised."""
    return str(getattr(request, "param", "sqlite"))


@contextmanager
def backend_storage(backend: str) -> Iterator[str | None]:
    """``--storage`` for a daemon of ``backend``: None (SQLite), or a fresh database's URL."""
    if backend == "sqlite":
        yield None
    else:
        with pg_database() as url:
            yield url


@pytest.fixture
def slow_writer() -> Iterator[Callable[[float], None]]:
    """``slow_writer(s)``: this process's write transactions take ``s`` longer (undone after)."""
    from tests.slow_daemon import slowed

    undo: list[Callable[[], None]] = []
    yield lambda delay: undo.append(slowed(delay))
    for u in reversed(undo):
        u()


@pytest.fixture
def daemon_storage(backend: str) -> Iterator[str | None]:
    """``--storage`` for a daemon the test starts itself: None (SQLite) or a fresh database."""
    with backend_storage(backend) as url:
        yield url


@pytest.fixture
def daemon(short_dir: Path, backend: str) -> Iterator[Daemon]:
    """A fresh daemon per test (default settings), on the module's ``backend``."""
    with backend_storage(backend) as storage:
        d = _new_daemon(short_dir, storage=storage).start()
        try:
            yield d
        finally:
            d.stop()


@pytest.fixture(scope="module")
def shared_daemon(backend: str) -> Iterator[Daemon]:
    """One daemon for a whole module (and backend); tests use their own session tags."""
    base = Path(tempfile.mkdtemp(prefix="nxm", dir="/tmp"))
    with backend_storage(backend) as storage:
        d = _new_daemon(base, storage=storage).start()
        try:
            yield d
        finally:
            d.stop()
            shutil.rmtree(base, ignore_errors=True)


def together(*argvs: Sequence[str], timeout: float = 60) -> list[tuple[int, str, str]]:
    """Run processes that start at once: each prints ``ready`` and waits for a line on stdin.

    Returns each one's exit code, stdout (after ``ready``) and stderr; kills
    the ones left on a failure.  So two writers really overlap: neither starts
    while the other is still importing.
    """
    procs = [
        subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in procs:  # all connected: start them together
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


def need(module: str, extra: str) -> Any:
    """``module``, or this test module skipped with the reason (its extra is not installed).

    The test extra installs every framework extra, so CI runs these tests;
    ``tests/test_integrations.py`` checks that it still does.
    """
    return pytest.importorskip(
        module, reason=f"{module} is not installed: pip install 'nexusd[{extra}]'"
    )


@pytest.fixture
def tag(request: pytest.FixtureRequest) -> str:
    """A session tag unique to the test (and its backend parameter)."""
    return str(request.node.name)[:200]


# ── in-process server (asyncio only: aiosqlite is asyncio-bound) ──────────────
def make_config(base: Path, **overrides: Any) -> Config:
    defaults = {"db": base / "nexus.db", "socket": base / "s.sock", "uvloop": False}
    return Config(**{**defaults, **overrides}).validate()


@asynccontextmanager
async def running_server(cfg: Config) -> AsyncIterator[Server]:
    server = Server(cfg)
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: server.serve(task_status=task_status))
        try:
            yield server
        finally:
            server.request_shutdown()


def make_v1_db(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    """A database exactly as the v1 store writes it: its DDL, WAL, its rows."""
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(
        """CREATE TABLE IF NOT EXISTS nexus_messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    role        TEXT    NOT NULL,
    content     TEXT    NOT NULL,
    timestamp   TEXT    NOT NULL,
    session_tag TEXT    NOT NULL DEFAULT 'nexus'
);
CREATE INDEX IF NOT EXISTS idx_nexus_session ON nexus_messages(session_tag);
CREATE INDEX IF NOT EXISTS idx_nexus_ts ON nexus_messages(timestamp);
"""
    )
    conn.executemany(
        "INSERT INTO nexus_messages (role, content, timestamp, session_tag) VALUES (?, ?, ?, ?)",
        rows,
    )
    conn.commit()
    conn.close()


class RawSync:
    """A blocking raw-frame client for tests that misbehave on purpose."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        import msgspec  # noqa: F401  (kept local: conftest stays light)

        from nexusd.wire.framing import FrameDecoder

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.dec = FrameDecoder(64 * 1024 * 1024)
        self.ready: list[bytes] = []

    def send(self, obj: Any) -> None:
        import msgspec

        from nexusd.wire.framing import encode_frame

        body = obj if isinstance(obj, bytes) else msgspec.msgpack.encode(obj)
        self.sock.sendall(encode_frame(body))

    def recv(self) -> dict[str, Any]:
        import msgspec

        while not self.ready:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed by the daemon")
            self.ready = self.dec.feed(chunk)
        return msgspec.msgpack.decode(self.ready.pop(0))  # type: ignore[no-any-return]

    def call(self, obj: Any) -> dict[str, Any]:
        self.send(obj)
        return self.recv()

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def write_config(path: Path, **settings: Any) -> Path:
    """A TOML config file with ``settings`` (numbers, booleans, strings)."""

    def toml(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return f'"{v}"' if isinstance(v, str) else repr(v)

    lines = [f"{k} = {toml(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def as_uid(
    uid: int,
    path: Path,
    requests: list[dict[str, Any]],
    *,
    gid: int | None = None,
    groups: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Fork, become ``uid`` (group ``gid``, default ``uid``; supplementary
    ``groups``), send ``requests`` on one connection, return the replies
    (``{"op": "closed"}`` where the daemon hung up instead).  Needs root."""
    import msgspec

    from nexusd.wire.framing import FrameDecoder, encode_frame

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on
        code = 0
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(path))
            dec = FrameDecoder(1 << 24)
            out: list[Any] = []
            for req in requests:
                sent = True
                try:
                    s.sendall(encode_frame(msgspec.msgpack.encode(req)))
                except OSError:
                    sent = False  # refused already: still read what it said
                frames: list[bytes] = []
                while not frames:
                    try:
                        chunk = s.recv(65536)
                    except OSError:  # a reset after a refusal is a hang-up too
                        chunk = b""
                    if not chunk:
                        break
                    frames = dec.feed(chunk)
                if not frames:
                    out.append({"op": "closed"})
                    break
                out.append(msgspec.msgpack.decode(frames[0]))
                if not sent:
                    break
            os.write(w, msgspec.msgpack.encode(out))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return msgspec.msgpack.decode(data)  # type: ignore[no-any-return]


def session_rows(db: Path, tag: str) -> list[tuple[int, str]]:
    """(id, content) of a session, read straight from the SQLite file."""
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT id, content FROM nexus_messages WHERE session_tag = ? ORDER BY id", (tag,)
        ).fetchall()
    finally:
        conn.close()


def only_connection(raw: RawSync, deadline: float = 10.0) -> RawSync:
    """Wait until ``raw`` is the daemon's only connection (the start-up probe's
    may not be reaped yet); return it."""
    end = time.monotonic() + deadline
    while raw.call({"op": "stats", "id": 0})["stats"]["connections"] > 1:
        assert time.monotonic() < end
        time.sleep(0.02)  # poll interval of a deadline loop
    return raw


# ── PostgreSQL: a database per test on the run's throwaway cluster ────────────
#: The cluster's superuser URL, set by scripts/with-postgres (the README's test
#: command runs the suite under it).
PG_ADMIN = os.environ.get("NEXUSD_TEST_POSTGRES", "")


def pg_missing() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when they can."""
    if not PG_ADMIN:
        return (
            "no PostgreSQL server for the tests: run the suite under scripts/with-postgres"
            " (Debian: apt install postgresql)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install 'nexusd[postgres]'"
    return None


def _skip_or_fail_without_postgres() -> None:
    why = pg_missing()
    if why is None:
        return
    # CI installs PostgreSQL and runs under scripts/with-postgres: there a missing
    # server is a broken run, never a quiet skip.
    if os.environ.get("NEXUSD_REQUIRE_POSTGRES") == "1":
        pytest.fail(why)
    pytest.skip(why)


def pg_database_url(name: str) -> str:
    """The URL of database ``name`` on the test cluster."""
    import psycopg.conninfo

    params = psycopg.conninfo.conninfo_to_dict(PG_ADMIN)
    params["dbname"] = name
    host = params.pop("host")
    user = params.pop("user", "nexusd")
    rest = "&".join(f"{k}={v}" for k, v in params.items() if k != "dbname")
    return f"postgresql://{user}@/{name}?host={host}" + (f"&{rest}" if rest else "")


@contextmanager
def pg_database() -> Iterator[str]:
    """A new, empty database on the test cluster (dropped afterwards); its URL."""
    _skip_or_fail_without_postgres()
    import psycopg

    name = f"t_{os.getpid()}_{random.randrange(1 << 40):x}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_database_url(name)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test: its ``postgresql://`` URL."""
    with pg_database() as url:
        yield url
