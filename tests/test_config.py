from __future__ import annotations

from pathlib import Path

import pytest

from nexusd.daemon.config import Config, ConfigError, load_config
from nexusd.wire.paths import default_db_path, default_socket_path, resolve_socket_path


def test_defaults_follow_systemd_then_xdg_then_tmp() -> None:
    assert default_db_path({"STATE_DIRECTORY": "/var/lib/nexusd"}) == Path(
        "/var/lib/nexusd/nexus.db"
    )
    assert default_db_path({"XDG_STATE_HOME": "/x/state"}) == Path("/x/state/nexusd/nexus.db")
    assert default_db_path({}).parts[-4:] == (".local", "state", "nexusd", "nexus.db")
    assert default_socket_path({"RUNTIME_DIRECTORY": "/run/nexusd"}) == Path(
        "/run/nexusd/nexusd.sock"
    )
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/7"}) == Path(
        "/run/user/7/nexusd.sock"
    )
    import os

    assert default_socket_path({}) == Path(f"/tmp/nexusd-{os.getuid()}/nexusd.sock")


def test_clients_resolve_the_same_default_as_the_daemon() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/7"}
    assert resolve_socket_path(None, env) == load_config(env=env).socket
    assert resolve_socket_path(None, {"NEXUSD_SOCKET": "/s"}) == Path("/s")
    assert resolve_socket_path("/explicit", {"NEXUSD_SOCKET": "/s"}) == Path("/explicit")


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path) -> None:
    f = tmp_path / "nexusd.toml"
    f.write_text(
        'db = "/file.db"\nsocket = "/file.sock"\nmax_messages = 7\nsynchronous = "normal"\n'
    )
    cfg = load_config(file=f, env={})
    assert (cfg.db, cfg.socket, cfg.max_messages, cfg.synchronous) == (
        Path("/file.db"),
        Path("/file.sock"),
        7,
        "normal",
    )
    cfg = load_config(file=f, env={"NEXUSD_DB": "/env.db"})
    assert cfg.db == Path("/env.db") and cfg.socket == Path("/file.sock")
    cfg = load_config(
        file=f, env={"NEXUSD_DB": "/env.db"}, flags={"db": "/flag.db", "max_messages": None}
    )
    assert cfg.db == Path("/flag.db") and cfg.max_messages == 7
    assert load_config(env={}).max_messages == 500


