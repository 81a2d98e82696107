"""Thinking through the real server and the real embedded model: SmolLM2 does not think of its
own, so it is served under a chat template whose generation prompt opens ``<think>``, with a
small budget; the host then closes the block itself and the answer follows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import jsonschema
import openai
import pytest
import requests

from llm_magic.supervisor.host import ApiHost

TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else -%}{{ '<think>\\n' }}{%- endif -%}{%- endif -%}"
)
BUDGET = 8
ASK = [{"role": "user", "content": "Explain in detail why the sky is blue."}]
GREEDY = {"temperature": 0, "max_tokens": 48}


@pytest.fixture(scope="module")
def thinking_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiHost]:
    template = Path(tmp_path_factory.mktemp("template")) / "thinking.jinja"
    template.write_text(TEMPLATE)
    host = ApiHost(use_token=False, port=0, tunnel="none", extra_args=[
        "--chat-template-file", str(template), "--reasoning-budget", str(BUDGET), "--parallel", "1"]).start()
    yield host
    host.stop()


@pytest.fixture(scope="module")
def client(thinking_host: ApiHost) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=thinking_host.url + "/v1", api_key="none") as sdk:
        yield sdk


def test_the_budget_closes_the_block_and_the_answer_follows(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="default", messages=ASK, **GREEDY)
    message = answer.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning.strip() and message.content.strip()
    assert "<think>" not in message.content and "</think>" not in message.content + reasoning
    details = answer.usage.model_extra.get("completion_tokens_details") or answer.usage.completion_tokens_details
    tokens = details["reasoning_tokens"] if isinstance(details, dict) else details.reasoning_tokens
    assert 0 < tokens <= BUDGET

    reasoning_parts, content_parts = [], []
    for chunk in client.chat.completions.create(model="default", messages=ASK, stream=True, **GREEDY):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning_parts.append((delta.model_extra or {}).get("reasoning_content") or "")
            content_parts.append(delta.content or "")
    assert ("".join(reasoning_parts), "".join(content_parts)) == (reasoning, message.content)


def test_a_request_sets_its_own_budget(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="default", messages=ASK, extra_body={"thinking_budget_tokens": 2},
                                            **GREEDY)
    assert answer.usage.completion_tokens_details.reasoning_tokens <= 2
    assert answer.choices[0].message.content.strip()


def test_reasoning_format_none_leaves_it_in_the_content(client: openai.OpenAI) -> None:
    thought = client.chat.completions.create(model="default", messages=ASK, **GREEDY).choices[0].message
    raw = client.chat.completions.create(model="default", messages=ASK, extra_body={"reasoning_format": "none"},
                                         **GREEDY).choices[0].message
    assert "reasoning_content" not in (raw.model_extra or {})
    assert raw.content.lstrip().startswith(thought.model_extra["reasoning_content"])  # no block closed: no budget


def test_a_template_switch_turns_thinking_off(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="default", messages=ASK, **GREEDY,
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert "reasoning_content" not in (answer.choices[0].message.model_extra or {})
    assert answer.choices[0].message.content.strip()


def test_json_schema_after_thinking_validates(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model="default", messages=ASK, temperature=0, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    message = answer.choices[0].message
    assert message.model_extra["reasoning_content"].strip()
    jsonschema.validate(json.loads(message.content), schema)


def test_responses_carry_a_reasoning_item(client: openai.OpenAI) -> None:
    response = client.responses.create(model="default", input=ASK[0]["content"], temperature=0,
                                       max_output_tokens=48)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text.strip() and response.output_text.strip()
    assert 0 < response.usage.output_tokens_details.reasoning_tokens <= BUDGET
    with client.responses.stream(model="default", input=ASK[0]["content"], temperature=0,
                                 max_output_tokens=48) as stream:
        events = list(stream)  # cut by max_output_tokens: it ends with response.incomplete
    kinds = [event.type for event in events]
    assert "response.reasoning_text.delta" in kinds
    done = next(event for event in events if event.type == "response.reasoning_text.done")
    assert done.text == response.output[0].content[0].text
    assert events[-1].response.output_text == response.output_text


def test_api_answers_reasoning_beside_content(thinking_host: ApiHost) -> None:
    body = {"inputs": ASK, "parameters": {"temperature": 0, "max_tokens": 48}}
    answer = requests.post(thinking_host.url + "/api", json=body, timeout=120).json()["answer"]
    assert answer["reasoning_content"].strip() and answer["content"].strip()
    streamed = requests.post(thinking_host.url + "/api", json={**body, "options": {"stream": True}}, stream=True,
                             timeout=120)
    items = [json.loads(line[6:]) for line in streamed.iter_lines(decode_unicode=True)
             if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(i.get("reasoning", "") for i in items) == answer["reasoning_content"]
    assert "".join(i.get("delta", "") for i in items) == answer["content"]


def test_langchain_gets_the_answer_without_the_thinking(thinking_host: ApiHost, closing) -> None:
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=thinking_host.url + "/v1", api_key="none", model="default", temperature=0,
                      max_tokens=48, timeout=120)
    plain = closing(openai.OpenAI(base_url=thinking_host.url + "/v1", api_key="none")).chat.completions.create(
        model="default", messages=ASK, **GREEDY).choices[0].message
    reply = chat.invoke([("user", ASK[0]["content"])])
    assert reply.content == plain.content  # the answer alone: no <think> block, no scratch work
    assert plain.model_extra["reasoning_content"].strip() and "<think>" not in reply.content
    streamed = "".join(str(chunk.content) for chunk in chat.stream([("user", ASK[0]["content"])]))
    assert streamed == plain.content
