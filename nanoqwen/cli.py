"""The `nanoqwen` command: one subcommand per job. Each handler is a short function; errors print one clear line."""
from __future__ import annotations

import argparse
import json
import re
import signal
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
        kind = f"hybrid {kind}" if c.is_hybrid else kind
        print(f"{name:18s} {kind:23s} layers {c.num_hidden_layers:3d}  hidden {c.hidden_size:5d}  "
              f"params {c.num_parameters() / 1e6:10.1f}M")


def cmd_init(args):
    """A randomly initialised model of a preset, saved as an HF checkpoint folder with its tokenizer, so every command
    opens it: the official Qwen3 tokenizer, or --tokenizer FOLDER. The vocabulary fits the tokenizer: the preset's
    size when the tokenizer fits in it, else the tokenizer's size rounded up to a multiple of 64 (or --vocab-size)."""
    from .checkpoint import load_model, save_model
    from .config import get_preset, padded_vocab_size
    from .tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args.tokenizer)
    named = f"the tokenizer at {args.tokenizer}" if args.tokenizer else "the official Qwen3 tokenizer"
    preset_size = get_preset(args.preset).vocab_size
    vocab_size = args.vocab_size or (preset_size if preset_size >= tokenizer.vocab_size else
                                     padded_vocab_size(tokenizer.vocab_size))
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(f"--vocab-size {vocab_size:,} is smaller than {named} ({tokenizer.vocab_size:,} tokens)")
    if vocab_size != preset_size and not args.vocab_size:
        print(f"vocab_size {preset_size:,} -> {vocab_size:,} to fit {named} ({tokenizer.vocab_size:,} tokens)"
              + ("" if args.tokenizer else "; --tokenizer FOLDER (e.g. from tokenizer-train) keeps it small"))
    model = load_model(args.preset, dtype=args.dtype, vocab_size=vocab_size)
    save_model(model, args.out)
    tokenizer.save(args.out)
    print(f"saved {args.preset} ({model.config.num_parameters():,} parameters) with {named} to {args.out}")


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


DIM, RESET = "\x1b[2m", "\x1b[0m"
CHAT_HELP = "commands: /think  /no_think  /budget N|off  /reset  /help  /exit"


def _sampling_kwargs(args) -> dict:
    """The engine's keyword arguments from the sampling flags shared by `chat` and `generate`."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, presence_penalty=args.presence_penalty, repetition_penalty=args.repetition_penalty,
                stop=args.stop, seed=args.seed, **_speculative_kwargs(args), **_cache_kwargs(args))


def _speculative_kwargs(args) -> dict:
    return dict(speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens)


def _cache_kwargs(args) -> dict:
    return dict(block_size=args.block_size, num_blocks=args.num_blocks,
                kv_cache_memory_bytes=args.kv_cache_memory_bytes, enable_prefix_caching=args.enable_prefix_caching)


def _long_context_kwargs(args) -> dict:
    """checkpoint.load's long_context from --dca, --yarn and --context (empty: the checkpoint as it is)."""
    chunk, local = args.dca if args.dca else (None, None)
    options = dict(dual_chunk=chunk, dual_chunk_local=local, yarn=args.yarn, context=args.context)
    return {k: v for k, v in options.items() if v is not None}


def _chunk_sizes(text: str) -> tuple[int, int | None]:
    """--dca CHUNK or CHUNK,LOCAL."""
    parts = text.split(",")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) < 2:
        raise argparse.ArgumentTypeError(f"must be CHUNK or CHUNK,LOCAL (integers, CHUNK >= 2), got {text!r}")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else None


def _add_long_context_flags(p) -> None:
    p.add_argument("--dca", type=_chunk_sizes, default=None, metavar="CHUNK[,LOCAL]",
                   help="Dual Chunk Attention with chunks of CHUNK tokens (at most the trained length; LOCAL default "
                        "CHUNK/32): runs past the trained length without training (docs/long_context.md)")
    p.add_argument("--yarn", type=_number(float, lambda v: v >= 1, ">= 1"), default=None, metavar="FACTOR",
                   help="YaRN rope scaling by FACTOR from the trained length (combines with --dca)")
    p.add_argument("--context", type=_positive_int, default=None,
                   help="longest sequence accepted (default with --dca/--yarn: 4x, or FACTOR x, the trained length)")


