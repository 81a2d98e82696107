"""What the openai SDK and frameworks send, against the real host process and the real model:
structured output that always validates, logprobs, lenient model names and fields, model lookup."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import requests
from pydantic import BaseModel

from llm_magic import ApiHost, __version__


class Person(BaseModel):
    name: str
    age: int
    hobbies: list[str]


class City(BaseModel):
    name: str
    country: str


_clients: list = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _clients:
        _clients.pop().close()


def openai_client(host: ApiHost):
    from openai import OpenAI

    _clients.append(OpenAI(base_url=host.url + "/v1", api_key=host.token, max_retries=0))
    return _clients[-1]


def post(host: ApiHost, path: str, body: dict) -> requests.Response:
    return requests.post(host.url + path, json=body, timeout=120, headers={"Authorization": f"Bearer {host.token}"})


def test_openai_parse_with_a_pydantic_model_gives_a_valid_object(host: ApiHost) -> None:
    completion = openai_client(host).chat.completions.parse(
        model="gpt-4o", response_format=Person, temperature=0.7, seed=3, max_tokens=200,
        messages=[{"role": "user", "content": "Invent a person: name, age and hobbies."}])
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person)
    jsonschema.validate(json.loads(completion.choices[0].message.content), Person.model_json_schema())
    assert completion.model == "SmolLM2-135M-Instruct.Q4_1"  # the model that served, not gpt-4o
    assert completion.system_fingerprint == f"llm_magic-{__version__}"


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_always_validates_stream_or_not(host: ApiHost, seed: int) -> None:
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0},
        "coastal": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["old", "new", "big", "small"]}, "maxItems": 3}},
        "required": ["city", "population", "coastal", "tags"], "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": "Describe a city as JSON."}], "max_tokens": 300,
            "temperature": 1.0, "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}}
    answer = post(host, "/v1/chat/completions", body).json()
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), schema)
    stream = openai_client(host).chat.completions.create(**body, model="x", stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), schema)


def test_json_object_on_completions_and_api(host: ApiHost) -> None:
    r = post(host, "/v1/completions", {"prompt": "A JSON object describing a cat:", "max_tokens": 200, "seed": 1,
                                       "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.json()["choices"][0]["text"]), dict)
    r = post(host, "/api", {"inputs": [{"role": "user", "content": "Give me a JSON object with a colour."}],
                            "parameters": {"max_tokens": 200, "seed": 1, "response_format": {"type": "json_object"}}})
    assert isinstance(json.loads(r.json()["answer"]["content"]), dict)


@pytest.mark.parametrize("schema, named", [
    ({"type": "object", "not": {"required": ["a"]}}, "'not'"),
    ({"type": "object", "properties": {"mail": {"type": "string", "format": "email"}}}, "format 'email'"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"$ref": "https://example.com/schema.json"}, "only references inside the schema"),
])
def test_a_schema_the_grammar_cannot_enforce_is_a_400_naming_it(host: ApiHost, schema: dict, named: str) -> None:
    r = post(host, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400 and named in r.json()["error"]["message"], r.text


def test_chat_logprobs_with_the_openai_sdk(host: ApiHost) -> None:
    client = openai_client(host)
    completion = client.chat.completions.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert "".join(t.token for t in content) == completion.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy takes the likeliest
        assert bytes(entry.bytes).decode() == entry.token
    assert 0 < sum(math.exp(t.logprob) for t in content[0].top_logprobs) <= 1.0001
    stream = client.chat.completions.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=3, stream=True)
    streamed = [e.token for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]


def test_n_answers_with_the_openai_sdk_stream_or_not(host: ApiHost) -> None:
    client = openai_client(host)
    ask = dict(model="gpt-4o", messages=[{"role": "user", "content": "Name an animal."}], max_tokens=12,
               temperature=1.0, seed=11, n=3)
    completion = client.chat.completions.create(**ask)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert len({c.message.content for c in completion.choices}) > 1  # three draws, not one thrice
    streamed = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert streamed == {c.index: c.message.content for c in completion.choices}  # same seed, same answers
    texts = openai_client(host).completions.create(model="davinci", prompt="One, two,", max_tokens=4,
                                                   temperature=0, n=2, logprobs=1)
    assert texts.choices[0].text == texts.choices[1].text  # greedy: both the same
    assert "".join(texts.choices[1].logprobs.tokens) == texts.choices[1].text
    assert texts.usage.completion_tokens == 8


def test_completion_logprobs(host: ApiHost) -> None:
    completion = openai_client(host).completions.create(model="davinci", prompt="One, two,", max_tokens=5,
                                                        temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_without_logprobs_answers_carry_none(host: ApiHost) -> None:
    answer = post(host, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).json()
    assert answer["choices"][0]["logprobs"] is None


def test_models_by_id_and_cached_tokens(host: ApiHost) -> None:
    client = openai_client(host)
    model = client.models.retrieve("SmolLM2-135M-Instruct.Q4_1")
    assert model.id == "SmolLM2-135M-Instruct.Q4_1" and model.owned_by == "llm_magic"
    r = requests.get(host.url + "/v1/models/nope", headers={"Authorization": f"Bearer {host.token}"}, timeout=10)
    assert r.status_code == 404 and "GET /v1/models lists them" in r.json()["error"]["message"]
    messages = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "Hi"}]
    client.chat.completions.create(model="m", messages=messages, max_tokens=1)
    again = client.chat.completions.create(model="m", messages=messages, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens - 2


def test_fields_frameworks_send_are_accepted(host: ApiHost) -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]
    r = post(host, "/v1/chat/completions", {
        "model": "gpt-4o", "max_completion_tokens": 3, "reasoning_effort": "low", "audio": None,
        "modalities": ["text"], "verbosity": "low", "prompt_cache_key": "k", "safety_identifier": "s",
        "stream_options": {"include_obfuscation": False, "include_usage": True}, "stream": True,
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                     {"role": "user", "content": "add"}, {"role": "assistant", "content": None, "tool_calls": calls},
                     {"role": "tool", "tool_call_id": "call_1", "content": "3"}, {"role": "user", "content": "thanks"}]})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


def test_context_error_on_v1_names_no_api_field(host: ApiHost) -> None:
    r = post(host, "/v1/completions", {"prompt": "word " * 5000, "max_tokens": 1})
    assert r.status_code == 400 and "ctx_length" not in r.json()["error"]["message"]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))  # the vectors are normalised


def test_embeddings_with_the_openai_sdk(host: ApiHost) -> None:
    client = openai_client(host)
    texts = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly tax filing deadlines."]
    result = client.embeddings.create(model="text-embedding-3-small", input=texts)  # the SDK asks for base64
    vectors = [d.embedding for d in result.data]
    assert len(vectors) == 3 and len(vectors[0]) == 576  # SmolLM2-135M's width
    assert all(abs(cosine(v, v) - 1) < 1e-4 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])  # nearer in meaning
    assert result.usage.prompt_tokens > 10 and result.model == "SmolLM2-135M-Instruct.Q4_1"
    as_floats = client.embeddings.create(model="x", input=texts[0], encoding_format="float").data[0].embedding
    assert as_floats == pytest.approx(vectors[0], abs=1e-6)
    tokens = post(host, "/v1/embeddings", {"input": [[1, 2, 3], [4, 5]]}).json()
    assert [d["index"] for d in tokens["data"]] == [0, 1] and tokens["usage"]["prompt_tokens"] == 5


def test_embeddings_refuse_what_they_cannot_do(host: ApiHost) -> None:
    for body, message in [({"input": []}, "'input' must be"), ({"input": [""]}, "'input[0]' is empty"),
                          ({"input": [[10**9]]}, "not in the model's vocabulary"),
                          ({"input": "x", "encoding_format": "int8"}, "'encoding_format'"),
                          ({"input": "x", "dimensions": 3}, "this model's embeddings have 576"),
                          ({"input": "word " * 5000}, "embedding context holds")]:
        r = post(host, "/v1/embeddings", body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)


def test_client_embed_and_a_separate_embedding_model(model_copy) -> None:
    from llm_magic import Client

    with ApiHost(use_token=False, port=0, extra_args=["--embedding-model", str(model_copy)]) as h:
        client = Client(h.url)
        one = client.embed("hello")
        assert len(one) == 576 and len(client.embed(["a", "b"])) == 2
        assert "copy.Q4_1" in client.models()
        r = requests.post(h.url + "/v1/embeddings", json={"input": "hello"}, timeout=60).json()
        assert r["model"] == "copy.Q4_1"
        assert Client(h.url).chat("Hi", max_tokens=2).model == "SmolLM2-135M-Instruct.Q4_1"


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls_with_the_openai_sdk_stream_or_not(host: ApiHost, tool_choice) -> None:
    client = openai_client(host)
    completion = client.chat.completions.create(model="gpt-4o", messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                                tool_choice=tool_choice, max_tokens=120, temperature=0.7, seed=1,
                                                parallel_tool_calls=False)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    with client.chat.completions.stream(model="gpt-4o", messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                        tool_choice=tool_choice, max_tokens=120, temperature=0.7, seed=2,
                                        parallel_tool_calls=False) as stream:
        final = stream.get_final_completion()  # the SDK's own accumulation of delta.tool_calls
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_a_full_tool_round_trip(host: ApiHost) -> None:
    client = openai_client(host)
    first = client.chat.completions.create(model="m", messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                           tool_choice="required", max_tokens=120, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK_WEATHER, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    final = client.chat.completions.create(model="m", messages=history, tools=[WEATHER_TOOL], tool_choice="none",
                                           max_tokens=60, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
    assert not final.choices[0].message.tool_calls


def test_auto_tool_choice_answers_text_or_a_valid_call(host: ApiHost) -> None:
    for seed in range(3):
        answer = post(host, "/v1/chat/completions", {"messages": ASK_WEATHER, "tools": [WEATHER_TOOL], "seed": seed,
                                                     "max_tokens": 80, "temperature": 1.0}).json()["choices"][0]
        for call in answer["message"].get("tool_calls") or []:
            jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])
        assert answer["message"].get("tool_calls") or answer["message"]["content"]


def test_langchain_structured_output_and_tools() -> None:
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    with ApiHost(use_token=True, port=0) as h:
        llm = ChatOpenAI(base_url=h.url + "/v1", api_key=h.token, model="gpt-4o-mini", temperature=0, max_tokens=150)
        city = llm.with_structured_output(City, method="json_schema").invoke("Name a city and its country.")
        assert isinstance(city, City) and city.name
        bound = llm.bind_tools([add], tool_choice="add")
        message = bound.invoke("What is 2 + 3?")
        call = message.tool_calls[0]
        assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
        result = add.invoke(call["args"])
        final = llm.invoke(["What is 2 + 3?", message, ToolMessage(str(result), tool_call_id=call["id"])])
        assert final.content
        streamed = None
        for chunk in bound.stream("What is 4 + 5?"):
            streamed = chunk if streamed is None else streamed + chunk
        assert streamed.tool_calls[0]["name"] == "add"


def test_responses_api_with_the_openai_sdk(host: ApiHost) -> None:
    client = openai_client(host)
    response = client.responses.create(model="gpt-4o", instructions="Answer briefly.", input="Say hello.",
                                       max_output_tokens=80, temperature=0, store=False)
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.usage.input_tokens > 5 and response.usage.output_tokens <= 80
    assert response.model == "SmolLM2-135M-Instruct.Q4_1"
    deltas, final = [], None
    with client.responses.stream(model="gpt-4o", instructions="Answer briefly.",
                                 input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
                                 max_output_tokens=80, temperature=0) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == response.output_text  # greedy: the same words


def test_responses_structured_output_and_function_calls(host: ApiHost) -> None:
    client = openai_client(host)
    parsed = client.responses.parse(model="m", input="Invent a city.", text_format=City, max_output_tokens=150, temperature=0)
    assert isinstance(parsed.output_parsed, City)
    tool = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
            "parameters": WEATHER_TOOL["function"]["parameters"]}
    response = client.responses.create(model="m", input="Weather in Oslo?", tools=[tool], tool_choice="required",
                                       max_output_tokens=120, temperature=0)
    call = next(item for item in response.output if item.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])
    follow_up = client.responses.create(model="m", max_output_tokens=30, temperature=0, input=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "-3 C and snowing"}])
    assert follow_up.output_text
    with client.responses.stream(model="m", input="Weather in Oslo?", tools=[tool], tool_choice="required",
                                 max_output_tokens=120, temperature=0) as stream:
        final = stream.get_final_response()
    assert {item.type for item in final.output} == {"function_call"}


def test_responses_refuse_state(host: ApiHost) -> None:
    for body in ({"input": "x", "previous_response_id": "resp_1"}, {"input": "x", "store": True}):
        r = post(host, "/v1/responses", body)
        assert r.status_code == 400 and "keeps no state" in r.json()["error"]["message"]


def test_client_structured_output_and_tool_calls(host: ApiHost) -> None:
    from llm_magic import Client

    client = Client(host.url, host.token)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                               "country": {"type": "string", "maxLength": 40}},
              "required": ["name", "country"]}
    answer = client.chat("A city as JSON.", max_tokens=100, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    assert City.model_validate(answer.json()).name
    # greedy: sampled, the tiny model sometimes repeats its call up to the grammar's limit of four
    # (~25 tokens each), past max_tokens
    answer = client.chat("Weather in Rome?", tools=[WEATHER_TOOL], tool_choice="required", max_tokens=100,
                         temperature=0)
    assert answer.finish_reason == "tool_calls" and answer.tool_calls[0]["function"]["name"] == "get_weather"


ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TWO_SUMS = "What is 2 + 3 and what is 4 + 5?"  # greedy, the tiny model calls add(2, 3) then add(4, 5)


def streamed_calls(chunks) -> tuple[str, dict[int, dict], str | None]:
    """Content, tool calls (by index) and finish_reason, put together from chat stream chunks."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


