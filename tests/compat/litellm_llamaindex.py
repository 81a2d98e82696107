"""LiteLLM and LlamaIndex against a real host, run as a script in a venv of their own.

    python -m venv /tmp/compat --system-site-packages
    /tmp/compat/bin/pip install litellm llama-index-llms-openai-like
    /tmp/compat/bin/python tests/compat/litellm_llamaindex.py

Both pin ``openai`` below 3, while the suite's own openai SDK tests run the current SDK, so they
cannot share the suite's environment. Each check asserts what a user of that framework relies
on: chat, streaming, pydantic structured output, tool calls, ``n``, embeddings.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from llm_magic import ApiHost

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


class City(BaseModel):
    name: str
    country: str


def check_litellm(base: str, token: str) -> None:
    import litellm

    ask = dict(model="openai/gpt-4o", api_base=base, api_key=token, max_tokens=60)
    hi = [{"role": "user", "content": "Say hi."}]
    assert litellm.completion(messages=hi, **ask).choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in litellm.completion(messages=hi, stream=True, **ask))
    r = litellm.completion(messages=[{"role": "user", "content": "A city in France."}], response_format=City, **ask)
    City.model_validate_json(r.choices[0].message.content)
    r = litellm.completion(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                           tool_choice="required", **ask)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    r = litellm.completion(messages=[{"role": "user", "content": "Name an animal."}], n=2, temperature=1.0, **ask)
    assert [c.index for c in r.choices] == [0, 1]
    e = litellm.embedding(model="openai/text-embedding-3-small", input=["hello", "world"], api_base=base, api_key=token)
    assert len(e.data) == 2 and len(e.data[0]["embedding"]) > 0
    print("LiteLLM: chat, stream, pydantic response_format, tool call, n=2, embeddings: ok")


def check_llamaindex(base: str, token: str) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model="smollm2", api_base=base, api_key=token, is_chat_model=True,
                     is_function_calling_model=True, max_tokens=60, temperature=0)
    hi = [ChatMessage(role="user", content="Say hi.")]
    answer = llm.chat(hi).message.content
    assert answer and "".join(c.delta or "" for c in llm.stream_chat(hi)) == answer
    assert llm.complete("One, two,").text

    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    response = llm.chat_with_tools([FunctionTool.from_defaults(fn=get_weather)],
                                   user_msg="What is the weather in Paris?", tool_required=True)
    calls = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert calls[0].tool_name == "get_weather" and "city" in calls[0].tool_kwargs
    assert isinstance(llm.as_structured_llm(City).complete("A city in France.").raw, City)
    print("LlamaIndex: chat, stream_chat, complete, chat_with_tools, as_structured_llm: ok")


if __name__ == "__main__":
    with ApiHost(port=0, token="compat-" + "x" * 24, tunnel="none") as host:
        check_litellm(host.url + "/v1", host.token or "")
        check_llamaindex(host.url + "/v1", host.token or "")
