"""The public generation API: `generate` (one prompt) and `generate_batch` (many), over an Engine.

Both take the sampling settings as a `SamplingParams` or as its fields in keyword arguments (max_new_tokens=...,
temperature=..., seed=...), which override it. Knobs left at None take Qwen's defaults for the thinking mode.
"""
from __future__ import annotations

import dataclasses
import time

from .engine import Engine
from .grammar import compile_constraint, constraint
from .request import ANSWER, Request, initial_phase
from .sampling import SamplingParams

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


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
                 context: int | None = None, constraint: str | None = None) -> Request:
    """Encode a prompt, fill in the mode's sampling defaults and fit max_new_tokens into the context. constraint:
    a grammar key of grammar.constraint (JSON output, a required tool call), compiled here (ValueError if it
    cannot be)."""
    ids = encode_prompt(tokenizer, prompt, enable_thinking, tools)
    context = min(context or model.config.max_position_embeddings, model.config.max_position_embeddings)
    if len(ids) >= context:
        raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {context}")
    outside = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if outside:
        raise ValueError(f"prompt token id {outside[0]} is outside the model's vocabulary ({model.config.vocab_size})")
    resolved = params.resolved(thinking=initial_phase(ids, tokenizer) != ANSWER)
    resolved.max_new_tokens = min(resolved.max_new_tokens, context - len(ids))
    return Request(ids, resolved, index, grammar=compile_constraint(tokenizer, constraint) if constraint else None)


_LAST_ENGINE: list[Engine] = []  # reused across calls: its prefix cache (and on CUDA its captured step) stay


def engine_for(model, tokenizer, batch_size: int, max_len: int, **options) -> Engine:
    """The previous engine when it fits (same model, rows and options, room enough, idle), else a new one whose row
    length is a power of two, so that growing conversations keep hitting the same engine and its prefix cache
    (and on CUDA each new shape costs a compilation). options: the Engine's other keyword arguments."""
    max_len = min(1 << max(8, (max_len - 1).bit_length()), model.config.max_position_embeddings)
    last = _LAST_ENGINE[0] if _LAST_ENGINE else None
    if (last is not None and last.model is model and last.tokenizer is tokenizer and last.batch_size == batch_size
            and last.max_len >= max_len and not last.live_slots()
            and all(getattr(last, name) == value for name, value in options.items())):
        return last
    _LAST_ENGINE[:] = []  # free the old cache first
    _LAST_ENGINE.append(Engine(model, tokenizer, batch_size, max_len, **options))
    return _LAST_ENGINE[0]


def sampling_params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    """`params` (default: SamplingParams()) with the keyword arguments that name its fields replaced."""
    unknown = sorted(set(overrides) - _SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} (sampling settings are "
                        f"{', '.join(sorted(_SAMPLING_FIELDS))})")
    return dataclasses.replace(params or SamplingParams(), **overrides)


def generate_batch(model, tokenizer, prompts: list, params: SamplingParams | None = None, *,
                   enable_thinking: bool | None = None, tools: list | None = None, stream: bool = False,
                   engine: Engine | None = None, batch_size: int | None = None, logprobs: int | None = None,
                   progress: str | None = None, speculative: str | None = None, num_speculative_tokens: int = 3,
                   block_size: int = 16, num_blocks: int | None = None, kv_cache_memory_bytes: int | None = None,
                   enable_prefix_caching: bool = True, response_format: dict | None = None, tool_choice=None,
                   **sampling):
    """Generate for many prompts at once: a list of GenerationResult, or with stream=True an iterator of Chunks
    (chunk.index says which prompt). params (or its fields as keyword arguments: max_new_tokens=512,
    temperature, top_p, top_k, min_p, presence_penalty, repetition_penalty, stop, seed, thinking_budget): the
    sampling settings of every prompt. An int seed gives prompt i the seed seed+i; a list gives each its own.
    batch_size: rows decoded together (default: all prompts); the others wait for a free row. logprobs=k: each
    token's logprob and its k best alternatives in result.logprobs / chunk.logprobs. Pass an Engine to reuse its
    cache (and, on CUDA, its compiled decode step) across calls. progress: a label for a bar of finished answers
    with tok/s and ETA, drawn when stderr is a terminal. speculative="ngram" drafts num_speculative_tokens tokens
    per step by prompt lookup ("mtp": by Qwen3-Next's MTP head), checked in one forward: the same tokens, sooner. block_size, num_blocks,
    kv_cache_memory_bytes, enable_prefix_caching: the paged KV cache (see Engine); without an engine, the last
    one is reused when it fits, so its prefix cache serves the next call (the next turn of a chat).
    response_format ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}) and
    tool_choice ("required" or {"type": "function", "function": {"name": ...}}) constrain every answer, as in the
    OpenAI API, by a grammar that starts after the think block (see grammar.py)."""
    params = sampling_params(params, sampling)
    key = constraint(response_format, tool_choice, tools)
    seeds = params.seed if isinstance(params.seed, (list, tuple)) else \
        [None if params.seed is None else params.seed + i for i in range(len(prompts))]
    requests = []
    for i, prompt in enumerate(prompts):
        requests.append(make_request(model, tokenizer, prompt, dataclasses.replace(params, seed=seeds[i]),
                                     enable_thinking, tools, i, engine.capacity if engine else None, key))
        requests[-1].logprobs = logprobs
    if engine is None:
        max_len = max(len(r.prompt_ids) for r in requests) + max(r.params.max_new_tokens for r in requests)
        engine = engine_for(model, tokenizer, min(batch_size or len(requests), len(requests)), max_len,
                            speculative=speculative, num_speculative_tokens=num_speculative_tokens,
                            block_size=block_size, num_blocks=num_blocks, kv_cache_memory_bytes=kv_cache_memory_bytes,
                            enable_prefix_caching=enable_prefix_caching)
    chunks = engine.run(requests)
    return chunks if stream else _results(chunks, len(requests), progress)


def _results(chunks, n: int, progress: str | None) -> list:
    """The result of each request from its chunks, with a progress bar when asked."""
    results = [None] * n
    bar = _progress_bar(progress, n) if progress else None
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


def generate(model, tokenizer, messages_or_prompt, params: SamplingParams | None = None, *,
             enable_thinking: bool | None = None, tools: list | None = None, stream: bool = False,
             engine: Engine | None = None, logprobs: int | None = None, speculative: str | None = None,
             num_speculative_tokens: int = 3, response_format: dict | None = None, tool_choice=None, **options):
    """Generate for one prompt: a GenerationResult, or with stream=True an iterator of Chunks whose last one carries
    the result. The arguments (sampling settings and KV-cache options included) are generate_batch's."""
    out = generate_batch(model, tokenizer, [messages_or_prompt], params, enable_thinking=enable_thinking,
                         tools=tools, stream=stream, engine=engine, logprobs=logprobs, speculative=speculative,
                         num_speculative_tokens=num_speculative_tokens, response_format=response_format,
                         tool_choice=tool_choice, **options)
    return out if stream else out[0]
