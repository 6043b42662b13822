"""An OpenAI-compatible HTTP server over the engine: chat and text completions (streamed or not), models, health.

Continuous batching: one thread owns the `Engine`. Between decode steps it admits waiting requests into free rows
while the paged KV cache has blocks for them (one prefill for all, reusing cached prefixes such as a shared system
prompt) and routes each chunk to the asyncio queue of the HTTP request it belongs to, so a new request joins the
running batch at once and every stream advances one token per step. A client that goes away has its row cancelled
(its blocks freed) before the next step.

The chat API follows OpenAI and vLLM's Qwen3 conventions: `reasoning_content` apart from `content` (message and
stream deltas), `chat_template_kwargs.enable_thinking`, `thinking_budget`, `tools` with `<tool_call>` output parsed
into `tool_calls`. Bad input gets a 4xx with an OpenAI error body that names the problem; the server keeps serving.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import importlib.resources
import itertools
import json
import os
import socket
import threading
import time
import uuid
from collections import deque

import jinja2
from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from .chat import OutputParser
from .generation.api import make_request
from .generation.engine import Engine
from .generation.grammar import compile_constraint, constraint
from .generation.request import THINKING, Chunk, initial_phase
from .generation.sampling import SamplingParams
from .metrics import ServerMetrics
from .openai_types import MAX_STOP_STRINGS, ChatCompletionRequest, CompletionRequest, Message, NamedToolChoice


CHAT_PAGE = importlib.resources.files(__package__).joinpath("chat.html")  # the web chat served at /


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code or self.status}})


# ----------------------------------------------------------------------------------------------------------------
# The engine loop: one thread, many requests

class EngineLoop:
    """The thread that owns the engine. `submit` queues requests (their chunks arrive on an asyncio queue, an
    Exception if generation failed); `cancel` drops them, waiting or running, before the next step."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.waiting: deque = deque()  # (request, queue, event loop) not yet in a slot
        self.cancelled: set[int] = set()
        self.running: dict[int, tuple] = {}  # request.index -> (slot, queue, event loop); engine thread only
        self.peak_running = 0  # most requests ever decoded together
        self.cancelled_running = 0  # requests dropped mid-generation (their client went away)
        self.ids = itertools.count()  # request.index: unique over the server's life, chunks are routed by it
        self.wake = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="nanoqwen-engine", daemon=True)
        self.thread.start()

    def submit(self, requests: list, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        with self.wake:
            self.waiting.extend((request, queue, loop) for request in requests)
            self.wake.notify()

    def cancel(self, requests: list) -> None:
        with self.wake:
            self.cancelled.update(r.index for r in requests)
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.waiting or self.cancelled or self.running or self.stopped)
                if self.stopped:
                    return
                for index in self.cancelled & self.running.keys():  # a client went away: its slot is free now
                    self.engine.cancel(self.running.pop(index)[0])
                    self.cancelled_running += 1
                self.waiting = deque(w for w in self.waiting if w[0].index not in self.cancelled)
                self.cancelled.clear()
                fits = self.engine.admissible([request for request, _, _ in self.waiting])
                admitted = [self.waiting.popleft() for _ in range(fits)]
            try:
                chunks = self._admit(admitted) if admitted else []
                chunks += self.engine.step()
            except Exception as error:  # a bug or out of memory: fail the requests in flight, keep serving
                for slot, queue, loop in [*self.running.values(), *[(None, q, l) for _, q, l in admitted]]:
                    _put(loop, queue, error)
                    if slot is not None:
                        self.engine.cancel(slot)
                self.running.clear()
                continue
            for chunk in chunks:
                slot, queue, loop = self.running[chunk.index]
                _put(loop, queue, chunk)
                if chunk.finish_reason:
                    del self.running[chunk.index]

    def _admit(self, admitted: list) -> list[Chunk]:
        slots = self.engine.free_slots()[:len(admitted)]  # the slots `add` fills, in order
        for (request, queue, loop), slot in zip(admitted, slots):
            self.running[request.index] = (slot, queue, loop)
        self.peak_running = max(self.peak_running, len(self.running))
        return self.engine.add([request for request, _, _ in admitted])


