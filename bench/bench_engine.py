"""Generation throughput of the nanoqwen engine vs transformers `generate`, same weights, same run, greedy.

    python bench/bench_engine.py                                   # CPU: nano-d2, fp32, batch 1 and 8
    python bench/bench_engine.py --device cuda --shape Qwen3-0.6B  # GPU: bf16, batch 1 and 64, prompt 128, 256 new
    python bench/bench_engine.py --shape nano-next-d4              # any preset: MoE, the Qwen3-Next hybrid, ...

Prefill tok/s = prompt tokens / time to the first token. Decode tok/s = tokens after the first / the rest of the time.
Decode GB/s = (weight bytes + KV-cache bytes at the mean context) * decode steps/s: the bytes a decode step must read
at the least, so GB/s over the device's peak (nanoqwen/hardware.py, printed) is the fraction of the memory-bandwidth
bound reached.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nanoqwen.checkpoint import load_model, save_model  # noqa: E402
from nanoqwen.generation import Engine, Request, SamplingParams  # noqa: E402
from nanoqwen.tokenizer import load_tokenizer  # noqa: E402
from nanoqwen.hardware import device_peak  # noqa: E402



def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def ours_generate(engine, prompts, new_tokens, device):
    """(tokens per row, prefill seconds, decode seconds, decode steps) of one greedy batch through the engine."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
    requests = [Request(p, params, i) for i, p in enumerate(prompts)]
    sync(device)
    t0 = time.perf_counter()
    chunks = engine.add(requests)
    sync(device)
    t1 = time.perf_counter()
    launches = engine.launches
    while engine.live_slots():
        chunks += engine.step()
    sync(device)
    t2 = time.perf_counter()
    steps = engine.launches - launches  # decode steps run (pipelined, a call of step() reads the one before)
    tokens = [[] for _ in prompts]
    for c in chunks:
        tokens[c.index] += c.token_ids
    return tokens, t1 - t0, t2 - t1, steps


def hf_generate(model, prompts, new_tokens, device):
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)  # no stops
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        sync(device)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, **kwargs)
        sync(device)
        t2 = time.perf_counter()
    return out[:, ids.shape[1]:].tolist(), t1 - t0, (t2 - t1) - (t1 - t0), new_tokens - 1


def step_bytes(config, batch, context, dtype):
    """Bytes one decode step must move: every weight once (active experts for MoE), the filled KV cache of the
    attention layers and, for the hybrid, each DeltaNet layer's fp32 state (read and written)."""
    weights = config.num_parameters(active_only=True) * dtype.itemsize
    linear = sum(config.is_linear_layer(i) for i in range(config.num_hidden_layers))
    attention = config.num_hidden_layers - linear
    kv = batch * attention * 2 * config.num_key_value_heads * context * config.head_dim * dtype.itemsize
    state = batch * linear * config.linear_num_value_heads * config.linear_key_head_dim * \
        config.linear_value_head_dim * 4 * 2
    return weights + kv + state


def same_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def best_of(repeats, fn):
    """The run with the least total time (the machine may be shared: the fastest run is the least disturbed)."""
    return min((fn() for _ in range(repeats)), key=lambda run: run[1] + run[2])


