"""Where messages are kept: the schema and its migrations, the write transaction, the read queries.

Imports only :mod:`nexusd.wire`; the daemon drives it.
"""