def _put(loop, queue: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


# ----------------------------------------------------------------------------------------------------------------
# From OpenAI requests to engine requests

def _message_dict(message: Message, i: int) -> dict:
    """An OpenAI message as the chat template takes it (text parts joined, developer read as system)."""
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    if content is None and not (message.role == "assistant" and message.tool_calls):
        raise APIError(400, f"messages[{i}].content is required for role '{message.role}'", f"messages.{i}.content")
    out = {"role": "system" if message.role == "developer" else message.role, "content": content or ""}
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    if message.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": c.function.model_dump()} for c in message.tool_calls]
    return out


def _sampling(body, max_tokens: int | None, seed_offset: int) -> SamplingParams:
    if body.frequency_penalty:
        raise APIError(400, "frequency_penalty is not supported (use presence_penalty or repetition_penalty)",
                       "frequency_penalty")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError(400, f"stop must be at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    return SamplingParams(max_new_tokens=1 if max_tokens is None else max_tokens,  # None: the room left, set later
                          temperature=body.temperature, top_p=body.top_p,
                          top_k=0 if body.top_k == -1 else body.top_k, min_p=body.min_p,
                          presence_penalty=body.presence_penalty, repetition_penalty=body.repetition_penalty,
                          stop=stop, seed=None if body.seed is None else body.seed + seed_offset,
                          thinking_budget=body.thinking_budget)


class Server:
    """The state behind the routes: the model, its engine loop and the limits of a request."""

    def __init__(self, model, tokenizer, model_name: str, max_batch: int, max_len: int, **engine_options):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        engine = Engine(model, tokenizer, batch_size=max_batch, max_len=max_len, **engine_options)
        self.max_batch, self.max_len = max_batch, engine.capacity  # a small KV cache holds shorter rows
        self.loop = EngineLoop(engine)
        self.metrics = ServerMetrics(self.loop)

    def requests(self, body, prompts: list, logprobs: int | None, **template) -> list:
        """n engine requests per prompt, checked: a ValueError of the engine or the template is a 400."""
        if body.model not in (None, self.model_name):
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{self.model_name}'",
                           "model", code="model_not_found")
        if len(prompts) * body.n > self.max_batch:
            raise APIError(400, f"n ({body.n}) times the number of prompts ({len(prompts)}) must be at most "
                                f"{self.max_batch} (the server's --max-batch)", "n")
        # the request model bounds both fields (>= 1); here a 0 is never read as "not given"
        completion = getattr(body, "max_completion_tokens", None)
        field, max_tokens = ("max_tokens", body.max_tokens) if completion is None else ("max_completion_tokens",
                                                                                        completion)
        out = []
        for prompt in prompts:
            for j in range(body.n):
                try:
                    request = make_request(self.model, self.tokenizer, prompt, _sampling(body, max_tokens, j),
                                           index=next(self.loop.ids), context=self.max_len, **template)
                except (ValueError, TypeError, KeyError, jinja2.TemplateError) as error:
                    raise APIError(400, str(error), "messages" if template else "prompt") from None
                room = self.max_len - len(request.prompt_ids)
                if max_tokens is not None and max_tokens > room:
                    raise APIError(400, f"this server's context holds {self.max_len} tokens, but you asked for "
                                        f"{len(request.prompt_ids) + max_tokens} ({len(request.prompt_ids)} in the "
                                        f"prompt, {max_tokens} to generate)", field)
                request.params.max_new_tokens = room if max_tokens is None else max_tokens
                request.logprobs = logprobs
                out.append(request)
        return out

    def chat_requests(self, body: ChatCompletionRequest) -> list:
        messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
        kwargs = body.chat_template_kwargs or {}
        enable_thinking = kwargs.get("enable_thinking")
        if not isinstance(enable_thinking, (bool, type(None))):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs")
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        if isinstance(body.tool_choice, str) and body.tool_choice == "none":
            tools = []  # the model is not told about them
        elif body.tool_choice is not None and not isinstance(body.tool_choice, str):  # a named function
            tools = [t for t in tools if t["function"]["name"] == body.tool_choice.function.name]
            if not tools:
                raise APIError(400, f"tool_choice names '{body.tool_choice.function.name}', which is not in tools",
                               "tool_choice")
        elif body.tool_choice == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs tools", "tool_choice")
        top = (body.top_logprobs or 0) if body.logprobs else None
        response_format = body.response_format.model_dump(by_alias=True) if body.response_format else None
        tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else \
            body.tool_choice
        try:
            key = constraint(response_format, tool_choice, tools)
            if key is not None:
                compile_constraint(self.tokenizer, key)  # cached: make_request finds it compiled
        except ValueError as error:
            constrained_json = response_format and response_format["type"] != "text"
            raise APIError(400, str(error), "response_format" if constrained_json else "tool_choice") from None
        return self.requests(body, [messages], top, enable_thinking=enable_thinking, tools=tools or None,
                             constraint=key)

    def completion_requests(self, body: CompletionRequest) -> list:
        prompt = body.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt")
        return self.requests(body, prompts, body.logprobs)


# ----------------------------------------------------------------------------------------------------------------
# Responses

