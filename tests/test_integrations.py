"""The adapters as packages: optional extras, no framework loaded by nexusd, the examples run.

The adapters' behaviour is tested beside each (``test_openai_agents.py``,
``test_langchain.py``, ``test_llamaindex.py``); here is what they share: a
missing framework is one line naming the extra, ``import nexusd`` loads no
framework, the test extra installs every framework (so CI never skips their
tests), and every example under ``examples/`` runs offline against a daemon.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nexusd.integrations.extras import DISTRIBUTIONS
from tests.conftest import Daemon, hide_package, run_python

ROOT = Path(__file__).resolve().parents[1]
#: adapter module → (the framework package it imports, the extra that installs it)
ADAPTERS = {
    "nexusd.integrations.openai_agents": ("agents", "agents"),
    "nexusd.integrations.langchain": ("langchain_core", "langchain"),
    "nexusd.integrations.llamaindex": ("llama_index", "llamaindex"),
}
FRAMEWORKS = ("agents", "openai", "langchain_core", "llama_index", "pydantic")


def test_importing_nexusd_loads_no_framework() -> None:
    probe = (
        "import sys, nexusd, nexusd.integrations, nexusd.integrations.link,"
        " nexusd.integrations.extras, nexusd.cli.main\n"
        "from nexusd import Client, AsyncClient\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))\n"
        "print('nexusd.client.client_sync' in sys.modules)"
    )
    done = run_python(probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True"]  # none, and the probe did load


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_a_missing_framework_is_one_line_naming_the_extra(adapter: str) -> None:
    package, extra = ADAPTERS[adapter]
    hide = hide_package(package)
    done = run_python(f"{hide}\nimport {adapter}")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"nexusd.integrations.extras.MissingExtra: {adapter} needs {DISTRIBUTIONS[extra]},"
        f" which is not installed: pip install 'nexusd[{extra}]'"
        f" (from nexusd's checkout: pip install '.[{extra}]')"
    )
    caught = run_python(
        f"{hide}\ntry:\n    import {adapter}\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc.name)"
    )
    assert caught.stdout.strip() == f"MissingExtra {package}"


def test_a_broken_framework_keeps_its_own_error() -> None:
    # Installed but lacking a name the adapter uses: not "not installed".
    done = run_python(
        "import sys, types\n"
        "fake = types.ModuleType('agents'); fake.__path__ = []\n"
        "sys.modules['agents'] = fake\n"
        "import nexusd.integrations.openai_agents"
    )
    assert done.returncode == 1
    assert "MissingExtra" not in done.stderr and "No module named 'agents.memory'" in done.stderr


def test_the_test_extra_installs_every_framework_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {extra for _, extra in ADAPTERS.values()}
    assert wanted <= set(extras)
    (self_ref,) = [r for r in extras["test"] if r.startswith("nexusd[")]
    # Every framework extra, and the PostgreSQL backend's (its tests need psycopg).
    assert set(self_ref.removeprefix("nexusd[").removesuffix("]").split(",")) == wanted | {
        "postgres"
    }
    for extra in wanted:  # a range, bounded above: what CI tested is what users get
        (req,) = extras[extra]
        assert ">=" in req and "<" in req.replace("<=", ""), req
        assert req.startswith(DISTRIBUTIONS[extra] + ">=")  # the name the error gives


EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_is_an_example_per_framework() -> None:
    names = " ".join(p.name for p in EXAMPLES)
    for word in ("openai_agents", "langchain", "llamaindex"):
        assert word in names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_runs_offline_against_a_daemon(example: Path, shared_daemon: Daemon) -> None:
    env = {"NEXUSD_SOCKET": str(shared_daemon.socket), "OPENAI_API_KEY": ""}
    for _ in range(2):  # and again: an example may be rerun
        done = subprocess.run(
            [sys.executable, str(example)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, **env},
        )
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout.strip()
