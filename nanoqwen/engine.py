"""Generation: the one path used by the CLI, evaluation, RL rollouts and the server.

An `Engine` owns a fixed number of batch slots that share one static KV cache (`model.make_cache`). All rows write
their next key at the same cache slot `t`; a prompt is placed so that it ends at `t` (left padding, masked out), and
each row carries its own position ids, so RoPE never sees the padding. Requests can join free slots between decode
steps (`add`) and leave when done: that is continuous batching. When `t` reaches the end of the cache, the cache is
shifted left past the slots no live row needs (keys carry their positions, so moving them changes nothing).

Each row runs a small state machine over its tokens: the thinking phase (`<think>` ... `</think>`), the thinking
budget (the official phrase is forced once the reasoning reaches N tokens), stop tokens and stop strings, and a
UTF-8-safe text stream that tells reasoning from answer.

On CPU the decode step attends only to the filled prefix of the cache. On CUDA the step always sees the whole cache
(static shapes): it is compiled and captured in one CUDA graph (model, greedy choice, position and mask updates),
the q/k/v and gate/up projections run as one matmul each (stacked weights that the parameters are views of), and
the steps are pipelined: step n+1 is queued before the host reads step n's tokens, so the per-row Python (stops,
streaming, thinking budget) runs while the GPU computes. Forced tokens are decided one step ahead, which is
possible because they depend only on the tokens already accepted.
"""
from __future__ import annotations

import os
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

from .model import fused_projections
from .sampling import SamplingParams, Sampler, device_tensor

BUDGET_PHRASE = ("\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
                 "directly now.\n</think>\n\n")
START, THINKING, ANSWER = "start", "thinking", "answer"  # thinking phases of a row
REASONING, CONTENT = "reasoning", "content"  # kinds of streamed text
PREFILL_CHUNK = 4096  # long prompts are prefilled in pieces so the attention mask stays small


@dataclass
class GenerationResult:
    text: str  # everything generated, as text (think tags included; stop token and stop string excluded)
    reasoning_content: str | None
    content: str
    tool_calls: list
    token_ids: list[int]  # generated ids, forced ones and the final stop token included
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    logprobs: list | None = None  # per token (logprob, [(id, logprob)] top alternatives) if the request asked


@dataclass
class Chunk:
    """A piece of a stream: the tokens of one step of one request and the text they released."""
    index: int  # which prompt of the batch
    token_ids: list[int]
    text: str
    kind: str  # what the text is: "reasoning" or "content"
    finish_reason: str | None = None  # set on the last chunk of a request, which also carries the result
    result: GenerationResult | None = None
    logprobs: list | None = None  # per token of token_ids, if the request asked: (logprob, top alternatives)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams  # resolved: no None knobs
    index: int = 0
    logprobs: int | None = None  # report each token's logprob and this many top alternatives (None: off)


# ----------------------------------------------------------------------------------------------------------------
# One request in one batch slot

