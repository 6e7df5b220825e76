"""The Python clients of nexusd: :class:`AsyncClient`, :class:`Client`, and the v1 compat store.

Imports only :mod:`nexusd.wire`.
"""

from __future__ import annotations

from .clients import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]