def run_case(shape, batch, prompt_len, new_tokens, dtype, device, variants, repeats, ours_model, hf_model, tokenizer):
    config = ours_model.config
    torch.manual_seed(batch)
    prompts = torch.randint(0, min(config.vocab_size, 150000), (batch, prompt_len)).tolist()
    peak = device_peak(device)
    print(f"\n## {shape}, batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, "
          f"{str(dtype).replace('torch.', '')}, {device}; bandwidth bound: "
          + (f"{peak[0]}, {peak[2] / 1e9:,.0f} GB/s (nanoqwen/hardware.py)" if peak else "none for this device"))
    peak = peak[2] if peak else None
    hf_generate(hf_model, prompts, 8, device)  # warm-up
    theirs, hf_prefill, hf_decode, _ = best_of(repeats, lambda: hf_generate(hf_model, prompts, new_tokens, device))
    hf_rate = batch * (new_tokens - 1) / hf_decode
    print(f"{'':20s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'ms/step':>8s} {'vs transformers':>16s} "
          f"{'GB/s':>7s} {'of peak':>8s} {'same tokens':>12s}")
    print(f"{'transformers':20s} {batch * prompt_len / hf_prefill:14,.0f} {hf_rate:13,.0f} "
          f"{1e3 * hf_decode / (new_tokens - 1):8.2f} {1:15.2f}x")
    ratios = {}
    for label, compile_ours in variants:
        engine = Engine(ours_model, tokenizer, batch_size=batch, max_len=prompt_len + new_tokens, compile=compile_ours)
        skips, t = counters["inductor"]["cudagraph_skips"], time.perf_counter()
        ours_generate(engine, prompts, new_tokens, device)  # warm-up: compiles and captures the CUDA graph
        warm, skipped = time.perf_counter() - t, counters["inductor"]["cudagraph_skips"] > skips
        ours, prefill, decode, steps = best_of(repeats, lambda: ours_generate(engine, prompts, new_tokens, device))
        rate = sum(len(t) - 1 for t in ours) / decode
        steps_per_s = steps / decode
        gbps = step_bytes(config, batch, prompt_len + new_tokens // 2, dtype) * steps_per_s / 1e9
        agree = min(same_prefix(a, b) for a, b in zip(ours, theirs))
        ratios[label] = rate / hf_rate
        print(f"{label:20s} {batch * prompt_len / prefill:14,.0f} {rate:13,.0f} {1e3 / steps_per_s:8.2f} "
              f"{rate / hf_rate:15.2f}x {gbps:7,.0f} " + (f"{gbps * 1e9 / peak * 100:7.1f}%" if peak else f"{'':8s}")
              + f" {agree:>5d}/{new_tokens:<6d} (warm-up {warm:.1f} s)")
        if compile_ours and device == "cuda":
            print(f"{'':20s} CUDA graph: {'skipped, see the warning above' if skipped else 'captured'}")
    return ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default=None, help="preset name (default: nano-d2 on CPU, Qwen3-0.6B on CUDA)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: 1 8 / 1 64)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per variant, the best kept (default 3 CPU, 1 GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default 1: tiny models decode faster on one, and other processes on a shared "
                         "machine cannot stall it)")
    ap.add_argument("--eager", action="store_true", help="GPU: also time the eager decode step")
    ap.add_argument("--no-compile", action="store_true", help="only the eager decode step")
    ap.add_argument("--tune", action="store_true", help="inductor coordinate-descent tuning (slower compile)")
    args = ap.parse_args()
    device = args.device
    gpu = device == "cuda"
    shape = args.shape or ("Qwen3-0.6B" if gpu else "nano-d2")
    batches = args.batch or ([1, 64] if gpu else [1, 8])
    prompt_len, new_tokens = args.prompt_len or (128 if gpu else 64), args.new_tokens or (256 if gpu else 128)
    repeats = args.repeats or (1 if gpu else 3)
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        torch.set_num_threads(args.threads or 1)
    if args.tune:
        from torch._inductor import config as inductor_config
        inductor_config.coordinate_descent_tuning = True
    # CPU: the plain path and the compiled one; GPU: the compiled (CUDA graph) path, eager on request
    variants = [("nanoqwen", False), ("nanoqwen compiled", True)]
    if gpu and not args.eager:
        variants = variants[1:]
    if args.no_compile:
        variants = variants[:1]

    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          + (torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)")
          + f"; best of {repeats} runs")
    tokenizer = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_model(load_model(shape, dtype=dtype), tmp)  # one set of random weights for both
        ours = load_model(tmp, dtype=dtype, device=device).eval()
        cls = transformers.Qwen3NextForCausalLM if ours.config.is_hybrid else \
            transformers.Qwen3MoeForCausalLM if ours.config.is_moe else transformers.Qwen3ForCausalLM
        theirs = cls.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    t0 = time.perf_counter()
    for batch in batches:
        run_case(shape, batch, prompt_len, new_tokens, dtype, device, variants, repeats, ours, theirs, tokenizer)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
