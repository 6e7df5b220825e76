"""nexusd/integrations/records.py: the stored JSON text of a record, and how any message reads."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexusd.integrations.records import dumps, kind_of, loads_object, plain, role_of
from nexusd.wire.protocol import Message

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),  # lone surrogates included
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), JSON, max_size=6))
def test_any_json_object_reads_back_equal_key_order_included(obj: dict[str, Any]) -> None:
    text = dumps(obj)
    text.encode("utf-8")  # always storable: nexusd content is UTF-8
    back = loads_object(text)
    assert json.dumps(back) == json.dumps(obj)


def test_the_text_is_compact_and_keeps_what_is_not_ascii() -> None:
    assert dumps({"b": "é 🎉", "a": [1, 2.5]}) == '{"b":"é 🎉","a":[1,2.5]}'
    assert dumps({"s": "\ud800"}) == '{"s":"\\ud800"}'  # a lone surrogate: escaped
    with pytest.raises(ValueError, match="JSON compliant"):
        dumps({"x": math.nan})
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"x": {1, 2}})


@pytest.mark.parametrize(
    "content", ["hello", "", "[1, 2]", "{not json", '"{}"', "{} trailing", "42"]
)
def test_content_that_holds_no_json_object_is_foreign(content: str) -> None:
    assert loads_object(content) is None


def test_role_of_takes_the_first_valid_role() -> None:
    assert role_of(None, "function_call") == "function_call"
    assert role_of("user", "message") == "user"
    assert role_of("", 3, "x" * 65) == "item"
    assert role_of(None, default="human") == "human"


def _msg(role: str, content: str) -> Message:
    return Message(id=1, role=role, content=content, timestamp="t", session_tag="s")


@pytest.mark.parametrize(
    ("role", "record", "kind", "text"),
    [
        # Each framework's own records, and what they say in words.
        ("human", {"type": "human", "data": {"content": "hi", "type": "human"}}, "langchain", "hi"),
        (
            "ai",
            {"type": "ai", "data": {"content": [{"type": "text", "text": "a"}, {"text": "b"}]}},
            "langchain",
            "a\nb",
        ),
        (
            "assistant",
            {"role": "assistant", "additional_kwargs": {}, "blocks": [{"text": "yes"}]},
            "llamaindex",
            "yes",
        ),
        ("user", {"role": "user", "content": "q"}, "agents", "q"),
        (
            "assistant",
            {"type": "message", "role": "assistant", "content": [{"text": "out"}]},
            "agents",
            "out",
        ),
        # A tool call says nothing in words: its JSON is the text.
        ("function_call", {"type": "function_call", "name": "f"}, "agents", None),
        # Shapes whose role does not match the message's: nobody's record.
        ("user", {"type": "ai", "data": {"content": "x"}}, None, None),
        ("user", {"role": "assistant", "additional_kwargs": {}, "blocks": []}, None, None),
        ("user", {"not": "a record"}, None, None),
    ],
)
def test_kind_and_plain_text_of_each_shape(
    role: str, record: dict[str, Any], kind: str | None, text: str | None
) -> None:
    content = dumps(record)
    assert kind_of(loads_object(content), role) == kind
    assert plain(_msg(role, content), loads_object(content)) == (role, text or content)


def test_plain_text_of_a_message_no_adapter_wrote() -> None:
    m = _msg("critic", "plain words")
    assert plain(m, loads_object(m.content)) == ("critic", "plain words")
