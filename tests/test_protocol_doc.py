"""docs/protocol.md against a live daemon: every table and example in it.

A client in another language was written from that document alone; these
tests hold the document to what the daemon does on the wire.  The tables are
parsed, not copied, so a change to either side that the other does not follow
fails here.
"""

from __future__ import annotations

import re
import socket
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from nexusd.wire import errors
from nexusd.wire import protocol as p
from nexusd.wire.ops import OPERATIONS
from tests.conftest import Daemon, RawSync, _new_daemon

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
_TICKED = re.compile(r"`([a-z_]+)`(\?)?")
_ITEM = re.compile(r"`\{([^}]*)\}`")


def _section(title: str) -> str:
    """The text under the heading ``title`` up to the next heading."""
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", DOC, re.M | re.S)
    assert m is not None, title
    return m.group(1)


def _paragraph(start: str) -> str:
    """The paragraph that starts with ``start``."""
    i = DOC.index(start)
    end = DOC.find("\n\n", i)
    return DOC[i : end if end >= 0 else None]


def _table(text: str) -> list[list[str]]:
    """Body rows (cells stripped) of the first Markdown table in ``text``."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def _tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text``, in order."""
    out: list[list[list[str]]] = []
    cur: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            out.append(_table("\n".join(cur)))
            cur = []
    if cur:
        out.append(_table("\n".join(cur)))
    return out


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


class Op(typing.NamedTuple):
    name: str
    required: set[str]
    optional: set[str]
    item_required: set[str]
    item_optional: set[str]
    reply: set[str]


def _ops() -> list[Op]:
    out = []
    for cells in _table(_section("Operations")):
        (name,) = _ticked(cells[0])
        req_cell = _ITEM.sub("", cells[1])
        keys = _TICKED.findall(req_cell)
        items = _ITEM.findall(cells[1])
        item_keys = [k.strip() for k in items[0].split(",")] if items else []
        out.append(
            Op(
                name=name,
                required={k for k, q in keys if not q},
                optional={k for k, q in keys if q},
                item_required={k for k in item_keys if not k.endswith("?")},
                item_optional={k[:-1] for k in item_keys if k.endswith("?")},
                reply={k for k, _ in _TICKED.findall(cells[2])},
            )
        )
    return out


OPS = _ops()
REQUESTS = {op.name: op.request for op in OPERATIONS}
REPLIES = {op.name: op.reply for op in OPERATIONS}


def _split(cls: type[Any]) -> tuple[set[str], set[str]]:
    fields = [f for f in msgspec.structs.fields(cls) if f.name != "id"]
    return {f.name for f in fields if f.required}, {f.name for f in fields if not f.required}


# ── the document against the code ─────────────────────────────────────────────
def test_the_operations_table_lists_every_operation_once() -> None:
    assert sorted(o.name for o in OPS) == sorted(REQUESTS)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_each_operations_row_matches_its_request_and_reply_types(op: Op) -> None:
    required, optional = _split(REQUESTS[op.name])
    assert (op.required, op.optional) == (required, optional)
    if op.name == "append_many":
        assert (op.item_required, op.item_optional) == _split(p.NewMessage)
    reply_required, reply_optional = _split(REPLIES[op.name])
    assert op.reply == reply_required | reply_optional


def test_the_message_and_session_info_tables_list_their_fields() -> None:
    message = {_ticked(r[0])[0] for r in _table(_section("Message"))}
    assert message == {f.name for f in msgspec.structs.fields(p.Message)}
    info = _ticked(_paragraph("**SessionInfo** is"))[0]
    assert info == "{" + ", ".join(f.name for f in msgspec.structs.fields(p.SessionInfo)) + "}"


def test_the_error_code_table_is_the_codes_the_daemon_can_send() -> None:
    codes = {_ticked(r[0])[0] for r in _table(_section("Errors"))}
    assert codes == set(errors._BY_CODE)


# ── the document against a live daemon ───────────────────────────────────────
def _hex_blocks(text: str) -> list[bytes]:
    """The byte dumps (fenced blocks of hex pairs, ``#`` starts a comment)."""
    out = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        tokens = [t for line in block.splitlines() for t in line.split("#")[0].split()]
        if tokens and all(re.fullmatch(r"[0-9a-f]{2}", t) for t in tokens):
            out.append(bytes.fromhex("".join(tokens)))
    return out


def test_the_example_bytes_are_exact(daemon: Daemon) -> None:
    request, reply = _hex_blocks(_section("Example"))
    assert int.from_bytes(request[:4], "big") == len(request) - 4 == 39
    assert msgspec.msgpack.decode(request[4:]) == {
        "op": "append",
        "id": 1,
        "role": "user",
        "content": "hello",
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # a fresh database
        s.settimeout(10)
        s.connect(str(daemon.socket))
        s.sendall(request)
        got = b""
        while len(got) < 4 or len(got) < 4 + int.from_bytes(got[:4], "big"):
            chunk = s.recv(65536)
            assert chunk, "closed"
            got += chunk
    assert got == reply
    assert msgspec.msgpack.decode(reply[4:]) == {"op": "append", "message_id": 1, "id": 1}


@pytest.fixture(scope="module")
def live_daemon() -> Iterator[Daemon]:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="nxd", dir="/tmp"))
    d = _new_daemon(base).start()
    try:
        yield d
    finally:
        assert d.stop() == 0
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def live(live_daemon: Daemon) -> Iterator[RawSync]:
    """A connection of its own per test (a backup handle lives as long as its connection)."""
    raw = RawSync(live_daemon.socket)
    try:
        yield raw
    finally:
        raw.close()


