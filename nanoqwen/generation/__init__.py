"""Generation: the one path used by the CLI, evaluation, RL rollouts and the server.

    api.py            generate / generate_batch (a SamplingParams or its fields as keywords), encode_prompt
    engine.py         Engine: rows, add/step/run, admission and preemption, choosing tokens, pipelined steps, logprobs
    request.py        Request, Chunk, GenerationResult and the per-row state machine (thinking, budget, stops)
    sampling.py       SamplingParams and the per-row Sampler
    decode.py         the decode step: compile, CUDA graph, stacked projections
    cache.py          the per-layer caches and the protocol between them, the model and the engine
    cache_manager.py  the paged KV cache: block tables, prefill, prefix caching, DeltaNet snapshots
    blocks.py         the block pool: free blocks, reference counts, the prefix cache's hashes, LRU eviction
    speculative.py    prompt-lookup drafts and the speculative step
"""
from .api import encode_prompt, generate, generate_batch, make_request
from .engine import Engine
from .request import BUDGET_PHRASE, Chunk, GenerationResult, Request
from .sampling import SamplingParams

__all__ = ["BUDGET_PHRASE", "Chunk", "Engine", "GenerationResult", "Request", "SamplingParams", "encode_prompt",
           "generate", "generate_batch", "make_request"]
