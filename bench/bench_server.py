"""Serving throughput: aggregate generated tokens/s and time to first token at 1, 8 and 32 concurrent clients.

    python bench/bench_server.py                                   # CPU: a tiny random model, fp32
    python bench/bench_server.py --device cuda --shape Qwen3-0.6B  # GPU: a 0.6B-shaped random model, bf16

Starts `nanoqwen serve` as a subprocess on loopback and sends the same requests (streamed /v1/completions, token-id
prompts, greedy, a fixed number of new tokens) from N concurrent clients; N=1 is serving them one at a time. The
speedup column is aggregate tokens/s over that of a one-slot server serving them one at a time (the first row):
what continuous batching buys. (A 32-slot engine decodes all its slots every step, so one client on it is slower
than on a one-slot server.)
"""
import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)


def build_checkpoint(shape: str | None, dtype: str, path: str) -> None:
    """A random model saved as a checkpoint folder; the official tokenizer goes with its vocabulary."""
    import torch
    from nanoqwen.checkpoint import load_model, save_model
    from nanoqwen.config import Qwen3Config
    from nanoqwen.model import Qwen3ForCausalLM
    torch.manual_seed(0)
    if shape:
        model = load_model(shape, dtype=dtype)
    else:  # tiny: the 151,936-row embedding and head dominate, as in small real models
        config = Qwen3Config(vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                             tie_word_embeddings=True)
        model = Qwen3ForCausalLM(config)
        model.init_weights()
    save_model(model, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: str, port: int, max_batch: int, args) -> subprocess.Popen:
    command = [sys.executable, "-m", "nanoqwen", "serve", "--model", path, "--port", str(port),
               "--max-batch", str(max_batch), "--max-len", str(args.prompt_len + args.max_tokens + 8)]
    command += ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)  # keep the caller's path
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, env=env, cwd=REPO)


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(seconds to the first token, completion tokens) of one streamed greedy completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"] and first is None:
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first, tokens


async def run_level(url: str, prompts: list[list[int]], max_tokens: int, clients: int) -> dict:
    queue = list(prompts)
    ttfts, tokens = [], []

    async def worker(client):
        while queue:
            ttft, n = await one_request(client, queue.pop(), max_tokens)
            ttfts.append(ttft)
            tokens.append(n)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(clients)])
        wall = time.perf_counter() - start
    ttfts.sort()
    return dict(clients=clients, wall=wall, tokens=sum(tokens), tok_s=sum(tokens) / wall,
                p50=statistics.median(ttfts), p95=ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, help="preset name (default: a tiny model)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--prompt-len", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the one-slot server (requests served one at a time)")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else None)
    args.prompt_len = args.prompt_len or (128 if gpu else 32)
    args.max_tokens = args.max_tokens or (128 if gpu else 32)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    print(f"# {args.shape or 'tiny'} on {args.device}, {args.requests} requests, prompt {args.prompt_len} tokens, "
          f"{args.max_tokens} new, greedy")
    print("| server | clients | wall s | tokens | tok/s | speedup | TTFT p50 ms | TTFT p95 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as path:
        build_checkpoint(args.shape, args.dtype or "float32", path)
        base = None
        runs = ([(1, [1])] if args.baseline else []) + [(args.max_batch, list(map(int, args.levels.split(","))))]
        for max_batch, levels in runs:  # a one-slot server: the requests served one at a time
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            server = start_server(path, port, max_batch, args)
            try:
                wait_until_up(url, server)
                asyncio.run(run_level(url, prompts[:2], 4, 2))  # warm-up: on CUDA this compiles the decode step
                for clients in levels:
                    r = asyncio.run(run_level(url, prompts, args.max_tokens, clients))
                    base = base or r["tok_s"]
                    print(f"| {max_batch} slots | {clients} | {r['wall']:.2f} | {r['tokens']} | {r['tok_s']:.1f} | "
                          f"{r['tok_s'] / base:.2f}x | {r['p50'] * 1e3:.0f} | {r['p95'] * 1e3:.0f} |", flush=True)
            finally:
                server.terminate()
                server.wait(timeout=30)


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before answering")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    raise RuntimeError(f"the server at {url} did not come up in {seconds:.0f}s")


if __name__ == "__main__":
    main()
