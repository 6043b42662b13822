"""GRPO step time and rollout throughput, with the share of time spent generating vs training.

    python bench/bench_rl.py                                   # CPU: nano-d2, 512-token BBPE, 4 prompts x G=4
    python bench/bench_rl.py --device cuda --shape Qwen3-0.6B  # GPU: 0.6B shape, Qwen3 tokenizer, 16 prompts x G=8

Random weights rarely emit the stop token, so rollouts run (nearly) to --max-new-tokens. One RL step = batched
sampling through the engine (G answers per prompt), rewards, the sampling policy's log-probs (one forward), then
--iterations optimizer steps of the GRPO loss on the shared Trainer.
The first step (engine compilation and CUDA-graph capture on GPU) is reported apart and left out of the means.
"""
import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nanoqwen.checkpoint import load_model  # noqa: E402
from nanoqwen.train.grpo import GRPO, GRPOConfig  # noqa: E402
from nanoqwen.train.posttrain import rl_prompts  # noqa: E402
from nanoqwen.train.trainer import TrainConfig, Trainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default=None, help="preset (default: nano-d2 on CPU, Qwen3-0.6B on CUDA)")
    parser.add_argument("--prompts-per-step", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured RL steps (after one warm-up step)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    shape = args.shape or ("Qwen3-0.6B" if cuda else "nano-d2")
    prompts_per_step = args.prompts_per_step or (16 if cuda else 4)
    group_size = args.group_size or (8 if cuda else 4)
    max_new = args.max_new_tokens or (512 if cuda else 64)
    micro = args.micro_batch or (8 if cuda else 16)
    torch.set_num_threads(torch.get_num_threads() if cuda else min(2, torch.get_num_threads()))

    if shape.startswith("nano"):  # a small trained tokenizer keeps the CPU logits small
        from nanoqwen import data
        from nanoqwen.tokenizer import train_tokenizer
        tokenizer = train_tokenizer(itertools.islice(data.synthetic_corpus("train", 0), 1000), 512)
        overrides = dict(vocab_size=512)
    else:
        from nanoqwen.tokenizer import load_tokenizer
        tokenizer, overrides = load_tokenizer(), {}
    torch.manual_seed(0)
    model = load_model(shape, device=args.device, dtype=torch.float32, **overrides)
    params = model.config.num_parameters()
    prompts = rl_prompts(prompts_per_step * (args.steps + 1), seed=0, tasks=["arithmetic"], difficulty=(1, 3),
                         languages=["en"])
    config = GRPOConfig(prompts_per_step=prompts_per_step, group_size=group_size, iterations=args.iterations,
                        micro_batch=micro, max_new_tokens=max_new)
    with tempfile.TemporaryDirectory() as out:
        grpo = GRPO(model, tokenizer, prompts, config, out)
        train = TrainConfig(out_dir=out, steps=(args.steps + 1) * args.iterations, batch_size=grpo.micro_batch,
                            grad_accum=grpo.grad_accum, lr=1e-6, progress=False)
        trainer = Trainer(model, train, grpo, loss_fn=grpo.loss, tokenizer=tokenizer, device=args.device)
        grpo.model = trainer.raw_model
        started = time.perf_counter()
        for _ in range(args.steps + 1):
            for _ in range(args.iterations):
                trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
        grpo.log_previous()
        total = time.perf_counter() - started
        records = [json.loads(line) for line in open(os.path.join(out, "rl_metrics.jsonl"))]
    first, rest = records[0], records[1:]
    mean = {k: sum(r[k] for r in rest) / len(rest) for k in ("generate_s", "train_s", "gen_tok_per_s",
                                                             "response_length")}
    step = mean["generate_s"] + mean["train_s"]
    rows = prompts_per_step * group_size
    print(f"\n{shape} ({params / 1e6:.1f}M parameters) on {args.device}: {prompts_per_step} prompts x G={group_size} = "
          f"{rows} rollouts of up to {max_new} tokens, {args.iterations} iteration(s), micro-batch {micro}")
    print(f"warm-up step: {first['generate_s'] + first['train_s']:.1f} s (generation {first['generate_s']:.1f} s)")
    print(f"RL step:      {step:.2f} s  = generation {mean['generate_s']:.2f} s "
          f"({100 * mean['generate_s'] / step:.0f}%) + training {mean['train_s']:.2f} s ({100 * mean['train_s'] / step:.0f}%)")
    print(f"rollouts:     {mean['gen_tok_per_s']:,.0f} generated tok/s, mean response {mean['response_length']:.0f} "
          f"tokens; training {rows * mean['response_length'] * args.iterations / mean['train_s']:,.0f} response "
          f"tok/s (training = rewards + old log-probs + optimizer steps)")
    print(f"total wall time {total:.1f} s")


if __name__ == "__main__":
    main()
