"""Dual Chunk Attention's decode cost against plain attention, at 4x the trained length, in the same run:

    python bench/bench_dca.py                         # CPU: a random nano-d4 trained at 512 tokens, 2 threads
    python bench/bench_dca.py --device cuda --shape nano-d8 --trained 4096

Both models hold the same random weights and read the same prompt of about 4x the trained length into the engine's
paged KV cache (one prefill), then decode --steps tokens one at a time with the engine's decode step, the two
alternating; the median step time of each is compared. Goal: DCA at most 1.5x plain attention. The KV cache is the same for both (keys are
stored once, rotated to their place in their chunk; only the queries are rotated three times): the script prints
both pools' bytes. On CUDA both run the plain PyTorch path (no FlexAttention kernel for DCA yet).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nanoqwen.checkpoint import model_class  # noqa: E402
from nanoqwen.config import get_preset, long_context, with_overrides  # noqa: E402
from nanoqwen.generation.cache_manager import PagedCache  # noqa: E402
from nanoqwen.generation.decode import decode_step  # noqa: E402


def build(shape: str, trained: int, dual_chunk: bool, device: str):
    """A random model of `shape` able to read 4x `trained` tokens: RoPE as it is, or Dual Chunk Attention."""
    config = get_preset(shape, vocab_size=1024, max_position_embeddings=trained)
    config = with_overrides(config, **long_context(config, context=4 * trained,
                                                   dual_chunk=trained if dual_chunk else None))
    torch.manual_seed(0)
    model = model_class(config)(config)
    model.init_weights()
    return model.to(device).eval()


def prefilled(model, prompt: list[int], steps: int, block_size: int = 16):
    """A paged KV cache holding `prompt` (one prefill), with room for `steps` more tokens, and the next token."""
    cache = PagedCache(model, 1, len(prompt) + steps, block_size)
    cache.admit(0, prompt)
    cache.reserve(0, len(prompt) + steps)
    with torch.no_grad():
        return cache, cache.prefill([0], [prompt], [0]).argmax(-1).to(model.lm_head.weight.device)


def timed_step(model, cache, tokens) -> tuple[float, float]:
    """Seconds of one engine decode step: wall clock, and CPU time of this process (all its threads), which a
    machine busy with other work disturbs less."""
    device = model.lm_head.weight.device
    live = torch.ones(1, dtype=torch.bool, device=device)
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        decode_step(model, cache.layers, tokens, cache.positions, cache.table, live, cache.block_size,
                    model.config.vocab_size, blocks=len(cache.blocks[0]))
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="nano-d4")
    parser.add_argument("--trained", type=int, default=512, help="the trained length; the prompt is about 4x it")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 1024, (4 * args.trained - args.steps,), generator=torch.Generator().manual_seed(0))
    models = {name: build(args.shape, args.trained, name == "dca", args.device) for name in ("plain", "dca")}
    caches = {name: prefilled(model, prompt.tolist(), args.steps) for name, model in models.items()}
    times = {name: [] for name in models}
    for step in range(args.steps):  # alternate, so that a busy machine slows both alike
        for name, model in models.items():
            times[name].append(timed_step(model, *caches[name]))
    print(f"{args.shape}, trained length {args.trained}, decoding at {4 * args.trained} tokens on {args.device} "
          f"({args.threads} threads), median of {args.steps - 1} steps (the first warms up):")
    for i, clock in enumerate(("wall clock", "CPU time")):
        plain, dca = (statistics.median(t[i] for t in times[name][1:]) for name in ("plain", "dca"))
        print(f"  {clock:10s}: plain {plain * 1e3:7.2f} ms, DCA {dca * 1e3:7.2f} ms -> DCA / plain = "
              f"{dca / plain:.2f}x (goal <= 1.5x)")
    print(f"KV pool: plain {caches['plain'][0].allocated_bytes / 2**20:.1f} MiB, "
          f"DCA {caches['dca'][0].allocated_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