def test_file_may_use_a_nexusd_table_and_dashes(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[nexusd]\nmax-messages = 0\nsocket_mode = "0660"\n')
    cfg = load_config(file=f, env={})
    assert cfg.max_messages == 0 and cfg.socket_mode == 0o660


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("max_messages = -1", "max_messages"),
        ('synchronous = "sometimes"', "synchronous"),
        ("no_such_key = 1", "unknown setting"),
        ("max_messages = 'many'", "max_messages"),
        ("this is = not toml =", "not valid TOML"),
        ("max_content = 999999999", "max_content"),
    ],
)
def test_bad_settings_are_start_up_errors(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(file=f, env={})


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('isolate_peers = "ture"', r"isolate_peers: expected `bool` \(got 'ture'\)"),
        ("isolate_peers = 1", "isolate_peers: expected `bool`"),
        ("max_messages = 1.9", r"max_messages: expected `int` \(got 1.9\)"),
        ("max_messages = true", "max_messages: expected `int`"),
        ('log_level = "verbose"', "log_level: must be one of debug, info, warning, error"),
        ("readers = 0", "readers: expected `int` >= 1"),
        ("max_frame = 1073741824", "max_frame: expected `int` <= 67108864"),
        ("idle_timeout = 0", "idle_timeout: expected `float` > 0"),
        ("allow_uids = [1, -2]", "allow_uids: expected `int` >= 0"),
        ('allow_uids = "1,2"', "allow_uids: expected `array`"),
        ('socket_mode = "999"', "socket_mode must be a file mode"),
        ("commit_delay = 0.5", "unknown setting 'commit_delay'"),
        ("db = 5", r"db: expected `str` \(a path\) \(got 5\)"),
        ('db = ""', "db: expected a path"),
        ("socket = []", "socket: expected `str`"),
        ("max_connections = 10\nmax_connections_per_uid = 20", "max_connections_per_uid"),
        ("[nexusd]\nreaders = 2\n[other]\nx = 1", "unknown setting 'other'"),
    ],
)
def test_every_value_is_checked_by_type_and_range(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(file=f, env={})


def test_a_valid_file_keeps_its_values_exactly(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        'isolate_peers = true\nlog_level = "WARNING"\nshutdown_timeout = 3\n'
        "allow_uids = [1000, 1001]\nsocket_mode = 0o660\n"
    )
    cfg = load_config(file=f, env={})
    assert cfg.isolate_peers is True and cfg.log_level == "warning"
    assert cfg.shutdown_timeout == 3.0 and cfg.allow_uids == [1000, 1001]
    assert cfg.socket_mode == 0o660


def test_a_binary_or_directory_config_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe")
    with pytest.raises(ConfigError, match="not a text"):
        load_config(file=f, env={})
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(file=tmp_path, env={})


def test_flags_are_checked_like_the_file() -> None:
    with pytest.raises(ConfigError, match="command line: bad value for max_messages"):
        load_config(flags={"max_messages": -1}, env={})


def test_validate_checks_a_config_built_in_code() -> None:
    cfg = Config(max_messages=1.9)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_messages"):
        cfg.validate()


def test_environment_and_flags_arrive_as_strings_and_are_converted() -> None:
    cfg = load_config(
        flags={"max_messages": "7", "shutdown_timeout": "3", "log_level": "DEBUG"},
        env={"NEXUSD_DB": "/env.db", "NEXUSD_SOCKET": "/env.sock"},
    )
    assert (cfg.max_messages, cfg.shutdown_timeout, cfg.log_level) == (7, 3.0, "debug")
    assert (cfg.db, cfg.socket) == (Path("/env.db"), Path("/env.sock"))
    with pytest.raises(ConfigError, match=r"max_messages: expected `int` \(got 'many'\)"):
        load_config(flags={"max_messages": "many"}, env={})
    with pytest.raises(ConfigError, match="environment: bad value for db: expected a path"):
        load_config(env={"NEXUSD_DB": " "})


def test_a_config_cannot_change_once_made() -> None:
    cfg = load_config(env={})
    with pytest.raises(AttributeError):
        cfg.max_messages = 1  # type: ignore[misc]


def test_every_setting_is_declared_with_its_default_and_help() -> None:
    from nexusd.daemon.config import SETTINGS

    cfg = Config()
    assert list(SETTINGS) == list(Config.__struct_fields__)
    for name, setting in SETTINGS.items():
        assert setting.description, name
        if name not in ("db", "socket"):  # computed at start-up, described in words
            assert setting.default == getattr(cfg, name), name
            assert "default" not in setting.description, name  # the default is stated once
    assert SETTINGS["log_level"].choices == ("debug", "info", "warning", "error")


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(file=tmp_path / "nope.toml", env={})


def test_validate_defaults() -> None:
    assert Config().validate().max_frame == 4 * 1024 * 1024


def test_the_readme_table_states_each_declared_default() -> None:
    import re

    from msgspec.structs import fields

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \|[^|]*\| ([^|]+) \|", readme, re.M))
    cfg = Config()
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if f.name in ("db", "socket", "allow_uids", "allow_gids", "socket_group", "storage"):
            continue  # computed or "(none)": described in words
        shown = rows[f.name].strip().strip("`")
        if isinstance(value, bool):
            assert shown == str(value).lower(), f.name
        elif f.name == "socket_mode":
            assert int(shown, 8) == value, f.name
        elif isinstance(value, list):
            assert shown == str(value), f.name
        else:
            assert type(value)(shown) == value, (f.name, shown, value)


def test_storage_comes_from_file_then_environment_then_flag(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('storage = "postgresql://file@h/nexus"\n')
    assert load_config(env={}).storage == ""  # the default: SQLite at db
    assert load_config(file=f, env={}).storage == "postgresql://file@h/nexus"
    env = {"NEXUSD_STORAGE": "postgres://env@h/nexus"}
    assert load_config(file=f, env=env).storage == "postgres://env@h/nexus"
    flag = "postgresql://flag@/nexus?host=/run/postgresql"
    assert load_config(file=f, env=env, flags={"storage": flag}).storage == flag
    # An empty flag is a value (back to SQLite); an empty variable counts as unset.
    assert load_config(file=f, env=env, flags={"storage": ""}).storage == ""
    assert load_config(file=f, env={"NEXUSD_STORAGE": ""}).storage == "postgresql://file@h/nexus"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('storage = "sqlite:///x.db"', "storage: must be a postgresql:// "),
        ('storage = "host=db password=hunter2"', r"got 'host=db password=\*\*\*'"),
        ("storage = 5", r"storage: expected `str` \(got 'int'\)"),
        ('storage = "postgresql://u:hunter2@db/x?colour=red"', 'query parameter: "colour"'),
        ('storage = "postgresql://u:hunter2@db:54x/x"', "port '54x' of 'db'"),
        ('storage = "postgresql://u:hunter2@db/x?sslmode=on"', "sslmode must be one of"),
        ('storage = "postgresql://u:hun ter2@db/x"', "spaces or control characters"),
        ('storage = "postgresql://u:hun%ZZter2@db/x"', "password in the URL is not valid"),
        ('storage = "postgresql://u:hun/ter2@db/x"', "percent-encode '@' and '/'"),
    ],
)
def test_a_bad_storage_url_is_one_line_without_its_password(
    tmp_path: Path, text: str, match: str
) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as caught:
        load_config(file=f, env={})
    message = caught.value.message
    assert "\n" not in message and "hunter2" not in message and "ter2" not in message
