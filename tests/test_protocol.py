from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexusd import protocol as p
from nexusd.errors import BadRequest, Overloaded, error_for_code

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
    assert p.decode_request(p.encoder.encode(req)) == req


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


def _bad(obj: Any) -> p.RequestError:
    body = obj if isinstance(obj, bytes) else msgspec.msgpack.encode(obj)
    with pytest.raises(p.RequestError) as info:
        p.decode_request(body)
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
    req = p.decode_request(
        msgspec.msgpack.encode({"op": "append", "id": 1, "role": "r" * 64, "content": ""})
    )
    assert isinstance(req, p.Append) and len(req.role) == 64


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",
        b"",
        b"\x93\x01\x02\x03",
        b"\x91" * 100_000,
        # a str holding a CESU-encoded lone surrogate: not UTF-8
        b"\x84\xa2op\xa6append\xa2id\x01\xa4role\xa1r\xa7content\xa3\xed\xa0\x80",
    ],
)
def test_undecodable_bodies_give_bad_request_without_id(body: bytes) -> None:
    assert _bad(body).request_id is None


@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_bad_request(body: bytes) -> None:
    try:
        p.decode_request(body)
    except p.RequestError:
        pass


def test_error_codes_map_back_to_exception_types() -> None:
    err = error_for_code("overloaded", "busy", retry_after=0.5)
    assert isinstance(err, Overloaded) and err.retry_after == 0.5
    with pytest.raises(BadRequest) as info:
        p.raise_for_error(p.ErrorReply(id=1, code="bad_request", message="m", field="role"))
    assert info.value.field == "role"
    unknown = error_for_code("brand_new", "m")
    assert unknown.code == "brand_new"
