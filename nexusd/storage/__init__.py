"""Where messages are kept, behind one seam.

- :mod:`.base`: the :class:`~.base.Storage` interface and its contract, the
  typed write ops and pages (backend-neutral; what the daemon sees).
- :mod:`.sqlite`: the SQLite backend, the only one today, and which threads
  it runs and why; its parts are :mod:`.schema` (table, migrations,
  connection set-up, row to message), :mod:`.writes` (one write transaction),
  :mod:`.reads` (the reader pool and its queries), :mod:`.files` (the files
  on disk, the single-instance lock) and :mod:`.thread` (the writer's thread).
- :mod:`.scope`: the shape of a namespaced session tag, shared by every backend.

Imports only :mod:`nexusd.wire`; the daemon drives it.
"""