class _Row:
    """The running state of a request: generated tokens, thinking phase, forced tokens, streamed text."""

    def __init__(self, request: Request, tokenizer, budget_ids: list[int]):
        self.request, self.params, self.tokenizer, self.budget_ids = request, request.params, tokenizer, budget_ids
        self.phase = initial_phase(request.prompt_ids, tokenizer)
        self.started_thinking = self.phase == THINKING
        self.token_ids: list[int] = []
        self.thinking_tokens = self.reasoning_tokens = 0
        self.forced: deque[int] = deque()
        self.decoder = tokenizer.stream_decoder()
        self.unsent: list[tuple[str, str]] = []  # (kind, text) held back: it may be the start of a stop string
        self.sent: list[str] = []
        self.sent_tail = ""  # the end of the sent text: a stop string may begin there
        self.logprobs: list | None = [] if request.logprobs is not None else None
        self.finish_reason: str | None = None
        self.lookup: PromptLookup | None = None  # speculative decoding's drafts (made on first use)

    def next_token(self, sampled: int) -> int:
        """The sampled token, unless the thinking budget is spent: then the tokens of the budget phrase, one by one."""
        forced = self.take_forced()
        return sampled if forced is None else forced

    def take_forced(self) -> int | None:
        """The next token if it is forced (the budget phrase), else None. Depends only on the tokens accepted so
        far, so the engine can decide it before the sample it replaces is known."""
        budget = self.params.thinking_budget
        if self.phase == THINKING and budget is not None and not self.forced and self.thinking_tokens >= budget:
            self.forced.extend(self.budget_ids)
        return self.forced.popleft() if self.forced else None

    def accept(self, token: int, logprob=None) -> list[Chunk]:
        kind = self._advance_phase(token)
        self.token_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        self.reasoning_tokens += kind == REASONING
        if token in self.tokenizer.stop_token_ids:
            self.finish_reason, text = "stop", self.decoder.flush()
        else:
            text = self.decoder.push(token)
            if len(self.token_ids) >= self.params.max_new_tokens:
                self.finish_reason, text = "length", text + self.decoder.flush()
        pieces = self._release(kind, text) or [(kind, "")]
        chunks = [Chunk(self.request.index, [token] if i == 0 else [], t, k) for i, (k, t) in enumerate(pieces)]
        if self.logprobs is not None:
            chunks[0].logprobs = [logprob]
        if self.finish_reason:
            chunks[-1].finish_reason, chunks[-1].result = self.finish_reason, self.result()
        return chunks

    def _advance_phase(self, token: int) -> str:
        """Move the thinking phase on by one token; returns the kind of that token."""
        if self.phase == START:  # the model opens a think block, or answers directly
            self.phase = THINKING if token == self.tokenizer.think_start_id else ANSWER
            return REASONING if self.phase == THINKING else CONTENT
        if self.phase == THINKING:
            if token == self.tokenizer.think_end_id:
                self.phase = ANSWER
            else:
                self.thinking_tokens += 1
            return REASONING
        return CONTENT

    def _release(self, kind: str, text: str) -> list[tuple[str, str]]:
        """Queue new text; return the pieces that can be streamed, cutting at a stop string (which ends the row)."""
        if text:
            self.unsent.append((kind, text))
        pending = "".join(t for _, t in self.unsent)
        stops = self.params.stop
        if not stops:
            ready = len(pending)
        else:
            window = self.sent_tail + pending
            hits = [window.find(s) for s in stops if s in window]
            if hits:
                ready, self.finish_reason = min(hits) - len(self.sent_tail), "stop"
            elif self.finish_reason:
                ready = len(pending)
            else:
                ready = len(pending) - partial_stop_length(window, stops)
        pieces, self.unsent = split_pieces(self.unsent, ready)
        if self.finish_reason:
            self.unsent = []
        self.sent += [t for _, t in pieces]
        if stops:
            self.sent_tail = (self.sent_tail + "".join(t for _, t in pieces))[-max(map(len, stops)):]
        return pieces

    def result(self) -> GenerationResult:
        text = "".join(self.sent)
        # a prompt that opened the think block leaves no <think> in the output; the parser needs it to see reasoning
        parsed = self.tokenizer.parse_output(("<think>" if self.started_thinking else "") + text)
        return GenerationResult(text, parsed["reasoning_content"], parsed["content"], parsed["tool_calls"],
                                list(self.token_ids), self.finish_reason, len(self.request.prompt_ids),
                                len(self.token_ids), self.reasoning_tokens, self.logprobs)


def initial_phase(prompt_ids: list[int], tokenizer) -> str:
    """Where the prompt leaves the model: inside a think block, after a closed one (thinking off), or free to open
    one (the model decides)."""
    opened = _last_index(prompt_ids, tokenizer.think_start_id)
    closed = _last_index(prompt_ids, tokenizer.think_end_id)
    if opened > closed:
        return THINKING
    if closed >= 0 and not tokenizer.decode(prompt_ids[closed + 1:]).strip():
        return ANSWER  # the prompt ends with a think block, e.g. the empty one of enable_thinking=False
    return START


def _last_index(ids: list[int], token: int | None) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    return -1


