"""Drop-in replacement for the v1 ``NexusStore``: see :mod:`nexusd.client.compat`.

Kept at this path so v1 callers switch by changing one import::

    from nexusd.compat import NexusStore, nexus_store
"""

from __future__ import annotations

from .client.compat import *  # noqa: F403
from .client.compat import __all__ as __all__
