"""A database's schema against the one nexusd makes: every object nexusd needs, nothing else.

``nexusd restore`` puts a file from elsewhere in place of the database, and
what its schema holds runs in the daemon and in every program that writes the
file: a trigger that deletes each row an append stores, or copies it into
another peer's session; a view where a table should be; an index on an
expression or with a collation that does not exist.  So a backup is fit only
when every object of its ``sqlite_schema`` (table, index, view, trigger) is,
by type, name, table and SQL, one nexusd itself makes at the backup's schema
version, and every object nexusd needs at that version is there.

One source of truth: what is expected is read from fresh in-memory databases
built by nexusd's own code, :data:`~.schema.MIGRATIONS` up to that version
(version 0, a v1 store's file, is the v1 table and its two indexes: migration
1), and the full-text index made by :func:`~.index.ensure` and finished by
:func:`~.index.build_step` (its triggers have two forms: while the index is
built, and once it is).  The index is optional (a daemon with search off keeps
none) but whole: its tables all or none.  The daemon drops and makes its three
triggers again at every start, but another program (the v1 store, the
``sqlite3`` shell) may write the file before a daemon starts on it, so they
too must be nexusd's, or absent.  SQLite's statistics tables
(``sqlite_stat1`` to ``4``, written by ``ANALYZE``) may be there.  SQL is
compared with each run of whitespace made one space.

The file is read with ``PRAGMA trusted_schema = OFF``, read-only: nothing of
its schema is evaluated, only ``sqlite_schema`` and the tables' columns read.
"""

from __future__ import annotations

import functools
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from . import index
from .schema import MIGRATIONS, SCHEMA_VERSION, TABLE, migrate, reader_uri

__all__ = ["Found", "SchemaObject", "problem", "read"]

#: SQLite's tables that ANALYZE may have written into any database.
_STATS: Final = frozenset({"sqlite_stat1", "sqlite_stat2", "sqlite_stat3", "sqlite_stat4"})
#: Characters of a name from the file shown in a message.
_NAME_SHOWN: Final = 60


@dataclass(frozen=True, slots=True)
class SchemaObject:
    """One row of ``sqlite_schema``, its SQL with whitespace runs made one space."""

    type: str
    name: str
    table: str
    sql: str | None
    #: A table's columns (``PRAGMA table_xinfo``); None for others and virtual tables.
    columns: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class Found:
    """A database's ``user_version`` and its schema objects, in ``sqlite_schema`` order."""

    version: int
    objects: tuple[SchemaObject, ...]

    def named(self, name: str) -> SchemaObject | None:
        return next((o for o in self.objects if o.name == name), None)


def read(path: Path) -> Found:
    """The schema of the database at ``path``, read-only, nothing of it evaluated.

    Raises :class:`sqlite3.DatabaseError` when SQLite cannot read it (damaged).
    """
    conn = sqlite3.connect(reader_uri(path), uri=True)
    try:
        # Before anything reads the schema: SQL functions in it run as untrusted.
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("PRAGMA query_only = 1")
        return _read(conn)
    finally:
        conn.close()


def _read(conn: sqlite3.Connection) -> Found:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema").fetchall()
    objects = []
    for kind, name, table, sql in rows:
        kind, name, table = str(kind), str(name), str(table)
        sql = None if sql is None else " ".join(str(sql).split())
        columns: tuple[str, ...] | None = None
        if kind == "table" and sql is not None and not sql.upper().startswith("CREATE VIRTUAL"):
            try:  # only to word a refusal: a table SQLite cannot describe is just refused
                info = conn.execute("SELECT name FROM pragma_table_xinfo(?)", (name,))
                columns = tuple(str(r[0]) for r in info.fetchall())
            except sqlite3.Error:
                columns = None
        objects.append(SchemaObject(kind, name, table, sql, columns))
    return Found(version, tuple(objects))


@dataclass(frozen=True, slots=True)
class _SearchIndex:
    """The full-text index's objects, as :mod:`.index` makes them."""

    tables: tuple[SchemaObject, ...]
    #: Each trigger's name and the SQL of its forms (while built, once built).
    triggers: dict[str, frozenset[str | None]]


def _fresh() -> sqlite3.Connection:
    return sqlite3.connect(":memory:", isolation_level=None)


@functools.cache
def _migrated(version: int) -> Found:
    """What nexusd's migrations make of an empty database up to ``version`` (0: the v1
    store's schema, which is migration 1)."""
    conn = _fresh()
    try:
        for script in MIGRATIONS[: max(version, 1)]:
            # As :func:`~.schema.migrate` runs them: statement by statement.
            for stmt in (s.strip() for s in script.split(";")):
                if stmt:
                    conn.execute(stmt)
        return _read(conn)
    finally:
        conn.close()


