"""The decode step: one new token for every row, and how it runs.

`decode_step` does the whole step on the device: where each row's key goes and which keys it reads (its block
table), the model, the greedy choice, the positions moved on. `DecodeStep` runs it eagerly over the live rows,
compiled over static shapes (every row, the whole block table), or (dense models on CUDA) captured by hand in one
CUDA graph and replayed; MoE models go through torch.compile's own CUDA graphs, since their routing has
data-dependent shapes. The q/k/v and gate/up projections of dense layers run as one matmul each over
stacked copies of the weights that the step owns (`FusedProjections`); the model's parameters are never touched.
"""
from __future__ import annotations

import warnings

import torch

from ..model import DecoderLayer, MLP
from .cache import paged_view


def decode_step(model, cache, tokens, positions, table, live, block_size: int, token_limit: int, rows=None,
                blocks: int | None = None, fused=None) -> torch.Tensor:
    """One decode step, in place: each row reads `tokens` at `positions` (its keys in the blocks `table` lists),
    its position advances and `tokens` receives its greedy next token. Returns the logits (rows, token_limit) in
    the model's dtype. rows None: every row (rows not `live` keep their position); else only these rows. blocks
    None: the whole block table (static shapes: on CUDA this function is compiled and captured in one CUDA graph);
    else its first `blocks` columns."""
    if rows is None:
        fed, at, blocks_read = tokens, positions, table[:, :blocks]
    else:
        fed, at, blocks_read = tokens[rows], positions[rows], table[rows, :blocks]
    view = paged_view(cache, blocks_read, at[:, None], block_size, rows)
    out = model(fed[:, None], position_ids=at[:, None], cache=view, fused=fused)
    logits = out.logits[:, -1]
    best = greedy_tokens(logits, token_limit)
    if rows is None:
        positions.add_(live.long())
        tokens.copy_(best)
    else:
        positions.index_add_(0, rows, torch.ones_like(rows))
        tokens.index_copy_(0, rows, best)
    return logits[:, :token_limit]


def greedy_tokens(logits: torch.Tensor, limit: int, chunks: int = 128) -> torch.Tensor:
    """argmax over the first `limit` columns of (B, V) logits, the first index on ties, as plain argmax. Split in two
    stages when V allows: one row of 151,936 logits is otherwise a single long reduction (~37 us of a 1.4 ms decode
    step on an H100 at batch 1)."""
    B, V = logits.shape
    if V % chunks or V // chunks < 256:
        return logits[:, :limit].argmax(-1)
    width = V // chunks
    column = torch.arange(V, device=logits.device).view(chunks, width)
    x = logits.reshape(B, chunks, width).masked_fill(column >= limit, float("-inf"))
    local = x.argmax(-1)  # (B, chunks): the best column of each chunk
    best = x.gather(2, local[..., None])[..., 0]
    chunk = best.argmax(-1)  # the first chunk holding the maximum
    return chunk * width + local.gather(1, chunk[:, None])[:, 0]


class FusedProjections:
    """Stacked copies of each dense layer's [q; k; v] and [gate; up] weights: one matmul for each group instead of
    three and two. The model reads them only when they are passed to it (`model(..., fused=this)`); its parameters,
    state_dict and checkpoints are untouched. `refresh()` copies a weight again whenever it changed since (an
    optimizer step, a replaced tensor), so the stacks always equal the weights. Layers with biased projections, MoE
    layers' experts and the hybrid's layers keep their separate matmuls (None here)."""

    def __init__(self, model):
        layers = model.model.layers
        self.groups = {"qkv": [], "gate_up": []}
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            dense = isinstance(layer, DecoderLayer) and attn.q_proj.bias is None
            self.groups["qkv"].append([attn.q_proj, attn.k_proj, attn.v_proj] if dense else None)
            self.groups["gate_up"].append([layer.mlp.gate_proj, layer.mlp.up_proj]
                                          if dense and type(layer.mlp) is MLP else None)
        self.qkv = [None] * len(layers)
        self.gate_up = [None] * len(layers)
        self.stamps: dict = {}
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> bool:
        """Bring the stacks up to date; False when some stack had to be a new tensor (a weight changed shape, dtype
        or device), so whatever holds the old ones, like a captured CUDA graph, must be rebuilt."""
        same = True
        for name, stacks in (("qkv", self.qkv), ("gate_up", self.gate_up)):
            for i, linears in enumerate(self.groups[name]):
                if linears is not None:
                    old = stacks[i]
                    stacks[i] = self._stack((name, i), [lin.weight for lin in linears], old)
                    same &= stacks[i] is old
        return same

    def _stack(self, key, weights: list[torch.Tensor], stack: torch.Tensor | None) -> torch.Tensor:
        """The weights stacked row-wise, in `stack` when it still fits (else a new tensor), copied only when some
        weight changed since the last copy (its version counter moved, or it was replaced)."""
        rows, like = sum(w.shape[0] for w in weights), weights[0]
        if stack is None or stack.shape != (rows, like.shape[1]) or stack.dtype != like.dtype or \
                stack.device != like.device:
            stack, self.stamps[key] = torch.empty(rows, like.shape[1], dtype=like.dtype, device=like.device), None
        stamp = [(w.data_ptr(), w._version) for w in weights]
        if stamp != self.stamps.get(key):
            torch.cat([w.detach() for w in weights], out=stack)
            self.stamps[key] = stamp
        return stack


