"""Adapters that plug nexusd into agent frameworks, each behind an optional extra.

* ``openai_agents.py``: :class:`NexusSession`, a ``Session`` of the OpenAI
  Agents SDK (``pip install 'nexusd[agents]'``).
* ``langchain.py``: :class:`NexusChatMessageHistory`, LangChain's
  ``BaseChatMessageHistory`` (``pip install 'nexusd[langchain]'``).
* ``llamaindex.py``: :class:`NexusChatStore`, LlamaIndex's ``BaseChatStore``
  (``pip install 'nexusd[llamaindex]'``).
* ``link.py``: what they share: the calls over a blocking ``Client`` (in a
  worker thread) or an open ``AsyncClient``, mutations that finish even when
  the caller is cancelled, and each record's JSON text.
* ``extras.py``: importing a framework, or one line naming the extra to install.

Importing :mod:`nexusd` (or this package) imports no framework: only each
adapter module does, when it is imported itself.  They use the public client
only (integrations → client → wire).
"""
