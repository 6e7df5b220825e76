from __future__ import annotations

import typing
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexusd.wire import protocol as p
from nexusd.wire.codec import RequestError, decode_request
from nexusd.wire.errors import BadRequest, Overloaded, error_for_code
from nexusd.wire.timestamps import parse_timestamp

REQUESTS: list[Any] = [
    p.Hello(id=1, version=1, client="t"),
    p.Ping(id=2),
    p.Append(
        id=3, role="user", content="hi", session_tag="s", timestamp="t", meta={"k": [1, 2.5, None]}
    ),
    p.AppendMany(id=4, messages=[p.NewMessage(role="a", content="b")], session_tag="s"),
    p.History(id=5, session_tag="s", limit=10, before_id=9, after_id=2),
    p.Count(id=6, session_tag="s"),
    p.Sessions(id=7, after="a", limit=5),
    p.Pop(id=8, session_tag="s"),
    p.Clear(id=9, session_tag="s"),
    p.ClearAll(id=10),
    p.Stats(id=11),
]


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_roundtrips(req: Any) -> None:
    assert decode_request(p.encoder.encode(req)) == req


def test_every_reply_roundtrips() -> None:
    msg = p.Message(id=1, role="r", content="c", timestamp="t", session_tag="s", meta={"a": 1})
    replies: list[Any] = [
        p.HelloReply(id=1, version=1, server="x", limits={"max_frame": 1}),
        p.PingReply(id=2),
        p.AppendReply(id=3, message_id=7),
        p.AppendManyReply(id=4, message_ids=[7, 8]),
        p.HistoryReply(id=5, messages=[msg], truncated=True),
        p.CountReply(id=6, count=3),
        p.SessionsReply(
            id=7,
            sessions=[
                p.SessionInfo(session_tag="s", count=1, first_id=1, last_id=1, last_timestamp="t")
            ],
        ),
        p.PopReply(id=8, message=msg),
        p.PopReply(id=8, message=None),
        p.ClearReply(id=9, deleted=2),
        p.ClearAllReply(id=10, deleted=3),
        p.StatsReply(id=11, stats={"a": 1}),
        p.ErrorReply(id=None, code="too_large", message="m"),
    ]
    for reply in replies:
        assert p.reply_decoder.decode(p.encoder.encode(reply)) == reply


def test_wire_shape_is_a_plain_map_with_op_and_id() -> None:
    raw = msgspec.msgpack.decode(p.encoder.encode(p.Count(id=6, session_tag="s")))
    assert raw == {"op": "count", "id": 6, "session_tag": "s"}


def _bad(obj: Any) -> RequestError:
    body = obj if isinstance(obj, bytes) else msgspec.msgpack.encode(obj)
    with pytest.raises(RequestError) as info:
        decode_request(body)
    assert isinstance(info.value, BadRequest)
    return info.value


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"op": "append", "id": 1, "role": "", "content": "x"}, "role"),
        ({"op": "append", "id": 1, "role": "r" * 65, "content": "x"}, "role"),
        ({"op": "append", "id": 1, "role": "r", "content": 5}, "content"),
        ({"op": "append", "id": 1, "role": "r", "content": "x", "session_tag": ""}, "session_tag"),
        (
            {"op": "append", "id": 1, "role": "r", "content": "x", "session_tag": "s" * 257},
            "session_tag",
        ),
        ({"op": "append", "id": 1, "role": "r", "content": "x", "meta": {1: 2}}, "meta"),
        ({"op": "history", "id": 1, "limit": 0}, "limit"),
        ({"op": "history", "id": 1, "limit": 10_001}, "limit"),
        ({"op": "history", "id": 1, "before_id": -1}, "before_id"),
        ({"op": "frobnicate", "id": 1}, "op"),
        ({"id": 1}, "op"),
        (
            {
                "op": "append_many",
                "id": 1,
                "messages": [{"role": "a", "content": "b"}, {"role": "", "content": "c"}],
            },
            "messages[1].role",
        ),
        ({"op": "append_many", "id": 1, "messages": []}, "messages"),
    ],
)
def test_invalid_fields_are_named_and_keep_the_request_id(obj: Any, field: str) -> None:
    err = _bad(obj)
    assert err.field == field
    assert err.request_id == 1
    assert err.code == "bad_request"