def partial_stop_length(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that begins a stop string (it must wait for the next tokens)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def split_pieces(pieces: list[tuple[str, str]], n: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split (kind, text) pieces after n characters; the first part merges neighbours of the same kind."""
    head, tail = [], []
    for kind, text in pieces:
        take = text[:max(n, 0)]
        n -= len(take)
        if take:
            if head and head[-1][0] == kind:
                head[-1] = (kind, head[-1][1] + take)
            else:
                head.append((kind, take))
        if len(take) < len(text):
            tail.append((kind, text[len(take):]))
    return head, tail


# ----------------------------------------------------------------------------------------------------------------
# The engine: slots over one static KV cache

def _decode_step(model, cache, tokens, positions, mask, t, live, kv_len: int | None = None,
                 token_limit: int | None = None) -> torch.Tensor:
    """One decode step of every row, in place: slot t becomes real for the live rows, the model reads `tokens` at
    `positions`, positions and t advance, and `tokens` receives each row's greedy next token. Returns the logits
    (B, token_limit) in the model's dtype. kv_len None: attend to the whole cache (static shapes: on CUDA this
    function is compiled and captured in one CUDA graph); else to its first kv_len slots."""
    mask.index_copy_(1, t, live[:, None])
    out = model(tokens[:, None], position_ids=positions[:, None], cache=cache, cache_position=t,
                attention_mask=mask if kv_len is None else mask[:, :kv_len])
    logits = out.logits[:, -1]
    positions.add_(1)
    t.add_(1)
    tokens.copy_(greedy_tokens(logits, token_limit or logits.shape[-1]))
    return logits[:, :token_limit]


def greedy_tokens(logits: torch.Tensor, limit: int, chunks: int = 128) -> torch.Tensor:
    """argmax over the first `limit` columns of (B, V) logits, the first index on ties, as plain argmax. Split in two
    stages when V allows: one row of 151,936 logits is otherwise a single long reduction (~37 us of a 1.4 ms decode
    step on an H100 at batch 1)."""
    B, V = logits.shape
    if V % chunks or V // chunks < 256:
        return logits[:, :limit].argmax(-1)
    width = V // chunks
    column = torch.arange(V, device=logits.device).view(chunks, width)
    x = logits.reshape(B, chunks, width).masked_fill(column >= limit, float("-inf"))
    local = x.argmax(-1)  # (B, chunks): the best column of each chunk
    best = x.gather(2, local[..., None])[..., 0]
    chunk = best.argmax(-1)  # the first chunk holding the maximum
    return chunk * width + local.gather(1, chunk[:, None])[:, 0]


@dataclass
class _Launch:
    """A decode step queued on the device whose tokens the host has not read yet."""
    rows: list  # the _Row of each slot at launch time (None: slot not decoded)
    host: torch.Tensor  # the step's next tokens, (batch,), copied to the host (asynchronously on CUDA)
    event: object  # CUDA event recorded after that copy, or None
    logits: torch.Tensor  # the step's logits: valid only until the next launch
    forced: dict | None = None  # slot -> forced token replacing the sampled one, once decided

    def tokens(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class Engine:
    """A fixed number of slots sharing one KV cache of max_len tokens. `add` prefills requests into free slots,
    `step` decodes one token for every live slot; both return the chunks produced. `run` does the whole loop.

    max_len defaults to the model's context; size it to the work on CUDA, where every step reads the whole cache.
    compile (default: on CUDA) compiles the decode step over static shapes; on CUDA it is captured in one CUDA graph
    (model, greedy choice and bookkeeping; sampling with temperature runs after it without waiting for the host).
    pipeline (default: on CUDA) queues step n+1 before the host reads step n's tokens, so the host's per-row work
    (stops, streaming text, forced tokens) overlaps the device's; it is turned off while a row asks for logprobs.
    speculative="ngram" makes each step read num_speculative_tokens drafted tokens per row as well (prompt lookup)
    and keep those the row would have chosen anyway: the tokens of plain decoding, in fewer steps (eager, not
    pipelined)."""

    def __init__(self, model, tokenizer, batch_size: int = 1, max_len: int | None = None, compile: bool | None = None,
                 pipeline: bool | None = None, speculative: str | None = None, num_speculative_tokens: int = 3):
        self.model, self.tokenizer = model, tokenizer
        if speculative not in (None, "ngram"):
            raise ValueError(f"speculative must be 'ngram' (prompt lookup) or None, got {speculative!r}")
        if speculative and num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.speculative, self.num_speculative_tokens = speculative, num_speculative_tokens
        self.device = model.lm_head.weight.device
        self.batch_size, self.max_len = batch_size, max_len or model.config.max_position_embeddings
        self.cache = model.make_cache(batch_size, self.max_len)
        device = self.device
        self.mask = torch.zeros(batch_size, self.max_len, dtype=torch.bool, device=device)  # slots with real keys
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # position of each row's next token
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # the token each row feeds next
        self.t = 0  # the cache slot the next token of every row is written to
        self.t_device = torch.zeros(1, dtype=torch.long, device=device)  # the same, for the decode step
        self.rows: list[_Row | None] = [None] * batch_size
        self.live = torch.zeros(batch_size, dtype=torch.bool, device=self.device)  # rows[i] is not None, on device
        self.sampler = Sampler(batch_size, model.config.vocab_size, self.device)
        # ids past the tokenizer's (the padded rows of the embedding, e.g. 151669..151935) are never sampled
        self.token_limit = min(tokenizer.vocab_size, model.config.vocab_size)
        self.budget_ids = tokenizer.encode(BUDGET_PHRASE, allow_special=True)
        cuda = self.device.type == "cuda"
        # static shapes (+ one CUDA graph on the GPU); the CPU attends to the filled prefix only
        # (the hybrid's DeltaNet state is advanced in place by each step; its captured step is not measured yet)
        self.static = (cuda and not model.config.is_hybrid) if compile is None else compile
        self.pipeline = cuda if pipeline is None else pipeline
        if speculative:  # a speculative step has a data-dependent shape and waits for its tokens: eager, unpipelined
            self.static = self.pipeline = False
        self.drafted = self.accepted = 0  # speculative decoding: draft tokens proposed and accepted
        # stacked q/k/v and gate/up weights (model.fuse_projections): views of the parameters on the GPU; copies on
        # the CPU, so there only for models under 1B parameters
        self.fused = cuda or model.config.num_parameters() <= 1e9
        self.launches = 0  # decode steps run
        self._pending: _Launch | None = None  # pipelined: the step queued last, its tokens not read yet
        self._override: dict[int, int] = {}  # slot -> forced token to feed instead of the sampled one
        self._graph = self._graph_logits = self._weights = None
        # a manual CUDA graph of the compiled step for dense models; MoE routing has data-dependent shapes, so its
        # step goes through torch.compile's own CUDA graphs (which split the step where it must)
        self._use_graph = self.static and cuda and not model.config.is_moe and not model.config.is_hybrid
        if not self.static:
            self._decode = _decode_step
        elif self._use_graph or not cuda:
            self._decode = _compiled_step("default", not model.config.is_moe)
        else:
            self._decode = _compiled_step("reduce-overhead", False)
            for buffer in [self.mask, self.positions, self.tokens, self.t_device, self.live] + \
                    [b for layer in self.cache for b in layer.buffers()]:
                torch._dynamo.mark_static_address(buffer)
        self._check_weights()

    # --- slots ---
    def free_slots(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row is None]

    def live_slots(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row is not None]

    def cancel(self, slot: int) -> None:
        """Drop a request (e.g. a client went away); its slot is free for the next `add`."""
        self.rows[slot] = None
        self.live[slot] = False
        self.mask[slot] = False
        self._override.pop(slot, None)

    # --- generation ---
    @torch.no_grad()
    def add(self, requests: list[Request]) -> list[Chunk]:
        """Prefill requests into free slots (one forward for all) and choose their first tokens."""
        slots = self.free_slots()[:len(requests)]
        if len(slots) < len(requests):
            raise RuntimeError(f"{len(requests)} requests but only {len(slots)} free slots")
        for r in requests:
            if len(r.prompt_ids) + r.params.max_new_tokens > self.max_len:
                raise ValueError(f"prompt ({len(r.prompt_ids)} tokens) + max_new_tokens ({r.params.max_new_tokens}) "
                                 f"exceed the cache ({self.max_len} tokens)")
        if not self.live_slots():
            self._pending = None  # what is still queued belongs to finished rows
        self._check_weights()
        with fused_projections(self.fused):
            logits = self._prefill(slots, [r.prompt_ids for r in requests])
        for slot, request in zip(slots, requests):
            self.rows[slot] = _Row(request, self.tokenizer, self.budget_ids)
            self.sampler.set_row(slot, request.params, request.prompt_ids)
        self.live[slots] = True
        return self._choose(slots, logits)

    @torch.no_grad()
    def step(self) -> list[Chunk]:
        """Decode one token for every live slot. Pipelined, the chunks returned are those of the step before (the
        host reads a step's tokens while the next one runs); a row's last tokens come with the call after."""
        if not self.live_slots():
            self._pending = None
            return []
        if self.speculative:
            return self._speculative_step()
        pending, self._pending = self._pending, None
        if pending is not None and pending.forced is None:
            self._decide(pending)  # what the rows feed next must be known before the next step is queued
        launch = self._launch() if self._launch_needed(pending) else None
        chunks = self._process(pending) if pending is not None else []
        if launch is not None:
            if self.pipeline and not self._wants_logprobs():
                self._pending = launch
            else:
                self._decide(launch)
                chunks += self._process(launch)
        return chunks

    def run(self, requests: list[Request]) -> Iterator[Chunk]:
        """Generate all requests, admitting queued ones as slots free up; yields chunks as they are produced."""
        queue, mine = deque(requests), {id(r) for r in requests}
        try:
            while queue or self.live_slots():
                if queue and self.free_slots():
                    yield from self.add([queue.popleft() for _ in range(min(len(queue), len(self.free_slots())))])
                yield from self.step()
        finally:  # a stream abandoned midway (closed, interrupted) gives its slots back
            for slot in self.live_slots():
                if id(self.rows[slot].request) in mine:
                    self.cancel(slot)

    def _choose(self, slots: list[int], logits: torch.Tensor) -> list[Chunk]:
        """The next token of these rows from their logits (len(slots), vocab), chosen on the host: sample (or force)
        it, feed it to the row's state machine. For newly added rows and for each position of a speculative step."""
        logits = logits[:, :self.token_limit]
        sampled = self.sampler.sample(logits, slots).tolist()
        tokens = [self.rows[slot].next_token(token) for slot, token in zip(slots, sampled)]
        self.tokens[slots] = torch.tensor(tokens, device=self.device)
        self.sampler.observe(slots, tokens)
        chunks = []
        for slot, token, logprob in zip(slots, tokens, self._logprobs(slots, logits, tokens)):
            chunks += self._accept(slot, token, logprob)
        return chunks

    def _accept(self, slot: int, token: int, logprob) -> list[Chunk]:
        row = self.rows[slot]
        chunks = row.accept(token, logprob)
        if row.finish_reason:
            self.cancel(slot)
        return chunks

    # --- decode steps ---
    def _launch_needed(self, pending: _Launch | None) -> bool:
        """Whether any live row needs another step: not when every row's token in flight is its last by length."""
        for slot in self.live_slots():
            row = self.rows[slot]
            if pending is None or pending.rows[slot] is not row or len(row.token_ids) + 1 < row.params.max_new_tokens:
                return True
        return False

    def _wants_logprobs(self) -> bool:
        return any(row is not None and row.request.logprobs is not None for row in self.rows)

    def _launch(self) -> _Launch:
        """Queue one decode step (forced tokens first, then the model, then sampling) and the copy of its tokens to
        the host; nothing here waits for the device."""
        if self.t == self.max_len:
            self._compact()
        if self._override:
            slots = list(self._override)
            self.tokens[device_tensor(slots, torch.long, self.device)] = device_tensor(
                [self._override[s] for s in slots], torch.long, self.device)
            self._override.clear()
        self.sampler.observe_all(self.tokens)  # the tokens fed now are the ones chosen last (penalties)
        slots = self.live_slots()
        logits = self._forward_decode()
        self.t += 1
        self.launches += 1
        if not self.sampler.is_greedy(slots):  # the step wrote argmaxes; rows that sample overwrite theirs
            if len(slots) == self.batch_size:
                self.tokens.copy_(self.sampler.sample(logits.float(), slots))
            else:
                index = device_tensor(slots, torch.long, self.device)
                self.tokens.index_copy_(0, index, self.sampler.sample(logits[index].float(), slots))
        if self.device.type == "cuda":
            host, event = self.tokens.to("cpu", non_blocking=True), torch.cuda.Event()
            event.record()
        else:
            host, event = self.tokens.clone(), None
        return _Launch(list(self.rows), host, event, logits)

    def _decide(self, launch: _Launch) -> None:
        """Which rows take a forced token (the thinking budget's phrase) instead of this step's sample. Decided
        from the rows' state before that token, as soon as every earlier token was accepted."""
        launch.forced = {}
        for slot, row in enumerate(launch.rows):
            if row is not None and self.rows[slot] is row:
                token = row.take_forced()
                if token is not None:
                    launch.forced[slot] = self._override[slot] = token

    def _process(self, launch: _Launch) -> list[Chunk]:
        """Read a step's tokens and feed them to the rows that are still the ones it decoded."""
        sampled = launch.tokens()
        slots = [s for s, row in enumerate(launch.rows) if row is not None and self.rows[s] is row]
        tokens = [launch.forced.get(s, sampled[s]) for s in slots]
        chunks = []
        for slot, token, logprob in zip(slots, tokens, self._logprobs(slots, launch.logits, tokens)):
            chunks += self._accept(slot, token, logprob)
        return chunks

    def _logprobs(self, slots: list[int], logits: torch.Tensor, tokens: list[int]) -> list:
        """(logprob, [(id, logprob)] top alternatives) of each chosen token for the rows that asked, None for the
        others; from the model's raw distribution (before penalties and temperature), as vLLM reports them.
        logits: one row per slot of `slots` (prefill), or one per engine slot (decode)."""
        wanted = [i for i, slot in enumerate(slots) if self.rows[slot].request.logprobs is not None]
        out = [None] * len(slots)
        if not wanted:
            return out
        pick = [slots[i] for i in wanted] if logits.shape[0] == self.batch_size else wanted
        logp = logits[pick].float().log_softmax(-1)
        chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=logp.device))[:, 0].tolist()
        top = max(self.rows[slots[i]].request.logprobs for i in wanted)
        values, ids = (t.tolist() for t in logp.topk(top, dim=-1))
        for j, i in enumerate(wanted):
            n = self.rows[slots[i]].request.logprobs
            out[i] = (chosen[j], list(zip(ids[j][:n], values[j][:n])))
        return out

    def _forward_decode(self) -> torch.Tensor:
        args = (self.model, self.cache, self.tokens, self.positions, self.mask, self.t_device, self.live,
                None if self.static else self.t + 1, self.token_limit)
        if self._graph is not None:
            self._graph.replay()
            return self._graph_logits
        with fused_projections(self.fused):
            if self._decode is _decode_step:
                return _decode_step(*args)
            try:
                if self._use_graph:
                    return self._capture(args)
                if self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
                return self._decode(*args)
            except Exception as error:  # a compiler problem must not stop generation: fall back to eager
                warnings.warn(f"compiling the decode step failed, running it eagerly: {error}")
                self._decode, self._use_graph = _decode_step, False
                return _decode_step(*args)

    def _capture(self, args) -> torch.Tensor:
        """Compile the step (warm-up runs on a side stream, state restored after each), capture it in a CUDA graph
        and run it once for real."""
        state = [self.tokens, self.positions, self.t_device]
        saved = [b.clone() for b in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # the same step with the same inputs: the cache and mask receive what they will
                self._decode(*args)
                for b, v in zip(state, saved):
                    b.copy_(v)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._decode(*args)
        for b, v in zip(state, saved):
            b.copy_(v)
        self._graph, self._graph_logits = graph, logits
        graph.replay()
        return logits

    def _check_weights(self) -> None:
        """The stacked projections (CUDA) and the captured graph follow the model's tensors: if any parameter was
        replaced since (`.to()`, assigning `.data`), the stacks are re-linked and the graph captured again."""
        if self.fused and not self.model.fuse_projections():
            self._graph = None
        weights = [p.data_ptr() for p in self.model.parameters()]
        if weights != self._weights:
            self._graph, self._weights = None, weights

    # --- cache layout ---
    def _prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts, left-padded to a common length L, and write their keys into `slots` at [t-L, t)."""
        L = max(map(len, prompts))
        if not self.live_slots():
            self._set_t(L)  # an idle engine starts over: nothing to move
        elif L > self.t:
            self._shift(L - self.t)
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        real = torch.zeros(len(prompts), L, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            ids[i, L - len(prompt):] = torch.tensor(prompt)
            real[i, L - len(prompt):] = True
        ids, real = ids.to(self.device), real.to(self.device)
        positions = (real.cumsum(1) - 1).clamp(min=0)
        in_place = self.t == L and len(slots) == self.batch_size  # a whole fresh batch: write the cache directly
        cache = self.cache if in_place else self.model.make_cache(len(prompts), L)
        if in_place:
            for layer in cache:
                layer.clear()  # a recurrent state (the hybrid's) must start from zero; stale keys are masked anyway
        for start in range(0, L, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, L)
            out = self.model(ids[:, start:end], position_ids=positions[:, start:end], attention_mask=real[:, :end],
                             cache=cache, cache_position=torch.arange(start, end, device=self.device),
                             logits_to_keep=1)
        index = torch.tensor(slots, device=self.device)
        if not in_place:
            for layer, new in zip(self.cache, cache):
                layer.place(index, new, self.t - L, self.t)
        self.mask[index] = False
        self.mask[index, self.t - L:self.t] = real
        self.positions[index] = real.sum(1)
        return out.logits[:, -1].float()

    def _set_t(self, t: int) -> None:
        self.t = t
        self.t_device.fill_(t)

    def _shift(self, offset: int) -> None:
        """Move every row's keys `offset` slots right (left when negative); positions travel with the keys."""
        for layer in self.cache:
            layer.shift(offset)
        self.mask.copy_(self.mask.roll(offset, 1))
        stale = slice(0, offset) if offset > 0 else slice(self.max_len + offset, self.max_len)
        self.mask[:, stale] = False  # the slots that wrapped around
        self._set_t(self.t + offset)

    def _compact(self) -> None:
        """The cache is full: drop the slots before the oldest key any live row still needs."""
        first_real = self.mask[self.live_slots()].int().argmax(1)
        self._shift(-int(first_real.min()))


    # --- speculative decoding ---
    def _speculative_step(self) -> list[Chunk]:
        """Up to k+1 tokens per live row from one forward: each row reads its next token followed by k drafted ones
        (at consecutive positions, into cache slots t..t+k), then keeps the drafts up to the first one that differs
        from what it chooses at that position from the model's logits. The choice is the one a plain step would
        make (the same sampler, penalties, forced tokens and random draws), so the tokens are those of plain
        decoding, seeded sampling included; a good draft only makes them come faster. The slots of rejected drafts
        stay in the cache as masked holes."""
        slots = self.live_slots()
        drafts = {slot: self._draft(slot) for slot in slots}
        k = max(map(len, drafts.values()))
        if self.t + k + 1 > self.max_len:
            self._defragment()
            k = min(k, self.max_len - self.t - 1)
            drafts = {slot: draft[:k] for slot, draft in drafts.items()}
        fed = torch.zeros(self.batch_size, k + 1, dtype=torch.long)
        fed[:, 0] = self.tokens.cpu()
        for slot, draft in drafts.items():
            fed[slot, 1:1 + len(draft)] = torch.tensor(draft, dtype=torch.long)
        step = torch.arange(k + 1, device=self.device)
        self.mask[:, self.t:self.t + k + 1] = self.live[:, None]
        for layer in self.cache:
            layer.track = True  # a DeltaNet state keeps its value after each token, to return to the last accepted
        with fused_projections(self.fused):
            out = self.model(fed.to(self.device), position_ids=self.positions[:, None] + step, cache=self.cache,
                             cache_position=self.t + step, attention_mask=self.mask[:, :self.t + k + 1])
        logits = out.logits[..., :self.token_limit].float()
        kept = torch.zeros(self.batch_size, dtype=torch.long)  # drafts kept per row
        chunks, active = [], slots
        for j in range(k + 1):  # position j chooses the token after fed[:, j], as plain decoding would
            rows = [self.rows[slot] for slot in active]
            chunks += self._choose(active, logits[active, j])
            going = []
            for slot, row in zip(active, rows):
                if self.rows[slot] is row and j < len(drafts[slot]) and row.token_ids[-1] == drafts[slot][j]:
                    kept[slot] = j + 1  # the draft was right: its key is valid and the row chooses again
                    going.append(slot)
            active = going
            if not active:
                break
        for slot in self.live_slots():
            self.mask[slot, self.t + int(kept[slot]) + 1:self.t + k + 1] = False
        kept = kept.to(self.device)
        for layer in self.cache:
            layer.keep(kept)
            layer.track = False
        self.positions += kept + 1
        self._set_t(self.t + k + 1)
        self.launches += 1
        self.drafted += sum(map(len, drafts.values()))
        self.accepted += int(kept.sum())
        return chunks

    def _draft(self, slot: int) -> list[int]:
        """Up to k tokens that may follow the row's text so far (prompt lookup)."""
        row = self.rows[slot]
        if row.lookup is None:
            row.lookup = PromptLookup()
        return row.lookup.draft(row.request.prompt_ids + row.token_ids, self.num_speculative_tokens)

    def _defragment(self) -> None:
        """Close the holes: move each row's real keys (in order) to the slots just before the new t, the largest
        number of real keys of any row."""
        counts = self.mask.sum(1).tolist()
        t = max(counts)
        source = torch.zeros(self.batch_size, self.max_len, dtype=torch.long)
        mask = torch.zeros(self.batch_size, self.max_len, dtype=torch.bool)
        for row, count in enumerate(counts):
            source[row, t - count:t] = self.mask[row].nonzero()[:, 0].cpu()
            mask[row, t - count:t] = True
        source = source.to(self.device)
        for layer in self.cache:
            layer.reorder(source)
        self.mask.copy_(mask)
        self._set_t(t)


class PromptLookup:
    """Prompt-lookup drafts (vLLM's "ngram" method, transformers' prompt_lookup_num_tokens) for one growing text:
    find the latest earlier occurrence of the text's last n tokens, for the longest n <= max_n that has one, and
    propose the k tokens that followed it. Keeps a map from each n-gram to where its latest occurrence ends,
    extended by the new tokens at each call, so a call costs what the text grew by, not its length."""

    def __init__(self, max_n: int = 3):
        self.max_n, self.ends, self.indexed = max_n, {}, 0

    def draft(self, text: list[int], k: int) -> list[int]:
        for end in range(self.indexed, len(text) - 1):  # n-grams ending before the last token: something follows
            for n in range(1, min(self.max_n, end + 1) + 1):
                self.ends[tuple(text[end + 1 - n:end + 1])] = end + 1
        self.indexed = max(self.indexed, len(text) - 1)
        for n in range(min(self.max_n, len(text)), 0, -1):
            follows = self.ends.get(tuple(text[-n:]))
            if follows is not None:
                return text[follows:follows + k]
        return []


_COMPILED = {}


def _compiled_step(mode: str, fullgraph: bool):
    """The decode step compiled once per process and kind (static shapes; each engine shape adds a graph)."""
    key = (mode, fullgraph)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_decode_step, mode=mode, fullgraph=fullgraph, dynamic=False)
    return _COMPILED[key]


