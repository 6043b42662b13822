"""Where a decode step's time goes: GPU kernel time vs wall time per step, and the top kernels.

    python bench/profile_engine.py --device cuda --shape Qwen3-0.6B --batch 1
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nanoqwen.checkpoint import load_model  # noqa: E402
from nanoqwen.engine import Engine, Request  # noqa: E402
from nanoqwen.sampling import SamplingParams  # noqa: E402
from nanoqwen.tokenizer import load_tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="Qwen3-0.6B")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = load_model(args.shape, dtype=dtype, device=args.device).eval()
    tokenizer = load_tokenizer()
    engine = Engine(model, tokenizer, batch_size=args.batch, max_len=512)
    params = SamplingParams(max_new_tokens=300, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
    prompt = list(range(1000, 1128))

    def run(steps):
        engine.add([Request(prompt, params, i) for i in range(args.batch)])
        for _ in range(steps):
            engine.step()
        for slot in engine.live_slots():
            engine.cancel(slot)

    run(8)  # compile + capture
    run(8)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    run(args.steps)
    sync()
    wall = (time.perf_counter() - t0) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        run(args.steps)
        sync()
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e3 / args.steps if args.device == "cuda" else 0
    print(f"wall {wall * 1e3:.3f} ms/step (prefill included), GPU kernels {gpu_total:.3f} ms/step")
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
