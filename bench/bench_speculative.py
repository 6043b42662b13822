"""Speculative decoding with prompt-lookup drafts: our engine vs transformers' `generate(prompt_lookup_num_tokens=)`,
same weights, same prompts, greedy, same run. Both give exactly the tokens of plain greedy decoding (checked here);
the drafts only change how many forwards it takes.

    python bench/bench_speculative.py --model runs/out/speedrun-cpu/general   # the speedrun's teacher, its task prompts
    python bench/bench_speculative.py                                      # a random nano-d2 (its greedy text loops)

Prompts are held-out questions of the embedded task families, thinking on: the reasoning copies numbers and words
from the question, which is where prompt lookup pays. tok/s counts generated tokens over the whole generation
(prefill included); "forwards" counts the engine's model calls (prefills and decode steps).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nanoqwen import tasks  # noqa: E402
from nanoqwen.checkpoint import load_model, save_model  # noqa: E402
from nanoqwen.checkpoint import load  # noqa: E402
from nanoqwen.generation import Engine, generate_batch  # noqa: E402
from nanoqwen.tokenizer import load_tokenizer  # noqa: E402


def ours(model, tok, prompts, new_tokens, batch, speculative, k):
    engine = Engine(model, tok, batch_size=batch, max_len=max(map(len, prompts)) + new_tokens,
                    speculative=speculative, num_speculative_tokens=k)
    start = time.perf_counter()
    results = generate_batch(model, tok, prompts, max_new_tokens=new_tokens, temperature=0, engine=engine)
    seconds = time.perf_counter() - start
    forwards = engine.launches + -(-len(prompts) // batch)  # decode steps + prefills
    return [r.token_ids for r in results], seconds, forwards, engine


def transformers_run(hf, prompts, new_tokens, lookup, stop_ids):
    """One prompt at a time (transformers' prompt lookup takes batch 1)."""
    out, seconds = [], 0.0
    for p in prompts:
        ids = torch.tensor([p])
        kwargs = dict(do_sample=False, max_new_tokens=new_tokens, eos_token_id=stop_ids, pad_token_id=stop_ids[0])
        if lookup:
            kwargs["prompt_lookup_num_tokens"] = lookup
        start = time.perf_counter()
        with torch.no_grad():
            new = hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[0, len(p):].tolist()
        seconds += time.perf_counter() - start
        out.append(new)
    return out, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder or run folder (default: a random nano-d2)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5], help="draft tokens per step")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            torch.manual_seed(0)
            save_model(load_model("nano-d2", vocab_size=151936), tmp)  # the official tokenizer's vocabulary
            model, tok, path = load_model(tmp, device="cpu"), load_tokenizer(), tmp
        else:
            model, tok = load(args.model, device="cpu")
            path = tmp
            save_model(model, tmp)  # a plain HF folder for transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    examples = tasks.sample_examples(args.prompts, split="test", seed=1)
    prompts = [tok.apply_chat_template(tasks.to_messages(e)[:1], add_generation_prompt=True) for e in examples]
    stops = sorted(tok.stop_token_ids)
    print(f"{args.model or 'random nano-d2'}: {args.prompts} prompts of {sum(map(len, prompts)) / len(prompts):.0f} "
          f"tokens (mean), up to {args.new_tokens} new tokens, greedy, {args.threads} threads")

    reference, plain_s = transformers_run(hf, prompts, args.new_tokens, None, stops)
    rows = [("transformers generate", 1, reference, plain_s, None)]
    for k in args.k:
        tokens, seconds = transformers_run(hf, prompts, args.new_tokens, k, stops)
        rows.append((f"transformers prompt lookup k={k}", 1, tokens, seconds, None))
    for batch in args.batch:
        tokens, seconds, forwards, _ = ours(model, tok, prompts, args.new_tokens, batch, None, 0)
        rows.append(("nanoqwen engine", batch, tokens, seconds, forwards))
        for k in args.k:
            tokens, seconds, forwards, engine = ours(model, tok, prompts, args.new_tokens, batch, "ngram", k)
            name = f"nanoqwen ngram k={k} (kept {engine.accepted / max(engine.drafted, 1):.0%} of drafts)"
            rows.append((name, batch, tokens, seconds, forwards))
    generated = sum(map(len, reference))
    print(f"\n{generated} tokens generated\n")
    print("| implementation | batch | tok/s | vs transformers generate | forwards | same tokens |")
    print("|---|---:|---:|---:|---:|:---:|")
    for name, batch, tokens, seconds, forwards in rows:
        same = [t == r for t, r in zip(tokens, reference)]  # both end a row with its stop token, included
        print(f"| {name} | {batch} | {generated / seconds:,.0f} | {plain_s / seconds:.2f}x | {forwards or ''} | "
              f"{'yes' if all(same) else f'{sum(same)}/{len(same)}'} |")


if __name__ == "__main__":
    main()