# ----------------------------------------------------------------------------------------------------------------
# The public API

def encode_prompt(tokenizer, prompt, enable_thinking: bool | None = None, tools: list | None = None) -> list[int]:
    """Messages (chat template), a plain string (raw completion) or token ids, as token ids."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, allow_special=True)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt) and prompt:
        ids = tokenizer.apply_chat_template(list(prompt), tools=tools, add_generation_prompt=True,
                                            enable_thinking=enable_thinking)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(i, int) for i in prompt):
        ids = list(prompt)
    else:
        raise TypeError("a prompt is a list of message dicts, a string or a list of token ids")
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


def make_request(model, tokenizer, prompt, params: SamplingParams, enable_thinking=None, tools=None, index=0,
                 context: int | None = None) -> Request:
    """Encode a prompt, fill in the mode's sampling defaults and fit max_new_tokens into the context."""
    ids = encode_prompt(tokenizer, prompt, enable_thinking, tools)
    context = min(context or model.config.max_position_embeddings, model.config.max_position_embeddings)
    if len(ids) >= context:
        raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {context}")
    outside = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if outside:
        raise ValueError(f"prompt token id {outside[0]} is outside the model's vocabulary ({model.config.vocab_size})")
    resolved = params.resolved(thinking=initial_phase(ids, tokenizer) != ANSWER)
    resolved.max_new_tokens = min(resolved.max_new_tokens, context - len(ids))
    return Request(ids, resolved, index)


