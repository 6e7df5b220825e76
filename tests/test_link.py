"""nexusd/integrations/link.py: the stored JSON text of a record, roles, settled writes."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexusd.integrations.link import Link, dumps, loads_object, role_of, settle

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # settle() is asyncio's, as the frameworks are


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


async def test_settle_finishes_the_write_then_raises_the_cancellation() -> None:
    done = asyncio.Event()
    release = asyncio.Event()

    async def write() -> str:
        await release.wait()
        done.set()
        return "stored"

    task = asyncio.create_task(settle(write()))
    await asyncio.sleep(0)  # let it start waiting
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done()  # the cancellation waits for the write
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done.is_set()
    assert await settle(write()) == "stored"  # uncancelled: the result


def test_link_refuses_what_is_not_a_client() -> None:
    with pytest.raises(TypeError, match="Client or AsyncClient, not dict"):
        Link(None, {}, adapter="X")  # type: ignore[arg-type]