def test_role_of_64_chars_is_fine() -> None:
    req = decode_request(
        msgspec.msgpack.encode({"op": "append", "id": 1, "role": "r" * 64, "content": ""})
    )
    assert isinstance(req, p.Append) and len(req.role) == 64


_APPEND_1 = msgspec.msgpack.encode({"op": "append", "id": 1, "role": "r", "content": "abc"})


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",
        b"",
        b"\x93\x01\x02\x03",  # an array, not a map
        b"\x91" * 100_000,
        _APPEND_1[:-1],  # truncated
        _APPEND_1 + b"\x00",  # trailing bytes
        msgspec.msgpack.encode({"op": "ping"}),  # no id
        msgspec.msgpack.encode({"op": "ping", "id": None}),
        msgspec.msgpack.encode({"op": "ping", "id": -1}),
        msgspec.msgpack.encode({"op": "ping", "id": 2**63}),
        msgspec.msgpack.encode({"op": "ping", "id": "1"}),
        msgspec.msgpack.encode({"op": "ping", "id": 1.0}),
    ],
)
def test_bodies_without_a_usable_id_give_bad_request_without_id(body: bytes) -> None:
    assert _bad(body).request_id is None


@pytest.mark.parametrize(
    "body",
    [
        # a str holding a CESU-encoded lone surrogate: not UTF-8, but the id is readable
        b"\x84\xa2op\xa6append\xa2id\x01\xa4role\xa1r\xa7content\xa3\xed\xa0\x80",
        msgspec.msgpack.encode({"op": "nope", "id": 1}),
        msgspec.msgpack.encode({"op": 7, "id": 1}),
        msgspec.msgpack.encode({"id": 1, "op": "append", "role": b"bytes", "content": None}),
        msgspec.msgpack.encode({"op": "history", "id": 1, "limit": None, "before_id": "x"}),
        # invalid UTF-8 deep inside meta, before the id
        msgspec.msgpack.encode(
            {"op": "append", "meta": {"k": ["\x00\x00\x00"]}, "role": "r", "content": "", "id": 1}
        ).replace(b"\xa3\x00\x00\x00", b"\xa3\xed\xa0\x80"),
    ],
)
def test_the_id_is_salvaged_whenever_the_body_is_a_map_with_a_valid_id(body: bytes) -> None:
    err = _bad(body)
    assert err.request_id == 1, err


def _defaulted_fields() -> list[tuple[type[Any], str, Any]]:
    out = []
    for cls in [*typing.get_args(p.Request), p.NewMessage]:
        for f in msgspec.structs.fields(cls):
            if f.default is not msgspec.NODEFAULT:
                out.append((cls, f.name, f.default))
    return out


@pytest.mark.parametrize(
    ("cls", "name", "default"), _defaulted_fields(), ids=lambda v: getattr(v, "__name__", None)
)
def test_nil_means_absent_for_every_optional_key(cls: type[Any], name: str, default: Any) -> None:
    required = {
        "id": 1,
        "role": "r",
        "content": "c",
        "messages": [{"role": "r", "content": "c"}],
        "backup": "b",
        "query": "q",
        "offset": 0,
        "ids": [1],
        "source_tag": "a",
        "new_tag": "b",
    }
    if cls is p.NewMessage:
        body = {
            "op": "append_many",
            "id": 1,
            "messages": [{"role": "r", "content": "c", name: None}],
        }
        req = decode_request(msgspec.msgpack.encode(body))
        assert isinstance(req, p.AppendMany)
        assert getattr(req.messages[0], name) == default
        return
    tag = cls.__struct_config__.tag
    fields = {f.name: required[f.name] for f in msgspec.structs.fields(cls) if f.required}
    body = {"op": tag, **fields, name: None}
    req = decode_request(msgspec.msgpack.encode(body))
    assert type(req) is cls and getattr(req, name) == default


