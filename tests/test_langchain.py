"""The LangChain adapter against a real daemon and the real langchain-core.

Every message type round-trips (sync and async), a batch is one atomic,
ordered ``append_many``, a long session is read back across pages, a message
another tool wrote reads back as a plain one, a real ``RunnableWithMessageHistory``
over a fake chat model sees its earlier turns, and two processes share one
session without losing a message (writing it directly, and each through a
``RunnableWithMessageHistory`` with ``history_messages_key``).
"""

from __future__ import annotations

import sys
import textwrap
import warnings
from typing import Any

import anyio
import pytest

from tests.conftest import Daemon, need, together

need("langchain_core", "langchain")

from langchain_core.chat_history import BaseChatMessageHistory  # noqa: E402
from langchain_core.language_models.fake_chat_models import FakeListChatModel  # noqa: E402
from langchain_core.messages import (  # noqa: E402
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    message_to_dict,
)
from langchain_core.prompt_values import PromptValue  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder  # noqa: E402
from langchain_core.runnables import RunnableLambda  # noqa: E402
from langchain_core.runnables.history import RunnableWithMessageHistory  # noqa: E402

from nexusd import AsyncClient, BadRequest, Client  # noqa: E402
from nexusd.integrations.langchain import PAGE, NexusChatMessageHistory  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the adapter's Link is asyncio's (to_thread, settled writes)


@pytest.fixture
def history(shared_daemon: Daemon, tag: str) -> Any:
    h = NexusChatMessageHistory(tag, socket=shared_daemon.socket)
    yield h
    h.close()


def every_type() -> list[BaseMessage]:
    return [
        SystemMessage("You are terse.", id="s-1"),
        HumanMessage("What is 2+2?", id="h-1", additional_kwargs={"lang": "en", "n": [1, 2]}),
        AIMessage(
            "",
            id="a-1",
            tool_calls=[{"name": "add", "args": {"a": 2, "b": 2}, "id": "call-1"}],
            invalid_tool_calls=[
                {"name": "mul", "args": "{not json", "id": "call-2", "error": "bad JSON"}
            ],
            usage_metadata={
                "input_tokens": 12,
                "output_tokens": 7,
                "total_tokens": 19,
                "input_token_details": {"cache_read": 3},
            },
            response_metadata={"model_name": "fake-1", "finish_reason": "tool_calls"},
            additional_kwargs={"refusal": None},
        ),
        ToolMessage("4", tool_call_id="call-1", status="success", artifact={"raw": [4, 4.0]}),
        ToolMessage("no such tool", tool_call_id="call-2", status="error", name="mul"),
        AIMessage([{"type": "text", "text": "4"}], id="a-2", name="bot"),
        ChatMessage(role="critic", content="Correct.", id="c-1"),
        FunctionMessage(name="legacy", content="{}"),
        AIMessageChunk(content="partial", id="a-3"),
    ]


def same(got: list[BaseMessage], want: list[BaseMessage]) -> None:
    assert [type(m) for m in got] == [type(m) for m in want]
    assert got == want
    assert [message_to_dict(m) for m in got] == [message_to_dict(m) for m in want]


def roles(socket: object, tag: str) -> list[str]:
    with Client(socket) as c:  # type: ignore[arg-type]
        return [m.role for m in c.get_history(tag, 10_000)]


# ── round trips ──────────────────────────────────────────────────────────────
def test_every_message_type_round_trips_sync(
    history: NexusChatMessageHistory, shared_daemon: Daemon, tag: str
) -> None:
    assert history.messages == []
    history.add_messages(every_type())
    same(history.messages, every_type())
    # One nexusd message each, its role the message's type: what `nexusd history` shows.
    assert roles(shared_daemon.socket, tag) == [m.type for m in every_type()]
    # A second reader (another history object, as another process would be) agrees.
    with NexusChatMessageHistory(tag, socket=shared_daemon.socket) as other:
        same(other.messages, every_type())


@pytest.mark.anyio
async def test_every_message_type_round_trips_async(
    history: NexusChatMessageHistory, tag: str
) -> None:
    assert await history.aget_messages() == []
    await history.aadd_messages(every_type())
    same(await history.aget_messages(), every_type())