def test_a_tool_call_cut_by_max_tokens_never_shows_the_hosts_format(host: ApiHost) -> None:
    """The issue's case: tool_choice required and 8 tokens, too few for even the call's name."""
    client = openai_client(host)
    ask = dict(model="m", messages=[{"role": "user", "content": "What is 2 + 3?"}], tools=[ADD_TOOL],
               tool_choice="required", max_tokens=8, temperature=0)
    choice = client.chat.completions.create(**ask).choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert not choice.message.content  # it was '{ "tool_calls": [{"'
    content, calls, finish = streamed_calls(client.chat.completions.create(**ask, stream=True))
    assert content == "" and calls == {} and finish == "length"
    response = client.responses.create(model="m", input="What is 2 + 3?", tools=[RESPONSES_ADD], tool_choice="required",
                                       max_output_tokens=8, temperature=0)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert "tool_calls" not in response.output_text and all(item.status == "incomplete" for item in response.output)


RESPONSES_ADD = {"type": "function", "name": "add", "description": "Add two integers",
                 "parameters": ADD_TOOL["function"]["parameters"]}


@pytest.fixture(scope="module")
def cut_in_second_call(host: ApiHost) -> int:
    """A max_tokens that cuts the tiny model's greedy answer to TWO_SUMS inside its second
    call's arguments, found from the tokens of its whole answer."""
    whole = post(host, "/v1/chat/completions", {"messages": [{"role": "user", "content": TWO_SUMS}], "tools": [ADD_TOOL],
                                                "tool_choice": "required", "max_tokens": 200, "temperature": 0,
                                                "logprobs": True}).json()["choices"][0]
    assert [json.loads(c["function"]["arguments"]) for c in whole["message"]["tool_calls"][:2]] == [
        {"a": 2, "b": 3}, {"a": 4, "b": 5}]
    text = ""
    for k, entry in enumerate(whole["logprobs"]["content"], 1):
        text += entry["token"]
        if re.search(r'"arguments".*"arguments": \{\s*"a": 4', text):
            return k
    raise AssertionError(text)


