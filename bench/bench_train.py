"""Training throughput and MFU of nanoqwen's Trainer vs transformers' model with the same optimizer, in the same run.

    python bench/bench_train.py                     # CPU: nano-d8 and nano-moe-d8 at 4 x 256, fp32
    python bench/bench_train.py --device cuda       # H100: the Qwen3-0.6B shape at 4 x 4096, bf16 (< 5 minutes)

Every variant runs the same step: forward with the fused next-token loss, backward, gradient clipping, fused AdamW
(same weight-decay groups and hyper-parameters) under bf16 autocast. nanoqwen goes through `Trainer.train_step`
(loss normalisation, clipping, logging values included). Rows are plain causal sequences for both models; the
"packed" lines add document_ids (4 documents per row): on CUDA through FlexAttention with a block mask (the default),
and, for comparison, through SDPA with a dense boolean mask (NANOQWEN_FLEX_ATTENTION=0), which takes SDPA off its
flash kernel.
MFU = tokens/s * (6 * matmul params + 6 * layers * heads * head_dim * seq) / the device's dense bf16 peak from
nanoqwen/hardware.py (printed); packed rows count attention per document (trainer.training_flops), a quarter of a
full row's here.
"""
import argparse
import itertools
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nanoqwen  # noqa: E402
from nanoqwen import model as modeling  # noqa: E402
from nanoqwen.config import get_preset  # noqa: E402
from nanoqwen.hardware import device_peak  # noqa: E402
from nanoqwen.train.trainer import TrainConfig, Trainer, attended_pairs, training_flops  # noqa: E402
from bench_model import random_checkpoint, timed  # noqa: E402  (shared with the model benchmark)


def batches(config, batch, seq, device, packed):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    out = dict(input_ids=ids, labels=ids.clone())
    if packed:
        out["document_ids"] = (torch.arange(seq) // (seq // 4))[None].expand(batch, seq).contiguous()
    return itertools.repeat({k: v.to(device) for k, v in out.items()})


def nanoqwen_rate(path, config, batch, seq, dtype, device, steps, warmup, compile=False, packed=False, flex=True):
    model = nanoqwen.load_model(path, dtype=dtype)
    saved, modeling.FLEX_ATTENTION = modeling.FLEX_ATTENTION, "auto" if flex else "0"
    try:
        with tempfile.TemporaryDirectory() as out:
            train = TrainConfig(out_dir=out, steps=10**9, batch_size=batch, lr=1e-5, progress=False, compile=compile)
            trainer = Trainer(model, train, batches(config, batch, seq, device, packed), device=device)
            return batch * seq / timed(trainer.train_step, steps, warmup, device)
    finally:
        modeling.FLEX_ATTENTION = saved


def transformers_rate(path, config, batch, seq, dtype, device, steps, warmup):
    """transformers' model in the same loop: the Trainer's AdamW groups, clipping and autocast."""
    import transformers
    cls = transformers.Qwen3MoeForCausalLM if config.is_moe else transformers.Qwen3ForCausalLM
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)],
                                  lr=1e-5, betas=(0.9, 0.95), fused=device == "cuda")
    data = next(batches(config, batch, seq, device, packed=False))

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=data["input_ids"], labels=data["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return batch * seq / timed(step, steps, warmup, device)


def run_case(name, config, batch, seq, dtype, device, steps, warmup, compile, only=None):
    tmp = random_checkpoint(config, dtype)
    args = (tmp.name, config, batch, seq, dtype, device, steps, warmup)
    variants = [("nanoqwen Trainer", lambda: nanoqwen_rate(*args))]
    if compile:
        variants += [("nanoqwen Trainer + compile", lambda: nanoqwen_rate(*args, compile=True)),
                     ("nanoqwen + compile, packed", lambda: nanoqwen_rate(*args, compile=True, packed=True)),
                     ("nanoqwen + compile, packed, SDPA mask",
                      lambda: nanoqwen_rate(*args, compile=True, packed=True, flex=False))]
    else:
        variants += [("nanoqwen packed", lambda: nanoqwen_rate(*args, packed=True))]
    variants.append(("transformers", lambda: transformers_rate(*args)))
    if only:
        variants = [v for v in variants if any(word in v[0] for word in only)]
    peak, results = device_peak(device), {}
    plain, packed = (next(batches(config, batch, seq, "cpu", p)) for p in (False, True))
    fpt = {p: training_flops(config, batch * seq, attended_pairs(b)) / (batch * seq) for p, b in ((False, plain),
                                                                                                  (True, packed))}
    for label, measure in variants:
        try:
            results[label] = measure()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            print(f"{label}: failed: {str(e).splitlines()[0][:160]}")
            results[label] = float("nan")
        if device == "cuda":
            torch.cuda.empty_cache()
    tmp.cleanup()
    print(f"\n## {name}: batch {batch} x seq {seq}, {str(dtype).replace('torch.', '')}, {device}, "
          f"{config.num_parameters() / 1e6:.1f}M params, {fpt[False] / 1e9:.2f} GFLOP/token "
          f"({fpt[True] / 1e9:.2f} for 4 packed documents per row, attention counted per document)")
    print("MFU against " + (f"{peak[0]}: {peak[1] / 1e12:,.0f} TFLOP/s dense bf16 (nanoqwen/hardware.py)" if peak
                            else "nothing: no peak for this device in nanoqwen/hardware.py"))
    print(f"{'implementation':38s} {'tokens/s':>12s} {'vs transformers':>16s} {'MFU':>7s} {'TFLOP/s':>8s}")
    for label, rate in results.items():
        work = fpt["packed" in label]
        mfu = f"{rate * work / peak[1] * 100:6.1f}%" if peak else "   n/a"
        ratio = f"{rate / results['transformers']:15.2f}x" if "transformers" in results else f"{'':16s}"
        print(f"{label:38s} {rate:12,.0f} {ratio} {mfu} {rate * work / 1e12:8.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--fp32-master", action="store_true", help="fp32 weights under bf16 autocast (default: bf16)")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only the variants whose label contains one of these words (e.g. compile transformers)")
    args = ap.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        steps, warmup = args.steps or 10, 3
        cases = [("Qwen3-0.6B", get_preset("Qwen3-0.6B"), args.batch or 4, 4096)]
        dtype, compile = (torch.float32 if args.fp32_master else torch.bfloat16), not args.no_compile
    else:
        torch.set_num_threads(os.cpu_count())
        steps, warmup = args.steps or 5, 2
        cases = [("nano-d8 (dense)", get_preset("nano-d8"), args.batch or 4, 256),
                 ("nano-moe-d8 (MoE)", get_preset("nano-moe-d8"), args.batch or 4, 256)]
        dtype, compile = torch.float32, False
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f" ({os.cpu_count()} cores)"))
    for name, config, batch, seq in cases:
        run_case(name, config, batch, seq, dtype, args.device, steps, warmup, compile, args.only)


if __name__ == "__main__":
    main()
