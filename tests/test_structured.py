"""Structured outputs: JSON answers and required tool calls enforced by a grammar (xgrammar) on a tiny random model,
which would never write JSON by itself. Every answer must parse and validate against its schema (`jsonschema`, an
independent validator), with thinking off, with a think block closed by the budget, and with the model free to open
one; streamed and not; through generate_batch and through the server."""
import itertools
import json

import httpx
import jsonschema
import openai
import pytest


from nanoqwen import data
from nanoqwen.chat import QWEN3_CHAT_TEMPLATE, OutputParser
from nanoqwen.checkpoint import save_model
from nanoqwen.generation import Engine, generate_batch, make_request
from nanoqwen.generation.grammar import constraint
from nanoqwen.generation.sampling import SamplingParams
from nanoqwen.tokenizer import train_tokenizer
from test_engine import random_model, scripted_model
from test_server import _name, running

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "unit": {"enum": ["celsius", "fahrenheit"]}, "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}},
    "required": ["name", "age", "unit", "ok", "tags"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                             "b": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["a", "b"], "additionalProperties": False}}}]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
# a template that opens the think block in the generation prompt (as Qwen3's thinking-only checkpoints do)
OPENING_TEMPLATE = QWEN3_CHAT_TEMPLATE.replace(
    "{{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}",
    "{{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- else %}\n        {{- '<think>\\n' }}\n    {%- endif %}")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(itertools.islice(data.synthetic_corpus("train", 0), 300), 512)


@pytest.fixture(scope="module")
def model(tok):
    return random_model(vocab_size=tok.vocab_size, max_position_embeddings=1024)


def _prompts(tok, mode: str, n: int = 8) -> list:
    """n chat prompts; mode "budget": the prompt opens the think block (the budget closes it)."""
    messages = [[{"role": "user", "content": f"question {i}"}] for i in range(n)]
    if mode != "budget":
        return messages
    return [tok.apply_chat_template(m, add_generation_prompt=True) + [tok.think_start_id] for m in messages]


MODES = {"off": dict(enable_thinking=False), "budget": dict(thinking_budget=6), "free": dict(thinking_budget=6)}


def _messages(model, tok, mode: str, stream: bool, **options) -> list[dict]:
    """The parsed message of each prompt: from the results, or from the streamed chunks through an OutputParser."""
    prompts = _prompts(tok, mode)
    out = generate_batch(model, tok, prompts, stream=stream, max_new_tokens=160, temperature=1.0, seed=1,
                         **MODES[mode], **options)
    if not stream:
        assert all(r.finish_reason == "stop" for r in out)
        return [{"reasoning_content": r.reasoning_content, "content": r.content, "tool_calls": r.tool_calls}
                for r in out]
    parsers, messages = [OutputParser(thinking=mode == "budget") for _ in prompts], [None] * len(prompts)
    for chunk in out:
        parsers[chunk.index].feed(chunk.text)
        if chunk.result is not None:
            assert chunk.finish_reason == "stop"
            messages[chunk.index] = parsers[chunk.index].finish()[1]
    return messages


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_constrained_answer_parses_and_validates(model, tok, mode, stream):
    for message in _messages(model, tok, mode, stream, response_format=FORMAT):
        jsonschema.validate(json.loads(message["content"]), SCHEMA)
        assert message["tool_calls"] == []
        if mode == "budget":
            assert message["reasoning_content"]  # the reasoning stayed free: the grammar starts after </think>


def test_unconstrained_the_random_model_writes_no_json(model, tok):
    out = generate_batch(model, tok, _prompts(tok, "off"), max_new_tokens=40, temperature=1.0, seed=1,
                         enable_thinking=False)
    for result in out:
        with pytest.raises(ValueError):
            json.loads(result.content)


@pytest.mark.parametrize("mode", ["off", "budget"])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_a_required_tool_call_always_comes_back_as_tool_calls(model, tok, mode, tool_choice):
    for message in _messages(model, tok, mode, False, tools=TOOLS, tool_choice=tool_choice):
        (call,) = message["tool_calls"]
        name = call["function"]["name"]
        assert name == "add" if isinstance(tool_choice, dict) else name in PARAMETERS
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[name])
        assert message["content"] == ""


def test_any_json_object_when_it_finishes(model, tok):
    out = generate_batch(model, tok, _prompts(tok, "off", 16), max_new_tokens=48, temperature=1.0, seed=0,
                         enable_thinking=False, response_format={"type": "json_object"})
    finished = [r for r in out if r.finish_reason == "stop"]
    assert finished  # a random model's strings may run on past the limit: those are cut, not invalid
    for result in finished:
        assert isinstance(json.loads(result.content), dict)