_LAST_CUDA_ENGINE: list[Engine] = []  # reused across calls, so its decode step is compiled and captured once


def engine_for(model, tokenizer, batch_size: int, max_len: int, speculative: str | None = None,
               num_speculative_tokens: int = 3) -> Engine:
    """A new engine on CPU (cheap); on CUDA the previous one when it fits, else one with a power-of-two cache length
    (each new shape costs a compilation)."""
    spec = dict(speculative=speculative, num_speculative_tokens=num_speculative_tokens)
    if model.lm_head.weight.device.type != "cuda":
        return Engine(model, tokenizer, batch_size, max_len, **spec)
    max_len = 1 << max(8, (max_len - 1).bit_length())
    last = _LAST_CUDA_ENGINE[0] if _LAST_CUDA_ENGINE else None
    if (last is not None and last.model is model and last.tokenizer is tokenizer and last.batch_size == batch_size
            and last.max_len >= max_len and not last.live_slots() and last.speculative == speculative
            and last.num_speculative_tokens == num_speculative_tokens):
        return last
    _LAST_CUDA_ENGINE[:] = []  # free the old cache first
    _LAST_CUDA_ENGINE.append(Engine(model, tokenizer, batch_size, max_len, **spec))
    return _LAST_CUDA_ENGINE[0]


