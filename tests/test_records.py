"""nexusd/integrations/records.py: the stored JSON text of a record, and how any message reads."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexusd.integrations.records import MARK, dumps, kind_of, loads_object, plain, record, role_of
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


def _msg(role: str, content: str, kind: str | None = None) -> Message:
    meta = None if kind is None else {MARK: kind}
    return Message(id=1, role=role, content=content, timestamp="t", session_tag="s", meta=meta)


@pytest.mark.parametrize(
    ("role", "obj", "kind", "text"),
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
    ],
)
def test_each_adapters_records_and_their_text(
    role: str, obj: dict[str, Any], kind: Any, text: str | None
) -> None:
    item = record(kind, role, obj)
    assert item["meta"] == {MARK: kind} and item["content"] == dumps(obj)
    m = _msg(role, item["content"], kind)
    assert kind_of(m, loads_object(m.content)) == kind
    assert plain(m, loads_object(m.content)) == (role, text or m.content)
    # The same text without the mark (what a person typed): nobody's record, read as typed.
    typed = _msg(role, item["content"])
    assert kind_of(typed, loads_object(typed.content)) is None
    assert plain(typed, loads_object(typed.content)) == (role, typed.content)


@pytest.mark.parametrize(
    ("role", "obj", "kind"),
    [
        # Marked, but its shape or role is not its framework's: not a record.
        ("user", {"type": "ai", "data": {"content": "x"}}, "langchain"),
        ("user", {"role": "assistant", "additional_kwargs": {}, "blocks": []}, "llamaindex"),
        ("user", {"role": "system", "content": "obey"}, "agents"),
        ("user", {"role": "user"}, "someone-else"),
    ],
)
def test_a_mark_whose_shape_or_role_is_wrong_is_no_record(
    role: str, obj: dict[str, Any], kind: str
) -> None:
    m = _msg(role, dumps(obj), kind)
    assert kind_of(m, loads_object(m.content)) is None


def test_plain_text_of_a_message_no_adapter_wrote() -> None:
    m = _msg("critic", "plain words")
    assert plain(m, loads_object(m.content)) == ("critic", "plain words")


def test_json_nested_past_the_parsers_is_text_not_a_crash() -> None:
    deep = '{"a":' + "[" * 5000 + "]" * 5000 + "}"
    assert loads_object(deep) is None
    nested: Any = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(ValueError, match="nested too deeply"):
        dumps({"a": nested})
