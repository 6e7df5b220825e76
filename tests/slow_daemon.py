"""Test hook, kept out of the product: ``nexusd`` whose writer sleeps in every batch.

Run as ``python tests/slow_daemon.py SECONDS serve ...``.  The delay wraps
:func:`nexusd.storage.writes.run`, the SQLite backend's one call per write
transaction (made on its writer thread, behind the storage seam), in this process
only, so no setting, variable or flag of the daemon can make it slow.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any


def slowed(delay: float) -> Callable[[], None]:
    """Make every write transaction of this process take ``delay`` s longer; return an undo."""
    import nexusd.storage.writes as batch

    real = batch.run

    def run(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return real(*args, **kwargs)

    batch.run = run

    def undo() -> None:
        batch.run = real

    return undo


if __name__ == "__main__":
    slowed(float(sys.argv[1]))
    from nexusd.cli.main import main

    sys.exit(main(sys.argv[2:]))
