"""The OpenAI-compatible server over loopback, driven by the official `openai` client: thinking on and off, budget,
tools, stops, seeds, logprobs, 32 concurrent streams against the same requests alone, disconnects, bad input and
schema-driven fuzzing. Models are scripted (a fixed token sequence) or tiny and random, saved to a tmp folder."""
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import schemathesis
from schemathesis import GenerationMode
import uvicorn
from hypothesis import HealthCheck, given, settings

from nanoqwen.checkpoint import save_model


def _import_schemathesis_now():
    """schemathesis imports most of itself lazily, on the fuzzing test's first schema, and pytest compiles those
    modules (it rewrites a plugin's asserts). CPython 3.11.7's AST constructor keeps its recursion depth in
    interpreter-wide state, so a compile while the server's thread compiles too can end in "SystemError: AST
    constructor recursion depth mismatch" (seen once in CI). Importing them here, at collection, before any server
    thread exists, leaves nothing to compile later."""
    from hypothesis import find
    spec = {"openapi": "3.0.2", "info": {"title": "warm-up", "version": "1"}, "paths": {"/x": {"post": {
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
        "responses": {"200": {"description": "ok"}}}}}}
    for operation in schemathesis.openapi.from_dict(spec).get_all_operations():
        for mode in ("positive", "negative"):
            find(operation.ok().as_strategy(GenerationMode(mode)), lambda case: True)


_import_schemathesis_now()
from nanoqwen.checkpoint import load
from nanoqwen.generation import BUDGET_PHRASE
from nanoqwen.server import create_app
from nanoqwen.tokenizer import train_tokenizer
from test_engine import chain, full_forward_greedy, random_model, scripted_model, thinker_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HI = [{"role": "user", "content": "hi"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER_CALL = '{"name":"get_weather","arguments":{"city": "Paris"}}'
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}}}}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; `tok` comes from there too


