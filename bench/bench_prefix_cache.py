"""The paged KV cache and prefix caching, each measured against the engine without it, in the same run:

    python bench/bench_prefix_cache.py                      # CPU: a random nano-d4, fp32, 2 threads
    python bench/bench_prefix_cache.py --device cuda --shape nano-d8

1. Multi-turn chat: time to first token of the 10th turn (its prompt holds the nine turns before), with the prefix
   cache (the same engine served the earlier turns) and without it. Goal: >= 5x lower.
2. 32 clients sharing a 1,000-token system prompt, each with its own question, all at once: generated tokens per
   second with and without the prefix cache. Goal: >= 2x.
3. Peak KV memory for 32 requests of mixed length (prompts of 20-1,000 tokens, 64 new tokens each): the paged
   pool as it grew (and the blocks in use at the peak) against the static slots the engine had before paging,
   which held batch x max_len tokens for every layer from the start.

The model has random weights (speed does not depend on them) and a 1,024-token BPE tokenizer trained on the
embedded corpus, saved to a temporary folder and loaded as a checkpoint. Greedy decoding: with and without the
cache the tokens are the same, which the script checks.
"""
import argparse
import itertools
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nanoqwen import data  # noqa: E402
from nanoqwen.checkpoint import load, load_model, save_model  # noqa: E402
from nanoqwen.generation import Engine, SamplingParams, make_request  # noqa: E402
from nanoqwen.tokenizer import train_tokenizer  # noqa: E402

GREEDY = dict(temperature=0.0)


def build(shape: str, path: str, device: str):
    """A random model of `shape` and a trained 1,024-token tokenizer, saved and loaded back."""
    tokenizer = train_tokenizer(itertools.islice(data.synthetic_corpus("train", 0), 2000), 1024)
    torch.manual_seed(0)
    save_model(load_model(shape, vocab_size=1024, max_position_embeddings=4096), path)
    tokenizer.save(path)
    return load(path, dtype="float32", device=device)


def sentences(n_tokens: int, tokenizer, rng: random.Random) -> str:
    """Text of about n_tokens tokens from the embedded corpus."""
    docs = list(itertools.islice(data.synthetic_corpus("test", rng.randrange(1000)), 200))
    text, out = "", []
    while len(tokenizer.encode(text)) < n_tokens:
        out.append(rng.choice(docs)[:400])
        text = " ".join(out)
    return tokenizer.decode(tokenizer.encode(text)[:n_tokens])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def first_token_seconds(engine, request, device: str) -> tuple[float, list]:
    """Time of add() (prefill and first token) for one request, then the rest of its tokens."""
    sync(device)
    start = time.perf_counter()
    chunks = engine.add([request])
    sync(device)
    seconds = time.perf_counter() - start
    while engine.live_slots():
        chunks += engine.step()
    return seconds, [t for c in chunks for t in c.token_ids]


def chat_turn10(model, tok, args, caching: bool, seed: int) -> tuple[float, int, int]:
    """A 10-turn chat on one engine; (seconds to the 10th turn's first token, its prompt length, tokens cached)."""
    rng = random.Random(seed)
    engine = Engine(model, tok, batch_size=1, max_len=4096, enable_prefix_caching=caching)
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for turn in range(10):
        messages.append({"role": "user", "content": sentences(args.user_tokens, tok, rng)})
        request = make_request(model, tok, messages, SamplingParams(max_new_tokens=args.answer_tokens, **GREEDY),
                               enable_thinking=False)
        hits = engine.cache.pool.hit
        seconds, tokens = first_token_seconds(engine, request, args.device)
        messages.append({"role": "assistant", "content": tok.decode(tokens[:-1] if tokens[-1] in tok.stop_token_ids
                                                                    else tokens)})
    return seconds, len(request.prompt_ids), (engine.cache.pool.hit - hits) * engine.block_size


