"""LlamaIndex's chat store over nexusd (``NexusChatStore``) against a real daemon.

``SimpleChatStore``, LlamaIndex's own in-memory store, is the oracle: the same
calls on both must give the same answers (nexusd has no empty sessions, so the
oracle forgets a key whose list it emptied: the one documented difference).
The store is also run inside LlamaIndex's chat memory and a ``SimpleChatEngine``
with the framework's ``MockLLM``, from this process and from others.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.conftest import Daemon, need, together

need("llama_index.core", "llamaindex")

from llama_index.core.agent.workflow import ReActAgent  # noqa: E402
from llama_index.core.base.llms.types import (  # noqa: E402
    ImageBlock,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field  # noqa: E402
from llama_index.core.chat_engine import SimpleChatEngine  # noqa: E402
from llama_index.core.llms import (  # noqa: E402
    ChatMessage,
    CompletionResponse,
    CompletionResponseGen,
    MessageRole,
    MockLLM,
)
from llama_index.core.llms.mock import MockLLMWithChatMemoryOfLastCall  # noqa: E402
from llama_index.core.memory import ChatMemoryBuffer, ChatSummaryMemoryBuffer  # noqa: E402
from llama_index.core.storage.chat_store import SimpleChatStore  # noqa: E402
from llama_index.core.storage.chat_store.base import BaseChatStore  # noqa: E402

from nexusd import AsyncClient, BadRequest, Client  # noqa: E402
from nexusd.integrations import llamaindex  # noqa: E402
from nexusd.integrations.llamaindex import NexusChatStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASYNC = {
    "set_messages": "aset_messages",
    "get_messages": "aget_messages",
    "add_message": "async_add_message",
    "delete_messages": "adelete_messages",
    "delete_message": "adelete_message",
    "delete_last_message": "adelete_last_message",
    "get_keys": "aget_keys",
}


@pytest.fixture
def store(shared_daemon: Daemon) -> Iterator[NexusChatStore]:
    s = NexusChatStore(socket=shared_daemon.socket)
    yield s
    s.close()


def _msg(text: str, role: str = "user") -> ChatMessage:
    return ChatMessage(role=role, content=text)


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except IndexError:
        return ("raised", "IndexError")


async def _aoutcome(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", await fn(*args))
    except IndexError:
        return ("raised", "IndexError")


def _ops(keys: list[str], seed: int, n: int) -> list[tuple[str, tuple[Any, ...]]]:
    """A random sequence of every BaseChatStore call over ``keys``, including every idx edge."""
    rnd = random.Random(seed)
    roles = [r.value for r in MessageRole]
    out: list[tuple[str, tuple[Any, ...]]] = []
    for i in range(n):
        key = rnd.choice(keys)
        m = _msg(f"m{i} ü", rnd.choice(roles))
        op = rnd.choice(
            ["add"] * 6 + ["add_idx", "set", "get", "del_all", "del_at", "del_last", "keys"]
        )
        if op == "add":
            out.append(("add_message", (key, m)))
        elif op == "add_idx":
            out.append(("add_message", (key, m, rnd.randint(-6, 6))))
        elif op == "set":
            out.append(
                ("set_messages", (key, [_msg(f"s{i}.{j}") for j in range(rnd.randint(0, 4))]))
            )
        elif op == "get":
            out.append(("get_messages", (key,)))
        elif op == "del_all":
            out.append(("delete_messages", (key,)))
        elif op == "del_at":
            out.append(("delete_message", (key, rnd.randint(-8, 8))))
        elif op == "del_last":
            out.append(("delete_last_message", (key,)))
        else:
            out.append(("get_keys", ()))
    return out


def _oracle_step(oracle: SimpleChatStore, keys: list[str], name: str, args: Any) -> Any:
    got = _outcome(getattr(oracle, name), *args)
    for k in keys:  # nexusd has no empty sessions: an emptied key is gone
        if oracle.store.get(k) == []:
            del oracle.store[k]
    if name == "get_messages" or name == "delete_messages":
        got = ("ok", list(got[1])) if got[1] is not None else got
    return got


def _ours(result: Any, keys: list[str], name: str) -> Any:
    if name == "get_keys" and result[0] == "ok":
        return ("ok", sorted(k for k in result[1] if k in keys))
    return result


def _expected(result: Any, name: str) -> Any:
    return ("ok", sorted(result[1])) if name == "get_keys" else result


# ── the oracle: the same calls on SimpleChatStore ─────────────────────────
def test_every_sync_method_answers_as_simple_chat_store(store: NexusChatStore, tag: str) -> None:
    keys = [f"{tag}-a", f"{tag}-b"]
    oracle = SimpleChatStore()
    for step, (name, args) in enumerate(_ops(keys, seed=1, n=160)):
        want = _expected(_oracle_step(oracle, keys, name, args), name)
        got = _ours(_outcome(getattr(store, name), *args), keys, name)
        assert got == want, f"step {step}: {name}{args!r}"
    for k in keys:
        assert store.get_messages(k) == oracle.get_messages(k)


@pytest.mark.parametrize("client_kind", ["own", "blocking", "async"])
def test_every_async_method_answers_as_simple_chat_store(
    shared_daemon: Daemon, tag: str, client_kind: str
) -> None:
    keys = [f"{tag}-a", f"{tag}-b"]

    async def main() -> None:
        async with AsyncClient(shared_daemon.socket) as ac:
            blocking = Client(shared_daemon.socket)
            kws: dict[str, dict[str, Any]] = {
                "own": {"socket": shared_daemon.socket},
                "blocking": {"client": blocking},
                "async": {"client": ac},
            }
            kw = kws[client_kind]
            store = NexusChatStore(**kw)
            oracle = SimpleChatStore()
            for step, (name, args) in enumerate(_ops(keys, seed=2, n=120)):
                want = _expected(_oracle_step(oracle, keys, name, args), name)
                got = _ours(await _aoutcome(getattr(store, ASYNC[name]), *args), keys, name)
                assert got == want, f"step {step}: {name}{args!r}"
            # The sync methods see the same, whatever client the store was given.
            for k in keys:
                assert store.get_messages(k) == await store.aget_messages(k)
                assert store.get_messages(k) == oracle.get_messages(k)
            store.close()
            blocking.close()

    asyncio.run(main())


def test_the_async_methods_are_the_stores_own() -> None:
    for name in ASYNC.values():
        assert getattr(NexusChatStore, name) is not getattr(BaseChatStore, name), name
    assert issubclass(NexusChatStore, BaseChatStore)
    assert NexusChatStore.class_name() == "NexusChatStore"


def test_an_emptied_key_is_gone(store: NexusChatStore, tag: str) -> None:
    store.add_message(tag, _msg("one"))
    assert tag in store.get_keys()
    assert store.delete_message(tag, 0) == _msg("one")
    assert tag not in store.get_keys()
    assert store.get_messages(tag) == []
    # Where SimpleChatStore keeps an empty list ([], IndexError), nexusd has no session: None.
    assert store.delete_messages(tag) is None
    assert store.delete_last_message(tag) is None
    assert store.delete_message(tag, -1) is None
    store.set_messages(tag, [])
    assert tag not in store.get_keys()


# ── what is stored ────────────────────────────────────────────────────────
KINDS = [
    *[ChatMessage(role=r, content=f"hello from {r.value}") for r in MessageRole],
    ChatMessage(
        role="assistant",
        content="",
        additional_kwargs={
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": "x"}'},
                }
            ]
        },
    ),
    ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": "call_1"}),
    ChatMessage(role="user", blocks=[TextBlock(text="see"), ImageBlock(url="https://e.x/a.png")]),
    ChatMessage(
        role="user", blocks=[ImageBlock(image=b"\x89PNG\r\n\x1a\n", image_mimetype="image/png")]
    ),
    ChatMessage(
        role="assistant",
        blocks=[
            ThinkingBlock(content="hmm"),
            ToolCallBlock(tool_call_id="c2", tool_name="f", tool_kwargs={"a": [1, None]}),
        ],
    ),
    ChatMessage(role="user", blocks=[]),
    ChatMessage(role="user", content="Grüße, 你好, 🦙, \u2028, \x00, tab\t"),
    ChatMessage(role="user", content='\'); DROP TABLE messages; -- " OR 1=1 {"role":"system"}'),
    ChatMessage(role="system", content='{"role": "system", "blocks": []}'),
    ChatMessage(role="user", content="lone \udc80 surrogate"),
    ChatMessage(
        role="assistant", content="x", additional_kwargs={"nested": {"k": [1.5, True, None]}}
    ),
]


def test_every_kind_of_message_round_trips(store: NexusChatStore, tag: str) -> None:
    for m in KINDS[:5]:
        store.add_message(tag, m)
    store.set_messages(tag, KINDS)
    assert store.get_messages(tag) == KINDS
    assert asyncio.run(store.aget_messages(tag)) == KINDS
    # A fresh store (as another process would) reads the same.
    other = NexusChatStore(socket=store._link.blocking.socket_path)
    assert other.get_messages(tag) == KINDS
    assert other.delete_messages(tag) == KINDS
    other.close()


def test_each_message_is_one_nexusd_message_of_its_role(
    store: NexusChatStore, shared_daemon: Daemon, tag: str
) -> None:
    store.set_messages(tag, KINDS[:3])
    with Client(shared_daemon.socket) as c:
        rows = c.get_history(tag, 100)
    assert [r.role for r in rows] == ["system", "developer", "user"]
    assert json.loads(rows[0].content) == KINDS[0].model_dump(mode="json")


def test_messages_other_tools_wrote_read_as_text(
    store: NexusChatStore, shared_daemon: Daemon, tag: str
) -> None:
    foreign = [
        ("user", "plain words"),
        ("assistant", '{"answer": 1}'),  # a JSON object, but not a ChatMessage
        ("tool", "[1, 2]"),
        ("narrator", "a role LlamaIndex does not have"),
        ("system", '{"role": "user", "blocks": []}'),  # a dump whose role is not the record's
        ("assistant", '{"role": "assistant", "blocks": "not a list"}'),
    ]
    with Client(shared_daemon.socket) as c:
        c.append_many(foreign, session_tag=tag)
    want = [ChatMessage(role=r if r != "narrator" else "user", content=text) for r, text in foreign]
    assert store.get_messages(tag) == want
    store.add_message(tag, _msg("ours"))
    assert store.delete_message(tag, 3) == want[3]
    assert store.delete_last_message(tag) == _msg("ours")
    store.add_message(tag, _msg("first"), idx=0)  # copies the foreign ones verbatim
    with Client(shared_daemon.socket) as c:
        rows = c.get_history(tag, 100)
    assert [(r.role, r.content) for r in rows[1:]] == [f for i, f in enumerate(foreign) if i != 3]


def test_a_message_that_is_not_json_is_a_clear_error(store: NexusChatStore, tag: str) -> None:
    bad = ChatMessage(role="user", content="x", additional_kwargs={"obj": object()})
    with pytest.raises(ValueError, match=r"^NexusChatStore: a ChatMessage that is not JSON"):
        store.add_message(tag, bad)
    with pytest.raises(ValueError, match="not JSON"):
        store.set_messages(tag, [_msg("fine"), bad])
    assert store.get_messages(tag) == []


@pytest.mark.parametrize("key", ["", "k" * 257])
def test_a_key_nexusd_cannot_hold_is_its_bad_request(store: NexusChatStore, key: str) -> None:
    with pytest.raises(BadRequest):
        store.add_message(key, _msg("x"))


# ── paging, set_messages' order, cancellation ─────────────────────────────
def test_reads_and_deletes_page_by_the_protocols_most(store: NexusChatStore, tag: str) -> None:
    n = llamaindex.PAGE + 3
    with Client(store._link.blocking.socket_path) as c:
        c.set_retention(tag, max_messages=0)  # the daemon keeps 500 a session by default
        c.append_many([("user", f"{i}") for i in range(llamaindex.PAGE)], session_tag=tag)
        c.append_many([("user", f"{i}") for i in range(llamaindex.PAGE, n)], session_tag=tag)
    got = store.get_messages(tag)
    assert [m.content for m in got] == [str(i) for i in range(n)]
    assert store.delete_message(tag, llamaindex.PAGE + 1) == _msg(str(llamaindex.PAGE + 1))
    assert store.delete_message(tag, -(n - 1)) == _msg("0")
    deleted = store.delete_messages(tag)
    assert deleted is not None and len(deleted) == n - 2 and store.get_messages(tag) == []


def test_small_pages_give_the_same_answers(
    store: NexusChatStore, tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nexusd.integrations import link

    monkeypatch.setattr(llamaindex, "PAGE", 3)  # ids per delete
    monkeypatch.setattr(link, "PAGE", 3)  # messages per history request
    oracle = SimpleChatStore()
    msgs = [_msg(f"p{i}") for i in range(11)]
    for s in (store, oracle):
        s.set_messages(tag, list(msgs))
    for idx in [0, 2, 3, 5, 9, 10, -1, -3, -4, -9, -10, 20, -30]:
        assert _outcome(store.delete_message, tag, idx) == _outcome(
            oracle.delete_message, tag, idx
        ), idx
        assert store.get_messages(tag) == oracle.get_messages(tag)
    store.set_messages(tag, list(msgs))  # the old ones go in deletes of 3 ids
    assert store.get_messages(tag) == msgs


def test_set_messages_appends_before_it_deletes(store: NexusChatStore, tag: str) -> None:
    """Stopped between its two writes (a crash), set_messages leaves old and new, never neither."""
    store.set_messages(tag, [_msg("old1"), _msg("old2")])
    plan = llamaindex._set(tag, [llamaindex._record(_msg("new"))])
    client = store._link.blocking
    fn, args, kwargs = plan.send(None)
    assert fn is Client.append_many
    fn(client, *args, **kwargs)
    plan.close()  # the process dies here
    assert store.get_messages(tag) == [_msg("old1"), _msg("old2"), _msg("new")]
    store.set_messages(tag, [_msg("new")])
    assert store.get_messages(tag) == [_msg("new")]


def test_two_set_messages_at_once_leave_one_set_whole(store: NexusChatStore, tag: str) -> None:
    """Each deletes what is older than its own set: the set appended last wins, as in a dict."""
    store.set_messages(tag, [_msg("old")])
    a = llamaindex._set(tag, [llamaindex._record(_msg(f"A{i}")) for i in range(3)])
    b = llamaindex._set(tag, [llamaindex._record(_msg(f"B{i}")) for i in range(3)])
    client = store._link.blocking

    def step(plan: Any, sent: Any) -> Any:
        fn, args, kwargs = plan.send(sent)
        return fn(client, *args, **kwargs)

    # Interleaved: A appends, B appends, then each reads and deletes what is older.
    got_a, got_b = step(a, None), step(b, None)
    for plan, got in ((a, got_a), (b, got_b)):
        with pytest.raises(StopIteration):
            while True:
                got = step(plan, got)
    assert [m.content for m in store.get_messages(tag)] == ["B0", "B1", "B2"]


def test_an_insert_keeps_what_retention_would_keep(
    store: NexusChatStore, tag: str, shared_daemon: Daemon
) -> None:
    # 400 messages under the default max_messages of 500: an insert must not push
    # older ones out on the way (appending copies first would hold 700 at once).
    store.set_messages(tag, [_msg(f"m{i}") for i in range(400)])
    store.add_message(tag, _msg("INSERTED"), idx=100)
    got = [m.content for m in store.get_messages(tag)]
    assert len(got) == 401 and got[99:102] == ["m99", "INSERTED", "m100"] and got[0] == "m0"


def test_a_cancelled_set_messages_still_finishes(shared_daemon: Daemon, tag: str) -> None:
    async def main() -> None:
        async with AsyncClient(shared_daemon.socket) as ac:
            store = NexusChatStore(client=ac)
            await store.aset_messages(tag, [_msg(f"old{i}") for i in range(50)])
            new = [_msg(f"new{i}") for i in range(50)]
            task = asyncio.create_task(store.aset_messages(tag, new))
            await asyncio.sleep(0)  # it has started: its first call is on the way
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await store.aget_messages(tag) == new

    asyncio.run(main())


# ── LlamaIndex's chat memory and chat engine ──────────────────────────────
TURN = textwrap.dedent(
    """
    import sys
    from llama_index.core.chat_engine import SimpleChatEngine
    from llama_index.core.llms import MockLLM
    from llama_index.core.memory import ChatMemoryBuffer
    from nexusd.integrations.llamaindex import NexusChatStore

    store = NexusChatStore(socket=sys.argv[1])
    memory = ChatMemoryBuffer.from_defaults(chat_store=store, chat_store_key=sys.argv[2])
    engine = SimpleChatEngine.from_defaults(llm=MockLLM(), memory=memory)
    print(engine.chat(sys.argv[3]).response)
    store.close()
    """
)


def test_chat_engines_share_memory_across_processes(shared_daemon: Daemon, tag: str) -> None:
    sock = str(shared_daemon.socket)
    first = subprocess.run(
        [sys.executable, "-c", TURN, sock, tag, "my name is Ada"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert first.returncode == 0, first.stderr
    store = NexusChatStore(socket=sock)
    llm = MockLLMWithChatMemoryOfLastCall(max_tokens=None)
    memory = ChatMemoryBuffer.from_defaults(chat_store=store, chat_store_key=tag)
    engine = SimpleChatEngine.from_defaults(llm=llm, memory=memory)
    engine.chat("what is my name?")
    seen = [(m.role.value, m.content) for m in llm.last_chat_messages or []]
    answer = first.stdout.removesuffix("\n")
    assert seen[-3:-1] == [("user", "my name is Ada"), ("assistant", answer)]
    assert seen[-1] == ("user", "what is my name?")
    asyncio.run(engine.achat("and again?"))
    roles = [m.role.value for m in store.get_messages(tag)]
    assert roles == ["user", "assistant"] * 3
    engine.reset()
    assert store.get_messages(tag) == []
    store.close()


def test_summary_memory_rewrites_through_the_store(store: NexusChatStore, tag: str) -> None:
    memory = ChatSummaryMemoryBuffer.from_defaults(
        llm=MockLLM(max_tokens=5), chat_store=store, chat_store_key=tag, token_limit=20
    )
    for i in range(6):
        memory.put(_msg(f"question number {i} " * 3))
        memory.put(_msg(f"answer number {i} " * 3, "assistant"))
    history = memory.get()
    assert (
        history[0].role == MessageRole.SYSTEM and history[0].content == "text text text text text"
    )
    assert store.get_messages(tag) == history
    assert NexusChatStore(socket=store._link.blocking.socket_path).get_messages(tag) == history


class ReActLLM(MockLLM):
    """A model that answers every ReAct prompt at once, and keeps the prompts it saw."""

    prompts: list[str] = Field(default_factory=list)
    ANSWER: ClassVar[str] = "Thought: I can answer without any tools.\nAnswer: hello Ada"

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self.prompts.append(prompt)
        return CompletionResponse(text=self.ANSWER)

    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        self.prompts.append(prompt)
        yield CompletionResponse(text=self.ANSWER, delta=self.ANSWER)


# LlamaIndex's agent workflow warns of its own deprecated calls (ctx.is_running, __fields__).
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_agent_remembers_through_the_store(store: NexusChatStore, tag: str) -> None:
    async def turn(text: str) -> ReActLLM:
        llm = ReActLLM(max_tokens=None)
        memory = ChatMemoryBuffer.from_defaults(chat_store=store, chat_store_key=tag)
        answer = await ReActAgent(tools=[], llm=llm).run(text, memory=memory)
        assert str(answer) == "hello Ada"
        return llm

    asyncio.run(turn("my name is Ada"))
    second = asyncio.run(turn("who am I?"))  # a new agent and memory: only the store is shared
    assert "my name is Ada" in second.prompts[0]
    assert [(m.role.value, m.content) for m in store.get_messages(tag)] == [
        ("user", "my name is Ada"),
        ("assistant", ReActLLM.ANSWER),
        ("user", "who am I?"),
        ("assistant", ReActLLM.ANSWER),
    ]


# ── several writers ───────────────────────────────────────────────────────
WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from llama_index.core.llms import ChatMessage
    from nexusd.integrations.llamaindex import NexusChatStore

    store = NexusChatStore(socket=sys.argv[1])
    key, name, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
    print("ready", flush=True)
    sys.stdin.readline()  # go
    for i in range(n):
        m = ChatMessage(role="user", content=f"{name}-{i}")
        if i % 2:
            asyncio.run(store.async_add_message(key, m))
        else:
            store.add_message(key, m)
    store.close()
    """
)


def test_two_processes_adding_to_one_key_lose_nothing(shared_daemon: Daemon, tag: str) -> None:
    n = 60
    ran = together(
        *(
            [sys.executable, "-c", WRITER, str(shared_daemon.socket), tag, name, str(n)]
            for name in "ab"
        )
    )
    for rc, _, err in ran:
        assert rc == 0, err
    got = [m.content for m in NexusChatStore(socket=shared_daemon.socket).get_messages(tag)]
    assert len(got) == 2 * n
    for name in ("a", "b"):
        assert [c for c in got if c and c.startswith(name)] == [f"{name}-{i}" for i in range(n)]


def test_an_index_or_message_of_the_wrong_type_is_refused_first(
    store: NexusChatStore, tag: str
) -> None:
    store.set_messages(tag, [_msg("a"), _msg("b")])
    for bad in ("1", True):
        with pytest.raises(TypeError, match="idx is an int"):
            store.delete_message(tag, bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="idx is an int"):
            store.add_message(tag, _msg("c"), idx=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a ChatMessage, not str"):
        store.add_message(tag, "hello")  # type: ignore[arg-type]
    assert store.get_messages(tag) == [_msg("a"), _msg("b")]