def test_nil_for_a_required_key_is_still_refused_with_the_key_named() -> None:
    err = _bad({"op": "append", "id": 1, "role": None, "content": "c", "limit": None})
    assert (err.field, err.request_id) == ("role", 1)


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2026-11-26T07:41:50.406180Z", "2026-11-26T07:41:50.406180Z"),
        ("2026-11-26T07:41:50Z", "2026-11-26T07:41:50.000000Z"),
        ("2026-11-26t07:41:50.4z", "2026-11-26T07:41:50.400000Z"),
        ("2026-11-26 08:41:50.406180+01:00", "2026-11-26T07:41:50.406180Z"),
        ("2026-11-26T02:11:50.123456789-05:30", "2026-11-26T07:41:50.123456Z"),
        ("2026-01-01T00:30:00+01:00", "2025-12-31T23:30:00.000000Z"),
        ("2026-11-26T07:41:50-00:00", "2026-11-26T07:41:50.000000Z"),
    ],
)
def test_timestamps_are_normalised_to_utc_microseconds(sent: str, stored: str) -> None:
    assert parse_timestamp(sent) == stored


@pytest.mark.parametrize(
    "sent",
    [
        "07:41:50",  # v1's bare time
        "2026-11-26",
        "2026-11-26T07:41:50",  # no offset: names no instant
        "2026-11-26T07:41:50.406180",
        "2026-11-26T07:41Z",
        "2026-02-30T00:00:00Z",
        "2026-11-26T24:00:00Z",
        "2026-11-26T23:59:60Z",  # leap second
        "2026-11-26T07:41:50+24:00",
        "2026-11-26T07:41:50+0100",
        "2026-11-26T07:41:50.1234567890Z",
        "0001-01-01T00:30:00+01:00",  # before year 1 in UTC
        "２０２６-11-26T07:41:50Z",  # non-ASCII digits
        "2026-11-26T07:41:50Z ",
        "x" * 65,
        "2" * 2_000_000,
    ],
)
def test_bad_timestamps_are_refused_with_the_field_named(sent: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_timestamp(sent, "messages[3].timestamp")
    assert info.value.field == "messages[3].timestamp"


@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_bad_request(body: bytes) -> None:
    try:
        decode_request(body)
    except RequestError:
        pass


def test_error_codes_map_back_to_exception_types() -> None:
    err = error_for_code("overloaded", "busy", retry_after=0.5)
    assert isinstance(err, Overloaded) and err.retry_after == 0.5
    with pytest.raises(BadRequest) as info:
        p.raise_for_error(p.ErrorReply(id=1, code="bad_request", message="m", field="role"))
    assert info.value.field == "role"
    unknown = error_for_code("brand_new", "m")
    assert unknown.code == "brand_new"


def test_a_map_with_a_non_string_key_still_gets_its_id_back() -> None:
    body = b"\x83\xa2op\xa4ping\xa2id\x0e\x05\x01"  # {"op": "ping", "id": 14, 5: 1}
    with pytest.raises(RequestError) as info:
        decode_request(body)
    assert info.value.request_id == 14


@pytest.mark.parametrize(
    ("request_body", "field"),
    [
        ({"op": "append", "id": 3, "role": "u", "content": "~"}, "content"),
        ({"op": "append", "id": 3, "role": "~", "content": "ok"}, "role"),
        ({"op": "count", "id": 3, "session_tag": "~"}, "session_tag"),
        (
            {
                "op": "append_many",
                "id": 3,
                "messages": [{"role": "u", "content": "ok"}, {"role": "u", "content": "~"}],
            },
            "messages[1].content",
        ),
    ],
)
def test_invalid_utf8_names_the_field_that_holds_it(
    request_body: dict[str, Any], field: str
) -> None:
    body = msgspec.msgpack.encode(request_body).replace(b"\xa1~", b"\xa1\xff")
    with pytest.raises(RequestError) as info:
        decode_request(body)
    assert (info.value.request_id, info.value.field) == (3, field)
