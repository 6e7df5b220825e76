"""The ``nexusd`` commands for lifecycle (issue 13: under way)."""

from __future__ import annotations

from typing import Any


def add_commands(sub: Any, client_cmd: Any) -> None:
    """Declare this module's commands on sub (client_cmd adds the client options)."""
    del sub, client_cmd