def test_unicode_and_injection_looking_strings(history: NexusChatMessageHistory) -> None:
    texts = [
        "'; DROP TABLE nexus_messages; --",
        'Robert"); DELETE FROM x; --',
        "nul\u0000inside",
        "emoji \U0001f680\U0001f469\u200d\U0001f4bb",
        "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",  # RTL: Arabic, Hebrew
        "lone \ud800 surrogate",
        "{not json",
        '{"type": "human"}',
        "",
    ]
    msgs: list[BaseMessage] = [HumanMessage(t) for t in texts]
    msgs.append(
        AIMessage(
            texts[0],
            tool_calls=[{"name": "q", "args": {t: t for t in texts}, "id": texts[2]}],
            response_metadata={"k": texts},
            additional_kwargs={texts[3]: texts[5]},
        )
    )
    history.add_messages(msgs)
    same(history.messages, msgs)


# ── batches ──────────────────────────────────────────────────────────────────
def test_batch_is_one_ordered_append(
    history: NexusChatMessageHistory, shared_daemon: Daemon, tag: str
) -> None:
    batch = [HumanMessage(f"q{i}") if i % 2 else AIMessage(f"a{i}") for i in range(50)]
    history.add_messages(batch)
    history.add_messages([])  # nothing to send: no call, no error
    history.add_message(HumanMessage("last"))
    history.add_user_message("user text")
    same(history.messages, [*batch, HumanMessage("last"), HumanMessage("user text")])
    with Client(shared_daemon.socket) as c:
        ids = [m.id for m in c.get_history(tag, 100)]
    assert ids[:50] == list(range(ids[0], ids[0] + 50))  # one append_many: consecutive ids


def test_a_failing_batch_stores_nothing(
    history: NexusChatMessageHistory, shared_daemon: Daemon, tag: str
) -> None:
    history.add_messages([HumanMessage("kept")])
    too_big = HumanMessage("x" * (1024 * 1024 + 1))  # over the daemon's max_content
    with pytest.raises(BadRequest, match="content"):
        history.add_messages([HumanMessage("a"), AIMessage("b"), too_big])
    not_json = ToolMessage("r", tool_call_id="t", artifact=object())
    with pytest.raises(TypeError, match=r"messages\[1\] \(tool\) cannot be stored as JSON"):
        history.add_messages([HumanMessage("a"), not_json])
    with pytest.raises(ValueError, match=r"messages\[0\] \(ai\)"):
        history.add_messages([AIMessage("nan", response_metadata={"score": float("nan")})])
    with pytest.raises(TypeError, match=r"messages\[1\] is a str"):
        history.add_messages([HumanMessage("a"), "plain text"])  # type: ignore[list-item]
    # More than the session keeps (the daemon's max_messages, 500 by default) ...
    with pytest.raises(BadRequest, match="max_messages"):
        history.add_messages([HumanMessage(str(i)) for i in range(501)])
    # ... or than one append_many takes, in a session that keeps everything.
    with Client(shared_daemon.socket) as c:
        c.set_retention(tag, max_messages=0)
    with pytest.raises(BadRequest, match="10000"):
        history.add_messages([HumanMessage(str(i)) for i in range(PAGE + 1)])
    assert history.messages == [HumanMessage("kept")]


@pytest.mark.anyio
async def test_a_failing_async_batch_stores_nothing(history: NexusChatMessageHistory) -> None:
    with pytest.raises(BadRequest):
        await history.aadd_messages([HumanMessage("a"), HumanMessage("x" * (1024 * 1024 + 1))])
    assert await history.aget_messages() == []


def test_messages_span_more_than_one_page(
    history: NexusChatMessageHistory, shared_daemon: Daemon, tag: str
) -> None:
    assert PAGE == 10_000  # the protocol's most per history request
    with Client(shared_daemon.socket) as c:
        c.set_retention(tag, max_messages=0)  # keep them all (the default keeps 500)
    total = PAGE + 7
    sent = [HumanMessage(f"m{i}") for i in range(total)]
    history.add_messages(sent[:PAGE])
    history.add_messages(sent[PAGE:])
    got = history.messages
    assert len(got) == total  # more than one request can return: it paged
    assert [m.content for m in got] == [m.content for m in sent]
    assert [m.content for m in anyio.run(history.aget_messages)] == [m.content for m in sent]


