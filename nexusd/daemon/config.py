"""Daemon configuration: one declaration of every setting, read strictly.

:class:`Config` declares each setting once: its type, its allowed range and
its default.  Values come from defaults < a TOML file < the environment
(``NEXUSD_DB``, ``NEXUSD_SOCKET``) < flags, and every value is checked
against that declaration with msgspec: a wrong type (``max_messages = 1.9``,
``isolate_peers = "ture"``), an out-of-range number, an unknown choice
(``log_level = "verbose"``) or an unknown key is a :class:`ConfigError` naming
the key, never a silent fallback.  The default paths follow systemd first
(``$STATE_DIRECTORY``, ``$RUNTIME_DIRECTORY``), then XDG, then a private
directory under /tmp; clients resolve the socket the same way.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from ..wire.errors import NexusError
from ..wire.paths import default_db_path, default_socket_path, resolve_socket_path

__all__ = [
    "MAX_FRAME_CAP",
    "Config",
    "ConfigError",
    "default_db_path",
    "default_socket_path",
    "load_config",
    "resolve_socket_path",
]

MiB = 1024 * 1024
#: The largest frame limit accepted: every connection may buffer one frame.
MAX_FRAME_CAP: Final = 64 * MiB

Count = Annotated[int, Meta(ge=1)]
Seconds = Annotated[float, Meta(gt=0, le=86_400)]
Id = Annotated[int, Meta(ge=0, le=2**32 - 1)]


class ConfigError(NexusError):
    """The configuration is invalid (start-up error, never a silent policy)."""

    code = "bad_request"


@dataclass(slots=True)
class Config:
    """Every setting of ``nexusd serve``; TOML keys are these names."""

    db: Path = dataclasses.field(default_factory=default_db_path)
    socket: Path = dataclasses.field(default_factory=default_socket_path)
    #: Rows kept per session tag; 0 keeps every row.
    max_messages: Annotated[int, Meta(ge=0)] = 500
    synchronous: Literal["full", "normal"] = "full"
    queue_size: Count = 10_000
    batch_max: Count = 1_000
    readers: Annotated[int, Meta(ge=1, le=64)] = 4
    #: WAL pages after which a commit checkpoints.  SQLite's default, 1000,
    #: checkpoints after nearly every large batch; 8000 (32 MiB of WAL) copies
    #: each hot index page once per checkpoint instead of once per few commits.
    wal_autocheckpoint: Annotated[int, Meta(ge=0)] = 8000
    max_frame: Annotated[int, Meta(ge=64 * 1024, le=MAX_FRAME_CAP)] = 4 * MiB
    max_content: Count = 1 * MiB
    max_inflight: Count = 1_024
    max_connections: Count = 1_024
    #: Connections one peer uid may hold at once (below max_connections, so no
    #: single uid can lock the others out).
    max_connections_per_uid: Count = 512
    #: Encoded size of one message's ``meta`` (JSON bytes).
    max_meta: Count = 64 * 1024
    #: Bytes the daemon may hold in total for large partial frames and unsent
    #: replies, over all connections.
    max_buffered: Annotated[int, Meta(ge=MiB)] = 256 * MiB
    #: Backup snapshots held at once, over all connections (one per connection).
    max_snapshots: Count = 2
    enqueue_timeout: Seconds = 5.0
    #: Seconds a connection may send nothing while nothing of its is in flight.
    idle_timeout: Seconds = 300.0
    #: Seconds one frame may take from its first byte to its last.
    frame_timeout: Seconds = 30.0
    shutdown_timeout: Seconds = 20.0
    socket_mode: Annotated[int, Meta(ge=0, le=0o777)] = 0o600
    #: Group (name or number) given to a socket the daemon creates; its members
    #: are allowed in as well.
    socket_group: str = ""
    #: Peers allowed to connect, by uid; empty means the daemon's own uid and root.
    allow_uids: list[Id] = dataclasses.field(default_factory=list)
    #: Peers allowed to connect by group (primary or supplementary gid).
    allow_gids: list[Id] = dataclasses.field(default_factory=list)
    #: Give every peer uid its own namespace of session tags.
    isolate_peers: bool = False
    #: Uids that see and manage every namespace when isolate_peers is on.
    admin_uids: list[Id] = dataclasses.field(default_factory=lambda: [0])
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    uvloop: bool = True

    def validate(self) -> Config:
        """Check every value against its declaration, then the rules between settings."""
        _convert({f.name: getattr(self, f.name) for f in fields(Config)}, "setting", strict=True)

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(
            self.max_content <= self.max_frame - 16 * 1024,
            "max_content must leave 16 KiB of max_frame for the envelope",
        )
        need(
            self.max_meta <= self.max_frame - 16 * 1024,
            "max_meta must leave 16 KiB of max_frame for the envelope",
        )
        need(
            self.max_connections_per_uid <= self.max_connections,
            "max_connections_per_uid must be <= max_connections",
        )
        if self.socket_group:
            self.socket_gid()  # fails here, at start-up, if the group does not exist
        return self

    def socket_gid(self) -> int | None:
        """The numeric group of ``socket_group`` (None when unset)."""
        if not self.socket_group:
            return None
        if self.socket_group.isdigit():
            return int(self.socket_group)
        import grp

        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ConfigError(f"socket_group {self.socket_group!r} does not exist") from None

    def allowed_uids(self) -> set[int]:
        return set(self.allow_uids) if self.allow_uids else {os.getuid(), 0}

    def allowed_gids(self) -> set[int]:
        gid = self.socket_gid()
        return set(self.allow_gids) | ({gid} if gid is not None else set())


_ENV: Final = {"NEXUSD_DB": "db", "NEXUSD_SOCKET": "socket"}
_NAMES: Final = frozenset(f.name for f in fields(Config))
_OCTAL: Final = re.compile(r"0?o?([0-7]{3,4})")
_LOWERED: Final = ("synchronous", "log_level")


def _dec_hook(kind: type, value: Any) -> Any:
    # msgspec turns a TypeError/ValueError raised here into a ValidationError
    # naming the key.
    if kind is not Path or not isinstance(value, (str, Path)):
        raise TypeError(f"Expected `str` (a path), got `{type(value).__name__}`")
    if not str(value).strip():
        raise ValueError("Expected a path, got an empty string")
    return Path(os.path.expanduser(str(value)))


def _convert(values: dict[str, Any], source: str, *, strict: bool) -> dict[str, Any]:
    """``values`` checked and converted by :class:`Config`'s declaration.

    ``strict``: types must match exactly (TOML, flags); otherwise strings are
    parsed (the environment).  The error names the key and the source.
    """
    for key in values:
        if key not in _NAMES:
            raise ConfigError(f"{source}: unknown setting {key!r}")
    prepared = dict(values)
    for key in _LOWERED:
        if isinstance(prepared.get(key), str):
            prepared[key] = prepared[key].lower()
    mode = prepared.get("socket_mode")
    if isinstance(mode, str):
        m = _OCTAL.fullmatch(mode.strip())
        if m is None:
            raise ConfigError(
                f'{source}: socket_mode must be a file mode like "0660", not {mode!r}'
            )
        prepared["socket_mode"] = int(m.group(1), 8)
    # A stand-in db keeps msgspec from computing the default (which may need a
    # home directory the uid lacks); load_config computes it only when missing.
    prepared.setdefault("db", ".")
    try:
        cfg = msgspec.convert(prepared, Config, strict=strict, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), source, values)) from None
    return {key: getattr(cfg, key) for key in values}


def _explain(message: str, source: str, values: Mapping[str, Any]) -> str:
    """msgspec's "Expected `int` >= 0 - at `$.max_messages`" as "KEY: ... (got VALUE)"."""
    text, _, where = message.partition(" - at `$.")
    key = re.split(r"[.\[`]", where, maxsplit=1)[0] if where else ""
    if not key:
        return f"{source}: {text}"
    got = values.get(key)
    text = text.replace("Expected", "expected").split(", got ")[0]
    if key in ("synchronous", "log_level"):
        choices = _choices(key)
        text = f"must be one of {', '.join(choices)}"
    return f"{source}: bad value for {key}: {text} (got {got!r})"


