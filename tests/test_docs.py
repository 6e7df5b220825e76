"""The README's promises that a test can hold it to."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci if "pytest" in line)
    assert f"\n{command}\n" in readme


def test_every_config_key_is_documented() -> None:
    from dataclasses import fields

    from nexusd.daemon.config import Config

    readme = (ROOT / "README.md").read_text()
    undocumented = [f.name for f in fields(Config) if f"`{f.name}`" not in readme]
    assert undocumented == []


def test_every_operation_is_documented_in_the_protocol_doc() -> None:
    import typing

    from nexusd.wire import protocol

    doc = (ROOT / "docs" / "protocol.md").read_text()
    for cls in typing.get_args(protocol.Request):
        tag = cls.__struct_config__.tag
        assert f"`{tag}`" in doc, tag