def _bytes(text: str) -> int:
    """A byte count: 123, 512MB, 2GB (powers of 1000) or 2GiB (powers of 1024)."""
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B?)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size in bytes (e.g. 2GiB, 500MB), got {text!r}")
    unit = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** unit)


def _add_cache_flags(p) -> None:
    p.add_argument("--block-size", type=_number(int, lambda v: v > 0 and not v & (v - 1), "a power of two"),
                   default=16, help="tokens per KV-cache block")
    p.add_argument("--num-blocks", type=_positive_int, default=None,
                   help="KV-cache blocks (default: enough for every row to reach its full length)")
    p.add_argument("--kv-cache-memory-bytes", type=_bytes, default=None,
                   help="KV-cache size instead of --num-blocks, e.g. 4GiB")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of earlier prompts that start the same way")


def _add_speculative_flags(p) -> None:
    p.add_argument("--speculative", choices=["ngram", "mtp"], default=None,
                   help="speculative decoding: ngram drafts from the text so far (prompt lookup), mtp from "
                        "Qwen3-Next's multi-token-prediction head; same tokens, sooner")
    p.add_argument("--num-speculative-tokens", type=_positive_int, default=3, help="draft tokens checked per step")


def _print_stream(chunks, color: bool):
    """Write streamed text as it comes; returns the result. With color on, reasoning is dimmed and its think tags
    hidden, with the newlines around them: one blank line between the thinking and the answer, none before."""
    if not color:
        result = None
        for chunk in chunks:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            result = chunk.result or result
        return result
    result, dimmed, kind, started, held = None, False, None, False, ""
    for chunk in chunks:
        result = chunk.result or result
        if chunk.kind != kind:  # thinking ends (or starts): newlines held back at the end of the last part are dropped
            kind, held, started = chunk.kind, "\n\n" if started else "", False
        text = chunk.text.replace("<think>", "").replace("</think>", "") if kind == "reasoning" else chunk.text
        text = text if started else text.lstrip("\n")
        body = text.rstrip("\n")
        if body:
            if dimmed != (kind == "reasoning"):
                dimmed = not dimmed
                sys.stdout.write(DIM if dimmed else RESET)
            sys.stdout.write(held + body)
            sys.stdout.flush()
            started, held = True, ""
        held += text[len(body):]  # trailing newlines wait: more text of this kind shows them, a new kind drops them
    if dimmed:
        sys.stdout.write(RESET)
    return result


def cmd_generate(args):
    """One prompt (flag or stdin) through the chat template (or raw), streamed to stdout."""
    from .checkpoint import load
    from .generation.api import generate
    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    if not prompt.strip():
        raise ValueError("the prompt is empty: pass --prompt TEXT, or pipe the prompt to standard input")
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device, long_context=_long_context_kwargs(args))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": prompt}]
    response_format = _json_schema_format(args.json_schema) if args.json_schema else None
    stream = generate(model, tokenizer, prompt if args.raw else messages, stream=True,
                      enable_thinking=False if args.no_think else None, thinking_budget=args.thinking_budget,
                      response_format=response_format, **_sampling_kwargs(args))
    if args.json:
        result = [c.result for c in stream if c.result][0]
        usage = dict(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                     reasoning_tokens=result.reasoning_tokens)
        print(json.dumps(dict(text=result.text, reasoning_content=result.reasoning_content, content=result.content,
                              tool_calls=result.tool_calls, finish_reason=result.finish_reason, usage=usage),
                         ensure_ascii=False))
        return
    _print_stream(stream, color=sys.stdout.isatty())
    print()


