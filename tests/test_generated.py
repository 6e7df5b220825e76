"""The blocking client is generated from the async one, and what is on disk is up to date."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "unasync.py"


def _unasync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_blocking_client_is_up_to_date() -> None:
    generated = _unasync().generate()
    assert generated, "the generator produced nothing"
    for path, text in generated.items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is out of date: run `python scripts/unasync.py`"
        )


def test_check_mode_exits_0_when_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_the_substitutions_turn_async_code_into_blocking_code() -> None:
    out = _unasync().unasync(
        "class AsyncClient:\n"
        "    async def __aenter__(self) -> AsyncClient:\n"
        "        async with self._gate:\n"
        "            await self._connector.aclose()\n"
        "        self.awaited = 'awaitable'  # no partial words: AsyncClientX stays\n",
        "client.py",
    )
    assert out.splitlines()[0].startswith("# Generated from nexusd/client/client.py")
    assert out.splitlines()[2:] == [
        "class Client:",
        "    def __enter__(self) -> Client:",
        "        with self._gate:",
        "            self._connector.close()",
        "        self.awaited = 'awaitable'  # no partial words: AsyncClientX stays",
    ]


@pytest.mark.parametrize(
    ("name", "io"), [("client_sync.py", "transport_sync"), ("watch_sync.py", "stream_sync")]
)
def test_the_generated_modules_have_no_async_code_left(name: str, io: str) -> None:
    path = ROOT / "nexusd" / "client" / name
    tree = ast.parse(path.read_text(encoding="utf-8"))
    asynchronous = (ast.AsyncFunctionDef, ast.AsyncWith, ast.AsyncFor, ast.Await)
    assert [type(n).__name__ for n in ast.walk(tree) if isinstance(n, asynchronous)] == []
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert [n for n in names if n.startswith("Async") or n == "aclose"] == []
    assert io in modules and io.replace("_sync", "_async") not in modules
