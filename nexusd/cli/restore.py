"""The ``nexusd restore`` command (issue 13: under way)."""

from __future__ import annotations

from typing import Any


def add_command(sub: Any) -> None:
    """Declare ``restore`` on ``sub``; it runs on files, with ``set_defaults(local=...)``."""
    del sub