def _json_schema_format(path: str) -> dict:
    """The OpenAI response_format of a JSON schema file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        schema = json.loads(text)
    except ValueError as error:
        raise ValueError(f"--json-schema {path} is not JSON: {error}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"--json-schema {path} must hold a JSON schema object")
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def _chat_command(line: str, state: dict) -> bool:
    """Apply a /command typed in the chat; False if the line is a message (soft switches like `/no_think hi` are,
    and so is a line that only starts with a slash, like a path). An unknown command shows the list."""
    words = line.split()
    if not re.fullmatch(r"/\w+", words[0]) or (words[0] in ("/think", "/no_think") and len(words) > 1):
        return False
    if words == ["/think"] or words == ["/no_think"]:
        state["enable_thinking"] = words[0] == "/think"
        print(f"thinking {'on' if state['enable_thinking'] else 'off'}")
    elif words and words[0] == "/budget" and len(words) <= 2:
        value = words[1] if len(words) == 2 else "off"
        if value != "off" and not value.isdigit():
            print("usage: /budget N (tokens of thinking, N >= 0) or /budget off")
        else:
            state["thinking_budget"] = None if value == "off" else int(value)
            print(f"thinking budget: {value if value == 'off' else value + ' tokens'}")
    elif words == ["/reset"]:
        del state["messages"][state["kept"]:]
        print("conversation cleared")
    elif words in (["/exit"], ["/quit"]):
        raise EOFError
    elif words == ["/help"]:
        print(CHAT_HELP)
    else:
        print(f"unknown command {line!r}; {CHAT_HELP}")
    return True


def _chat_turn(model, tokenizer, state: dict, args) -> None:
    """Stream one answer; the assistant turn is stored with its reasoning, which the template drops later."""
    from .generation.api import generate
    try:
        stream = generate(model, tokenizer, state["messages"], stream=True, enable_thinking=state["enable_thinking"],
                          thinking_budget=state["thinking_budget"], **_sampling_kwargs(args))
        result = _print_stream(stream, color=sys.stdout.isatty())
        if result.finish_reason == "length":
            print("\n[stopped at --max-new-tokens]", end="")
    except KeyboardInterrupt:
        result = None
        print("\n[interrupted]")
    except ValueError as error:  # e.g. the conversation outgrew the context: say so and keep the chat alive
        result = None
        print(f"error: {error}")
    print()
    if result is None:
        state["messages"].pop()
        return
    state["messages"].append({"role": "assistant", "content": result.content,
                              "reasoning_content": result.reasoning_content})


def cmd_chat(args):
    """Interactive multi-turn chat that streams, thinking dimmed apart from the answer."""
    from .checkpoint import load
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device, long_context=_long_context_kwargs(args))
    # Ctrl-C stops an answer: take it even when started from a shell that ignores SIGINT (a script's `cmd &`)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    system = [{"role": "system", "content": args.system}] if args.system else []
    state = dict(messages=system, kept=len(system), enable_thinking=False if args.no_think else None,
                 thinking_budget=args.thinking_budget)
    print(f"nanoqwen chat with {args.model}; {CHAT_HELP}")
    while True:
        try:
            line = input(">>> ").strip()
            if not line or _chat_command(line, state):
                continue
        except KeyboardInterrupt:
            print()
            continue
        except EOFError:
            print()
            return
        state["messages"].append({"role": "user", "content": line})
        _chat_turn(model, tokenizer, state, args)


def cmd_speedrun(args):
    """The whole recipe on the embedded default (nanoqwen/speedrun.py), then the report card."""
    from .speedrun import run
    path = run(args.out, args.scale, args.minutes, args.seed, args.launcher, args.report_only, args.compare)
    print(f"\nreport card: {path}")


def cmd_serve(args):
    """An OpenAI-compatible HTTP server (chat and text completions, continuous batching) over a checkpoint folder."""
    from .server import serve
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_len=args.max_len, dtype=args.dtype, device=args.device, model_name=args.served_model_name,
          long_context=_long_context_kwargs(args), **_speculative_kwargs(args), **_cache_kwargs(args))


def cmd_tokenize(args):
    """Corpora (.txt/.jsonl/.parquet files or folders) into token shards that `PackedLoader` memory-maps."""
    from . import data
    from .tokenizer import load_tokenizer
    for path in args.inputs:
        data.check_corpus(path)
    tokenizer = load_tokenizer(args.tokenizer)
    docs = data.mix([data.iter_documents(path, **_corpus_options(args)) for path in args.inputs],
                    [1.0] * len(args.inputs), args.seed)
    meta = data.write_shards(docs, tokenizer, args.out, max_tokens=args.max_tokens)
    print(f"{meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens in {len(meta['shards'])} shard(s) "
          f"at {args.out}")


def cmd_tokenizer_train(args):
    """A byte-level BPE (Qwen3's regex and added tokens) trained on corpora, saved in the HF layout."""
    import itertools
    from . import data
    from .tokenizer import train_tokenizer
    for path in args.inputs:
        data.check_corpus(path)
    docs = itertools.islice(data.mix([data.iter_documents(p, **_corpus_options(args)) for p in args.inputs],
                                     [1.0] * len(args.inputs), 0), args.max_documents)
    tokenizer = train_tokenizer(docs, args.vocab_size, save_dir=args.out)
    print(f"trained a {tokenizer.vocab_size:,}-token tokenizer, saved to {args.out}")


def _add_corpus_flags(p: argparse.ArgumentParser) -> None:
    """How corpus files hold documents (pretrain --data, tokenize, tokenizer-train)."""
    from .data import TEXT_SPLITS
    p.add_argument("--text-split", choices=TEXT_SPLITS, default="paragraph",
                   help=".txt documents: paragraphs (separated by blank lines), lines, or whole files "
                        "(default: paragraph)")
    p.add_argument("--text-field", default="text",
                   help="the .jsonl / hf: field or .parquet column that holds a document's text (default: text)")


def _corpus_options(args) -> dict:
    return dict(text_split=args.text_split, text_field=args.text_field)


# --- the training recipe's stages (nanoqwen/train/): each is an options dataclass and a `run` function in its
# module; the flags are built from the dataclass, so the CLI, the library and the speedrun share one set of defaults

def cmd_stage(args):
    """Run one stage of the recipe from its flags (nanoqwen/train/: STAGE_COMMANDS)."""
    from .train import stage_command
    from .train.options import from_args
    run, options_class = stage_command(args.command)
    result = run(from_args(options_class, args))
    if isinstance(result, str):
        print(f"{args.command} done: {result}")


def _add_stage_parsers(sub) -> None:
    from .train import STAGE_COMMANDS, stage_command
    from .train.options import add_arguments
    for command, (_, _, help_text) in STAGE_COMMANDS.items():
        p = sub.add_parser(command, help=help_text)
        _one_line_errors(p)
        add_arguments(p, stage_command(command)[1])
        p.set_defaults(func=cmd_stage)


def _number(kind, ok, requirement: str):
    """An argparse type: a number of `kind` for which ok(value) holds, else a one-line error."""
    from .train.options import number
    return number(kind, (ok, requirement))


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Bad flag values end in one line on stderr, not a usage dump."""
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    _one_line_errors(p)
    p.add_argument("--model", required=True, help="checkpoint folder (model and tokenizer files)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--no-think", action="store_true", help="switch thinking off (enable_thinking=False)")
    at_least_0, positive = (lambda v: v >= 0), (lambda v: v > 0)
    p.add_argument("--thinking-budget", type=_number(int, at_least_0, ">= 0"), default=None,
                   help="most thinking tokens before the answer is forced")
    p.add_argument("--max-new-tokens", type=_number(int, positive, ">= 1"), default=2048)
    p.add_argument("--temperature", type=_number(float, at_least_0, ">= 0"), default=None,
                   help="0: greedy (default: Qwen's recommendation for the thinking mode)")
    p.add_argument("--top-p", type=_number(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=None)
    p.add_argument("--top-k", type=_number(int, at_least_0, ">= 0"), default=None, help="0: off")
    p.add_argument("--min-p", type=_number(float, lambda v: 0 <= v <= 1, "in [0, 1]"), default=None)
    p.add_argument("--presence-penalty", type=_number(float, lambda v: True, "a number"), default=0.0)
    p.add_argument("--repetition-penalty", type=_number(float, positive, "> 0"), default=1.0)
    p.add_argument("--seed", type=_number(int, lambda v: True, "an integer"), default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _add_speculative_flags(p)
    _add_cache_flags(p)
    _add_long_context_flags(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)


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

    p = sub.add_parser("init",
                       help="save a randomly initialised preset, with its tokenizer, as an HF checkpoint folder")
    _one_line_errors(p)
    p.add_argument("preset")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder saved with the model (default: the official Qwen3 tokenizer)")
    p.add_argument("--vocab-size", type=_positive_int, default=None,
                   help="embedding rows (default: the preset's, or the tokenizer's size rounded up to 64 when larger)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("speedrun", help="the whole Qwen3 recipe on the embedded data in a time budget, then a report "
                                        "card")
    _one_line_errors(p)
    p.add_argument("--scale", choices=["tiny", "cpu", "gpu"], default=None,
                   help="gpu (10 min) with a CUDA device, else cpu (30 min); tiny: every stage at its smallest (the "
                        "test)")
    p.add_argument("--minutes", type=_number(float, lambda v: v > 0, "a positive number"), default=None,
                   help="the stages' time budget (default: the scale's); the models and every stage's size follow")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--out", default=None, help="run folder (default: runs/out/speedrun-SCALE); a rerun skips "
                                               "finished stages")
    p.add_argument("--launcher", default=None, help='pre-training launcher, e.g. "torchrun --nproc-per-node 8"')
    p.add_argument("--report-only", action="store_true", help="only (re)write the report card of OUT")
    p.add_argument("--compare", default=None, metavar="OTHER", help="a run of the same recipe with another seed: the "
                                                                     "card sets its findings beside OUT's")
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser("demo", help="build, save, reload and run small dense and MoE models")
    p.add_argument("--out", default="runs/out/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="one-shot generation from a checkpoint folder (prompt flag or stdin)")
    _add_generation_flags(p)
    p.add_argument("--prompt", default=None, help="the user message ('-' or absent: read stdin)")
    p.add_argument("--raw", action="store_true", help="plain completion of the prompt text, no chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, reasoning, content, usage)")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="the answer is JSON that follows this schema (enforced after the think block)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with a checkpoint folder")
    _add_generation_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions), a web "
                                     "chat at / and Prometheus metrics at /metrics")
    _one_line_errors(p)
    p.add_argument("--model", required=True, help="checkpoint folder (model and tokenizer files)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=_number(int, lambda v: 0 <= v < 65536, "a port number"), default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-batch", type=_positive_int, default=16, help="most rows decoded together")
    p.add_argument("--max-len", type=_positive_int, default=None,
                   help="tokens per row, prompt and answer (default: 4096, at most the model's context)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    _add_speculative_flags(p)
    _add_cache_flags(p)
    _add_long_context_flags(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tokenize", help="tokenise corpora into memory-mapped shards")
    _one_line_errors(p)
    p.add_argument("inputs", nargs="+", help=".txt/.jsonl/.parquet files or folders, or hf:NAME")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the official Qwen3 tokenizer)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=_positive_int, default=None)
    _add_corpus_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("tokenizer-train", help="train a byte-level BPE tokenizer on corpora")
    _one_line_errors(p)
    p.add_argument("inputs", nargs="+", help=".txt/.jsonl/.parquet files or folders, or hf:NAME")
    p.add_argument("--vocab-size", type=_positive_int, required=True)
    p.add_argument("--max-documents", type=_positive_int, default=100_000)
    p.add_argument("--out", required=True)
    _add_corpus_flags(p)
    p.set_defaults(func=cmd_tokenizer_train)
    _add_stage_parsers(sub)
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