def _token_logprobs(tokenizer, chunks: list[Chunk], top: int) -> list[dict]:
    """OpenAI chat logprobs entries of the tokens of these chunks (when the engine computed them)."""
    def entry(token_id, logprob):
        raw = tokenizer.decode_bytes([token_id])
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}
    out = []
    for chunk in chunks:
        for token_id, (logprob, alternatives) in zip(chunk.token_ids, chunk.logprobs or []):
            out.append({**entry(token_id, logprob), "top_logprobs": [entry(t, lp) for t, lp in alternatives[:top]]})
    return out


def _completion_logprobs(entries: list[dict]) -> dict:
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]}


def _usage(requests: list, results: list, n: int) -> dict:
    prompt = sum(len(r.prompt_ids) for r in requests[::n])  # n choices of a prompt count it once, as OpenAI does
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": sum(r.reasoning_tokens for r in results)}}


def _finish_reason(result) -> str:
    return "tool_calls" if result.tool_calls else result.finish_reason


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _chunks(server: Server, http: HTTPRequest, requests: list):
    """Submit requests to the engine loop and yield their chunks as they come; cancels what is left on exit (the
    stream was closed or the client went away)."""
    queue: asyncio.Queue = asyncio.Queue()
    metrics, arrived, waiting_first = server.metrics, time.perf_counter(), {r.index for r in requests}
    metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))
    server.loop.submit(requests, queue)
    left = len(requests)
    try:
        while left:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:  # nothing yet (a long prefill, a full batch): is anyone still listening?
                if await http.is_disconnected():
                    return
                continue
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}", type="server_error")
            left -= item.finish_reason is not None
            metrics.generation_tokens.inc(len(item.token_ids))
            if item.index in waiting_first and item.token_ids:
                waiting_first.discard(item.index)
                metrics.time_to_first_token.observe(time.perf_counter() - arrived)
            yield item
    finally:
        if left:
            server.loop.cancel(requests)


async def _results(server: Server, http: HTTPRequest, requests: list):
    chunks = {r.index: [] for r in requests}
    async for chunk in _chunks(server, http, requests):
        chunks[chunk.index].append(chunk)
    return [chunks[r.index] for r in requests]


# ----------------------------------------------------------------------------------------------------------------
# The app

def create_app(model, tokenizer, model_name: str, max_batch: int = 16, max_len: int | None = None,
               api_key: str | None = None, **engine_options) -> FastAPI:
    """engine_options: the Engine's (speculative, num_speculative_tokens, block_size, num_blocks,
    kv_cache_memory_bytes, enable_prefix_caching)."""
    max_len = min(max_len or 4096, model.config.max_position_embeddings)
    server = Server(model, tokenizer, model_name, max_batch, max_len, **engine_options)
    max_len = server.max_len
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        server.loop.stop()

    app = FastAPI(title="nanoqwen", version="0.1.0", description="OpenAI-compatible Qwen3 server", lifespan=lifespan)
    app.state.server = server
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if api_key and not (credentials and hmac.compare_digest(credentials.credentials.encode(), api_key.encode())):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", type="authentication_error",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        problems = []
        for e in error.errors()[:3]:
            where = ".".join(str(part) for part in e["loc"] if part != "body")
            problems.append(("malformed JSON: " if e["type"] == "json_invalid" else "") + f"{where or 'body'}: {e['msg']}")
        param = ".".join(str(p) for p in error.errors()[0]["loc"][1:]) if error.errors() else None
        return APIError(400, "; ".join(problems) or "invalid request", param or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        return APIError(error.status_code, str(error.detail), type="invalid_request_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(server.loop.running), "waiting": len(server.loop.waiting)}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanoqwen",
                                            "max_model_len": max_len}]}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(CHAT_PAGE.read_text("utf-8"))

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        text, content_type = server.metrics.exposition()
        return Response(text, media_type=content_type)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        server.metrics.requests.labels("chat").inc()
        requests = server.chat_requests(body)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        top = body.top_logprobs or 0
        if body.stream:
            return StreamingResponse(_chat_stream(server, http, requests, head, body, top),
                                     media_type="text/event-stream")
        choices, results = [], []
        for i, chunks in enumerate(await _results(server, http, requests)):
            result = chunks[-1].result
            results.append(result)
            message = {"role": "assistant", "content": result.content if result.content or not result.tool_calls
                       else None, "reasoning_content": result.reasoning_content, "tool_calls": result.tool_calls or None}
            logprobs = {"content": _token_logprobs(tokenizer, chunks, top)} if body.logprobs else None
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": _finish_reason(result)})
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(requests, results, body.n)}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, http: HTTPRequest):
        server.metrics.requests.labels("completions").inc()
        requests = server.completion_requests(body)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if body.stream:
            return StreamingResponse(_completion_stream(server, http, requests, head, body),
                                     media_type="text/event-stream")
        choices, results = [], []
        for i, chunks in enumerate(await _results(server, http, requests)):
            results.append(chunks[-1].result)
            logprobs = None if body.logprobs is None else \
                _completion_logprobs(_token_logprobs(tokenizer, chunks, body.logprobs))
            choices.append({"index": i, "text": chunks[-1].result.text, "logprobs": logprobs,
                            "finish_reason": chunks[-1].result.finish_reason})
        return {**head, "object": "text_completion", "choices": choices, "usage": _usage(requests, results, body.n)}

    return app