def generate_batch(model, tokenizer, prompts: list, max_new_tokens: int = 512, enable_thinking: bool | None = None,
                   thinking_budget: int | None = None, temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, min_p: float | None = None, presence_penalty: float = 0.0,
                   repetition_penalty: float = 1.0, stop: str | list[str] | None = None,
                   seed: int | list[int] | None = None, stream: bool = False, tools: list | None = None,
                   engine: Engine | None = None, batch_size: int | None = None, logprobs: int | None = None,
                   progress: str | None = None, speculative: str | None = None, num_speculative_tokens: int = 3):
    """Generate for many prompts at once: a list of GenerationResult, or with stream=True an iterator of Chunks
    (chunk.index says which prompt). An int seed gives prompt i the seed seed+i. batch_size: rows decoded together
    (default: all prompts); the others wait for a free row. logprobs=k: each token's logprob and its k best
    alternatives in result.logprobs / chunk.logprobs. Pass an Engine to reuse its cache (and, on CUDA, its compiled
    decode step) across calls. progress: a label for a bar of finished answers with tok/s and ETA, drawn when
    stderr is a terminal. speculative: "ngram" (prompt lookup) or "mtp" (Qwen3-Next's MTP head) drafts
    num_speculative_tokens tokens per step, checked in one forward: the same tokens, sooner (see Engine)."""
    if not isinstance(seed, (list, tuple)):
        seed = [None if seed is None else seed + i for i in range(len(prompts))]
    requests = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                min_p=min_p, presence_penalty=presence_penalty,
                                repetition_penalty=repetition_penalty, stop=stop, seed=seed[i],
                                thinking_budget=thinking_budget)
        requests.append(make_request(model, tokenizer, prompt, params, enable_thinking, tools, i,
                                     engine.max_len if engine else None))
        requests[-1].logprobs = logprobs
    if engine is None:
        max_len = max(len(r.prompt_ids) for r in requests) + max(r.params.max_new_tokens for r in requests)
        engine = engine_for(model, tokenizer, min(batch_size or len(requests), len(requests)), max_len, speculative,
                            num_speculative_tokens)
    chunks = engine.run(requests)
    if stream:
        return chunks
    results = [None] * len(requests)
    bar = _progress_bar(progress, len(requests)) if progress else None
    tokens, start = 0, time.perf_counter()
    for chunk in chunks:
        tokens += len(chunk.token_ids)
        if chunk.result is not None:
            results[chunk.index] = chunk.result
            if bar is not None:
                bar.update()
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tok/s")  # and redraw
    if bar is not None:
        bar.close()
    return results