def assert_first_call_kept_and_second_cut(calls: list[tuple[str, str]]) -> None:
    assert len(calls) == 2 and [name for name, _ in calls] == ["add", "add"], calls
    assert json.loads(calls[0][1]) == {"a": 2, "b": 3}
    assert calls[1][1].replace(" ", "") == '{"a":4'  # the arguments so far, as OpenAI sends them cut


def test_a_second_call_cut_by_max_tokens_keeps_the_first(host: ApiHost, cut_in_second_call: int) -> None:
    client = openai_client(host)
    ask = dict(model="m", messages=[{"role": "user", "content": TWO_SUMS}], tools=[ADD_TOOL], tool_choice="required",
               max_tokens=cut_in_second_call, temperature=0)
    choice = client.chat.completions.create(**ask).choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    assert_first_call_kept_and_second_cut([(c.function.name, c.function.arguments) for c in choice.message.tool_calls])
    content, calls, finish = streamed_calls(client.chat.completions.create(**ask, stream=True))
    assert content == "" and finish == "length"
    assert_first_call_kept_and_second_cut([(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)])

    responses = dict(model="m", input=TWO_SUMS, tools=[RESPONSES_ADD], tool_choice="required",
                     max_output_tokens=cut_in_second_call, temperature=0)
    response = client.responses.create(**responses)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in response.output] == ["function_call", "function_call"]
    assert [item.status for item in response.output] == ["completed", "incomplete"]
    assert_first_call_kept_and_second_cut([(item.name, item.arguments) for item in response.output])
    with client.responses.stream(**responses) as stream:
        events = list(stream)  # the SDK's get_final_response() waits for response.completed, as with OpenAI's
    kinds = [event.type for event in events]
    assert kinds[-1] == "response.incomplete" and "response.output_text.delta" not in kinds
    final = events[-1].response
    assert [item.status for item in final.output] == ["completed", "incomplete"]
    assert_first_call_kept_and_second_cut([(item.name, item.arguments) for item in final.output])