@pytest.mark.parametrize("options", [{}, {"pipeline": True}, {"speculative": "ngram"}])
def test_constrained_and_free_rows_share_a_batch(model, tok, options):
    """A free row decodes the same tokens beside a constrained one (which thinks first) as alone: masks touch only
    their own row; pipelined steps wait for the token after </think>; speculative drafts meet the mask too."""
    greedy = SamplingParams(max_new_tokens=240, temperature=0.0, thinking_budget=4)
    thinking = _prompts(tok, "budget", 1)[0]
    free = [{"role": "user", "content": "b"}]

    def run(pairs):
        engine = Engine(model, tok, batch_size=2, max_len=512, **options)
        requests = [make_request(model, tok, p, greedy, enable_thinking=False, index=i, constraint=k)
                    for i, (p, k) in enumerate(pairs)]
        return {c.index: c.result for c in engine.run(requests) if c.result is not None}
    together = run([(thinking, constraint(FORMAT)), (free, None)])
    alone = run([(free, None)])
    assert together[1].token_ids == alone[0].token_ids
    assert together[0].reasoning_content and together[0].finish_reason == "stop"
    jsonschema.validate(json.loads(together[0].content), SCHEMA)


@pytest.mark.parametrize("pipeline", [False, True])
def test_the_token_after_a_think_block_the_model_closes_is_masked(tok, pipeline):
    """A model that closes its think block itself and then wants plain text: the token after </think> is already
    constrained, also when steps are pipelined (the step after </think> waits for it to be read)."""
    word, text = tok.encode(" hmm")[0], tok.encode("Hello")[0]
    model = scripted_model({tok.think_start_id: word, word: tok.think_end_id, tok.think_end_id: text, text: text},
                           vocab_size=tok.vocab_size)
    engine = Engine(model, tok, batch_size=1, max_len=512, pipeline=pipeline)
    request = make_request(model, tok, _prompts(tok, "budget", 1)[0], SamplingParams(max_new_tokens=120,
                           temperature=0.0), constraint=constraint(FORMAT))
    result = [c.result for c in engine.run([request]) if c.result is not None][0]
    assert result.reasoning_content == tok.decode([word]) and result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.content), SCHEMA)


@pytest.mark.parametrize("schema, words", [({"type": "strnig"}, "strnig"),
                                           ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
                                           ({"type": "string", "pattern": "(("}, "parenthesis")])
def test_a_schema_that_cannot_compile_is_one_line(model, tok, schema, words):
    with pytest.raises(ValueError, match=words) as error:
        generate_batch(model, tok, _prompts(tok, "off", 1), enable_thinking=False,
                       response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    assert "\n" not in str(error.value) and ".cc" not in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# Through the server

@pytest.fixture(scope="module")
def server(tok, model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("structured"))
    tok.chat_template = OPENING_TEMPLATE
    save_model(model, path)
    tok.save(path)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    with running(path, max_batch=8, max_len=1024) as (url, app):
        yield url


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def _streamed(events) -> list[tuple[dict, str]]:
    """The message a client assembles from the deltas of each choice, and its finish reason."""
    choices = {}
    for event in events:
        if not event.choices:
            continue
        choice = event.choices[0]
        empty = ({"reasoning_content": "", "content": ""}, {}, [None])
        message, calls, finish = choices.setdefault(choice.index, empty)
        delta = choice.delta
        message["content"] += delta.content or ""
        message["reasoning_content"] += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish[0] = choice.finish_reason or finish[0]
    return [({**message, "tool_calls": [calls[k] for k in sorted(calls)]}, finish[0])
            for message, calls, finish in (choices[i] for i in sorted(choices))]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("thinking", [False, True])
def test_server_response_format_json_schema(server, stream, thinking):
    extra = {"thinking_budget": 5} if thinking else {"chat_template_kwargs": {"enable_thinking": False}}
    kwargs = dict(model=_name(server), messages=[{"role": "user", "content": "hi"}], response_format=FORMAT, n=4,
                  seed=0, temperature=1.0, max_tokens=160, extra_body=extra)
    if stream:
        answers = _streamed(_client(server).chat.completions.create(stream=True, **kwargs))
    else:
        answers = [({"content": c.message.content, "reasoning_content": c.message.reasoning_content},
                    c.finish_reason) for c in _client(server).chat.completions.create(**kwargs).choices]
    assert len(answers) == 4
    for message, finish in answers:
        assert finish == "stop"
        jsonschema.validate(json.loads(message["content"]), SCHEMA)
        assert bool(message["reasoning_content"]) == thinking


def test_server_required_tool_call_streams_as_tool_call_deltas(server):
    events = list(_client(server).chat.completions.create(
        model=_name(server), messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="required",
        stream=True, n=4, seed=0, temperature=1.0, max_tokens=200, extra_body={"thinking_budget": 4}))
    for index in range(4):
        entries = [c for e in events if e.choices and e.choices[0].index == index
                   for c in (e.choices[0].delta.tool_calls or [])]
        assert entries[0].id and entries[0].function.name in PARAMETERS  # the name first, then the arguments
    answers = _streamed(events)
    assert len(answers) == 4
    for message, finish in answers:
        assert finish == "tool_calls" and message["content"] == "" and message["reasoning_content"]
        (call,) = message["tool_calls"]
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


def test_server_uncompilable_schema_is_a_400_with_the_reason(server):
    body = {"messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}}
    reply = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert "strnig" in error["message"] and error["param"] == "response_format"
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    reply = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400 and "nope" in reply.json()["error"]["message"]
