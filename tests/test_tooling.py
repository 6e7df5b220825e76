"""The code stays lint-clean, formatted and strictly typed: ruff and mypy run as tests.

So the README's one test command (and ``.ci/run``, which runs it) checks them
too, and nobody has to remember three more commands.  Each tool reads its
settings from ``pyproject.toml``; mypy checks ``nexusd/`` (strict), the tests,
the benchmarks and the scripts.  The tools come with the ``dev`` extra; without
them these tests are skipped, except under CI (``$CI`` set), where a missing
tool fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: install the dev extra (pip install -e '.[dev]')")
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return str(path)


def _run(*argv: str) -> None:
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"


def test_ruff_check() -> None:
    _run(_tool("ruff"), "check", ".")


def test_ruff_format() -> None:
    _run(_tool("ruff"), "format", "--check", ".")


def test_mypy_strict() -> None:
    _run(_tool("mypy"))