@contextlib.contextmanager
def running(path: str, **options):
    """Load a checkpoint folder and serve it on a free loopback port from a thread; yields (base url, app)."""
    model, tokenizer = load(path, device="cpu")
    app = create_app(model, tokenizer, os.path.basename(path), **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def client(url, **kwargs):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def thinker(tok, tmp_path_factory):
    """Thinks " hmm" forever unless the budget (or enable_thinking=False) closes the block; then answers "Hello"."""
    path = str(tmp_path_factory.mktemp("thinker"))
    save_model(scripted_model(thinker_script(tok)[0]), path)
    with running(path, max_batch=4, max_len=1024) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def tool_model(tok, tmp_path_factory):
    """After the generation prompt it calls get_weather; after the empty think block (thinking off) it answers
    "It is sunny." A scripted model sees only the last token, so the final turn is asked with thinking off."""
    call = tok.encode(WEATHER_CALL)
    answer = tok.encode("It is sunny.")
    assert len(set(call + answer)) == len(call + answer)  # a chain must not revisit a token
    newline, blank, open_, close = tok.encode("\n")[0], tok.encode("\n\n")[0], tok.encode("<tool_call>", True)[0], \
        tok.encode("</tool_call>", True)[0]
    script = {**chain(newline, open_, *call, close, tok.eos_token_id), **chain(blank, *answer, tok.eos_token_id)}
    path = str(tmp_path_factory.mktemp("tools"))
    save_model(scripted_model(script), path)
    with running(path, max_batch=2, max_len=512) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A tiny random model with its own 300-token tokenizer, saved as a checkpoint folder."""
    path = str(tmp_path_factory.mktemp("small"))
    texts = ["the quick brown fox jumps over the lazy dog\n\n" * 3, "hello world, hello there\n"] * 20
    tokenizer = train_tokenizer(texts, 300, path)
    save_model(random_model(vocab_size=tokenizer.vocab_size), path)
    return path


@pytest.fixture(scope="module")
def small(small_dir):
    with running(small_dir, max_batch=16, max_len=256) as (url, app):
        yield url, app


# ----------------------------------------------------------------------------------------------------------------
# Chat: thinking, budget, tools, stops, seeds

def test_thinking_budget_inserts_the_official_phrase(thinker, tok):
    url, _ = thinker
    out = client(url).chat.completions.create(model=_name(url), messages=HI, extra_body={"thinking_budget": 4},
                                              max_tokens=100)
    message = out.choices[0].message
    phrase = BUDGET_PHRASE.split("</think>")[0].strip("\n")
    assert message.reasoning_content == " hmm" * 4 + "\n\n" + phrase
    assert message.content == "Hello" and out.choices[0].finish_reason == "stop"
    n_phrase = len(tok.encode(BUDGET_PHRASE, allow_special=True))
    assert out.usage.completion_tokens == 1 + 4 + n_phrase + 2
    assert out.usage.completion_tokens_details.reasoning_tokens == 1 + 4 + n_phrase - 1
    prompt = tok.apply_chat_template(HI, add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(prompt)


def test_thinking_off_and_length_limit(thinker):
    url, _ = thinker
    off = client(url).chat.completions.create(model=_name(url), messages=HI, extra_body=NO_THINK)
    assert off.choices[0].message.content == "Hello" and off.choices[0].message.reasoning_content is None
    assert off.usage.completion_tokens_details.reasoning_tokens == 0
    endless = client(url).chat.completions.create(model=_name(url), messages=HI, max_completion_tokens=6)
    assert endless.choices[0].finish_reason == "length" and endless.choices[0].message.content == ""
    assert endless.choices[0].message.reasoning_content == " hmm" * 5


@pytest.mark.parametrize("extra", [{"thinking_budget": 3}, NO_THINK, {}])
def test_stream_deltas_add_up_to_the_message(thinker, extra):
    url, _ = thinker
    kwargs = dict(model=_name(url), messages=HI, max_tokens=40, extra_body=extra)
    whole = client(url).chat.completions.create(**kwargs)
    events = list(client(url).chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    deltas = [e.choices[0].delta for e in events if e.choices]
    assert deltas[0].role == "assistant"
    reasoning = "".join(_reasoning(d) for d in deltas)
    assert reasoning == (whole.choices[0].message.reasoning_content or "")
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == whole.choices[0].finish_reason
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings(thinker):
    url, _ = thinker
    for stream in (False, True):
        out = client(url).chat.completions.create(model=_name(url), messages=HI, stop=["llo", "zz"], stream=stream,
                                                  extra_body=NO_THINK)
        if stream:
            out = list(out)
            assert "".join(e.choices[0].delta.content or "" for e in out) == "He"
            assert out[-1].choices[0].finish_reason == "stop"
        else:
            assert out.choices[0].message.content == "He" and out.choices[0].finish_reason == "stop"


def test_tool_call_round_trip(tool_model, tok):
    url, _ = tool_model
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client(url).chat.completions.create(model=_name(url), messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    streamed = list(client(url).chat.completions.create(model=_name(url), messages=messages, tools=[WEATHER_TOOL],
                                                        stream=True))
    calls = [c for e in streamed for c in (e.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id and calls[0].function.arguments == ""
    assert all(c.index == 0 and not c.function.name for c in calls[1:])  # then the arguments, in fragments
    assert "".join(c.function.arguments for c in calls) == call.function.arguments
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(e.choices[0].delta.content or "" for e in streamed)  # the call's text is not content

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
    final = client(url).chat.completions.create(model=_name(url), messages=messages, tools=[WEATHER_TOOL],
                                                extra_body=NO_THINK)
    assert final.choices[0].message.content == "It is sunny." and final.choices[0].finish_reason == "stop"
    rendered = tok.apply_chat_template([messages[0], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        messages[2]], tools=[WEATHER_TOOL], add_generation_prompt=True, enable_thinking=False)
    assert final.usage.prompt_tokens == len(rendered)  # the call and its result reached the prompt


def test_seeds_and_n(small):
    url, _ = small
    kwargs = dict(model=_name(url), messages=HI, max_tokens=16, temperature=1.0, top_p=1.0, extra_body={"top_k": 0})
    a = client(url).chat.completions.create(seed=7, n=2, **kwargs)
    b = client(url).chat.completions.create(seed=7, n=2, **kwargs)
    c = client(url).chat.completions.create(seed=8, **kwargs)
    texts = lambda out: [(ch.message.reasoning_content, ch.message.content) for ch in out.choices]  # noqa: E731
    assert texts(a) == texts(b) and len(texts(a)) == 2
    assert texts(a)[0] != texts(a)[1] and texts(c)[0] != texts(a)[0]
    assert a.usage.prompt_tokens == b.usage.prompt_tokens < a.usage.total_tokens


def test_logprobs(small):
    url, _ = small
    out = client(url).chat.completions.create(model=_name(url), messages=HI, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=3)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for e in entries:  # greedy: the chosen token is the best one
        assert len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.logprob <= 0
    text = client(url).completions.create(model=_name(url), prompt="the quick", max_tokens=5, temperature=0,
                                          logprobs=2)
    assert len(text.choices[0].logprobs.token_logprobs) == 5
    assert all(1 <= len(top) <= 2 for top in text.choices[0].logprobs.top_logprobs)  # keyed by text: may collide


def test_completions_and_models(small, small_dir):
    url, _ = small
    c = client(url)
    assert [m.id for m in c.models.list().data] == [_name(url)]
    out = c.completions.create(model=_name(url), prompt=["the quick", "hello"], max_tokens=5, temperature=0, n=2)
    assert len(out.choices) == 4 and all(ch.finish_reason == "length" for ch in out.choices)
    assert out.choices[0].text == out.choices[1].text  # greedy: n copies agree
    streamed = list(c.completions.create(model=_name(url), prompt="the quick", max_tokens=5, temperature=0,
                                         stream=True))
    assert "".join(e.choices[0].text for e in streamed) == out.choices[0].text
    ids = c.completions.create(model=_name(url), prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3


# ----------------------------------------------------------------------------------------------------------------
# Continuous batching

def _request(i: int) -> dict:
    return dict(messages=[{"role": "user", "content": f"request {i}: " + "the quick brown fox " * (i % 5)}],
                max_tokens=6 + i % 11, temperature=0)


async def _stream_text(c, model, request, close_after=None):
    stream = await c.chat.completions.create(model=model, stream=True, **request)
    parts, finish = [], None
    async for event in stream:
        delta = event.choices[0].delta
        parts.append((_reasoning(delta), delta.content or ""))
        finish = event.choices[0].finish_reason or finish
        if close_after is not None and len(parts) >= close_after:
            break
    if close_after is not None:
        await stream.close()  # the client goes away mid-stream
        return None
    return "".join(r for r, _ in parts), "".join(c for _, c in parts), finish


def _alone(url, request):
    out = client(url).chat.completions.create(model=_name(url), **request).choices[0]
    return out.message.reasoning_content or "", out.message.content, out.finish_reason


def test_32_concurrent_streams_equal_each_request_alone(small):
    url, app = small
    requests = [_request(i) for i in range(32)]

    async def together():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        return await asyncio.gather(*[_stream_text(c, _name(url), r) for r in requests])

    concurrent = asyncio.run(together())
    assert app.state.server.loop.peak_running == 16  # all slots shared one batch; the rest joined as slots freed
    assert concurrent == [_alone(url, r) for r in requests]


def test_32_streams_sharing_a_system_prompt_in_a_small_kv_cache(small_dir, tok):
    """32 clients with one long system prompt and their own questions, in a KV cache of 40 blocks of 16 tokens:
    fewer rows than the 16 allowed fit at once (blocks, not rows, are the limit), the shared prompt's blocks are
    computed once and reused, and every stream equals the request alone; so does each answer with the prefix
    cache off."""
    system = {"role": "system", "content": "the quick brown fox jumps over the lazy dog. " * 4}
    requests = [dict(r, messages=[system] + r["messages"]) for r in map(_request, range(32))]
    with running(small_dir, max_batch=16, max_len=256, num_blocks=40) as (url, app):
        async def together():
            c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
            return await asyncio.gather(*[_stream_text(c, _name(url), r) for r in requests])
        concurrent = asyncio.run(together())
        engine = app.state.server.loop.engine
        assert 1 < app.state.server.loop.peak_running < 16
        assert engine.cache.pool.hit >= 31 * 5 and engine.cache.pool.capacity == 40
        assert concurrent == [_alone(url, r) for r in requests]
    with running(small_dir, max_batch=16, max_len=256, enable_prefix_caching=False) as (url, app):
        assert concurrent[::4] == [_alone(url, r) for r in requests[::4]]
        assert app.state.server.loop.engine.cache.pool.hit == 0


@pytest.mark.parametrize("speculative", [None, "ngram"])
def test_hybrid_model_serves_concurrent_streams_equal_to_each_request_alone(tmp_path, speculative):
    """A Qwen3-Next checkpoint: requests joining a running batch get their DeltaNet state placed in their slot;
    with speculative steps, each row's state also goes back to its last kept draft."""
    texts = ["the quick brown fox jumps over the lazy dog\n\n" * 3, "hello world, hello there\n"] * 20
    tokenizer = train_tokenizer(texts, 300, str(tmp_path))
    save_model(random_model(vocab_size=tokenizer.vocab_size, hybrid=True), str(tmp_path))
    requests = [_request(i) for i in range(12)]
    with running(str(tmp_path), max_batch=4, max_len=256, speculative=speculative) as (url, app):
        engine, rng = app.state.server.loop.engine, random.Random(0)
        if speculative:  # drafts that are often right (the model's own greedy tokens), cut short or spoilt at times
            def draft(slot):
                row = engine.rows[slot]
                future = full_forward_greedy(engine.model, row.request.prompt_ids + row.token_ids, rng.randint(0, 4))
                if future and rng.random() < 0.5:
                    future[rng.randrange(len(future))] += 1
                return future
            engine.draft = draft

        async def together():
            c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
            return await asyncio.gather(*[_stream_text(c, _name(url), r) for r in requests])
        concurrent = asyncio.run(together())
        assert app.state.server.loop.peak_running == 4
        assert concurrent == [_alone(url, r) for r in requests]
        assert (engine.accepted > 0) == (speculative is not None)
    if speculative:
        with running(str(tmp_path), max_batch=4, max_len=256) as (url, app):
            assert concurrent == [_alone(url, r) for r in requests]  # the answers of plain decoding


def test_new_request_joins_a_running_batch(thinker):
    url, _ = thinker
    c = client(url)
    with c.chat.completions.create(model=_name(url), messages=HI, max_tokens=600, stream=True) as long_stream:
        events = iter(long_stream)
        for _ in range(3):
            next(events)
        quick = c.chat.completions.create(model=_name(url), messages=HI, extra_body=NO_THINK)
        assert quick.choices[0].message.content == "Hello"
        assert next(events).choices[0].finish_reason is None  # the long one is still going


def test_disconnect_frees_the_slot_and_spares_the_others(small):
    url, app = small
    loop = app.state.server.loop
    cancelled = loop.cancelled_running
    long = dict(messages=HI, max_tokens=230, temperature=0)
    others = [_request(i) for i in range(3)]

    async def scenario():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        return await asyncio.gather(_stream_text(c, _name(url), long, close_after=4),
                                    *[_stream_text(c, _name(url), r) for r in others])

    _, *results = asyncio.run(scenario())
    deadline = time.time() + 5
    while (loop.running or loop.cancelled_running == cancelled) and time.time() < deadline:
        time.sleep(0.05)
    assert loop.cancelled_running == cancelled + 1 and not loop.running
    assert len(app.state.server.loop.engine.free_slots()) == 16
    assert results == [_alone(url, r) for r in others]


# ----------------------------------------------------------------------------------------------------------------
# Bad input

BAD = [  # (body or raw text, expected status, words in the message)
    ("{not json", 400, "malformed JSON"),
    ("[1, 2]", 400, "dictionary"),
    ("", 400, "body"),
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user"}]}, 400, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "type"),
    ({"messages": HI, "model": "gpt-4"}, 404, "gpt-4"),
    ({"messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": HI, "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": HI, "max_tokens": 100000}, 400, "context"),
    ({"messages": HI, "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": HI, "n": 17}, 400, "n"),
    ({"messages": HI, "n": 0}, 400, "n"),
    ({"messages": HI, "temperature": -1}, 400, "temperature"),
    ({"messages": HI, "temperature": "hot"}, 400, "temperature"),
    ({"messages": HI, "top_p": 0}, 400, "top_p"),
    ({"messages": HI, "top_p": 1.5}, 400, "top_p"),
    ({"messages": HI, "min_p": 2}, 400, "min_p"),
    ({"messages": HI, "stop": [""]}, 400, "stop"),
    ({"messages": HI, "stop": ["x"] * 20}, 400, "stop"),
    ({"messages": HI, "stop": 5}, 400, "stop"),
    ({"messages": HI, "seed": 2 ** 70}, 400, "seed"),
    ({"messages": HI, "thinking_budget": -1}, 400, "thinking_budget"),
    ({"messages": HI, "stream": "sometimes"}, 400, "stream"),
    ({"messages": HI, "chat_template_kwargs": {"enable_thinking": "maybe"}}, 400, "enable_thinking"),
    ({"messages": HI, "tools": [{"type": "function"}]}, 400, "function"),
    ({"messages": HI, "tool_choice": "sometimes"}, 400, "tool_choice"),
    ({"messages": HI, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     400, "nope"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ({"messages": HI, "frequency_penalty": 1.0}, 400, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "the quick brown fox " * 200}]}, 400, "context"),
]
BAD_COMPLETIONS = [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [5, 999999]}, 400, "vocabulary"),
    ({"prompt": [[1, 2], []]}, 400, "prompt"),
    ({"prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    ({"prompt": {"text": "hi"}}, 400, "prompt"),
]


@pytest.mark.parametrize("path,body,status,words", [("/v1/chat/completions", *case) for case in BAD] +
                         [("/v1/completions", *case) for case in BAD_COMPLETIONS])
def test_bad_input_is_a_4xx_that_names_the_problem(small, path, body, status, words):
    url, _ = small
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words.lower() in error["message"].lower(), error


@pytest.mark.parametrize("path,field", [("/v1/chat/completions", "max_tokens"),
                                        ("/v1/chat/completions", "max_completion_tokens"),
                                        ("/v1/completions", "max_tokens")])
def test_token_limits_below_one_are_refused_in_the_requests_own_words(small, path, field):
    """0 is not "no limit" and a negative count is not the engine's business: a 400 that names the request's field
    (never the engine's max_new_tokens); the same field at 1 is served."""
    url, _ = small
    body = {"messages": HI} if "chat" in path else {"prompt": "the quick"}
    for value in (0, -5):
        response = httpx.post(url + path, json={**body, field: value}, timeout=30)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == field, error
        assert field in error["message"] and "max_new_tokens" not in error["message"], error
    served = httpx.post(url + path, json={**body, field: 1, "temperature": 0}, timeout=30)
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 1


def test_unknown_routes_and_methods_are_openai_errors(small):
    url, _ = small
    assert httpx.get(url + "/v1/nothing").json()["error"]["code"] == 404
    assert httpx.get(url + "/v1/chat/completions").status_code == 405
    assert httpx.get(url + "/health").json()["status"] == "ok"  # still serving after all that


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzing_from_the_openapi_schema_never_gets_a_server_error(small, mode):
    """schemathesis draws requests from the server's own OpenAPI schema: valid ones (positive) and ones that break
    it (negative); none may get a 5xx."""
    url, _ = small
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    for operation in schema.get_all_operations():
        operation = operation.ok()
        if mode == "negative" and operation.method.upper() != "POST":
            continue  # a GET without parameters has nothing to break

        @given(case=operation.as_strategy(GenerationMode(mode)))
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(base_url=url, timeout=60)
            assert response.status_code < 500, (case.body, response.text)
            if response.status_code >= 400:
                assert "message" in response.json()["error"]

        call()


def test_server_survives_the_fuzzing(small):
    url, _ = small
    out = client(url).chat.completions.create(model=_name(url), messages=HI, max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3


# ----------------------------------------------------------------------------------------------------------------
# The CLI

def test_serve_command_with_api_key(small_dir):
    """`nanoqwen serve` on a free port (--port 0): the "serving" line names the bound port, which answers at once."""
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "nanoqwen", "serve", "--model", small_dir, "--port", "0",
                                "--api-key", "sesame", "--max-batch", "2", "--max-len", "128"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving {os.path.basename(small_dir)} on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split("/v1")[0]
        assert int(url.rsplit(":", 1)[1]) > 0
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # listening when the line is printed
        with pytest.raises(openai.AuthenticationError):
            client(url).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        out = good.chat.completions.create(model=os.path.basename(small_dir), messages=HI, max_tokens=2)
        assert out.usage.completion_tokens <= 2
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_serve_on_a_port_in_use_is_one_line(small_dir):
    env = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "nanoqwen", "serve", "--model", small_dir, "--port", str(port)],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""  # no "serving" line for a server that never served
    assert run.stderr == (f"nanoqwen serve: error: cannot serve on 127.0.0.1:{port}: Address already in use: another "
                          f"program is listening there; pick another --port\n")


def _reasoning(delta) -> str:
    """The reasoning_content of a stream delta (an extension field: the client keeps it as an extra)."""
    return (delta.model_extra or {}).get("reasoning_content") or ""


def _name(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


# ----------------------------------------------------------------------------------------------------------------
# Metrics

def _scrape(url: str) -> dict:
    """{name or name{labels}: value} of a /metrics page, read by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    reply = httpx.get(url + "/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" not in sample.labels:
                out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def test_metrics_count_requests_tokens_first_tokens_and_the_caches(small):
    url, _ = small
    before = _scrape(url)
    messages = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 6}]
    usage = [client(url).chat.completions.create(model=_name(url), messages=messages, max_tokens=5).usage
             for _ in range(2)]
    after = _scrape(url)
    grew = lambda name: after.get(name, 0) - before.get(name, 0)  # noqa: E731
    assert grew("nanoqwen_requests_total{endpoint=chat}") == 2
    assert grew("nanoqwen_prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert grew("nanoqwen_generation_tokens_total") == sum(u.completion_tokens for u in usage)
    assert grew("nanoqwen_time_to_first_token_seconds_count") == 2
    assert after["nanoqwen_queue_depth"] == 0 and after["nanoqwen_running_rows"] == 0
    assert after["nanoqwen_kv_blocks_total"] > 0 and 0 <= after["nanoqwen_kv_blocks_used"] <= after[
        "nanoqwen_kv_blocks_total"]
    full_blocks = (usage[1].prompt_tokens - 1) // 16
    assert grew("nanoqwen_prefix_cache_hit_blocks") >= full_blocks > 0  # the second prompt found the first's blocks
    assert after["nanoqwen_prefix_cache_hit_rate"] == pytest.approx(
        after["nanoqwen_prefix_cache_hit_blocks"] / after["nanoqwen_prefix_cache_queried_blocks"])