def test_langchain_round_trip_with_a_cut_second_call_keeps_the_first(host: ApiHost, cut_in_second_call: int) -> None:
    """A LangChain agent step: the whole call is run, the cut one is reported as invalid, and
    the conversation goes on (before, both came back as text and the whole call was lost)."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = ChatOpenAI(base_url=host.url + "/v1", api_key=host.token, model="gpt-4o-mini", temperature=0,
                     max_tokens=cut_in_second_call, max_retries=0)
    message = llm.bind_tools([add], tool_choice="required").invoke(TWO_SUMS)
    assert message.response_metadata["finish_reason"] == "length" and not message.content
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("add", {"a": 2, "b": 3})]
    assert [c["name"] for c in message.invalid_tool_calls] == ["add"]
    # the arguments so far (LangChain describes the tool in its own words, so its greedy answer
    # may run a token or two past the cut the fixture found for ADD_TOOL; still inside the call)
    cut = message.invalid_tool_calls[0]["args"].replace(" ", "")
    assert cut.startswith('{"a":4') and '{"a":4,"b":5}'.startswith(cut) and cut != '{"a":4,"b":5}'
    call = message.tool_calls[0]
    history = [HumanMessage(TWO_SUMS), message, ToolMessage(str(add.invoke(call["args"])), tool_call_id=call["id"])]
    final = llm.bind(max_tokens=40).invoke(history)
    assert final.content and not final.tool_calls


@pytest.fixture(scope="module")
def token_id(model_path):
    """The model's token id for a piece of text that is one token."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)

    def token(text: str) -> int:
        ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
        assert len(ids) == 1, ids
        return ids[0]

    return token