# ── other tools' messages ────────────────────────────────────────────────────
def test_a_foreign_message_reads_back_plain(
    history: NexusChatMessageHistory, shared_daemon: Daemon, tag: str
) -> None:
    r = shared_daemon.cli("append", "--session", tag, "user", "hello")
    assert r.returncode == 0, r.stderr
    with Client(shared_daemon.socket) as c:
        for role, content in [
            ("assistant", "hi there"),
            ("ai", "from ai"),
            ("human", "from human"),
            ("system", "be nice"),
            ("tool", "42"),
            ("critic", "meh"),
            ("user", '{"role": "user", "content": "an Agents SDK item"}'),
            ("ai", '{"type": "no-such-type", "data": {"content": "x"}}'),
            ("tool", '{"type": "tool", "data": {"content": "no tool_call_id"}}'),
            ("user", "[1, 2]"),
        ]:
            c.append(role, content, session_tag=tag)
    history.add_messages([AIMessage("ours", id="o-1")])
    same(
        history.messages,
        [
            HumanMessage("hello"),
            AIMessage("hi there"),
            AIMessage("from ai"),
            HumanMessage("from human"),
            SystemMessage("be nice"),
            ChatMessage(role="tool", content="42"),
            ChatMessage(role="critic", content="meh"),
            # JSON that no adapter marked as its record: read as the text it is.
            HumanMessage('{"role": "user", "content": "an Agents SDK item"}'),
            AIMessage('{"type": "no-such-type", "data": {"content": "x"}}'),
            ChatMessage(
                role="tool", content='{"type": "tool", "data": {"content": "no tool_call_id"}}'
            ),
            HumanMessage("[1, 2]"),
            AIMessage("ours", id="o-1"),
        ],
    )


# ── cancellation ─────────────────────────────────────────────────────────────
@pytest.mark.anyio
@pytest.mark.parametrize("over", ["thread", "async_client"])
async def test_a_cancelled_add_is_finished_first(
    shared_daemon: Daemon, tag: str, over: str
) -> None:
    import asyncio

    async def scenario(h: NexusChatMessageHistory) -> None:
        batch = [HumanMessage("q"), AIMessage("a"), HumanMessage("q2")]
        task = asyncio.ensure_future(h.aadd_messages(batch))
        await asyncio.sleep(0)  # let it send (a turn of the loop, not a wait for time)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The cancellation was raised once the write had its answer: all of it is stored.
        same(await h.aget_messages(), batch)

    if over == "thread":
        with NexusChatMessageHistory(tag, socket=shared_daemon.socket) as h:
            await scenario(h)
    else:
        async with AsyncClient(shared_daemon.socket) as c:
            await scenario(NexusChatMessageHistory(tag, client=c))


# ── clear, and both APIs on one session ─────────────────────────────────────
@pytest.mark.anyio
async def test_sync_and_async_share_a_session(
    history: NexusChatMessageHistory, shared_daemon: Daemon, tag: str
) -> None:
    history.add_messages([HumanMessage("sync 1")])
    await history.aadd_messages([AIMessage("async 1")])
    history.add_message(HumanMessage("sync 2"))
    want = [HumanMessage("sync 1"), AIMessage("async 1"), HumanMessage("sync 2")]
    same(history.messages, want)
    same(await history.aget_messages(), want)
    await history.aclear()
    assert history.messages == []
    history.add_messages(want)
    history.clear()
    assert await history.aget_messages() == []
    assert roles(shared_daemon.socket, tag) == []


@pytest.mark.anyio
async def test_an_async_client_passed_in(shared_daemon: Daemon, tag: str) -> None:
    async with AsyncClient(shared_daemon.socket) as c:
        h = NexusChatMessageHistory(tag, client=c)
        await h.aadd_messages(every_type())
        same(await h.aget_messages(), every_type())
        same(h.messages, every_type())  # sync: a blocking client of the same socket
        await h.aclear()
        assert await h.aget_messages() == []
        h.close()
        assert await c.message_count(tag) == 0  # still open: it is the caller's


