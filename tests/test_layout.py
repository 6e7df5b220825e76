"""The layout draws the architecture: layers, import direction, module size, docstrings.

Read from the source with :mod:`ast` (every import statement, those under
``if TYPE_CHECKING:`` and inside functions included), so a new import that
points the wrong way or closes a cycle fails here, not in a reviewer's head.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "nexusd"
#: What each layer may import from nexusd (besides itself).
ALLOWED = {
    "wire": {"wire"},
    "storage": {"storage", "wire"},
    "daemon": {"daemon", "storage", "wire"},
    "client": {"client", "wire"},
    "cli": {"cli", "daemon", "storage", "client", "wire"},
    # The framework adapters: the public client only.
    "integrations": {"integrations", "client", "wire"},
}
#: Leaf modules of the package root that every layer may import.
LEAVES = {"nexusd", "nexusd._version"}
#: Every module stays under 400 lines.
MAX_LINES = 399


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The nexusd modules ``name`` imports, resolved to module names."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nexusd"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("nexusd"):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.add(sub if sub in MODULES else mod)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module: str) -> None:
    layer = _layer(module)
    if layer is None:
        return  # nexusd itself, __main__, the compat shim: the public face
    wrong = sorted(
        target
        for target in GRAPH[module]
        if target not in LEAVES and _layer(target) not in ALLOWED[layer]
    )
    assert not wrong, f"{module} ({layer}) may not import {wrong}"
    # The package root loads the client: a layer importing it would drag it in.
    assert "nexusd" not in GRAPH[module] or layer == "cli", (
        f"{module} imports the nexusd package root; import __version__ from its module"
    )


def test_no_import_cycles() -> None:
    # Package __init__ modules that only re-export are edges like any other.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH:
                continue
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_small_and_say_what_they_own(module: str) -> None:
    path = MODULES[module]
    text = path.read_text()
    lines = text.count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(PKG.parent)} has {lines} lines"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc) > 20, f"{module} has no docstring saying what it owns"


def test_every_layer_is_found() -> None:
    # The walk saw the packages (a wrong root would pass every check above vacuously).
    for layer, at_least in (("wire", 5), ("storage", 5), ("daemon", 10), ("client", 10)):
        assert len([m for m in MODULES if _layer(m) == layer]) >= at_least, layer


@pytest.mark.parametrize(
    ("entry", "forbidden"),
    [
        ("nexusd.daemon.server", "nexusd.client"),
        ("nexusd.client", "nexusd.daemon"),
        ("nexusd.client", "nexusd.storage"),
        ("nexusd.storage", "nexusd.daemon"),
        ("nexusd.wire.protocol", "nexusd.storage"),
    ],
)
def test_importing_a_layer_loads_only_what_it_may(entry: str, forbidden: str) -> None:
    code = (
        f"import sys, {entry}\nprint(sorted(m for m in sys.modules if m.startswith({forbidden!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", f"importing {entry} loaded {out.strip()}"


def test_public_names_import_from_the_package_root() -> None:
    import nexusd
    from nexusd import compat

    for name in nexusd.__all__:
        assert getattr(nexusd, name) is not None
    assert issubclass(nexusd.Timeout, nexusd.NexusError)
    assert compat.NexusStore is not None


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


def test_timeout_is_exported_from_nexusd() -> None:
    import nexusd
    from nexusd.wire import errors

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