_IDS = iter(range(1000, 10**9))


def _call(raw: RawSync, op: str, **keys: Any) -> dict[str, Any]:
    rid = next(_IDS)
    reply = raw.call({"op": op, "id": rid, **keys})
    assert reply["id"] == rid, reply
    return reply


_SAMPLES: dict[str, Any] = {
    "role": "user",
    "content": "hi",
    "messages": [{"role": "user", "content": "hi"}],
    "query": "hi",
    "ids": [1],
}


def _required(raw: RawSync, op: Op) -> dict[str, Any]:
    keys = {k: _SAMPLES[k] for k in op.required if k in _SAMPLES}
    if "backup" in op.required:
        keys["backup"] = _call(raw, "backup_begin")["backup"]
    if "offset" in op.required:
        keys["offset"] = 0
    if "watch" in op.required:  # unwatch: of a watch open on this connection
        keys["watch"] = _call(raw, "watch")["id"]
    if "source_tag" in op.required:  # fork: a source with a message, into a new tag
        keys["source_tag"] = keys["new_tag"] = f"fork {next(_IDS)}"
        _call(raw, "append", role="user", content="hi", session_tag=keys["source_tag"])
        keys["new_tag"] += " copy"
    return keys


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_each_operation_answers_with_the_documented_reply_keys(live: RawSync, op: Op) -> None:
    reply = _call(live, op.name, **_required(live, op))
    assert reply["op"] == op.name, reply
    assert set(reply) == op.reply | {"op", "id"}


@pytest.mark.parametrize("op", [o for o in OPS if o.optional or o.item_optional], ids=str)
def test_nil_is_accepted_for_every_optional_key(live: RawSync, op: Op) -> None:
    keys = _required(live, op)
    keys.update(dict.fromkeys(op.optional))
    if op.item_optional:
        keys["messages"] = [{"role": "user", "content": "hi", **dict.fromkeys(op.item_optional)}]
    reply = _call(live, op.name, **keys)
    assert reply["op"] == op.name, reply


def test_hello_limits_are_the_documented_ones(live: RawSync) -> None:
    text = _paragraph("**`hello` limits**").split(":", 1)[1]
    listed = {k for k, _ in _TICKED.findall(text) if k.startswith("max_")}
    assert set(_call(live, "hello")["limits"]) == listed


def test_stats_holds_every_documented_key(live: RawSync) -> None:
    text = _paragraph("**`stats`** holds at least").split(":", 1)[1]
    listed = {k for k, _ in _TICKED.findall(text)}
    assert listed - set(_call(live, "stats")["stats"]) == set()


def test_an_unsupported_version_is_refused_naming_the_supported_one(live: RawSync) -> None:
    err = _call(live, "hello", version=2)
    assert (err["op"], err["code"], err["field"]) == ("error", "bad_request", "version")
    assert f"version {p.PROTOCOL_VERSION}" in err["message"]
    assert _call(live, "hello", version=None)["version"] == p.PROTOCOL_VERSION


def _timestamp_tables() -> tuple[list[tuple[str, str]], list[str]]:
    accepted, refused = _tables(_section("Timestamps"))
    return [(_ticked(a)[0], _ticked(b)[0]) for a, b in accepted], [
        _ticked(r[0])[0] for r in refused
    ]


@pytest.mark.parametrize(("sent", "stored"), _timestamp_tables()[0])
def test_documented_timestamps_are_stored_as_documented(
    live: RawSync, sent: str, stored: str
) -> None:
    tag = f"ts {sent}"
    _call(live, "append", role="user", content="x", session_tag=tag, timestamp=sent)
    many = [{"role": "user", "content": "y", "timestamp": sent}]
    assert _call(live, "append_many", session_tag=tag, messages=many)["op"] == "append_many"
    history = _call(live, "history", session_tag=tag)
    assert [m["timestamp"] for m in history["messages"]] == [stored, stored]


@pytest.mark.parametrize("sent", _timestamp_tables()[1])
def test_documented_bad_timestamps_are_refused(live: RawSync, sent: str) -> None:
    err = _call(live, "append", role="user", content="x", timestamp=sent)
    assert (err["code"], err["field"]) == ("bad_request", "timestamp")
    many = [{"role": "user", "content": "y"}, {"role": "user", "content": "y", "timestamp": sent}]
    err = _call(live, "append_many", messages=many)
    assert (err["code"], err["field"]) == ("bad_request", "messages[1].timestamp")


def test_characters_are_code_points(live: RawSync) -> None:
    assert _call(live, "append", role="😀" * 64, content="x")["op"] == "append"
    err = _call(live, "append", role="é" * 65, content="x")
    assert (err["code"], err["field"]) == ("bad_request", "role")


def test_the_id_comes_back_whenever_it_can_be_read(live: RawSync) -> None:
    # invalid UTF-8 in content, unknown op: the id is readable, so it comes back (and the field)
    live.send(b"\x84\xa2op\xa6append\xa2id\x05\xa4role\xa1r\xa7content\xa3\xed\xa0\x80")
    err = live.recv()
    assert (err["id"], err["code"], err["field"]) == (5, "bad_request", "content")
    assert _call(live, "frobnicate")["field"] == "op"
    # not a map, no id: nil, and the connection goes on
    live.send(msgspec.msgpack.encode([1, 2]))
    assert live.recv()["id"] is None
    live.send(msgspec.msgpack.encode({"op": "ping", "id": -1}))
    assert live.recv()["id"] is None
    assert _call(live, "ping")["op"] == "ping"
