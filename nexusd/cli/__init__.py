"""The ``nexusd`` command: run the daemon, and the admin and client commands around it."""

from __future__ import annotations

from .main import main, run

__all__ = ["main", "run"]