def _progress_bar(label: str, total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc=label, unit="answer", dynamic_ncols=True, leave=False, disable=None)  # None: TTY only


def generate(model, tokenizer, messages_or_prompt, max_new_tokens: int = 512, enable_thinking: bool | None = None,
             thinking_budget: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, min_p: float | None = None, presence_penalty: float = 0.0,
             repetition_penalty: float = 1.0, stop: str | list[str] | None = None, seed: int | None = None,
             stream: bool = False, tools: list | None = None, engine: Engine | None = None,
             logprobs: int | None = None, speculative: str | None = None, num_speculative_tokens: int = 3):
    """Generate for one prompt: a GenerationResult, or with stream=True an iterator of Chunks whose last one carries
    the result. Sampling knobs left at None take Qwen's defaults for the mode (thinking unless it is switched off)."""
    out = generate_batch(model, tokenizer, [messages_or_prompt], max_new_tokens=max_new_tokens,
                         enable_thinking=enable_thinking, thinking_budget=thinking_budget, temperature=temperature,
                         top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty,
                         repetition_penalty=repetition_penalty, stop=stop, seed=seed, stream=stream, tools=tools,
                         engine=engine, logprobs=logprobs, speculative=speculative,
                         num_speculative_tokens=num_speculative_tokens)
    return out if stream else out[0]