def shared_system_prompt(model, tok, args, caching: bool) -> tuple[float, list, float]:
    """32 requests with one 1,000-token system prompt, all at once: (seconds, tokens, mean first-token seconds)."""
    rng = random.Random(1)
    system = {"role": "system", "content": sentences(args.system_tokens, tok, rng)}
    params = SamplingParams(max_new_tokens=args.new_tokens, **GREEDY)
    requests = [make_request(model, tok, [system, {"role": "user", "content": sentences(20, tok, rng)}], params,
                             enable_thinking=False, index=i) for i in range(args.clients)]
    engine = Engine(model, tok, batch_size=args.clients, max_len=2048, enable_prefix_caching=caching)
    tokens, first = [[] for _ in requests], [None] * len(requests)
    sync(args.device)
    start = time.perf_counter()
    for chunk in engine.run(requests):
        tokens[chunk.index] += chunk.token_ids
        if first[chunk.index] is None:
            first[chunk.index] = time.perf_counter() - start
    sync(args.device)
    return time.perf_counter() - start, tokens, statistics.mean(first)


def mixed_lengths_memory(model, tok, args) -> dict:
    """32 requests of 20-1,000 prompt tokens: KV bytes of the paged pool vs the static slots before paging."""
    rng = random.Random(2)
    params = SamplingParams(max_new_tokens=64, **GREEDY)
    requests = [make_request(model, tok, [rng.randrange(10, 1000) for _ in range(rng.randint(20, 1000))], params,
                             index=i) for i in range(args.clients)]
    max_len = 1000 + 64
    engine = Engine(model, tok, batch_size=args.clients, max_len=max_len)
    for _ in engine.run(requests):
        pass
    cache = engine.cache
    per_token = cache.block_bytes // cache.block_size
    return dict(static=args.clients * max_len * per_token, allocated=cache.allocated_bytes,
                peak_in_use=cache.pool.peak_used * cache.block_bytes,
                tokens=sum(len(r.prompt_ids) + 64 for r in requests) * per_token)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="nano-d4", help="model preset (random weights)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--user-tokens", type=int, default=40, help="chat: tokens per user message")
    ap.add_argument("--answer-tokens", type=int, default=60, help="chat: tokens per answer")
    ap.add_argument("--repeats", type=int, default=3, help="chat: whole conversations per setting (median)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=32, help="shared prompt: tokens per answer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build(args.shape, tmp, args.device)
    print(f"{args.shape} ({model.config.num_parameters() / 1e6:.1f}M parameters, random weights), {args.device}, "
          f"{args.threads} threads, fp32, greedy\n")

    ttft = {}
    for caching in (False, True):
        runs = [chat_turn10(model, tok, args, caching, seed) for seed in range(args.repeats)]
        ttft[caching] = statistics.median(r[0] for r in runs)
        prompt, cached = runs[0][1], runs[0][2]
    print(f"1. chat, 10th turn ({prompt} prompt tokens, {cached} of them cached): time to first token "
          f"{ttft[False] * 1e3:.0f} ms without the prefix cache, {ttft[True] * 1e3:.0f} ms with it: "
          f"{ttft[False] / ttft[True]:.1f}x lower (goal >= 5x)")

    shared = {caching: shared_system_prompt(model, tok, args, caching) for caching in (False, True)}
    same = shared[False][1] == shared[True][1]
    rate = {c: sum(map(len, tokens)) / seconds for c, (seconds, tokens, _) in shared.items()}
    print(f"2. {args.clients} clients, a {args.system_tokens}-token system prompt: {rate[False]:.0f} tok/s without "
          f"the prefix cache, {rate[True]:.0f} tok/s with it: {rate[True] / rate[False]:.1f}x (goal >= 2x); mean "
          f"first token {shared[False][2]:.2f} s vs {shared[True][2]:.2f} s; same tokens: {same}")

    memory = mixed_lengths_memory(model, tok, args)
    mib = {k: v / 2**20 for k, v in memory.items()}
    print(f"3. {args.clients} requests of 20-1,000 prompt tokens + 64 new: KV memory {mib['allocated']:.1f} MiB "
          f"allocated by the paged pool ({mib['peak_in_use']:.1f} MiB in use at the peak; all their tokens "
          f"{mib['tokens']:.1f} MiB) vs {mib['static']:.1f} MiB for the static slots: "
          f"{memory['static'] / memory['allocated']:.1f}x less")


if __name__ == "__main__":
    main()
