"""An OpenAI Agents SDK agent whose conversation lives in nexusd. Runs offline.

Start a daemon first (`nexusd serve`), then: `python examples/openai_agents_session.py`.
The model here is a stand-in that answers from the history it is given, so no
API key or network is needed; with a real model, only `model=` changes.
Afterwards, `nexusd history --session example-agents` shows the same items.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agents import Agent, Runner, set_tracing_disabled
from agents.items import ModelResponse
from agents.models.interface import Model
from agents.usage import Usage
from openai.types.responses import ResponseOutputMessage, ResponseOutputText

from nexusd.integrations.openai_agents import NexusSession

set_tracing_disabled(True)  # offline: no traces sent anywhere


class RecallModel(Model):
    """Answers with how many user messages it has seen so far in the conversation."""

    async def get_response(self, system_instructions: Any, input: Any, *a: Any, **k: Any) -> Any:
        items = [{"role": "user", "content": input}] if isinstance(input, str) else input
        asked = [i["content"] for i in items if i.get("role") == "user"]
        text = f"You have said {len(asked)} thing(s); first: {asked[0]!r}."
        part = ResponseOutputText(type="output_text", text=text, annotations=[])
        msg = ResponseOutputMessage(
            id="msg", type="message", role="assistant", status="completed", content=[part]
        )
        return ModelResponse(output=[msg], usage=Usage(), response_id=None)

    def stream_response(self, *a: Any, **k: Any) -> Any:
        raise NotImplementedError("this example does not stream")


async def main() -> None:
    agent = Agent(name="assistant", instructions="Be brief.", model=RecallModel())
    # SQLiteSession("example-agents", "conversations.db") before; one line changes:
    session = NexusSession("example-agents")
    await session.clear_session()  # start the example afresh each time

    first = await Runner.run(agent, "My name is Ada.", session=session)
    print("turn 1:", first.final_output)
    # Another process (or this one, later) picks the conversation up from nexusd.
    second = await Runner.run(agent, "What is my name?", session=session)
    print("turn 2:", second.final_output)

    print("stored in nexusd, oldest first:")
    for item in await session.get_items():
        content = item.get("content")
        if isinstance(content, list):  # an answer: its text parts
            content = " ".join(part.get("text", "") for part in content)
        print(f"  {item.get('role') or item.get('type')}: {content}")
    session.close()


if __name__ == "__main__":
    asyncio.run(main())
