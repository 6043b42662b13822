"""The engine: rows, continuous batching, choosing tokens, pipelined decode steps, logprobs.

An `Engine` decodes up to `batch_size` rows together over a paged KV cache (cache_manager.py). `add` prefills
requests into free rows (computing only what the prefix cache does not hold) and chooses their first tokens;
`step` decodes one token for every row; both return the chunks produced. Requests join between steps and leave
when done: that is continuous batching. Each row's request runs its own state machine (request.py: thinking
phase, budget, stops, streamed text). Rows are admitted while blocks last; when a running row needs a block and
none is left, the newest row is preempted: its blocks go back (into the prefix cache), it keeps everything else,
and it comes back, first in line, by prefilling what it had read (mostly a prefix-cache hit).

On CUDA the steps are pipelined: step n+1 is queued before the host reads step n's tokens, so the per-row Python
(stops, streaming, thinking budget) runs while the GPU computes. Forced tokens are decided one step ahead, which is
possible because they depend only on the tokens already accepted. How a step runs (eager, compiled, CUDA graph,
stacked projections) is decode.py's business; speculative steps are speculative.py's.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

from .cache_manager import PagedCache
from .decode import DecodeStep
from .grammar import mask_logits
from .request import BUDGET_PHRASE, START, Chunk, Request, Row
from .sampling import Sampler, device_tensor
from .speculative import MTPDrafter, capture_hidden, draft_tokens, speculative_step


@dataclass
class _Launch:
    """A decode step queued on the device whose tokens the host has not read yet."""
    rows: list  # the Row of each slot at launch time (None: slot not decoded)
    order: dict  # slot -> its row of `logits`
    host: torch.Tensor  # the step's next tokens, (batch,), copied to the host (asynchronously on CUDA)
    event: object  # CUDA event recorded after that copy, or None
    logits: torch.Tensor  # the step's logits, one row per decoded slot: valid only until the next launch
    forced: dict | None = None  # slot -> forced token replacing the sampled one, once decided

    def tokens(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class Engine:
    """Up to `batch_size` rows decoded together over a paged KV cache of rows of up to max_len tokens. `add`
    prefills requests into free rows, `step` decodes one token for every row; both return the chunks produced.
    `admissible` says how many waiting requests `add` can take now; `run` does the whole loop.

    KV cache: blocks of block_size tokens; num_blocks (or kv_cache_memory_bytes) caps the pool (default: every row
    can reach max_len). enable_prefix_caching: prompts reuse the blocks of earlier prompts that start the same way.
    compile (default: on CUDA) compiles the decode step over static shapes (the pool is then allocated whole); on
    CUDA it is captured in one CUDA graph (model, greedy choice and bookkeeping; sampling with temperature runs
    after it without waiting for the host). pipeline (default: on CUDA) queues step n+1 before the host reads step
    n's tokens, so the host's per-row work (stops, streaming text, forced tokens) overlaps the device's; it is
    turned off while a row asks for logprobs. fuse_projections (default: models of at most 1B parameters) runs
    q/k/v and gate/up as one matmul each over stacked copies of the weights. speculative="ngram" makes each step
    read num_speculative_tokens drafted tokens per row as well (prompt lookup) and keep those the row would have
    chosen anyway: the tokens of plain decoding, in fewer steps (eager, not pipelined); speculative="mtp" drafts them
    with Qwen3-Next's multi-token-prediction head instead."""

    def __init__(self, model, tokenizer, batch_size: int = 1, max_len: int | None = None, compile: bool | None = None,
                 pipeline: bool | None = None, speculative: str | None = None, num_speculative_tokens: int = 3,
                 fuse_projections: bool | None = None, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory_bytes: int | None = None, enable_prefix_caching: bool = True):
        if speculative not in (None, "ngram", "mtp"):
            raise ValueError(f"speculative must be 'ngram' (prompt lookup), 'mtp' (Qwen3-Next's multi-token-prediction "
                             f"head) or None, got {speculative!r}")
        if speculative and num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.speculative, self.num_speculative_tokens = speculative, num_speculative_tokens
        self.block_size, self.num_blocks, self.kv_cache_memory_bytes = block_size, num_blocks, kv_cache_memory_bytes
        self.enable_prefix_caching = enable_prefix_caching
        self.device = device = model.lm_head.weight.device
        self.batch_size, self.max_len = batch_size, max_len or model.config.max_position_embeddings
        cuda = device.type == "cuda"
        # static shapes (+ one CUDA graph on the GPU); eager steps decode the live rows over their filled blocks
        # (the hybrid's DeltaNet state is advanced in place by each step; its captured step is not measured yet)
        self.static = (cuda and not model.config.is_hybrid) if compile is None else compile
        self.pipeline = cuda if pipeline is None else pipeline
        if speculative:  # a speculative step has a data-dependent shape and waits for its tokens: eager, unpipelined
            self.static = self.pipeline = False
        self.cache = PagedCache(model, batch_size, self.max_len, block_size, num_blocks, kv_cache_memory_bytes,
                                enable_prefix_caching, self.static)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # the token each row feeds next
        self.rows: list[Row | None] = [None] * batch_size
        self.live = torch.zeros(batch_size, dtype=torch.bool, device=device)  # rows decoded by the next step
        self.sampler = Sampler(batch_size, model.config.vocab_size, device)
        # ids past the tokenizer's (the padded rows of the embedding, e.g. 151669..151935) are never sampled
        self.token_limit = min(tokenizer.vocab_size, model.config.vocab_size)
        self.budget_ids = tokenizer.encode(BUDGET_PHRASE, allow_special=True)
        fuse = model.config.num_parameters() <= 1e9 if fuse_projections is None else fuse_projections
        self.decoder = DecodeStep(model, self.static, fuse, [self.tokens, self.live] + self.cache.buffers())
        self.launches = self.drafted = self.accepted = 0  # decode steps; speculative drafts proposed and kept
        self.drafter = MTPDrafter(self) if speculative == "mtp" else None  # else drafts come from draft()
        self.preempted: list[int] = []  # rows set aside for want of blocks, first out first back
        self.preemptions = 0
        self._admitted: dict[int, int] = {}  # row -> admission number (the newest row is preempted first)
        self._admissions = 0
        self._weights = None  # the parameters' storage and versions when the cache was filled
        self._pending: _Launch | None = None  # pipelined: the step queued last, its tokens not read yet
        self._override: dict[int, int] = {}  # slot -> forced token to feed instead of the sampled one

    @property
    def capacity(self) -> int:
        """The most tokens (prompt and answer) one row can hold: max_len, or less when the pool is smaller."""
        return min(self.max_len, (self.cache.pool.num_blocks - 1) * self.block_size)

    @property
    def acceptance_rate(self) -> float | None:
        """Speculative decoding: the share of drafted tokens the rows kept (None before any draft)."""
        return self.accepted / self.drafted if self.drafted else None

    # --- rows ---
    def free_slots(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row is None]

    def live_slots(self) -> list[int]:
        """Rows holding a request (decoding, or preempted and waiting to come back)."""
        return [i for i, row in enumerate(self.rows) if row is not None]

    def decoding_slots(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row is not None and i not in self.preempted]

    def cancel(self, slot: int) -> None:
        """Drop a request (e.g. a client went away); its row and blocks are free for the next `add`."""
        row = self.rows[slot]
        if slot in self.preempted:
            self.preempted.remove(slot)
        elif row is not None:
            self.cache.release(slot, row.request.prompt_ids + row.token_ids)
        self.rows[slot] = None
        self.live[slot] = False
        self._override.pop(slot, None)

    # --- admission ---
    def admissible(self, requests: list[Request]) -> int:
        """How many of these requests, in order, `add` can take now: free rows, and blocks for each prompt (beyond
        its cached prefix) and the first decode step. None while preempted rows wait to come back."""
        if self.preempted:
            return 0
        available, n = self.cache.pool.available(), 0
        for request in requests[:len(self.free_slots())]:
            self._check_fits(request)
            room = int(request.params.max_new_tokens > 1)  # the first decode step writes one more key
            need = self.cache.blocks_needed(request.prompt_ids, room)
            if need > available:
                break
            available, n = available - need, n + 1
        return n

    def _check_fits(self, request: Request) -> None:
        total = len(request.prompt_ids) + request.params.max_new_tokens
        if total > self.capacity:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                             f"({request.params.max_new_tokens}) exceed the cache ({self.capacity} tokens per row)")

    @torch.no_grad()
    def add(self, requests: list[Request]) -> list[Chunk]:
        """Prefill requests into free rows and choose their first tokens. Requests sharing a prefix that is not
        cached yet go in waves: the first computes it, the others then find it in the cache."""
        if self.admissible(requests) < len(requests):
            raise RuntimeError(f"{len(requests)} requests but room for {self.admissible(requests)} "
                               f"({len(self.free_slots())} free rows, {self.cache.pool.available()} free blocks)")
        if not self.decoding_slots():
            self._pending = None  # what is still queued belongs to finished rows
        self._check_weights()
        waiting, chunks = list(zip(self.free_slots(), requests)), []
        while waiting:
            wave, waiting = self._wave(waiting)
            chunks += self._prefill(wave)
        return chunks

    def _wave(self, waiting: list) -> tuple[list, list]:
        """The (slot, request) pairs to prefill now, and those that wait for a block an earlier one computes."""
        wave, later, claimed = [], [], set()
        for slot, request in waiting:
            hit, hashes = self.cache.cached_prefix(request.prompt_ids)
            new = hashes[len(hit):]
            if new and new[0] in claimed:
                later.append((slot, request))
            else:
                wave.append((slot, request))
                claimed.update(new)
        return wave, later

    def _prefill(self, wave: list) -> list[Chunk]:
        slots, prompts = [slot for slot, _ in wave], [request.prompt_ids for _, request in wave]
        starts = [self.cache.admit(slot, prompt) for slot, prompt in zip(slots, prompts)]
        logits = self._run_prefill(slots, prompts, starts)
        for slot, request in wave:
            self.rows[slot] = Row(request, self.tokenizer, self.budget_ids)
            self.sampler.set_row(slot, request.params, request.prompt_ids)
            self._admissions += 1
            self._admitted[slot] = self._admissions
        self.live[slots] = True
        return self.choose(slots, logits)

    def _run_prefill(self, slots: list[int], prompts: list[list[int]], starts: list[int]) -> torch.Tensor:
        """The cache's prefill; with MTP drafts, the prompts' hidden states go to the drafter."""
        if self.drafter is None:
            return self.cache.prefill(slots, prompts, starts, self.decoder.fused)
        with capture_hidden(self.model) as hidden:
            logits = self.cache.prefill(slots, prompts, starts, self.decoder.fused)
        hidden = torch.cat(hidden, dim=1)
        for i, (slot, prompt, start) in enumerate(zip(slots, prompts, starts)):
            self.drafter.record(slot, start, hidden[i, :len(prompt) - start])
        return logits

    def _check_weights(self) -> None:
        """Cached keys are stale once the weights change (a training step between rollouts): forget them."""
        weights = [(p.data_ptr(), p._version) for p in self.model.parameters()]
        if self._weights is not None and weights != self._weights:
            self.cache.forget()
        self._weights = weights
        self.decoder.check_weights()

    # --- preemption ---
    def reserve(self, widths: dict[int, int]) -> None:
        """Blocks for the next widths[slot] tokens of each row, oldest rows first; when the pool runs short, the
        newest rows are preempted until it does not."""
        for slot in sorted(widths, key=self._admitted.get):
            while slot not in self.preempted and \
                    not self.cache.reserve(slot, self.cache.lengths[slot] + widths[slot]):
                self._preempt(max(self.decoding_slots(), key=self._admitted.get))

    def _preempt(self, slot: int) -> None:
        """Set a row aside: its blocks go back (full ones into the prefix cache); it keeps its tokens, sampler and
        state machine, and comes back through _resume."""
        row = self.rows[slot]
        self.cache.release(slot, row.request.prompt_ids + row.token_ids)
        self.live[slot] = False
        self.preempted.append(slot)
        self.preemptions += 1

    def _resume(self) -> None:
        """Bring preempted rows back, first set aside first, while blocks allow: prefill what each had read (its
        prompt and its tokens but the last, which it feeds next)."""
        while self.preempted:
            slot = self.preempted[0]
            row = self.rows[slot]
            tokens = row.request.prompt_ids + row.token_ids[:-1]
            if self.cache.blocks_needed(tokens, 1) > self.cache.pool.available():
                return
            self.preempted.pop(0)
            self._run_prefill([slot], [tokens], [self.cache.admit(slot, tokens)])
            self.tokens[slot] = row.token_ids[-1]
            self._override.pop(slot, None)
            self.live[slot] = True

    # --- generation ---
    @torch.no_grad()
    def step(self) -> list[Chunk]:
        """Decode one token for every row. Pipelined, the chunks returned are those of the step before (the host
        reads a step's tokens while the next one runs); a row's last tokens come with the call after."""
        if self.preempted:
            self._resume()
        if not self.decoding_slots():
            self._pending = None
            return []
        if self.speculative:
            return speculative_step(self)
        pending, self._pending = self._pending, None
        if pending is not None and pending.forced is None:
            self._decide(pending)  # what the rows feed next must be known before the next step is queued
        launch = self._launch() if self._launch_needed(pending) else None
        chunks = self._process(pending) if pending is not None else []
        if launch is not None:
            # a grammar's mask needs the row's previous token: constrained rows are not pipelined
            if self.pipeline and not self._wants_logprobs() and not self._constrained():
                self._pending = launch
            else:
                self._decide(launch)
                chunks += self._process(launch)
        return chunks

    def run(self, requests: list[Request]) -> Iterator[Chunk]:
        """Generate all requests, admitting queued ones as rows and blocks free up; yields chunks as they come."""
        queue, mine = deque(requests), {id(r) for r in requests}
        try:
            while queue or self.live_slots():
                n = self.admissible(list(queue)[:len(self.free_slots())]) if queue else 0
                if n:
                    yield from self.add([queue.popleft() for _ in range(n)])
                yield from self.step()
        finally:  # a stream abandoned midway (closed, interrupted) gives its rows back
            for slot in self.live_slots():
                if id(self.rows[slot].request) in mine:
                    self.cancel(slot)

    def draft(self, slot: int) -> list[int]:
        """Speculative decoding: up to num_speculative_tokens tokens that may follow the row's text so far."""
        return draft_tokens(self.rows[slot], self.num_speculative_tokens)

    def choose(self, slots: list[int], logits: torch.Tensor) -> list[Chunk]:
        """The next token of these rows from their logits (len(slots), vocab), chosen on the host: sample (or force)
        it, feed it to the row's state machine. For newly added rows and for each position of a speculative step."""
        logits = logits[:, :self.token_limit]
        sampled = self.sampler.sample(self._constrained_logits(slots, logits), slots).tolist()
        tokens = [self.rows[slot].next_token(token) for slot, token in zip(slots, sampled)]
        self.tokens[slots] = torch.tensor(tokens, device=self.device)
        self.sampler.observe(slots, tokens)
        chunks = []
        for slot, token, logprob in zip(slots, tokens, self._logprobs(slots, logits, tokens)):
            chunks += self._accept(slot, token, logprob)
        return chunks

    def _constrained(self) -> bool:
        """Whether a row follows a grammar (now, or after its think block: the token after `</think>` is masked,
        so its step must wait for `</think>` to be read)."""
        return any(row is not None and row.matcher is not None and not row.matcher.broken for row in self.rows)

    def _constrained_logits(self, slots: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The logits (len(slots), vocab) to choose from: a copy with -inf where a row's grammar forbids a token
        (while a think block may still open, `<think>` stays allowed), or the logits themselves when no row has one."""
        rows = [self.rows[slot] for slot in slots]
        matchers = [row.grammar_now() for row in rows]
        if not any(matcher is not None for matcher in matchers):
            return logits
        think = self.tokenizer.think_start_id
        extra = [[think] if row.phase == START and think is not None else [] for row in rows]
        return mask_logits(logits.float().clone(), matchers, extra)

    def _accept(self, slot: int, token: int, logprob) -> list[Chunk]:
        row = self.rows[slot]
        chunks = row.accept(token, logprob)
        if row.finish_reason:
            self.cancel(slot)
        return chunks

    # --- decode steps ---
    def _launch_needed(self, pending: _Launch | None) -> bool:
        """Whether any row needs another step: not when every row's token in flight is its last by length."""
        for slot in self.decoding_slots():
            row = self.rows[slot]
            if pending is None or pending.rows[slot] is not row or len(row.token_ids) + 1 < row.params.max_new_tokens:
                return True
        return False

    def _wants_logprobs(self) -> bool:
        return any(row is not None and row.request.logprobs is not None for row in self.rows)

    def _launch(self) -> _Launch:
        """Queue one decode step (forced tokens first, then the model, then sampling) and the copy of its tokens to
        the host; nothing here waits for the device."""
        self.reserve({slot: 1 for slot in self.decoding_slots()})
        if self._override:
            slots = list(self._override)
            self.tokens[device_tensor(slots, torch.long, self.device)] = device_tensor(
                [self._override[s] for s in slots], torch.long, self.device)
            self._override.clear()
        self.sampler.observe_all(self.tokens, self.live)  # the tokens fed now are the ones chosen last (penalties)
        slots = self.decoding_slots()
        logits, order = self._forward_decode(slots)
        for slot in slots:
            self.cache.lengths[slot] += 1
        self.launches += 1
        # the step wrote argmaxes; rows that sample or follow a grammar overwrite theirs
        if not self.sampler.is_greedy(slots) or self._constrained():
            index = device_tensor(slots, torch.long, self.device)
            rows = logits if len(slots) == logits.shape[0] else logits[index]
            rows = self._constrained_logits(slots, rows.float())
            self.tokens.index_copy_(0, index, self.sampler.sample(rows, slots))
        if self.device.type == "cuda":
            host, event = self.tokens.to("cpu", non_blocking=True), torch.cuda.Event()
            event.record()
        else:
            host, event = self.tokens.clone(), None
        rows = [row if slot in order else None for slot, row in enumerate(self.rows)]
        return _Launch(rows, order, host, event, logits)

    def _forward_decode(self, slots: list[int]) -> tuple[torch.Tensor, dict]:
        """Run the decode step: static, every row over the whole block table; eager, these rows (all of them
        without a gather when they are all decoding) over their filled blocks. Returns the logits and which of
        their rows is each slot's."""
        cache, every_row = self.cache, self.static or len(slots) == self.batch_size
        width = None if self.static else max(-(-(cache.lengths[slot] + 1) // self.block_size) for slot in slots)
        rows = None if every_row else device_tensor(slots, torch.long, self.device)
        logits = self.decoder(self.model, cache.layers, self.tokens, cache.positions, cache.table, self.live,
                              self.block_size, self.token_limit, rows, width)
        return logits, {slot: slot if every_row else i for i, slot in enumerate(slots)}

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
        logits = launch.logits[[launch.order[s] for s in slots]] if self._wants_logprobs() else None
        chunks = []
        for slot, token, logprob in zip(slots, tokens, self._logprobs(slots, logits, tokens)):
            chunks += self._accept(slot, token, logprob)
        return chunks

    def _logprobs(self, slots: list[int], logits: torch.Tensor | None, tokens: list[int]) -> list:
        """(logprob, [(id, logprob)] top alternatives) of each chosen token for the rows that asked, None for the
        others; from the model's raw distribution (before penalties and temperature), as vLLM reports them.
        logits: one row per slot of `slots`."""
        wanted = [i for i, slot in enumerate(slots) if self.rows[slot].request.logprobs is not None]
        out = [None] * len(slots)
        if not wanted:
            return out
        logp = logits[wanted].float().log_softmax(-1)
        chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=logp.device))[:, 0].tolist()
        top = max(self.rows[slots[i]].request.logprobs for i in wanted)
        values, ids = (t.tolist() for t in logp.topk(top, dim=-1))
        for j, i in enumerate(wanted):
            n = self.rows[slots[i]].request.logprobs
            out[i] = (chosen[j], list(zip(ids[j][:n], values[j][:n])))
        return out