_COMPILED = {}


def compiled_step(mode: str, fullgraph: bool):
    """decode_step compiled once per process and kind (static shapes; each engine shape adds a graph)."""
    key = (mode, fullgraph)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(decode_step, mode=mode, fullgraph=fullgraph, dynamic=False)
    return _COMPILED[key]


class DecodeStep:
    """How the engine's decode step runs. static: compiled over static shapes (the whole cache every step); on CUDA
    a dense model's step is then captured in one CUDA graph (model, greedy choice and bookkeeping) and replayed.
    fuse: stack the q/k/v and gate/up weights (FusedProjections). `static_buffers` are the engine's and the cache's
    tensors the step reads and writes in place (torch.compile's CUDA graphs must know their addresses)."""

    def __init__(self, model, static: bool, fuse: bool, static_buffers: list[torch.Tensor]):
        config, cuda = model.config, model.lm_head.weight.device.type == "cuda"
        self.model, self.cuda = model, cuda
        self.fused = FusedProjections(model) if fuse else None
        self.graph = self.graph_logits = self.weights = None
        # a manual CUDA graph of the compiled step for dense models; MoE routing has data-dependent shapes, so its
        # step goes through torch.compile's own CUDA graphs (which split the step where it must)
        self.use_graph = static and cuda and not config.is_moe and not config.is_hybrid
        if not static:
            self.step = decode_step
        elif self.use_graph or not cuda:
            self.step = compiled_step("default", not config.is_moe)
        else:
            self.step = compiled_step("reduce-overhead", False)
            for buffer in static_buffers:
                torch._dynamo.mark_static_address(buffer)
        self.check_weights()

    def __call__(self, *args) -> torch.Tensor:
        """Run one step over the engine's buffers (decode_step's arguments, without `fused`)."""
        args = args + (self.fused,)
        if self.graph is not None:
            self.graph.replay()
            return self.graph_logits
        if self.step is decode_step:
            return decode_step(*args)
        try:
            if self.use_graph:
                return self._capture(args)
            if self.cuda:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
            return self.step(*args)
        except Exception as error:  # a compiler problem must not stop generation: fall back to eager
            warnings.warn(f"compiling the decode step failed, running it eagerly: {error}")
            self.step, self.use_graph = decode_step, False
            return decode_step(*args)

    def _capture(self, args) -> torch.Tensor:
        """Compile the step (warm-up runs on a side stream, state restored after each), capture it in a CUDA graph
        and run it once for real. args: decode_step's; tokens and positions are restored after each warm-up."""
        state = [args[2], args[3]]  # tokens, positions
        saved = [b.clone() for b in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # the same step with the same inputs: the cache receives what it will
                self.step(*args)
                for b, v in zip(state, saved):
                    b.copy_(v)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.step(*args)
        for b, v in zip(state, saved):
            b.copy_(v)
        self.graph, self.graph_logits = graph, logits
        graph.replay()
        return logits

    def check_weights(self) -> None:
        """The stacked projections and the captured graph follow the model's tensors: stacks are refreshed when a
        weight changed, and the graph is captured again when any parameter was replaced (`.to()`, `.data = `) or
        a stack had to be reallocated."""
        if self.fused is not None and not self.fused.refresh():
            self.graph = None
        weights = [p.data_ptr() for p in self.model.parameters()]
        if weights != self.weights:
            self.graph, self.weights = None, weights
