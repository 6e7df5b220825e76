"""A LangChain chat whose history nexusd keeps: two turns, the second sees the first.

Offline: the chat model is LangChain's FakeListChatModel (canned answers), so
no API key or network is needed.  Run it with a daemon running::

    nexusd serve &                      # or: systemctl --user start nexusd
    python examples/langchain_history.py

It prints the conversation, what the model was shown each turn (the history
LangChain read back from nexusd), the stored messages, and then what
``nexusd history`` (another process) shows of the same session.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
import warnings
from typing import Any

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.prompt_values import PromptValue
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory

from nexusd import Client, NexusError
from nexusd.integrations.langchain import NexusChatMessageHistory


def shown(prompt: PromptValue) -> PromptValue:
    """Pass the model's input through, printing it: the history is in it."""
    messages = prompt.to_messages()
    print(f"   (the model is shown {len(messages)} message(s): ", end="")
    print(" | ".join(f"{m.type}: {m.content}" for m in messages) + ")")
    return prompt


def main() -> int:
    session = f"langchain-demo-{uuid.uuid4().hex[:8]}"  # the nexusd session tag
    model = FakeListChatModel(responses=["Nice to meet you, Ada.", "Your name is Ada."])
    try:
        client = Client()  # $NEXUSD_SOCKET, else the default socket
        client.ping()
    except NexusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with client:
        with warnings.catch_warnings():
            # langchain-core >= 1.3.3 says RunnableWithMessageHistory is deprecated
            # in favour of LangGraph persistence; the README's LangChain section
            # says what that means.  Kept quiet here so the demo reads cleanly.
            warnings.simplefilter("ignore", DeprecationWarning)
            # The history goes in under its own key (a MessagesPlaceholder), the
            # question under another: then LangChain stores exactly this turn's
            # question and answer.  Without history_messages_key it re-reads the
            # session after the call and drops as many messages as it had read
            # before, so turns another process stored meanwhile cost human messages.
            prompt = ChatPromptTemplate.from_messages(
                [MessagesPlaceholder("history"), ("human", "{question}")]
            )
            chat = RunnableWithMessageHistory(
                prompt | RunnableLambda(shown) | model,
                # A history per call, all on one client.
                lambda session_id: NexusChatMessageHistory(session_id, client=client),
                input_messages_key="question",
                history_messages_key="history",
            )
        config: Any = {"configurable": {"session_id": session}}
        for question in ["Hi, I am Ada.", "What is my name?"]:
            print(f"you: {question}")
            answer = chat.invoke({"question": question}, config=config)
            print(f"bot: {answer.content}")

        stored = NexusChatMessageHistory(session, client=client).messages
        print(f"\nThe nexusd session {session!r} holds {len(stored)} messages:")
        for m in stored:
            print(f"  {type(m).__name__:>12}: {m.content}")

    print(f"\nAny process on this machine sees them: nexusd history --session {session}")
    cli = subprocess.run(
        [sys.executable, "-m", "nexusd", "history", "--session", session],
        capture_output=True,
        text=True,
        timeout=30,
    )
    print(cli.stdout.rstrip() or cli.stderr.rstrip())
    print(f"(remove it with: nexusd clear --session {session})")
    return cli.returncode


if __name__ == "__main__":
    sys.exit(main())
