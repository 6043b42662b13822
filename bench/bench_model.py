"""Forward and training-step throughput of nanoqwen vs transformers on the same weights, in the same run.

    python bench/bench_model.py                          # CPU: small dense, MoE and hybrid presets, fp32
    python bench/bench_model.py --device cuda            # GPU: Qwen3-0.6B at seq 4096, 4-layer Qwen3-30B-A3B and
                                                         #      Qwen3-Next shapes, bf16

A training step is forward + backward + fused AdamW on the next-token loss. MFU counts 6 * params + 6 * layers *
heads * head_dim * seq FLOPs per token (causal attention), the convention behind "transformers: 19.6% MFU".
"""
import argparse
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


def run_case(name, config, batch, seq, dtype, device, steps, warmup, compile_ours):
    tmp = random_checkpoint(config, dtype)
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    fpt, peak = flops_per_token(config, seq), device_peak(device)
    peak = peak[1] if peak else None

    # (label, builder, attention backends or None for SDPA's default choice)
    ours = lambda: nanoqwen.load_model(tmp.name, dtype=dtype, device=device)  # noqa: E731
    variants = [("nanoqwen", ours, None)]
    if compile_ours:
        from torch.nn.attention import SDPBackend
        variants += [("nanoqwen+compile", lambda: compile_blocks(ours()), None),
                     ("nanoqwen+compile+cudnn", lambda: compile_blocks(ours()),
                      [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION])]
    variants.append(("transformers", lambda: transformers_model(tmp.name, config, dtype, device), None))
    if config.is_moe:  # transformers' per-expert loop, for reference (its default is grouped_mm)
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
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f" ({os.cpu_count()} cores)"))
    for name, config, batch, seq in cases:
        run_case(name, config, batch, seq, dtype, device, steps, warmup, compile_ours)


if __name__ == "__main__":
    main()