def load(path: str, dtype=None, device=None):
    """(model, tokenizer) from a checkpoint folder (model and tokenizer files side by side), ready to generate.

    device None: CUDA when available. dtype None: the checkpoint's, but bf16 instead of fp32 on CUDA. A folder
    without tokenizer files gets the official Qwen3 tokenizer if the model has its vocabulary. A training run's
    folder (a `latest` file naming its newest checkpoint) loads that checkpoint."""
    from safetensors import SafetensorError
    from .checkpoint import load_model, resolve
    from .config import Qwen3Config
    from .tokenizer import load_tokenizer
    if not os.path.exists(os.path.join(path, "config.json")):
        path = resolve(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None and str(device).startswith("cuda") and os.path.isdir(path):
        dtype = "bfloat16" if Qwen3Config.from_json(path).torch_dtype in (None, "float32") else None
    try:
        model = load_model(path, dtype=dtype, device=device).eval()
    except SafetensorError as error:
        raise ValueError(f"{path}: cannot read the weights: {error}") from None
    has_tokenizer = os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                                for f in ("tokenizer.json", "vocab.json"))
    if has_tokenizer:
        return model, load_tokenizer(path)
    if model.config.vocab_size >= 151669 or not os.path.isdir(path):
        return model, load_tokenizer()
    raise FileNotFoundError(f"{path} has no tokenizer files (tokenizer.json) and its vocabulary is not Qwen3's")
