"""Daemon and client configuration: defaults, TOML file, environment, flags.

Precedence is flags > environment > file > defaults.  The default paths follow
systemd first (``$STATE_DIRECTORY``, ``$RUNTIME_DIRECTORY``), then XDG, then a
private directory under /tmp, and clients resolve the socket the same way so
zero configuration works on one machine.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import NexusError
from .paths import default_db_path, default_socket_path, resolve_socket_path

__all__ = [
    "Config",
    "ConfigError",
    "default_db_path",
    "default_socket_path",
    "load_config",
    "resolve_socket_path",
]

MiB = 1024 * 1024


class ConfigError(NexusError):
    """The configuration is invalid (start-up error, never a silent policy)."""

    code = "bad_request"


@dataclass(slots=True)
class Config:
    """Every setting of ``nexusd serve``; TOML keys are these names."""

    db: Path = dataclasses.field(default_factory=default_db_path)
    socket: Path = dataclasses.field(default_factory=default_socket_path)
    max_messages: int = 500
    synchronous: str = "full"
    queue_size: int = 10_000
    batch_max: int = 1_000
    readers: int = 4
    #: WAL pages after which a commit checkpoints.  SQLite's default, 1000,
    #: checkpoints after nearly every large batch; 8000 (32 MiB of WAL) copies
    #: each hot index page once per checkpoint instead of once per few commits.
    wal_autocheckpoint: int = 8000
    max_frame: int = 4 * MiB
    max_content: int = 1 * MiB
    max_inflight: int = 1_024
    max_connections: int = 1_024
    #: Connections one peer uid may hold at once (below max_connections, so no
    #: single uid can lock the others out).
    max_connections_per_uid: int = 512
    #: Encoded size of one message's ``meta`` (JSON bytes).
    max_meta: int = 64 * 1024
    #: Bytes the daemon may hold in total for large partial frames and unsent
    #: replies, over all connections.
    max_buffered: int = 256 * MiB
    #: Backup snapshots held at once, over all connections (one per connection).
    max_snapshots: int = 2
    enqueue_timeout: float = 5.0
    #: Seconds a connection may send nothing while nothing of its is in flight.
    idle_timeout: float = 300.0
    #: Seconds one frame may take from its first byte to its last.
    frame_timeout: float = 30.0
    shutdown_timeout: float = 20.0
    socket_mode: int = 0o600
    #: Group (name or number) given to a socket the daemon creates; its members
    #: are allowed in as well.
    socket_group: str = ""
    #: Peers allowed to connect, by uid; empty means the daemon's own uid and root.
    allow_uids: list[int] = dataclasses.field(default_factory=list)
    #: Peers allowed to connect by group (primary or supplementary gid).
    allow_gids: list[int] = dataclasses.field(default_factory=list)
    #: Give every peer uid its own namespace of session tags.
    isolate_peers: bool = False
    #: Uids that see and manage every namespace when isolate_peers is on.
    admin_uids: list[int] = dataclasses.field(default_factory=lambda: [0])
    log_level: str = "info"
    uvloop: bool = True

    def validate(self) -> Config:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.max_messages >= 0, "max_messages must be >= 0 (0 means unbounded)")
        need(self.synchronous in ("full", "normal"), "synchronous must be 'full' or 'normal'")
        need(self.queue_size >= 1, "queue_size must be >= 1")
        need(self.batch_max >= 1, "batch_max must be >= 1")
        need(1 <= self.readers <= 64, "readers must be between 1 and 64")
        need(self.wal_autocheckpoint >= 0, "wal_autocheckpoint must be >= 0")
        need(self.max_frame >= 64 * 1024, "max_frame must be >= 65536")
        need(
            1 <= self.max_content <= self.max_frame - 16 * 1024,
            "max_content must be >= 1 and leave 16 KiB of max_frame for the envelope",
        )
        need(self.max_inflight >= 1, "max_inflight must be >= 1")
        need(self.max_connections >= 1, "max_connections must be >= 1")
        need(self.enqueue_timeout > 0, "enqueue_timeout must be > 0")
        need(self.idle_timeout > 0, "idle_timeout must be > 0")
        need(self.shutdown_timeout > 0, "shutdown_timeout must be > 0")
        need(0 <= self.socket_mode <= 0o777, "socket_mode must be a file mode like 0o660")
        need(all(u >= 0 for u in self.allow_uids + self.admin_uids), "uids must be >= 0")
        need(all(g >= 0 for g in self.allow_gids), "gids must be >= 0")
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


_ENV = {"NEXUSD_DB": "db", "NEXUSD_SOCKET": "socket"}


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in fields(Config)}
    kind = kinds.get(name)
    if kind is None:
        raise ConfigError(f"unknown setting {name!r}")
    try:
        if kind == "Path":
            return Path(os.path.expanduser(str(value)))
        if kind == "int":
            if isinstance(value, bool):
                raise TypeError
            if name == "socket_mode" and isinstance(value, str):
                return int(value, 8)
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "list[int]":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or any(isinstance(i, bool) for i in items):
                raise TypeError
            return [int(i) for i in items if str(i).strip() != ""]
        if kind == "bool":
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        return str(value).lower() if name in ("synchronous", "log_level") else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad value for {name}: {value!r}") from None


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
        try:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
        # Accept either top-level keys or a [nexusd] table.
        data = data.get("nexusd", data)
        for key, value in data.items():
            values[key.replace("-", "_")] = _coerce(key.replace("-", "_"), value)
    for var, key in _ENV.items():
        if env.get(var):
            values[key] = _coerce(key, env[var])
    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = _coerce(key, value)
    values.setdefault("db", default_db_path(env))
    values.setdefault("socket", default_socket_path(env))
    cfg = Config(**values)
    return cfg.validate()
