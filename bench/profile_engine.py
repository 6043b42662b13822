"""Where a decode step's time goes: wall time per step (and its fraction of the memory-bandwidth bound), GPU kernel
time per step and the top kernels; optionally a few variants of the step and a correctness check on the GPU.

    python bench/profile_engine.py --device cuda --shape Qwen3-0.6B --batch 1 64
    python bench/profile_engine.py --device cuda --variants default tune sdpa   # compare decode-step variants
    python bench/profile_engine.py --device cuda --check                        # engine features on the GPU

Variants: default (the engine as shipped), tune (inductor coordinate-descent tuning: matrix-vector products become
tuned Triton reductions), sdpa (the single-query attention through scaled_dot_product_attention), unfused (separate
q/k/v and gate/up matmuls), kernels (nanoqwen/kernels.py's fused batch-1 Triton kernels, opt-in,
not yet measured on a GPU), eager (no compile, no CUDA graph).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nanoqwen.generation.decode as decode_module  # noqa: E402
import nanoqwen.kernels as kernels_module  # noqa: E402
import nanoqwen.model as model_module  # noqa: E402
from nanoqwen.checkpoint import load_model  # noqa: E402
from nanoqwen.generation import Engine, Request, SamplingParams  # noqa: E402
from nanoqwen.tokenizer import load_tokenizer  # noqa: E402
from nanoqwen.hardware import device_peak  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
ORIGINAL_ATTENTION = model_module.decode_attention


def sdpa_decode_attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def set_variant(name: str) -> None:
    from torch._inductor import config as inductor_config
    torch._dynamo.reset()
    decode_module._COMPILED.clear()
    inductor_config.coordinate_descent_tuning = name == "tune"
    kernels_module.ENABLED = name == "kernels"
    model_module.decode_attention = sdpa_decode_attention if name == "sdpa" else ORIGINAL_ATTENTION


def step_bytes(config, batch, context, dtype):
    weights = config.num_parameters(active_only=True) * dtype.itemsize
    kv = batch * config.num_hidden_layers * 2 * config.num_key_value_heads * context * config.head_dim * dtype.itemsize
    return weights + kv


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model, tokenizer, variant, batch, prompt_len, new_tokens, steps, device, top):
    engine = Engine(model, tokenizer, batch_size=batch, max_len=prompt_len + new_tokens,
                    compile=None if variant != "eager" else False, fuse_projections=variant != "unfused")
    torch.manual_seed(batch)
    prompts = torch.randint(0, min(model.config.vocab_size, 150000), (batch, prompt_len)).tolist()
    params = SamplingParams(**{**GREEDY.__dict__, "max_new_tokens": new_tokens})

    def generate(n_steps=None):
        engine.add([Request(p, params, i) for i, p in enumerate(prompts)])
        sync(device)
        t0, n = time.perf_counter(), 0
        while engine.live_slots() and (n_steps is None or n < n_steps):
            engine.step()
            n += 1
        for slot in engine.live_slots():
            engine.cancel(slot)
        engine.step()  # drops a step still in flight
        sync(device)
        return time.perf_counter() - t0

    t = time.perf_counter()
    generate()  # compile + capture
    warm = time.perf_counter() - t
    launches = engine.launches
    wall = min(generate() for _ in range(2))
    per_step = wall / ((engine.launches - launches) / 2)
    context = prompt_len + new_tokens // 2
    peak = device_peak(device)
    bound = (f"{100 * step_bytes(model.config, batch, context, model.lm_head.weight.dtype) / per_step / peak[2]:.1f}% "
             f"of the bandwidth bound ({peak[0]}, {peak[2] / 1e9:,.0f} GB/s)" if peak else "no bandwidth bound known")
    print(f"\n## {variant}, batch {batch}: {per_step * 1e3:.3f} ms/step, {batch / per_step:,.0f} tok/s, "
          f"{bound} (warm-up {warm:.1f} s, CUDA graph "
          f"{'captured' if engine.decoder.graph is not None else 'not used'})", flush=True)
    if device != "cuda" or not top:
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        before = engine.launches
        generate(steps)
    n = engine.launches - before
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e3 / n
    print(f"GPU kernels {gpu:.3f} ms/step over {n} steps")
    print(events.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60))


def check(device):
    """Engine features on the device against references: greedy tokens vs full forwards (fp32), forced budget
    tokens, stop strings, seeded sampling with penalties (alone == in a batch), logprobs."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_engine import QUESTION, START, chain, random_model, scripted_model, thinker_script
    from nanoqwen.generation import BUDGET_PHRASE, generate, generate_batch
    tok = load_tokenizer()
    model = random_model().to(device)

    def full_forward_greedy(model, prompt, n):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids], device=device)).logits[0, -1].argmax()))
        return ids[len(prompt):]

    prompts = [[1, 2, 3], list(range(20, 34)), [5, 6], list(range(40, 49)), [9]]
    engine = Engine(model, tok, batch_size=2, max_len=32)
    results = generate_batch(model, tok, prompts, max_new_tokens=12, engine=engine, temperature=0)
    ok = [r.token_ids == full_forward_greedy(model, p, 12) for p, r in zip(prompts, results)]
    print(f"greedy vs full forward (continuous batching, shifts): {ok}, graph {engine.decoder.graph is not None}, "
          f"pipelined {engine.pipeline}")
    script, word, answer = thinker_script(tok)
    thinker = scripted_model(script).to(device)
    question = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    phrase = tok.encode(BUDGET_PHRASE, allow_special=True)
    got = generate_batch(thinker, tok, [question] * 3, max_new_tokens=60, thinking_budget=3, seed=0)
    print("budget:", all(r.token_ids == [tok.think_start_id] + [word] * 3 + phrase + [answer, tok.eos_token_id]
                         for r in got))
    ids = tok.encode("Hello, world!")
    talker = scripted_model(chain(START, *ids, tok.eos_token_id)).to(device)
    got = generate(talker, tok, [START], max_new_tokens=50, stop=", wor")
    print("stop string:", got.text == "Hello" and got.finish_reason == "stop")
    knobs = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50, repetition_penalty=1.2,
                 presence_penalty=0.3)
    a = generate(model, tok, prompts[1], seed=7, **knobs).token_ids
    b = generate_batch(model, tok, [prompts[0], prompts[1]], seed=[1, 7], **knobs)[1].token_ids
    print("seeded sampling alone == in a batch:", a == b, "repeatable:",
          generate(model, tok, prompts[1], seed=7, **knobs).token_ids == a)
    result = generate(model, tok, prompts[0], max_new_tokens=6, logprobs=3, temperature=0)
    with torch.no_grad():
        full = model(torch.tensor([prompts[0] + result.token_ids], device=device)).logits[0, 2:-1].log_softmax(-1)
    err = max(abs(lp - full[i, t].item()) for i, (t, (lp, _)) in enumerate(zip(result.token_ids, result.logprobs)))
    print(f"logprobs max error {err:.2e}")
    moe = random_model(moe=True).to(device)
    results = generate_batch(moe, tok, prompts, max_new_tokens=8, batch_size=2, temperature=0)
    print("MoE greedy vs full forward:", [r.token_ids == full_forward_greedy(moe, p, 8)
                                          for p, r in zip(prompts, results)])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="Qwen3-0.6B")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32, help="profiled decode steps")
    ap.add_argument("--top", type=int, default=15, help="kernels listed (0: no profile)")
    ap.add_argument("--variants", nargs="+", default=["default"],
                    choices=["default", "kernels", "tune", "sdpa", "unfused", "eager"])
    ap.add_argument("--check", action="store_true", help="check engine features on the device first")
    ap.add_argument("--first-batch-only", action="store_true", help="variants after the first: first batch only")
    args = ap.parse_args()
    if args.check:
        check(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = load_model(args.shape, dtype=dtype, device=args.device).eval()
    tokenizer = load_tokenizer()
    for i, variant in enumerate(args.variants):
        set_variant(variant)
        for batch in args.batch[:1] if i and args.first_batch_only else args.batch:
            measure(model, tokenizer, variant, batch, args.prompt_len, args.new_tokens, args.steps, args.device,
                    args.top)
    set_variant("default")


if __name__ == "__main__":
    main()