def _choices(key: str) -> tuple[str, ...]:
    import typing

    hint = typing.get_type_hints(Config)[key]
    return tuple(typing.get_args(hint))


def load_config(
    *,
    file: str | os.PathLike[str] | None = None,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Merge defaults < file < environment < flags (None flags are ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if file is not None:
        values.update(_convert(_read_file(file), f"config file {file}", strict=True))
    from_env = {key: env[var] for var, key in _ENV.items() if env.get(var)}
    values.update(_convert(from_env, "environment", strict=False))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    values.update(_convert(given, "command line", strict=True))
    if "db" not in values:  # only when needed: it may need a home directory
        values["db"] = default_db_path(env)
    values.setdefault("socket", default_socket_path(env))
    return Config(**values).validate()


def _read_file(file: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(file, "rb") as fh:
            data = tomllib.load(fh)
    except IsADirectoryError:
        raise ConfigError(f"config file {file} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {file} is not a text (UTF-8 TOML) file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    # Either top-level keys or one [nexusd] table.
    table = data.get("nexusd")
    if isinstance(table, dict):
        others = sorted(k for k in data if k != "nexusd")
        if others:
            raise ConfigError(f"config file {file}: unknown setting {others[0]!r} beside [nexusd]")
        data = table
    return {key.replace("-", "_"): value for key, value in data.items()}