@functools.cache
def _search_index() -> _SearchIndex:
    conn = _fresh()
    try:
        migrate(conn)
        before = {o.name for o in _read(conn).objects}
        # One row, so that the index is made unfinished: the triggers' first form.
        conn.execute(f"INSERT INTO {TABLE} (role, content, timestamp) VALUES ('user', 'x', '')")
        index.ensure(conn)
        building = [o for o in _read(conn).objects if o.name not in before]
        index.build_step(conn)
        built = [o for o in _read(conn).objects if o.name not in before]
    finally:
        conn.close()
    triggers: dict[str, set[str | None]] = {}
    for obj in (*building, *built):
        if obj.type == "trigger":
            triggers.setdefault(obj.name, set()).add(obj.sql)
    return _SearchIndex(
        tables=tuple(o for o in built if o.type != "trigger"),
        triggers={name: frozenset(forms) for name, forms in triggers.items()},
    )


def problem(found: Found) -> str | None:
    """What keeps ``found`` from being a schema nexusd makes (a phrase following the
    file's name, ending with what to do), or None.

    A file without nexusd's table is not judged here: another program's, or an
    empty one, which the caller words.
    """
    version = found.version
    if version > SCHEMA_VERSION:
        return (
            f"has schema version {version}, newer than this nexusd supports"
            f" ({SCHEMA_VERSION}); restore it with a newer nexusd"
        )
    if found.named(TABLE) is None:
        return None
    if version < 0:
        return f"has schema version {version}, which no nexusd makes; not restored"
    unknown = _unknown(found)
    if unknown is not None:
        return f"{unknown}; not restored (a backup's triggers, views and indexes would run on it)"
    unfit = _unfit(found)
    return None if unfit is None else f"{unfit}; not restored: nexusd could not use it"


def _unknown(found: Found) -> str | None:
    """An object nexusd does not make at ``found``'s version (named as the file does)."""
    search = _search_index()
    ours = {o.name for o in (*_migrated(found.version).objects, *search.tables)}
    seen: set[str] = set()
    for obj in found.objects:
        if obj.name in seen:
            return f"holds two schema objects named {_show(obj.name)}"
        seen.add(obj.name)
        forms = search.triggers.get(obj.name)
        if forms is not None:
            if (obj.type, obj.table) != ("trigger", TABLE) or obj.sql not in forms:
                return f"holds {_kind(obj)} {obj.name}{_on(obj)} that is not the one nexusd makes"
        elif obj.name not in ours and not _stats(obj):
            return f"holds {_kind(obj)} {_show(obj.name)}{_on(obj)}, which nexusd does not make"
    return None


def _unfit(found: Found) -> str | None:
    """An object nexusd needs at ``found``'s version that is missing or not as it makes it."""
    version = found.version
    base = _migrated(version).objects
    search = _search_index()
    for ours in (*base, *search.tables):
        obj = found.named(ours.name)
        if obj is not None and obj.type != ours.type:
            return (
                f"has {obj.name} as {_kind(obj)}; nexusd's schema {version}"
                f" has {_kind(ours)} of that name"
            )
    for ours in base:
        if found.named(ours.name) is None:
            return f"has schema version {version} but no {ours.type} {ours.name}"
    present = [o.name for o in search.tables if found.named(o.name) is not None]
    for ours in search.tables if present else ():
        if found.named(ours.name) is None:
            return f"holds part of a search index ({present[0]}) but no {ours.name}"
    for ours in (*base, *search.tables):
        obj = found.named(ours.name)
        wrong = None if obj is None else _differs(obj, ours, version)
        if wrong is not None:
            return wrong
    for name in search.triggers if not present else ():
        if found.named(name) is not None:
            return f"holds the trigger {name} of a search index it does not have"
    return None


def _differs(obj: SchemaObject, ours: SchemaObject, version: int) -> str | None:
    if (obj.table, obj.sql) == (ours.table, ours.sql):
        return None
    if ours.columns is not None and obj.columns is not None and obj.columns != ours.columns:
        return (
            f"has a table {ours.name} with columns {', '.join(map(_show, obj.columns))};"
            f" nexusd's schema {version} has {', '.join(ours.columns)}"
        )
    return f"defines {ours.type} {ours.name} otherwise than nexusd's schema {version} does"


def _stats(obj: SchemaObject) -> bool:
    return obj.type == "table" and obj.name in _STATS and obj.table == obj.name


def _kind(obj: SchemaObject) -> str:
    if obj.type == "table" and obj.sql and obj.sql.upper().startswith("CREATE VIRTUAL"):
        return "a virtual table"
    return _article(obj.type)


def _article(kind: str) -> str:
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {_show(kind, quote=False)}"


def _on(obj: SchemaObject) -> str:
    return f" on {_show(obj.table)}" if obj.type in ("index", "trigger") else ""


def _show(name: str, *, quote: bool = True) -> str:
    """A name read from the file, short; quoted (and escaped) when it is not a plain word."""
    short = name[:_NAME_SHOWN] + ("..." if len(name) > _NAME_SHOWN else "")
    if not quote or (short.replace("_", "a").isalnum() and short.isascii()):
        return short
    return repr(short)