async def _chat_stream(server: Server, http, requests: list, head: dict, body, top: int):
    """Chat chunks as OpenAI deltas: each choice's text goes through an OutputParser, so the deltas add up to the
    message a non-streamed request gets (reasoning, content, then each tool call: its name, then its arguments)."""
    choice = {r.index: i for i, r in enumerate(requests)}
    parsers = {r.index: OutputParser(initial_phase(r.prompt_ids, server.tokenizer) == THINKING) for r in requests}
    event = {**head, "object": "chat.completion.chunk"}
    for i in range(len(requests)):
        yield _sse({**event, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
    results = []
    try:
        async for chunk in _chunks(server, http, requests):
            deltas, finish_reason = parsers[chunk.index].feed(chunk.text), None
            if chunk.result is not None:
                last, message = parsers[chunk.index].finish()
                deltas += last
                results.append(chunk.result)
                finish_reason = "tool_calls" if message["tool_calls"] else chunk.result.finish_reason
            logprobs = {"content": _token_logprobs(server.tokenizer, [chunk], top)} if body.logprobs else None
            if not deltas and (finish_reason or (logprobs and logprobs["content"])):
                deltas = [{}]
            for k, delta in enumerate(deltas):
                yield _sse({**event, "choices": [{"index": choice[chunk.index], "delta": delta,
                                                  "logprobs": logprobs if k == 0 else None,
                                                  "finish_reason": finish_reason if k == len(deltas) - 1 else None}]})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**event, "choices": [], "usage": _usage(requests, results, body.n)})
    except APIError as error:
        yield _sse({"error": json.loads(error.response().body)["error"]})
    yield "data: [DONE]\n\n"


async def _completion_stream(server: Server, http, requests: list, head: dict, body):
    choice = {r.index: i for i, r in enumerate(requests)}
    event = {**head, "object": "text_completion"}
    results = []
    try:
        async for chunk in _chunks(server, http, requests):
            logprobs = None if body.logprobs is None else \
                _completion_logprobs(_token_logprobs(server.tokenizer, [chunk], body.logprobs))
            if chunk.result is not None:
                results.append(chunk.result)
            if chunk.text or chunk.result is not None:
                yield _sse({**event, "choices": [{"index": choice[chunk.index], "text": chunk.text, "logprobs": logprobs,
                                                  "finish_reason": chunk.finish_reason}]})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**event, "choices": [], "usage": _usage(requests, results, body.n)})
    except APIError as error:
        yield _sse({"error": json.loads(error.response().body)["error"]})
    yield "data: [DONE]\n\n"


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 16,
          max_len: int | None = None, dtype=None, device=None, model_name: str | None = None,
          long_context: dict | None = None, **engine_options) -> None:
    """Bind the port (a port in use fails at once, before the model loads), load a checkpoint folder and serve it
    until interrupted. long_context: checkpoint.load's (Dual Chunk Attention, YaRN, a longer context).
    engine_options: as create_app."""
    import uvicorn
    from .checkpoint import load
    sock = bind(host, port)
    model, tokenizer = load(path, dtype=dtype, device=device, long_context=long_context)
    name = model_name or os.path.basename(os.path.normpath(path))
    app = create_app(model, tokenizer, name, max_batch=max_batch, max_len=max_len, api_key=api_key, **engine_options)
    sock.listen(2048)  # from here a client waits in the queue while the server starts, never refused
    address = f"[{host}]" if ":" in host else host
    cache = app.state.server.loop.engine.cache
    base = f"http://{address}:{sock.getsockname()[1]}"
    print(f"serving {name} on {base}/v1 (up to {max_batch} rows of {app.state.server.max_len} tokens, KV cache "
          f"{cache.pool.num_blocks - 1} blocks of {cache.block_size} tokens); chat page {base}/, metrics {base}/metrics",
          flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one); an address that cannot be bound is one line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as e:
        raise RuntimeError(f"cannot serve on {host}:{port}: {e.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may reuse a closing port
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = ": another program is listening there; pick another --port" if e.errno == errno.EADDRINUSE else ""
        raise RuntimeError(f"cannot serve on {host}:{port}: {e.strerror}{hint}") from None
    return sock
