"""The version of nexusd, in one place (the package metadata reads it too)."""

from __future__ import annotations

__version__ = "0.1.0"
