"""Forward and training-step throughput of nanoqwen vs transformers on the same weights, in the same run.

    python bench/bench_model.py                          # CPU: small dense, MoE and hybrid presets, fp32
    python bench/bench_model.py --device cuda            # GPU: Qwen3-0.6B at seq 4096, 4-layer Qwen3-30B-A3B and
                                                         #      Qwen3-Next shapes, bf16

A training step is forward + backward + fused AdamW on the next-token loss. MFU counts 6 * params + 6 * layers *
heads * head_dim * seq FLOPs per token (causal attention), the convention behind "transformers: 19.6% MFU".
The hybrid (Qwen3-Next layer shapes) shares its weights with transformers in memory instead of through a saved
checkpoint, and runs three variants, so `--only hybrid --device cuda` fits in about 3 minutes; both sides use
flash-linear-attention and causal-conv1d when installed (`pip install nanoqwen[gpu]`), which the header reports.
"""
import argparse
import dataclasses
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nanoqwen  # noqa: E402
from nanoqwen.checkpoint import model_class  # noqa: E402
from nanoqwen.config import get_preset  # noqa: E402
from nanoqwen.hardware import device_peak  # noqa: E402
from nanoqwen.train.trainer import flops_per_token  # noqa: E402



def transformers_model(path, config, dtype, device, experts=None):
    import transformers
    cls = transformers.Qwen3NextForCausalLM if config.is_hybrid else \
        transformers.Qwen3MoeForCausalLM if config.is_moe else transformers.Qwen3ForCausalLM
    extra = {"experts_implementation": experts} if experts else {}
    return cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **extra).to(device)


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def measure(model, x, device, steps, warmup, train):
    if not train:
        model.eval()

        @torch.no_grad()
        def step():
            model(x, logits_to_keep=1)
        return x.numel() / timed(step, steps, warmup, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")

    def step():
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return x.numel() / timed(step, steps, warmup, device)


def compile_blocks(model):
    """Compile each decoder layer (as torchtitan does): the fused loss and the layer loop stay eager."""
    for layer in model.model.layers:
        layer.compile()
    return model


def random_checkpoint(config, dtype) -> tempfile.TemporaryDirectory:
    """A seeded random model of this config saved in dtype to a temporary folder (.name), for both peers to load."""
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    model = model_class(config)(config)
    model.init_weights()
    nanoqwen.save_model(model.to(dtype), tmp.name)
    return tmp


def hybrid_peers(config, dtype, device):
    """Builders of our hybrid and of transformers' with the same weights, copied in memory: a saved checkpoint of
    the Qwen3-Next shape is GBs of random numbers (minutes to write and read). transformers v5 keeps the experts
    stacked as we do, so the state dicts match name for name (the MTP head aside: transformers has none)."""
    import transformers
    config = dataclasses.replace(config, num_nextn_predict_layers=0)

    def ours():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = model_class(config)(config)
        model.to_empty(device=device)
        model.tie_weights()
        model.init_weights()
        return model.to(dtype)

    def theirs():
        weights = ours().state_dict()
        with torch.device(device):
            model = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(
                **config.to_dict(), attn_implementation="sdpa")).to(dtype)
        model.load_state_dict(weights, strict=True)
        return model
    return ours, theirs


