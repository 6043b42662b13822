"""The per-token cost of constrained decoding with xgrammar and with llguidance, measured in the same run:

    python bench/bench_grammar.py            # the official Qwen3 tokenizer (151,669 tokens), 200-token walks

For each of three JSON schemas (a flat object, a tool call's arguments with enums and arrays, nested objects), each
library compiles the schema once, then walks `--tokens` steps: fill the next-token bitmask (what the engine does on
the CPU for every constrained row and step), pick an allowed token at random (a random model's choice), feed it.
Printed per library: compile time, mean and p99 mask time per token; and llguidance / xgrammar ratios. Both fill
the same (1, vocab/32) int32 bitmask layout, which the engine applies to the logits before sampling.
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nanoqwen.tokenizer import load_tokenizer  # noqa: E402

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                              "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"]},
    "tool": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 6}, "maxItems": 7}},
        "required": ["city", "unit"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["id"]},
        "scores": {"type": "array", "items": {"type": "number"}}}, "required": ["user", "scores"]},
}


def allowed(bitmask: torch.Tensor, vocab: int) -> list[int]:
    bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return [i for i in bits.flatten().nonzero().flatten().tolist() if i < vocab]


def walk(fill, feed, done, vocab: int, words: int, steps: int, rng: random.Random) -> list[float]:
    """Mask times (seconds) of a random walk of `steps` tokens through a grammar."""
    bitmask, times = torch.zeros(1, words, dtype=torch.int32), []
    for _ in range(steps):
        if done():
            break
        start = time.perf_counter()
        fill(bitmask)
        times.append(time.perf_counter() - start)
        choices = allowed(bitmask, vocab)
        if not choices:
            break
        feed(rng.choice(choices))
    return times


def xgrammar_runner(tokenizer, vocab: list[bytes]):
    import xgrammar as xgr
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab),
                             stop_token_ids=sorted(tokenizer.stop_token_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def start(schema):
        matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
        return (lambda bitmask: matcher.fill_next_token_bitmask(bitmask, 0)), matcher.accept_token, \
            matcher.is_terminated
    return start


class _Vocab:
    """What llguidance's TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer, vocab: list[bytes]):
        self.tokenizer, self.tokens = tokenizer, vocab
        self.eos_token_id, self.bos_token_id = tokenizer.eos_token_id, None
        self.special_token_ids = sorted(tokenizer.special_tokens.values())

    def __call__(self, text: bytes) -> list[int]:
        return self.tokenizer.encode(text.decode("utf-8", "replace"))


def llguidance_runner(tokenizer, vocab: list[bytes]):
    import llguidance
    import llguidance.torch
    lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(tokenizer, vocab)))

    def start(schema):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = llguidance.LLMatcher(lltokenizer, grammar)
        return (lambda bitmask: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)), \
            matcher.consume_token, matcher.is_stopped
    return start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200, help="steps of each random walk")
    parser.add_argument("--walks", type=int, default=5, help="random walks per schema and library")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer()
    vocab = [tokenizer.decode_bytes([i]) for i in range(tokenizer.vocab_size)]
    words = -(-len(vocab) // 32)
    start = time.perf_counter()
    runners = {"xgrammar": xgrammar_runner(tokenizer, vocab)}
    print(f"xgrammar tokenizer setup {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    runners["llguidance"] = llguidance_runner(tokenizer, vocab)
    print(f"llguidance tokenizer setup {time.perf_counter() - start:.2f} s")
    means = {}
    for name, schema in SCHEMAS.items():
        for library, runner in runners.items():
            times, compiles = [], []
            for seed in range(args.walks):
                start = time.perf_counter()
                fill, feed, done = runner(schema)
                compiles.append(time.perf_counter() - start)
                times += walk(fill, feed, done, len(vocab), words, args.tokens, random.Random(seed))
            times.sort()
            means[name, library] = statistics.mean(times)
            print(f"{name:7s} {library:10s} compile {1e3 * statistics.median(compiles):7.2f} ms   mask "
                  f"{1e6 * means[name, library]:8.1f} us/token mean, {1e6 * times[int(0.99 * len(times))]:8.1f} "
                  f"us p99 ({len(times)} tokens)")
    for name in SCHEMAS:
        print(f"{name:7s} llguidance / xgrammar mean mask time: {means[name, 'llguidance'] / means[name, 'xgrammar']:.2f}x")


if __name__ == "__main__":
    main()
