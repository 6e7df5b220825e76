"""How one peer's session tags are kept apart in storage (``isolate_peers``).

A namespaced tag is stored as ``NS_MARK u<uid> NS_MARK <tag>``; tags a client
sends may not start with ``NS_MARK``, so no one can forge another's prefix.
Storage needs only the prefix's shape to bound its queries; who gets which
prefix is decided by the daemon (:mod:`nexusd.daemon.peers`).
"""

from __future__ import annotations

from typing import Final

#: Starts every namespaced tag, and may not start a tag a client sends.
NS_MARK: Final = "\x1f"


def scope_bounds(scope: str) -> tuple[str, str]:
    """The half-open range [lo, hi) of stored tags that start with ``scope``."""
    return scope, scope[:-1] + chr(ord(scope[-1]) + 1)
