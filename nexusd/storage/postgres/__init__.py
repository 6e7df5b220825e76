"""The PostgreSQL backend: many daemons, on many hosts, sharing one database.

Chosen with ``storage = "postgresql://…"``; imported only then, so SQLite
users need neither psycopg nor this subpackage.  Its parts:

- :mod:`.schema`: the tables, numbered migrations, the database-wide write
  lock and the SQL fragments every query shares.
- :mod:`.dsn`: the connection URL, checked, and redacted for every log line.
- :mod:`.writes`: one batch of writes as one transaction.
- :mod:`.reads`: history, count, feed and sessions, one statement each.
- :mod:`.sweep`: deleting hidden and aged rows, a little at a time.
- :mod:`.search`: full-text search over a ``tsvector`` column.
- :mod:`.log`: what each commit changed, in commit order, for every daemon.
- :mod:`.follow`: the commits of other daemons, for this daemon's watches.
- :mod:`.backend`: :class:`~.backend.PostgresStorage`, the
  :class:`~nexusd.storage.base.Storage` that puts them together.

Imports only :mod:`nexusd.storage` and :mod:`nexusd.wire` (and psycopg).
"""