def test_logit_bias_bans_and_forces_tokens_stream_or_not(host: ApiHost, token_id) -> None:
    client = openai_client(host)
    ask = dict(model="m", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0, logprobs=True)
    first = client.chat.completions.create(**ask).choices[0].logprobs.content[0].token
    banned = client.chat.completions.create(**ask, logit_bias={str(token_id(first)): -100})
    assert banned.choices[0].logprobs.content[0].token != first  # greedy, yet the likeliest token never comes
    cat = str(token_id(" cat"))
    forced = client.completions.create(model="m", prompt="Hello", max_tokens=3, temperature=0, logit_bias={cat: 100})
    assert forced.choices[0].text == " cat cat cat"
    stream = client.completions.create(model="m", prompt="Hello", max_tokens=3, temperature=0.9, seed=4,
                                       logit_bias={cat: 100}, stream=True)  # sampled: the bias still decides
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == " cat cat cat"
    for bias, message in (({"49152": 1}, "not in the model's vocabulary (0 to 49151)"),
                          ({cat: 101}, "from -100 to 100"), ({"cat": 1}, "is not a token id")):
        r = post(host, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": bias})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"].startswith("logit_bias")


def test_models_default_answers_as_the_default_model(host: ApiHost) -> None:
    client = openai_client(host)
    assert client.models.retrieve("default") == client.models.retrieve("SmolLM2-135M-Instruct.Q4_1")