def run_case(name, config, batch, seq, dtype, device, steps, warmup, compile_ours):
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    fpt, peak = flops_per_token(config, seq), device_peak(device)
    peak = peak[1] if peak else None

    # (label, builder, attention backends or None for SDPA's default choice)
    if config.is_hybrid:
        tmp = None
        ours, theirs = hybrid_peers(config, dtype, device)
    else:
        tmp = random_checkpoint(config, dtype)
        ours = lambda: nanoqwen.load_model(tmp.name, dtype=dtype, device=device)  # noqa: E731
        theirs = lambda: transformers_model(tmp.name, config, dtype, device)  # noqa: E731
    variants = [("nanoqwen", ours, None)]
    if compile_ours:
        from torch.nn.attention import SDPBackend
        variants.append(("nanoqwen+compile", lambda: compile_blocks(ours()), None))
        if not config.is_hybrid:  # (the hybrid has one attention layer in four: cuDNN attention matters little)
            variants.append(("nanoqwen+compile+cudnn", lambda: compile_blocks(ours()),
                             [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]))
    variants.append(("transformers", theirs, None))
    if config.is_moe and not config.is_hybrid:  # transformers' per-expert loop, for reference (default: grouped_mm)
        variants.append(("transformers-eager-experts",
                         lambda: transformers_model(tmp.name, config, dtype, device, experts="eager"), None))
    results = {}
    for label, build, backends in variants:
        model = build()
        for mode in ("forward", "train step"):
            try:
                if backends:
                    from torch.nn.attention import sdpa_kernel
                    with sdpa_kernel(backends):
                        rate = measure(model, x, device, steps, warmup, train=mode == "train step")
                else:
                    rate = measure(model, x, device, steps, warmup, train=mode == "train step")
            except (torch.OutOfMemoryError, RuntimeError) as e:
                print(f"{label} {mode}: failed: {str(e).splitlines()[0][:160]}")
                rate = float("nan")
            results[(label, mode)] = rate
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    if tmp is not None:
        tmp.cleanup()
    print(f"\n## {name}: batch {batch} x seq {seq}, {str(dtype).replace('torch.', '')}, {device}, "
          f"{config.num_parameters() / 1e6:.1f}M params ({config.num_parameters(active_only=True) / 1e6:.1f}M active)")
    print(f"{'implementation':26s} {'mode':11s} {'tokens/s':>12s} {'vs transformers':>16s} {'MFU':>7s}")
    for (label, mode), rate in results.items():
        ratio = rate / results[("transformers", mode)]
        work = fpt if mode == "train step" else fpt / 3  # the forward pass is a third of the training FLOPs
        mfu = f"{rate * work / peak * 100:6.1f}%" if peak else "   n/a"
        print(f"{label:26s} {mode:11s} {rate:12,.0f} {ratio:15.2f}x {mfu}")
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", choices=["dense", "moe", "hybrid"], default=None)
    args = ap.parse_args()
    device = args.device
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        steps, warmup = args.steps or 10, 3
        cases = [("Qwen3-0.6B", get_preset("Qwen3-0.6B"), 4, 4096),
                 ("Qwen3-30B-A3B, 4 layers", get_preset("Qwen3-30B-A3B", num_hidden_layers=4), 4, 4096),
                 ("Qwen3-Next-80B-A3B, 4 layers, 128 experts",
                  get_preset("Qwen3-Next-80B-A3B", num_hidden_layers=4, num_experts=128), 4, 4096)]
        dtype, compile_ours = torch.bfloat16, not args.no_compile
    else:
        torch.set_num_threads(os.cpu_count())
        steps, warmup = args.steps or 5, 2
        cases = [("nano-d8 (dense)", get_preset("nano-d8"), 4, 256),
                 ("nano-moe-d8 (MoE)", get_preset("nano-moe-d8"), 4, 256),
                 ("nano-next-d8 (hybrid)", get_preset("nano-next-d8"), 4, 256)]
        dtype, compile_ours = torch.float32, False
    if args.only:
        kind = lambda c: "hybrid" if c.is_hybrid else "moe" if c.is_moe else "dense"  # noqa: E731
        cases = [case for case in cases if kind(case[1]) == args.only]
    import transformers
    from nanoqwen import qwen3_next
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f" ({os.cpu_count()} cores)")
          + f", flash-linear-attention {'yes' if qwen3_next.FLA_DELTA_RULE else 'no'}, causal-conv1d "
          + ("yes" if qwen3_next.CAUSAL_CONV1D else "no"))
    for name, config, batch, seq in cases:
        run_case(name, config, batch, seq, dtype, device, steps, warmup, compile_ours)


if __name__ == "__main__":
    main()
