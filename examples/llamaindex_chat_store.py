"""A LlamaIndex chat engine whose memory lives in nexusd (offline: LlamaIndex's MockLLM).

Run with a daemon up (``nexusd serve``; the socket comes from ``$NEXUSD_SOCKET``
or the default path)::

    pip install 'nexusd[llamaindex]'
    python examples/llamaindex_chat_store.py

Two turns go through a chat engine; a second engine, as another process would
make, then reads the same memory back.  ``nexusd history --session
llamaindex-example`` shows the same messages (each one's JSON).
"""

from __future__ import annotations

from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.llms import MockLLM
from llama_index.core.memory import ChatMemoryBuffer

from nexusd.integrations.llamaindex import NexusChatStore

KEY = "llamaindex-example"  # the chat store key is the nexusd session tag


def main() -> None:
    store = NexusChatStore()  # was: SimpleChatStore(), or a SQLite chat store
    try:
        store.delete_messages(KEY)  # start afresh each run
        memory = ChatMemoryBuffer.from_defaults(chat_store=store, chat_store_key=KEY)
        # MockLLM(max_tokens=3) answers "text text text": no network, no API key.
        engine = SimpleChatEngine.from_defaults(llm=MockLLM(max_tokens=3), memory=memory)
        for question in ["Hello! My name is Ada.", "What is my name?"]:
            print(f"user:      {question}")
            print(f"assistant: {engine.chat(question).response}")

        # Another engine (in this process or any other) over the same key sees it all.
        other_store = NexusChatStore()
        other = ChatMemoryBuffer.from_defaults(chat_store=other_store, chat_store_key=KEY)
        print(f"\nkeys in nexusd include {KEY!r}: {KEY in store.get_keys()}")
        print(f"messages stored under {KEY!r}:")
        for message in other.get_all():
            print(f"  {message.role.value:>9}: {message.content}")
        other_store.close()
    finally:
        store.close()


if __name__ == "__main__":
    main()