def test_a_list_of_prompts_gets_one_choice_per_prompt_stream_or_not(host: ApiHost) -> None:
    client = openai_client(host)
    prompts = ["One, two,", "Monday, Tuesday,", "A, B, C,", "Red, green,", "Paris is", "Water is"]  # more than slots
    alone = [client.completions.create(model="m", prompt=p, max_tokens=5, temperature=0) for p in prompts]
    together = client.completions.create(model="m", prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in together.choices] == list(range(6))
    assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]  # greedy: the same answers
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert together.usage.completion_tokens == 30
    texts: dict[int, str] = {}
    finished = set()
    for chunk in client.completions.create(model="m", prompt=prompts[:2], max_tokens=5, temperature=0, n=2,
                                           stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
        usage = chunk.usage or None
    # prompt i's choices are i*n .. i*n + n - 1, as OpenAI numbers them
    assert texts == {0: alone[0].choices[0].text, 1: alone[0].choices[0].text,
                     2: alone[1].choices[0].text, 3: alone[1].choices[0].text}
    assert finished == {0, 1, 2, 3} and usage.completion_tokens == 20
    r = post(host, "/v1/completions", {"prompt": ["Hi", "word " * 5000], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_clients_tell_a_context_overflow_from_other_bad_requests(host: ApiHost) -> None:
    """OpenAI's error shape on /v1: the SDK's errors carry OpenAI's string code and the param,
    through LangChain too, so that an agent can tell a history to trim from a bad request."""
    import openai
    from langchain_openai import ChatOpenAI

    client = openai_client(host)
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model="m", messages=long, max_tokens=1)
    assert overflow.value.code == "context_length_exceeded" and "context holds 4096" in overflow.value.message
    with pytest.raises(openai.BadRequestError) as other:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert other.value.code is None and other.value.param == "max_tokens"
    with openai.OpenAI(base_url=host.url + "/v1", api_key="wrong", max_retries=0) as stranger, \
            pytest.raises(openai.AuthenticationError) as refused:
        stranger.models.list()
    assert refused.value.code == "invalid_api_key"
    llm = ChatOpenAI(base_url=host.url + "/v1", api_key=host.token, model="m", max_tokens=1, max_retries=0)
    with pytest.raises(openai.BadRequestError) as through_langchain:
        llm.invoke("word " * 5000)
    assert through_langchain.value.code == "context_length_exceeded"


def test_client_raises_what_the_v1_error_says(host: ApiHost) -> None:
    from llm_magic import Client
    from llm_magic.client.client import _error_from_body, _status_of
    from llm_magic.errors import ContextLengthExceeded, HostBusy, InvalidRequest

    client = Client(host.url, host.token)
    with pytest.raises(ContextLengthExceeded, match="context holds 4096"):  # an InvalidRequest, as before
        client.complete("word " * 5000, max_tokens=1)
    with pytest.raises(InvalidRequest, match="'temperature'"):
        client.chat("x", temperature=9)
    # an error after a keep-alive began the answer comes in a 200's body: its type says what it is
    busy = {"error": {"message": "the host stayed busy", "type": "server_busy", "param": None, "code": "server_busy"}}
    assert isinstance(_error_from_body(_status_of(busy["error"]), busy, host.url), HostBusy)
    assert _status_of({"message": "x", "type": "invalid_request_error", "code": 400}) == 400  # /api's shape