def test_client_argument_errors(shared_daemon: Daemon, tag: str) -> None:
    with pytest.raises(TypeError, match=r"nexusd\.integrations\.langchain: client= .* not str"):
        NexusChatMessageHistory(tag, client="nope")  # type: ignore[arg-type]
    with Client(shared_daemon.socket) as c:
        with pytest.raises(TypeError, match="not both"):
            NexusChatMessageHistory(tag, socket=shared_daemon.socket, client=c)
        h = NexusChatMessageHistory(tag, client=c)
        h.add_messages([HumanMessage("x")])
        h.close()
        assert c.message_count(tag) == 1  # a blocking client passed in stays open too
    with pytest.raises(TypeError, match=r"session_id .* not int"):
        NexusChatMessageHistory(42, socket=shared_daemon.socket)  # type: ignore[arg-type]
    for bad, n in [("", 0), ("x" * 257, 257)]:  # refused before any call
        with pytest.raises(
            ValueError, match=rf"session_id must be 1 to 256 characters .* not {n}$"
        ):
            NexusChatMessageHistory(bad, socket=shared_daemon.socket)


# ── LangChain's own runnable over it ─────────────────────────────────────────
def _chain(client: Client, seen: list[list[BaseMessage]], answers: list[str]) -> Any:
    def remember(prompt: PromptValue) -> PromptValue:
        seen.append(prompt.to_messages())  # what the model is shown
        return prompt

    model = FakeListChatModel(responses=answers)
    # The keyed form (history under its own key): the unkeyed one loses human
    # messages when another process writes the session between read and store
    # (test_two_processes_share_a_runnable_session).
    prompt = ChatPromptTemplate.from_messages(
        [MessagesPlaceholder("history"), ("human", "{question}")]
    )
    # RunnableWithMessageHistory makes a history per call: they share one client.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chain = RunnableWithMessageHistory(
            prompt | RunnableLambda(remember) | model,
            lambda sid: NexusChatMessageHistory(sid, client=client),
            input_messages_key="question",
            history_messages_key="history",
        )
    # langchain-core >= 1.3.3 says RunnableWithMessageHistory is deprecated; that
    # warning is LangChain's and about LangChain's class, never one of ours.
    for w in caught:
        assert "RunnableWithMessageHistory" in str(w.message), w
    return chain


def test_runnable_with_message_history_sees_earlier_turns(shared_daemon: Daemon, tag: str) -> None:
    seen: list[list[BaseMessage]] = []
    with Client(shared_daemon.socket) as client:
        chain = _chain(client, seen, ["Hello, Ada.", "You are Ada."])
        cfg: Any = {"configurable": {"session_id": tag}}
        first = chain.invoke({"question": "I am Ada."}, config=cfg)
        second = chain.invoke({"question": "Who am I?"}, config=cfg)
        assert second.content == "You are Ada."
        assert [(m.type, m.content) for m in seen[1]] == [
            ("human", "I am Ada."),
            ("ai", "Hello, Ada."),
            ("human", "Who am I?"),
        ]
        stored = NexusChatMessageHistory(tag, client=client).messages
        same(stored, [HumanMessage("I am Ada."), first, HumanMessage("Who am I?"), second])


@pytest.mark.anyio
async def test_runnable_with_message_history_async(shared_daemon: Daemon, tag: str) -> None:
    seen: list[list[BaseMessage]] = []
    with Client(shared_daemon.socket) as client:
        chain = _chain(client, seen, ["one", "two"])
        cfg: Any = {"configurable": {"session_id": tag}}
        first = await chain.ainvoke({"question": "a"}, config=cfg)
        second = await chain.ainvoke({"question": "b"}, config=cfg)
        assert [m.content for m in seen[1]] == ["a", "one", "b"]
        got = await NexusChatMessageHistory(tag, client=client).aget_messages()
        same(got, [HumanMessage("a"), first, HumanMessage("b"), second])


# ── deprecation ──────────────────────────────────────────────────────────────
def test_no_deprecation_warning_from_the_adapter(shared_daemon: Daemon, tag: str) -> None:
    # langchain-core 1.6.4 marks BaseChatMessageHistory deprecated, but warns
    # only for direct instances of its own classes; the adapter adds none.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with NexusChatMessageHistory(tag, socket=shared_daemon.socket) as h:
            h.add_messages([HumanMessage("x")])
            assert len(h.messages) == 1
            h.clear()
    assert [str(w.message) for w in caught] == []
    marked = getattr(BaseChatMessageHistory, "__deprecated__", None)
    assert marked is None or isinstance(marked, str)  # PEP 702 marker on >= 1.6.4


