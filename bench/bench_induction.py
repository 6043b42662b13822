"""When does a nano preset learn to copy? nanoqwen vs transformers' Qwen3 from the same init, on the same data.

    python bench/bench_induction.py                      # nano-d4, 1,800 steps each (about 23 minutes on 2 CPU cores)
    python bench/bench_induction.py --steps 200 --impl nanoqwen

Passkey retrieval needs an induction (copying) circuit. This trains both implementations on a synthetic copy task
and prints, every --every steps, the loss and the copy accuracy of each: a row is units of a marker, 8 random digits,
a gap of 0-40 random filler tokens, a second marker and the same 8 digits; copy accuracy is the greedy accuracy on
digits 2-8 of the second copy of 32 held-out units (chance 0.10). Same weights (one seeded init saved in the HF
layout and loaded by both), same batches, AdamW(lr, betas 0.9/0.95, no weight decay), fp32. Writes the curves to
--plot (a PNG) when matplotlib is installed.
"""
import argparse
import os
import random
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nanoqwen  # noqa: E402
from nanoqwen.config import get_preset  # noqa: E402
from bench_model import transformers_model  # noqa: E402  (shared with the model benchmark)

VOCAB, DIGITS, MARK1, MARK2 = 64, 10, 10, 11  # tokens 0-9: digits; 10, 11: markers; filler drawn from 10-63


def unit(rng: random.Random) -> list[int]:
    digits = [rng.randrange(DIGITS) for _ in range(8)]
    gap = [rng.randrange(MARK1, VOCAB) for _ in range(rng.randint(0, 40))]
    return [MARK1, *digits, *gap, MARK2, *digits]


def batch(rng: random.Random, rows: int, seq: int) -> torch.Tensor:
    out = []
    for _ in range(rows):
        r = []
        while len(r) < seq + 1:
            r += unit(rng)
        out.append(r[:seq + 1])
    return torch.tensor(out)


@torch.no_grad()
def copy_accuracy(model) -> float:
    rng, hits = random.Random(5), []
    for _ in range(32):
        ids = unit(rng)
        pred = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        start = len(ids) - 8  # the second copy's first digit
        hits += [pred[start + i - 1] == ids[start + i] for i in range(1, 8)]
    return sum(hits) / len(hits)


def train(name, model, args) -> list[tuple[int, float, float]]:
    model.train()
    rng = random.Random(0)  # the same batches for every implementation
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    curve, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        ids = batch(rng, args.batch, args.seq)
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.every == 0 or step == args.steps:
            curve.append((step, loss.item(), copy_accuracy(model)))
            eta = (time.time() - t0) / step * (args.steps - step)
            print(f"{name:12s} step {step:5d}/{args.steps} | loss {curve[-1][1]:.3f} | copy {curve[-1][2]:.2f} | "
                  f"ETA {eta:.0f}s", flush=True)
    return curve


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="nano-d4")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--impl", choices=["both", "nanoqwen", "transformers"], default="both")
    p.add_argument("--plot", default="induction.png")
    args = p.parse_args()
    config = get_preset(args.preset, vocab_size=VOCAB)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()  # one seeded init in the HF layout, loaded by both
    nanoqwen.save_model(nanoqwen.load_model(args.preset, vocab_size=VOCAB), tmp.name)
    builders = {"nanoqwen": lambda: nanoqwen.load_model(tmp.name, dtype=torch.float32),
                "transformers": lambda: transformers_model(tmp.name, config, torch.float32, "cpu")}
    curves = {name: train(name, build(), args) for name, build in builders.items() if args.impl in ("both", name)}

    print(f"\n{args.preset}, {args.batch} x {args.seq} tokens a step, lr {args.lr:g}: copy accuracy (chance 0.10)")
    print("step   " + "".join(f"{name:>14s}" for name in curves))
    for i, (step, _, _) in enumerate(next(iter(curves.values()))):
        print(f"{step:5d}  " + "".join(f"{c[i][2]:14.2f}" for c in curves.values()))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, c in curves.items():
        ax.plot([x[0] for x in c], [x[2] for x in c], marker="o", label=name)
    ax.axhline(0.1, color="grey", linestyle=":", label="chance")
    ax.set(xlabel="step", ylabel="copy accuracy", title=f"{args.preset}: learning to copy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
