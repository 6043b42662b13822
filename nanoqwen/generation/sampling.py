"""Choosing the next token: penalties, temperature, top-k, top-p, min-p and greedy, one set of settings per batch row.

Each row draws one uniform number per token from its own CPU `torch.Generator`, so a seeded request gives the same
tokens alone or in any batch, on CPU or GPU. Settings live in per-row tensors so a slot can change request between
decode steps (continuous batching) without rebuilding anything. `sample` never waits for the device (host copies go
through pinned memory, decisions are taken from the host-side settings), so the engine can queue the next decode
step while the host is still busy with the previous one.

In transformers' order (tests/test_sampling.py checks against its processors): repetition penalty (CTRL: over the
prompt and the output, as transformers and vLLM), presence penalty (OpenAI: over the output only, as vLLM),
temperature, top-k, top-p, min-p. One difference: top-k keeps exactly k candidates, a tie at the k-th logit cut in
topk's order, where transformers and vLLM keep every tied token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Qwen3's recommended settings (model card): thinking never greedy (it loops), non-thinking a little hotter but narrower
THINKING_DEFAULTS = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
NON_THINKING_DEFAULTS = dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)


@dataclass
class SamplingParams:
    """Settings of one request. None for temperature/top_p/top_k/min_p means Qwen's default for the thinking mode."""
    max_new_tokens: int = 512
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None  # 0: no top-k
    min_p: float | None = None
    presence_penalty: float = 0.0  # OpenAI: subtracted from the logit of every token already generated
    repetition_penalty: float = 1.0  # CTRL/transformers: divides positive (multiplies negative) logits of seen tokens
    stop: list[str] = field(default_factory=list)  # the text is cut before the first stop string
    seed: int | None = None
    thinking_budget: int | None = None  # most reasoning tokens before the answer is forced; None: no limit

    def resolved(self, thinking: bool) -> "SamplingParams":
        """A copy with the unset sampling knobs filled with Qwen's defaults for this mode, checked."""
        defaults = THINKING_DEFAULTS if thinking else NON_THINKING_DEFAULTS
        knobs = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in defaults.items()}
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        out = SamplingParams(**{**self.__dict__, **knobs, "stop": stop})
        out.check()
        return out

    def check(self) -> None:
        problems = [
            (self.max_new_tokens < 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature < 0, f"temperature must be >= 0, got {self.temperature}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k < 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (not 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty <= 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.thinking_budget is not None and self.thinking_budget < 0,
             f"thinking_budget must be >= 0, got {self.thinking_budget}"),
            (any(not s for s in self.stop), "stop strings must not be empty"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message)


def device_tensor(values: list, dtype, device) -> torch.Tensor:
    """A small host list as a tensor on `device`, without waiting for the device: on CUDA the copy is queued from
    pinned memory (the caching host allocator keeps that memory until the copy is done)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Sampler:
    """Per-row sampling settings of a fixed-size batch and the tensors that apply them to a (rows, vocab) logits."""

    def __init__(self, batch_size: int, vocab_size: int, device):
        self.vocab_size, self.device = vocab_size, device
        self.temperature = torch.zeros(batch_size, device=device)
        self.top_k = torch.full((batch_size,), vocab_size, dtype=torch.long, device=device)
        self.top_p = torch.ones(batch_size, device=device)
        self.min_p = torch.zeros(batch_size, device=device)
        self.presence = torch.zeros(batch_size, device=device)
        self.repetition = torch.ones(batch_size, device=device)
        self.generators: list[torch.Generator | None] = [None] * batch_size
        self.params: list[SamplingParams | None] = [None] * batch_size
        self.generated = self.seen = None  # (batch, vocab) bool, allocated once a row asks for a penalty

    def set_row(self, row: int, params: SamplingParams, prompt_ids: list[int]) -> None:
        self.params[row] = params
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k or self.vocab_size
        self.top_p[row], self.min_p[row] = params.top_p, params.min_p
        self.presence[row], self.repetition[row] = params.presence_penalty, params.repetition_penalty
        generator = torch.Generator()  # on the CPU: the draws do not depend on the device
        if params.seed is None:
            generator.seed()  # non-deterministic, and leaves the global generator alone
        else:
            generator.manual_seed(params.seed)
        self.generators[row] = generator
        if self._wants_penalty(params) and self.generated is None:
            shape = (len(self.generators), self.vocab_size + 1)  # the last column: observe_all's other rows
            self.generated = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self.seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
        if self.generated is not None:
            self.generated[row] = False
            self.seen[row] = False
            prompt = torch.tensor([i for i in prompt_ids if i < self.vocab_size], dtype=torch.long)
            self.seen[row, prompt.to(self.device)] = True  # the repetition penalty counts the prompt too

    @staticmethod
    def _wants_penalty(params: SamplingParams) -> bool:
        return params.presence_penalty != 0 or params.repetition_penalty != 1

    def observe(self, rows: list[int], tokens: list[int]) -> None:
        """Record the tokens just emitted (sampled or forced) for the penalties."""
        if self.generated is not None:
            rows, tokens = torch.tensor(rows, device=self.device), torch.tensor(tokens, device=self.device)
            self.generated[rows, tokens] = True
            self.seen[rows, tokens] = True

    def observe_all(self, tokens: torch.Tensor, live: torch.Tensor) -> None:
        """Record one token per live row (tokens and live: (batch,) tensors on the device) without leaving the
        device; the other rows (free, or preempted and keeping their history) record into a spare column."""
        if self.generated is not None:
            index = torch.where(live, tokens, self.vocab_size)[:, None]
            self.generated.scatter_(1, index, True)
            self.seen.scatter_(1, index, True)

    def is_greedy(self, rows: list[int]) -> bool:
        """Whether the next tokens of these rows are plain argmaxes of the logits (no penalty, temperature 0)."""
        return all(self.params[r].temperature == 0 and not self._wants_penalty(self.params[r]) for r in rows)

    def sample(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The next token (len(rows),) for the given rows; logits (len(rows), vocab) in fp32."""
        params = [self.params[r] for r in rows]
        if self.is_greedy(rows):
            return logits.argmax(-1)  # the common greedy case: one kernel
        index = device_tensor(rows, torch.long, self.device)
        if any(self._wants_penalty(p) for p in params):
            logits = self._penalize(logits, index)
        greedy = logits.argmax(-1)
        if all(p.temperature == 0 for p in params):
            return greedy
        candidates, probs = self._filter(logits, index, max(p.top_k or self.vocab_size for p in params))
        uniform = device_tensor([float(torch.rand((), generator=self.generators[r])) for r in rows], torch.float32,
                                self.device)
        # inverse-CDF draw: one uniform number per row and token, whatever the batch around it
        kept = (probs > 0).sum(-1)  # the kept candidates are a prefix (best first)
        choice = torch.minimum((probs.cumsum(-1) <= uniform[:, None]).sum(-1), kept - 1)
        sampled = candidates.gather(1, choice[:, None])[:, 0]
        return torch.where(self.temperature[index] == 0, greedy, sampled)

    def _penalize(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        V = logits.shape[-1]  # the engine passes only the tokenizer's ids
        seen, generated = self.seen[index, :V], self.generated[index, :V]
        penalty = self.repetition[index, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        logits = logits - self.presence[index, None] * generated
        # extreme penalties overflow: keep every logit finite so softmax and argmax stay defined
        return torch.nan_to_num(logits, nan=torch.finfo(logits.dtype).min)

    def _filter(self, logits: torch.Tensor, index: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate token ids (rows, K), best first, and their probabilities after temperature, top-k/p and min-p.
        K: the largest top_k of these rows (known on the host: reading it off the device would wait for it)."""
        top_k = self.top_k[index]
        K = min(K, logits.shape[-1])
        scaled = logits / self.temperature[index, None].clamp(min=1e-5)
        values, candidates = scaled.topk(K, dim=-1) if K < logits.shape[-1] else scaled.sort(-1, descending=True)
        rank = torch.arange(K, device=logits.device)
        values = values.masked_fill(rank >= top_k[:, None], float("-inf"))
        probs = values.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the better candidates: keep the smallest set reaching top_p
        # the best candidate always stays, however small top_p is (5e-324 rounds to 0 in fp32)
        values = values.masked_fill((before >= self.top_p[index, None]) & (rank > 0), float("-inf"))
        probs = values.softmax(-1)
        values = values.masked_fill(probs < self.min_p[index, None] * probs[:, :1], float("-inf"))
        return candidates, values.softmax(-1)
