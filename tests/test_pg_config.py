"""Choosing PostgreSQL: the ``storage`` URL checked, its password never shown, the extra named.

The URL's parsing and redaction are tested as functions; what reaches people
(the daemon's stderr, ``stats``, the CLI's one-line errors) through real
processes, the daemon on a real database of the test cluster.  A missing
psycopg is simulated in a subprocess that hides it from the import system.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nexusd import Client
from nexusd.storage.postgres.dsn import check, has_password, redact
from tests.conftest import Daemon, hide_package, run_cli, run_python

ROOT = Path(__file__).resolve().parents[1]
SECRET = "Sup3rSecret"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:Sup3rSecret@db/nexus", "postgresql://app:***@db/nexus"),
        ("postgres://app:Sup3rSecret@h1:5432,h2/nexus", "postgres://app:***@h1:5432,h2/nexus"),
        (
            "postgresql://app@db/nexus?sslmode=require&password=Sup3rSecret&connect_timeout=5",
            "postgresql://app@db/nexus?sslmode=require&password=***&connect_timeout=5",
        ),
        # Unencoded reserved characters in the password: hidden whole all the same.
        ("postgresql://app:Sup3r?Secret@db/nexus", "postgresql://app:***@db/nexus"),
        ("postgresql://app:Sup3r@Secret@db/nexus", "postgresql://app:***@db/nexus"),
        ("postgresql://app:Sup3r/Secret@db/nexus", "postgresql://app:***@db/nexus"),
        ("host=db password=Sup3rSecret dbname=x", "host=db password=*** dbname=x"),
        ("mysql://app:Sup3rSecret@db/x", "mysql://app:***@db/x"),
    ],
)
def test_redact_hides_the_password_wherever_it_is(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert has_password(url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://nexusd@/nexus?host=/run/postgresql",
        "postgres://db.example.com/nexus",
        "postgresql://app@h1:5432,h2:5433/nexus?target_session_attrs=read-write",
        "postgresql://app@db/nexus?sslmode=verify-full&sslrootcert=/etc/ssl/db.pem",
        "postgresql://app@db/nexus?passfile=/etc/nexusd/pgpass&application_name=nexusd",
        "postgresql://[::1]:5432/nexus",
        "postgresql://app:p%40ss%2Fword@db/nexus",
        "postgresql://",
    ],
)
def test_check_accepts_what_libpq_reads(url: str) -> None:
    assert check(url) == url
    assert redact(url) == url or has_password(url)


def _serve(short_dir: Path, *args: str) -> str:
    """Code that runs ``nexusd serve`` with this test's files and ``args``."""
    argv = ["nexusd", "serve", "--db", str(short_dir / "n.db")]
    argv += ["--socket", str(short_dir / "s.sock"), *args]
    return f"sys.argv = {argv!r}\nfrom nexusd.cli.main import run\nrun()\n"


@pytest.mark.parametrize("package", ["psycopg", "psycopg_pool"])
def test_without_the_extra_serve_names_it_in_one_line(short_dir: Path, package: str) -> None:
    url = f"postgresql://app:{SECRET}@/nexus?host={short_dir}"
    done = run_python(hide_package(package) + _serve(short_dir, "--storage", url))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and SECRET not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith(
        f"ERROR nexusd: cannot serve: storage = postgresql://… needs {package}:"
        " pip install 'nexusd[postgres]' (from nexusd's checkout: pip install '.[postgres]')"
    ), last
    assert not (short_dir / "s.sock").exists()


