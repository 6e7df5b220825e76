"""The client package's shape: it imports only nexusd.wire, and its modules are small and say what they own."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import nexusd
from nexusd.wire import errors

CLIENT = Path(nexusd.__file__).parent / "client"


@pytest.mark.parametrize("module", ["nexusd.client", "nexusd.compat", "nexusd"])
def test_the_client_imports_neither_the_daemon_nor_storage(module: str) -> None:
    code = (
        "import json, sys\n"
        f"import {module}\n"
        "from nexusd import Client, AsyncClient\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nexusd'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = json.loads(done.stdout)
    assert "nexusd.client.client_sync" in loaded  # the probe did load the clients
    wrong = [m for m in loaded if m.split(".")[1:2] in (["daemon"], ["storage"], ["cli"])]
    assert wrong == []


def test_every_client_module_is_small_and_says_what_it_owns() -> None:
    modules = sorted(CLIENT.rglob("*.py"))
    assert len(modules) >= 10
    for path in modules:
        text = path.read_text(encoding="utf-8")
        assert ast.get_docstring(ast.parse(text)), f"{path.name} has no docstring"
        assert len(text.splitlines()) < 400, f"{path.name} is over 400 lines"


def test_timeout_is_exported_from_nexusd() -> None:
    assert "Timeout" in nexusd.__all__
    assert nexusd.Timeout is errors.Timeout
    assert issubclass(nexusd.Timeout, TimeoutError) and issubclass(
        nexusd.Timeout, nexusd.NexusError
    )
    done = subprocess.run(
        [sys.executable, "-c", "from nexusd import Timeout; print(Timeout.__module__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "nexusd.wire.errors"