# ── two processes, one session ──────────────────────────────────────────────
WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from nexusd.integrations.langchain import NexusChatMessageHistory

    sock, tag, who, mode = sys.argv[1:5]
    h = NexusChatMessageHistory(tag, socket=sock)
    h.messages  # connected before the start signal
    print("ready", flush=True)
    sys.stdin.readline()

    def batch(i):
        return [HumanMessage(f"{who}.{i}.q"), AIMessage(f"{who}.{i}.a"),
                ToolMessage(f"{who}.{i}.t", tool_call_id=f"{who}{i}")]

    async def run_async():
        for i in range(100):
            await h.aadd_messages(batch(i))

    if mode == "async":
        asyncio.run(run_async())
    else:
        for i in range(100):
            h.add_messages(batch(i))
    h.close()
    print("done", flush=True)
    """
)


def test_two_processes_write_one_session(
    history: NexusChatMessageHistory, shared_daemon: Daemon, tag: str
) -> None:
    with Client(shared_daemon.socket) as c:
        c.set_retention(tag, max_messages=0)  # 600 messages: more than the default keeps
    ran = together(
        *(
            [sys.executable, "-c", WRITER, str(shared_daemon.socket), tag, who, mode]
            for who, mode in [("A", "sync"), ("B", "async")]
        )
    )
    for rc, out, err in ran:
        assert rc == 0 and out == "done\n" and err == "", err
    got = [m.content for m in history.messages]
    assert len(got) == 600  # nothing lost
    for who in "AB":
        mine = [c for c in got if isinstance(c, str) and c.startswith(f"{who}.")]
        assert mine == [f"{who}.{i}.{k}" for i in range(100) for k in "qat"]  # in order
    # Each batch is one append_many: its three messages are never interleaved.
    for i in range(0, 600, 3):
        assert [str(c).rsplit(".", 1)[0] for c in got[i : i + 3]] == [
            str(got[i]).rsplit(".", 1)[0]
        ] * 3


RUNNER = textwrap.dedent(
    """
    import sys, warnings
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
    from langchain_core.runnables.history import RunnableWithMessageHistory
    from nexusd import Client
    from nexusd.integrations.langchain import NexusChatMessageHistory

    sock, tag, who, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    warnings.simplefilter("ignore", DeprecationWarning)  # LangChain's, about its class
    client = Client(sock)
    model = FakeListChatModel(responses=[f"{who}.{i}.a" for i in range(n)])
    prompt = ChatPromptTemplate.from_messages(
        [MessagesPlaceholder("history"), ("human", "{question}")]
    )
    chain = RunnableWithMessageHistory(
        prompt | model,
        lambda sid: NexusChatMessageHistory(sid, client=client),
        input_messages_key="question",
        history_messages_key="history",
    )
    client.ping()  # connected before the start signal
    print("ready", flush=True)
    sys.stdin.readline()
    cfg = {"configurable": {"session_id": tag}}
    for i in range(n):
        chain.invoke({"question": f"{who}.{i}.q"}, config=cfg)
    client.close()
    print("done", flush=True)
    """
)


def test_two_processes_share_a_runnable_session(
    history: NexusChatMessageHistory, shared_daemon: Daemon, tag: str
) -> None:
    # Each turn reads the session, then stores its question and answer; the
    # other process writes in between.  Keyed, every turn is stored whole.
    n = 30
    ran = together(
        *(
            [sys.executable, "-c", RUNNER, str(shared_daemon.socket), tag, who, str(n)]
            for who in "AB"
        )
    )
    for rc, out, err in ran:
        assert rc == 0 and out == "done\n" and err == "", err
    got = [(m.type, m.content) for m in history.messages]
    assert len(got) == 2 * n * 2, f"{len(got)} of {2 * n * 2} stored"
    for who in "AB":
        assert [c for t, c in got if t == "human" and str(c).startswith(f"{who}.")] == [
            f"{who}.{i}.q" for i in range(n)
        ]
        assert [c for t, c in got if t == "ai" and str(c).startswith(f"{who}.")] == [
            f"{who}.{i}.a" for i in range(n)
        ]
    # A turn is one add_messages (one append_many): its answer follows its question.
    for i in range(0, len(got), 2):
        assert got[i][0] == "human" and got[i + 1] == ("ai", str(got[i][1])[:-1] + "a")
