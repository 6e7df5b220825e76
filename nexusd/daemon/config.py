"""Daemon configuration: one declaration of every setting, read strictly.

:class:`Config` declares each setting once: its type, its allowed range, its
default and a one-line description (``Annotated[..., Meta(...)]``).  Values
come from defaults < a TOML file < the environment (``NEXUSD_DB``,
``NEXUSD_SOCKET``, ``NEXUSD_STORAGE``) < flags, and every source is converted by that declaration
with ``msgspec.convert``: strictly for TOML, which has types; leniently for
the environment and flags, which arrive as strings.  A wrong type
(``max_messages = 1.9``, ``isolate_peers = "ture"``), an out-of-range number,
an unknown choice (``log_level = "verbose"``) or an unknown key is a
:class:`ConfigError` naming the key, never a silent fallback.  The command
line's help is made from the same declaration (:data:`SETTINGS`).  The default
paths follow systemd first (``$STATE_DIRECTORY``, ``$RUNTIME_DIRECTORY``),
then XDG, then a private directory under /tmp; clients resolve the socket the
same way.  ``storage`` chooses the backend: "" is SQLite at ``db``, a
``postgresql://`` URL is PostgreSQL; the URL is checked here and only ever
shown redacted (:mod:`nexusd.storage.postgres.dsn`, which needs no driver).
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, NamedTuple

import msgspec
from msgspec import Meta

from ..storage.postgres import dsn
from ..wire.durations import parse_duration
from ..wire.errors import NexusError
from ..wire.paths import (
    default_db_path,
    default_socket_path,
    resolve_socket_path,
    socket_path_problem,
)

__all__ = [
    "MAX_FRAME_CAP",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
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


def _about(description: str) -> Meta:
    """The one-line help of a setting (shown by ``nexusd serve --help``)."""
    return Meta(description=description)


class ConfigError(NexusError):
    """The configuration is invalid (start-up error, never a silent policy)."""

    code = "bad_request"


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting of ``nexusd serve``; TOML keys are these names.

    Building one in code checks nothing: call :meth:`validate` (which
    :func:`load_config` does).
    """

    db: Annotated[
        Path,
        Meta(description="database file (default: $STATE_DIRECTORY, else the XDG state dir)"),
    ] = msgspec.field(default_factory=default_db_path)
    socket: Annotated[
        Path,
        Meta(description="socket path (default: $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR or /tmp)"),
    ] = msgspec.field(default_factory=default_socket_path)
    storage: Annotated[
        str,
        Meta(
            description="a postgresql:// URL: keep messages in that PostgreSQL database, not"
            ' SQLite at db ("": SQLite); its password in ~/.pgpass, PGPASSFILE or PGPASSWORD'
        ),
    ] = ""
    max_messages: Annotated[
        int, Meta(ge=0, description="rows kept per session tag, 0 = unbounded")
    ] = 500
    max_age: Annotated[
        str | float,
        Meta(
            description="delete messages this long after their commit: 30d, 12h, 90m,"
            " seconds; 0 = never"
        ),
    ] = "0"
    search: Annotated[
        bool, Meta(description="keep a full-text index and answer search (false: neither)")
    ] = True
    synchronous: Annotated[
        Literal["full", "normal"],
        Meta(description="SQLite durability: see Durability in the README"),
    ] = "full"
    queue_size: Annotated[Count, _about("write queue capacity, in jobs")] = 10_000
    batch_max: Annotated[Count, _about("most jobs per transaction")] = 1_000
    readers: Annotated[int, Meta(ge=1, le=64, description="read-only connections in the pool")] = 4
    # SQLite's default, 1000, checkpoints after nearly every large batch; 8000
    # (32 MiB of WAL) copies each hot index page once per checkpoint instead of
    # once per few commits.
    wal_autocheckpoint: Annotated[
        int, Meta(ge=0, description="WAL pages after which a commit checkpoints")
    ] = 8000
    max_frame: Annotated[
        int,
        Meta(
            ge=64 * 1024,
            le=MAX_FRAME_CAP,
            description="frame limit in bytes, requests and replies, 64 KiB to 64 MiB",
        ),
    ] = 4 * MiB
    max_content: Annotated[Count, _about("content limit in bytes of UTF-8")] = 1 * MiB
    max_inflight: Annotated[
        Count, _about("unanswered requests per connection before it is not read")
    ] = 1_024
    max_connections: Annotated[Count, _about("open connections; more are refused")] = 1_024
    # Below max_connections, so that no single uid can lock the others out.
    max_connections_per_uid: Annotated[Count, _about("open connections of one peer uid")] = 512
    max_meta: Annotated[Count, _about("encoded size of one message's meta, in bytes of JSON")] = (
        64 * 1024
    )
    max_buffered: Annotated[
        int,
        Meta(
            ge=MiB,
            description="bytes held for large frames and unsent replies, over all connections",
        ),
    ] = 256 * MiB
    max_snapshots: Annotated[Count, _about("backup snapshots held at once, one per connection")] = 2
    watch_buffer: Annotated[
        int,
        Meta(ge=16 * 1024, description="bytes of messages one watch may fall behind before lagged"),
    ] = MiB
    enqueue_timeout: Annotated[Seconds, _about("seconds a write may wait for queue space")] = 5.0
    idle_timeout: Annotated[
        Seconds, _about("seconds a connection may send nothing while nothing is in flight")
    ] = 300.0
    frame_timeout: Annotated[
        Seconds, _about("seconds one frame may take from its first byte to its last")
    ] = 30.0
    shutdown_timeout: Annotated[Seconds, _about("drain deadline in seconds on SIGTERM/SIGINT")] = (
        20.0
    )
    socket_mode: Annotated[
        int, Meta(ge=0, le=0o777, description="permissions of the socket the daemon creates")
    ] = 0o600
    socket_group: Annotated[
        str, Meta(description="group (name or gid) given to that socket; its members may connect")
    ] = ""
    allow_uids: Annotated[
        list[Id], Meta(description="peers allowed in by uid; empty: the daemon's uid and root")
    ] = msgspec.field(default_factory=list)
    allow_gids: Annotated[
        list[Id], Meta(description="peers allowed in by primary or supplementary group")
    ] = msgspec.field(default_factory=list)
    isolate_peers: Annotated[
        bool, Meta(description="give every peer uid its own namespace of session tags")
    ] = False
    admin_uids: Annotated[
        list[Id], Meta(description="uids that see every namespace when isolate_peers is on")
    ] = msgspec.field(default_factory=lambda: [0])
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"],
        Meta(description="least severe level logged, to stderr"),
    ] = "info"
    uvloop: Annotated[bool, Meta(description="use uvloop when the fast extra is installed")] = True

    def validate(self) -> Config:
        """Check every value against its declaration, then the rules between settings."""
        _convert(msgspec.structs.asdict(self), "setting", strict=True)

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
        try:
            parse_duration(self.max_age)
        except ValueError as exc:
            need(False, f"max_age: {exc}")
        try:
            if self.storage:
                dsn.check(self.storage)
        except ValueError as exc:  # its line never holds the password
            need(False, f"storage: {exc}")
        problem = socket_path_problem(self.socket)
        need(problem is None, f"socket {problem}")  # before any file is made
        if self.socket_group:
            self.socket_gid()  # fails here, at start-up, if the group does not exist
        return self

    @property
    def max_age_seconds(self) -> float:
        """``max_age`` in seconds (0: messages never expire)."""
        return parse_duration(self.max_age)

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


