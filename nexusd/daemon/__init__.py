"""The nexusd daemon: lifecycle, connections, request handlers, the writer actor, backups,
peer checks, systemd integration and configuration.

Imports :mod:`nexusd.storage` and :mod:`nexusd.wire`, never the clients.
"""
