"""One request's life in the engine: what it asks for (`Request`), what it streams (`Chunk`), what it ends with
(`GenerationResult`), and the state machine between them (`Row`): the thinking phase (`<think>` ... `</think>`),
the thinking budget (the official phrase is forced once the reasoning reaches N tokens), stop tokens and stop
strings, and a UTF-8-safe text stream that tells reasoning from answer. Nothing here touches the model or a tensor.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .grammar import Matcher
from .sampling import SamplingParams

BUDGET_PHRASE = ("\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
                 "directly now.\n</think>\n\n")
START, THINKING, ANSWER = "start", "thinking", "answer"  # thinking phases of a row
REASONING, CONTENT = "reasoning", "content"  # kinds of streamed text


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
    grammar: object | None = None  # a compiled grammar the answer must follow (grammar.py), None: free


class Row:
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
        self.lookup = None  # speculative decoding's drafts (a PromptLookup, made on first use)
        self.matcher = None if request.grammar is None else Matcher(request.grammar)

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

    def grammar_now(self):
        """The Matcher that constrains this row's next token, or None: none asked, or inside the think block."""
        if self.matcher is None or self.matcher.broken or self.phase == THINKING:
            return None
        return self.matcher

    def accept(self, token: int, logprob=None) -> list[Chunk]:
        in_grammar = self.grammar_now() is not None and not (self.phase == START and
                                                             token == self.tokenizer.think_start_id)
        kind = self._advance_phase(token)
        if in_grammar:
            self.matcher.accept(token)
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
        parsed = self.tokenizer.parse_output(text, thinking=self.started_thinking)
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