def test_sqlite_users_never_import_psycopg(short_dir: Path) -> None:
    # The configuration (URL checks included) and the SQLite backend load without it.
    done = run_python(
        hide_package("psycopg")
        + "from nexusd.daemon.config import load_config\n"
        + "from nexusd.daemon.server import make_storage\n"
        + f"cfg = load_config(env={{}}, flags={{'db': {str(short_dir / 'n.db')!r}}})\n"
        + "print(type(make_storage(cfg)).__name__)\n"
        + "print(load_config(env={'NEXUSD_STORAGE': 'postgresql://a@b/c'}).storage)\n"
        + "print(sorted(m for m in sys.modules if 'psycopg' in m or 'postgres.backend' in m))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["SQLiteStorage", "postgresql://a@b/c", "[]"]


def _one_line(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and SECRET not in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)


def test_a_bad_url_stops_serve_in_one_line_without_the_password(short_dir: Path) -> None:
    bad = f"postgresql://app:{SECRET}@db/nexus?colour=red"
    _one_line(
        run_cli("serve", "--socket", str(short_dir / "s"), "--storage", bad),
        2,
        'storage: invalid URI query parameter: "colour"',
    )
    env = {**os.environ, "NEXUSD_STORAGE": f"sqlite://app:{SECRET}@x"}
    _one_line(
        run_cli("serve", "--socket", str(short_dir / "s"), env=env),
        2,
        "storage: must be a postgresql://",
        "sqlite://app:***@x",
    )
    assert not (short_dir / "s").exists()


def test_commands_on_the_sqlite_file_refuse_postgresql_in_one_line(short_dir: Path) -> None:
    url = f"postgresql://app:{SECRET}@db/nexus"
    env = {**os.environ, "NEXUSD_STORAGE": url}
    shown = "postgresql://app:***@db/nexus"
    _one_line(run_cli("check", env=env), 2, "NEXUSD_STORAGE names PostgreSQL", shown, "pg_amcheck")
    _one_line(run_cli("check", "--db", url), 2, "--db names PostgreSQL", shown)
    backup = short_dir / "b.db"
    backup.write_bytes(b"")
    _one_line(run_cli("restore", str(backup), env=env), 2, "NEXUSD_STORAGE names", "pg_restore")
    config = short_dir / "c.toml"
    config.write_text(f'storage = "{url}"\n')
    no_env = {k: v for k, v in os.environ.items() if k != "NEXUSD_STORAGE"}
    _one_line(
        run_cli("restore", str(backup), "--config", str(config), env=no_env),
        2,
        "the configuration names PostgreSQL",
        shown,
    )
    _one_line(run_cli("restore", str(backup), "--db", url), 2, "--db names PostgreSQL")
    # A file named with --db is still checked as a file (here: not a database).
    _one_line(run_cli("check", "--db", str(backup), env=env), 2, "empty file")


def _with_password(url: str) -> str:
    """The test database's URL with a password in its user part (trust ignores it)."""
    assert url.startswith("postgresql://nexusd@")
    return url.replace("nexusd@", f"nexusd:{SECRET}@", 1)


def test_the_daemon_shows_the_url_only_redacted(short_dir: Path, pg_url: str) -> None:
    d = Daemon(dir=short_dir, db=short_dir / "n.db", socket=short_dir / "s.sock")
    d.storage = _with_password(pg_url)
    d.start()
    try:
        with Client(d.socket) as c:
            c.append("user", "hello", session_tag="s")
            stats = c.stats()
            assert stats["storage"] == redact(d.storage) and "***" in stats["storage"]
            assert stats["synchronous"] is None  # SQLite's; the server decides here
            assert SECRET not in repr(stats)
    finally:
        assert d.stop() == 0
    assert SECRET not in d.log
    assert "the password in --storage is visible to every user" in d.log
    assert f"serving {redact(d.storage)} on" in d.log
    # Backups are made next to db (its directory), as with SQLite.
    assert not (short_dir / "n.db").exists()


def test_a_password_from_the_environment_is_not_warned_about_nor_shown(
    short_dir: Path, pg_url: str
) -> None:
    d = Daemon(dir=short_dir, db=short_dir / "n.db", socket=short_dir / "s.sock")
    url = f"{pg_url}&password={SECRET}"
    d.start(env={"NEXUSD_STORAGE": url})
    try:
        with Client(d.socket) as c:
            assert c.stats()["storage"].endswith("&password=***")
    finally:
        assert d.stop() == 0
    assert SECRET not in d.log and "visible to every user" not in d.log


def test_a_database_it_cannot_reach_is_one_redacted_line(short_dir: Path) -> None:
    url = f"postgresql://app:{SECRET}@/nexus?host={short_dir}/nowhere&connect_timeout=2"
    done = run_cli(
        "serve",
        "--db",
        str(short_dir / "n.db"),
        "--socket",
        str(short_dir / "s.sock"),
        env={**os.environ, "NEXUSD_STORAGE": url},
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and SECRET not in done.stderr, done.stderr
    assert "cannot serve" in done.stderr.strip().splitlines()[-1]


def test_backup_is_refused_with_its_reason_even_where_db_has_no_directory(
    short_dir: Path, pg_url: str
) -> None:
    # A daemon on PostgreSQL never makes db's directory; the refusal names pg_dump
    # rather than failing to check free space there.
    d = Daemon(dir=short_dir, db=short_dir / "none" / "n.db", socket=short_dir / "s.sock")
    d.storage = pg_url
    d.start()
    try:
        r = d.cli("backup", str(short_dir / "copy.db"))
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [
            "nexusd: error (unavailable): backup snapshot failed: nexusd backup is not"
            " available with PostgreSQL storage; use pg_dump"
        ]
        assert not (short_dir / "copy.db").exists() and not (short_dir / "none").exists()
    finally:
        assert d.stop() == 0
