"""The `nanoqwen` command: one subcommand per job. Each handler is a short function; errors print one clear line."""
from __future__ import annotations

import argparse
import json
import sys
import time


def cmd_info(args):
    """Config and parameter counts of a preset or checkpoint folder (computed from shapes, nothing allocated)."""
    import os
    from .config import Qwen3Config, get_preset
    config = Qwen3Config.from_json(args.model) if os.path.isdir(args.model) else get_preset(args.model)
    total, active = config.num_parameters(), config.num_parameters(active_only=True)
    print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    print(f"parameters: {total:,}" + (f" (active per token: {active:,})" if config.is_moe else ""))


def cmd_presets(args):
    from .config import PRESETS, get_preset
    for name in PRESETS:
        c = get_preset(name)
        kind = f"MoE {c.num_experts}x top-{c.num_experts_per_tok}" if c.is_moe else "dense"
        print(f"{name:18s} {kind:16s} layers {c.num_hidden_layers:3d}  hidden {c.hidden_size:5d}  "
              f"params {c.num_parameters() / 1e6:10.1f}M")


def cmd_init(args):
    """A randomly initialised model of a preset, saved as an HF checkpoint folder."""
    from .checkpoint import load_model, save_model
    model = load_model(args.preset, dtype=args.dtype, vocab_size=args.vocab_size) if args.vocab_size else \
        load_model(args.preset, dtype=args.dtype)
    save_model(model, args.out)
    print(f"saved {args.preset} ({model.config.num_parameters():,} parameters) to {args.out}")


def cmd_demo(args):
    """The most complete job that exists so far: build a small Qwen3 (dense and MoE), save it in the HF layout,
    load it back, check the round trip is exact, and time a forward and a training step."""
    import torch
    from .checkpoint import load_model, save_model
    torch.manual_seed(0)
    for preset in ("nano-d4", "nano-moe-d4"):
        model = load_model(preset)
        path = f"{args.out}/{preset}"
        save_model(model, path)
        again = load_model(path)
        x = torch.randint(0, model.config.vocab_size, (2, 256))
        with torch.no_grad():
            same = torch.equal(model(x).logits, again(x).logits)
        t0 = time.perf_counter()
        out = again(x, labels=x)
        out.loss.backward()
        dt = time.perf_counter() - t0
        print(f"{preset:12s} params {model.config.num_parameters():>11,}  saved to {path}  round trip exact: {same}  "
              f"loss {out.loss.item():.3f} (ln V = {torch.log(torch.tensor(float(model.config.vocab_size))):.3f})  "
              f"train step {x.numel() / dt:,.0f} tok/s")


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoqwen", description="Qwen3 models, tokenizer, engine and training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="config and parameter count of a preset or checkpoint folder")
    p.add_argument("model", help="preset name or checkpoint folder")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("init", help="save a randomly initialised preset as an HF checkpoint folder")
    p.add_argument("preset")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--vocab-size", type=_positive_int, default=None)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("demo", help="build, save, reload and run small dense and MoE models")
    p.add_argument("--out", default="runs/out/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"nanoqwen {args.command}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