class Setting(NamedTuple):
    """What the declaration says of one setting, for help texts and messages."""

    name: str
    description: str
    #: The default; None when it is computed at start-up (the paths).
    default: Any
    #: The allowed values of a choice (a ``Literal``), else ().
    choices: tuple[str, ...]


#: Defaults computed at start-up from the environment; help describes them in words.
_COMPUTED: Final = (default_db_path, default_socket_path)


def _settings() -> dict[str, Setting]:
    out = {}
    for f in msgspec.structs.fields(Config):
        kind, *extras = typing.get_args(f.type) or (f.type,)
        description = next(
            (m.description for m in extras if isinstance(m, Meta) and m.description), None
        )
        if not description:
            raise TypeError(f"Config.{f.name} has no description")
        if f.default_factory in _COMPUTED:
            default = None
        elif f.default_factory is not msgspec.NODEFAULT:
            default = f.default_factory()
        else:
            default = f.default
        choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else ()
        out[f.name] = Setting(f.name, description, default, choices)
    return out


#: Every setting by name, in declaration order.
SETTINGS: Final = _settings()
_ENV: Final = {"NEXUSD_DB": "db", "NEXUSD_SOCKET": "socket", "NEXUSD_STORAGE": "storage"}
_OCTAL: Final = re.compile(r"0?o?([0-7]{3,4})")


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

    ``strict``: types must match exactly (TOML, a Config built in code);
    otherwise strings are parsed (the environment, flags).  The error names
    the key and the source.
    """
    for key in values:
        if key not in SETTINGS:
            raise ConfigError(f"{source}: unknown setting {key!r}")
    prepared = dict(values)
    for key, value in values.items():
        if SETTINGS[key].choices and isinstance(value, str):
            prepared[key] = value.lower()  # log_level = "WARNING" is meant
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
    if key == "storage":  # it may hold a password: its type, not its value
        got = type(got).__name__
    text = text.replace("Expected", "expected").split(", got ")[0]
    choices = SETTINGS[key].choices if key in SETTINGS else ()
    if choices:
        text = f"must be one of {', '.join(choices)}"
    return f"{source}: bad value for {key}: {text} (got {got!r})"


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
    values.update(_convert(given, "command line", strict=False))
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
