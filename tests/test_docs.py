"""The README's and docs' promises that a test can hold them to.

The README is the front door (commands, usage, settings); the long texts live in
``docs/``.  These tests read whichever file now carries each promise, run the
README's commands and examples against a real daemon, and check that every link
and every module path the docs name exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import Daemon

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
#: Every Markdown file a reader reaches from the README.
PAGES = [README, *DOCS, ROOT / "systemd" / "README.md"]


def _blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of ``text`` in language ``lang``, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, re.M | re.S)


def _ci_commands() -> list[str]:
    """The commands ``.ci/run`` runs after it removes the old virtual environment."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    after = lines[lines.index("rm -rf .venv") + 1 :]
    return [line for line in after if line.strip() and not line.lstrip().startswith("#")]


def _readme_test_block() -> list[str]:
    (block,) = [b for b in _blocks(README.read_text(), "sh") if "pytest" in b]
    return block.strip().splitlines()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci if "pytest" in line and not line.startswith("#"))
    assert f"\n{command}\n" in readme


def test_the_readme_test_command_is_what_ci_runs() -> None:
    # One command, the same in both: install with the dev tools, run the tests
    # (which include the lint, format, type and generated-code checks).
    assert _readme_test_block() == _ci_commands()
    assert len(_ci_commands()) == 1
    tooling = (ROOT / "tests" / "test_tooling.py").read_text()
    for step in ('"check", "."', '"format", "--check", "."', '_tool("mypy")'):
        assert step in tooling, step
    assert "--check" in (ROOT / "tests" / "test_generated.py").read_text()


def test_the_readme_install_commands_name_what_exists() -> None:
    # The two commands of a fresh machine: the extras they install are declared, the
    # development extra brings the tools CI runs, and `nexusd serve` is a command.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    commands = [line for b in _blocks(README.read_text(), "sh") for line in b.splitlines()]
    serve = next(line for line in commands if "nexusd serve" in line)
    assert "pip install '.[fast]'" in serve and "fast" in extras
    assert "nexusd" in project["scripts"]
    install = next(line for line in _readme_test_block() if "pip install" in line)
    assert "-e '.[dev]'" in install
    dev = " ".join(extras["dev"])
    for tool in ("nexusd[test]", "ruff", "mypy"):
        assert tool in dev, tool
    help_ = subprocess.run(
        [sys.executable, "-m", "nexusd", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_.returncode == 0, help_.stderr


def _setting_names() -> list[str]:
    """Every setting the daemon declares (a dataclass or a msgspec Struct)."""
    import dataclasses

    from nexusd.daemon.config import Config

    if dataclasses.is_dataclass(Config):
        return [f.name for f in dataclasses.fields(Config)]
    return list(Config.__struct_fields__)


def test_every_config_key_is_documented() -> None:
    readme = README.read_text()
    undocumented = [name for name in _setting_names() if f"`{name}`" not in readme]
    assert undocumented == []


def test_every_operation_is_documented_in_the_protocol_doc() -> None:
    import typing

    from nexusd.wire import protocol

    doc = (ROOT / "docs" / "protocol.md").read_text()
    for cls in typing.get_args(protocol.Request):
        tag = cls.__struct_config__.tag
        assert f"`{tag}`" in doc, tag


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_relative_link_reaches_a_file_and_heading() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_every_module_path_the_docs_name_exists() -> None:
    # A doc that names `nexusd/protocol.py` after it moved to nexusd/wire/ tells a
    # newcomer something false.
    missing = []
    for page in PAGES:
        for name in set(re.findall(r"\bnexusd/[\w/]*\w\.py\b", page.read_text())):
            if not (ROOT / name).is_file():
                missing.append(f"{page.relative_to(ROOT)}: {name}")
    assert missing == []


def test_the_architecture_tree_lists_every_module() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    (tree,) = [b for b in _blocks(doc, "text") if b.startswith("nexusd/")]
    listed: set[str] = set()
    package = sub = ""
    for line in tree.splitlines()[1:]:
        stripped = line.lstrip()
        if not stripped:
            continue
        indent, name = len(line) - len(stripped), stripped.split()[0]
        if indent == 2:
            package = name if name.endswith("/") else ""
        if indent == 4:  # a subpackage's modules are indented under it
            sub = name if name.endswith("/") else ""
        if name.endswith(".py"):
            listed.add({2: "", 4: package, 6: package + sub}.get(indent, "") + name)
    modules = {
        str(p.relative_to(ROOT / "nexusd"))
        for p in (ROOT / "nexusd").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    # A module added or removed: give it its line (what it owns) in docs/architecture.md.
    assert sorted(modules - listed) == [], "modules docs/architecture.md does not list"
    assert sorted(listed - modules) == [], "modules docs/architecture.md lists that are gone"


def test_the_readme_examples_run_against_a_daemon(short_dir: Path) -> None:
    # The shell lines and the Python examples, as written, against a daemon at the
    # default paths of a fresh home directory.
    home = short_dir
    run = home / "run"
    run.mkdir(mode=0o700)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "XDG_STATE_HOME", "NEXUSD_DB")
        and k != "NEXUSD_SOCKET"
    }
    env.update(
        HOME=str(home),
        XDG_RUNTIME_DIR=str(run),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    db = home / ".local" / "state" / "nexusd" / "nexus.db"
    db.parent.mkdir(parents=True, mode=0o700)
    daemon = Daemon(dir=home, db=db, socket=run / "nexusd.sock").start()
    try:
        readme = README.read_text()
        (shell,) = [b for b in _blocks(readme, "sh") if "nexusd append" in b]
        for line in shell.splitlines():
            done = subprocess.run(
                ["bash", "-o", "pipefail", "-c", line],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
                cwd=home,
            )
            assert done.returncode == 0, (line, done.stderr)
        assert (home / "nexus-backup.db").is_file()
        for code in _blocks(readme, "python"):
            done = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
                cwd=home,
            )
            assert done.returncode == 0, (code, done.stderr)
            assert "Traceback" not in done.stderr
    finally:
        daemon.stop()
