"""Speculative decoding with Qwen3-Next's multi-token-prediction head vs plain decoding and prompt-lookup drafts:
the same model, the same prompts, greedy, one run. Every method gives exactly the tokens of plain decoding (checked
here); the drafts only change how many forwards it takes.

    python bench/bench_mtp.py --model runs/mtp/stage1 --tasks arithmetic --languages en   # trained with the MTP loss
    python bench/bench_mtp.py                              # a random nano-next-d4: timings only, drafts rejected

Prompts are the first half of held-out documents of the embedded corpus (task problems with their worked answers,
and prose); the model continues them. tok/s counts generated tokens over the whole generation (prefill included);
"forwards" counts the engine's main-model calls (prefills and decode steps; the MTP head's own small steps are not
counted there, their time is in tok/s); acceptance is the share of drafted tokens kept.
"""
import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nanoqwen import data, tasks  # noqa: E402
from nanoqwen.checkpoint import load, load_model  # noqa: E402
from nanoqwen.generation import Engine, generate_batch  # noqa: E402
from nanoqwen.tokenizer import train_tokenizer  # noqa: E402


def held_out_prompts(tok, n: int, max_prompt: int, task_filter: dict) -> list[list[int]]:
    """The first half (at most max_prompt tokens) of n held-out documents of the embedded corpus (only task
    documents of the filtered families when a filter is given)."""
    prompts = []
    for document in data.synthetic_corpus("test", 7, prose_weight=0.0 if task_filter else 1.0, **task_filter):
        ids = tok.encode(document)
        if len(ids) >= 16:
            prompts.append(ids[:min(len(ids) // 2, max_prompt)])
        if len(prompts) == n:
            return prompts


def run(model, tok, prompts, new_tokens: int, batch: int, speculative, k: int):
    engine = Engine(model, tok, batch_size=batch, max_len=max(map(len, prompts)) + new_tokens + k + 1,
                    speculative=speculative, num_speculative_tokens=k)
    start = time.perf_counter()
    results = generate_batch(model, tok, prompts, max_new_tokens=new_tokens, temperature=0, engine=engine)
    seconds = time.perf_counter() - start
    forwards = engine.launches + -(-len(prompts) // batch)  # decode steps + prefills
    return [r.token_ids for r in results], seconds, forwards, engine.acceptance_rate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint or run folder with an MTP head (default: random)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3], help="draft tokens per step")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default=None, help="task families, comma-separated (default: all, and prose)")
    ap.add_argument("--languages", default=None, help="comma-separated: en,zh,fr (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        torch.manual_seed(0)
        tok = train_tokenizer(itertools.islice(data.synthetic_corpus("train", 0), 2000), 512)
        model = load_model("nano-next-d4", vocab_size=512).eval()
    else:
        model, tok = load(args.model, device="cpu")
    if getattr(model, "mtp", None) is None:
        raise SystemExit(f"{args.model}: the model has no multi-token-prediction head")
    task_filter = tasks.parse_filter(args.tasks, None, args.languages) if args.tasks or args.languages else {}
    prompts = held_out_prompts(tok, args.prompts, 96, task_filter)
    n_tokens = len(prompts) * args.new_tokens
    print(f"{args.model or 'random nano-next-d4'}: {len(prompts)} held-out prompts of "
          f"{sum(map(len, prompts)) / len(prompts):.0f} tokens (mean), {args.new_tokens} new tokens each, greedy, "
          f"{args.threads} threads")
    print(f"{'batch':>5} {'method':>8} {'k':>2} {'tok/s':>8} {'vs plain':>8} {'forwards':>8} {'acceptance':>10}")
    for batch in args.batch:
        reference, seconds, forwards, _ = run(model, tok, prompts, args.new_tokens, batch, None, 1)
        plain_rate = sum(map(len, reference)) / seconds
        print(f"{batch:5d} {'plain':>8} {'-':>2} {plain_rate:8.1f} {1:8.2f} {forwards:8d} {'-':>10}")
        for method, k in itertools.product(("ngram", "mtp"), args.k):
            tokens, seconds, forwards, acceptance = run(model, tok, prompts, args.new_tokens, batch, method, k)
            if tokens != reference:
                raise SystemExit(f"{method} k={k} batch {batch}: tokens differ from plain decoding")
            rate = sum(map(len, tokens)) / seconds
            print(f"{batch:5d} {method:>8} {k:2d} {rate:8.1f} {rate / plain_rate:8.2f} {forwards:8d} "
                  f"{100 * (acceptance or 0):9.1f}%")
    print(f"(up to {n_tokens} tokens per row of the table; every method's tokens equal plain decoding's)")


if __name__ == "__main__":
    main()
