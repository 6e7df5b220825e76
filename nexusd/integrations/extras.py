"""A framework an adapter needs but cannot import: one line that says which extra to install.

Each adapter imports its framework itself, so that type checkers see the real
classes, and turns the ``ImportError`` into :class:`MissingExtra`::

    try:
        from langchain_core.chat_history import BaseChatMessageHistory
    except ImportError as exc:
        raise missing_extra(exc, "langchain_core", extra="langchain", adapter=__name__) from None
"""

from __future__ import annotations

__all__ = ["DISTRIBUTIONS", "MissingExtra", "missing_extra"]

#: Each extra's framework as pip names it (the ranges are pyproject.toml's).
DISTRIBUTIONS = {
    "agents": "openai-agents",
    "langchain": "langchain-core",
    "llamaindex": "llama-index-core",
}


class MissingExtra(ImportError):
    """A framework an adapter needs is not installed."""


def missing_extra(exc: ImportError, package: str, *, extra: str, adapter: str) -> ImportError:
    """What to raise for ``exc``: :class:`MissingExtra` when ``package`` itself is absent.

    Anything else (the framework is there but broken, or lacks a name this
    version of nexusd uses) is ``exc`` itself: that error says more.
    """
    missing = exc.name or ""
    ours = missing == package or package.startswith(missing + ".")
    if not isinstance(exc, ModuleNotFoundError) or not missing or not ours:
        return exc
    return MissingExtra(
        f"{adapter} needs {DISTRIBUTIONS[extra]}, which is not installed: "
        f"pip install 'nexusd[{extra}]' (from nexusd's checkout: pip install '.[{extra}]')",
        name=exc.name,
    )
