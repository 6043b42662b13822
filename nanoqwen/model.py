"""The Qwen3 model family, dense and MoE, in one file (the Qwen3-Next hybrid builds on it in qwen3_next.py).

Module and attribute names mirror the HF checkpoint (`model.layers.N.self_attn.q_proj`, `mlp.gate`, ...) so weights
load by name; the only reshaping is the MoE experts, stored stacked here (see checkpoint.py). The model knows nothing
of distribution: parallelism, compilation and activation checkpointing are applied from outside. Nor does it keep
inference state: a cached forward reads and writes the engine's caches through the `CacheView` it is given
(nanoqwen/generation/cache.py), and stacked projection weights come in as an argument.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex

from . import kernels
from .config import Qwen3Config


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None  # (batch, seq, vocab); None when only the loss was asked for
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (unscaled)
    router_logits: tuple | None = None  # per MoE layer, (batch*seq, num_experts)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, cast back to the input dtype before the weight multiply (as Qwen does)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding: default and YaRN

def rope_parameters(config: Qwen3Config) -> tuple[torch.Tensor, float]:
    """inv_freq (head_dim/2,) and the attention factor that multiplies cos and sin.

    Computed in fp32 in the same order as the reference implementation: at 100K positions a one-ulp difference in
    inv_freq would already move the phase by ~5e-3 rad, so "more exact" fp64 would not run real checkpoints exactly."""
    dim, base = config.rotary_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "yarn":
        return 1.0 / pos_freqs, 1.0
    factor = float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast, beta_slow = scaling.get("beta_fast") or 32.0, scaling.get("beta_slow") or 1.0
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns over the original length
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # keep = 1: high-frequency dims keep their frequency (extrapolate); keep = 0: low-frequency dims are divided by
    # factor (interpolate). Written as 1 - (1 - ramp) on purpose: the same fp32 rounding as the reference.
    keep = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:  # partial RoPE (Qwen3-Next): only the first `rotary` dims turn
        rotated, rest = x[..., :rotary], x[..., rotary:]
        return torch.cat((rotated * cos + rotate_half(rotated) * sin, rest), dim=-1)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------------------
# Attention over an optional cache

class Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # which of the cache's layers is this one's
        H, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        bias = config.attention_bias
        self.q_proj = nn.Linear(H, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, H, bias=bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)  # per head, one weight shared by all heads
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, qkv_weight: torch.Tensor | None = None, dual_chunk=None):
        """qkv_weight: [q; k; v] stacked (the engine's decode step has them): one matmul instead of three."""
        if qkv_weight is not None:
            q, k, v = self.split_qkv(F.linear(x, qkv_weight))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.attend(q, k, v, cos, sin, mask, cache, dual_chunk))

    def split_qkv(self, qkv: torch.Tensor):
        return qkv.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)

    def attend(self, q, k, v, cos, sin, mask=None, cache=None, dual_chunk: "DualChunkRope | None" = None):
        """QK-norm, RoPE, the cache and attention over projected (B, T, heads * head_dim) q, k, v; the result goes
        into o_proj. cache: a generation.cache.CacheView (this layer's keys and values go in, all it attends to
        come out). dual_chunk: Dual Chunk Attention's query rotations (cos and sin then rotate the keys to their
        place in their chunk, which is what the cache stores)."""
        B, T, _ = q.shape
        q = self.q_norm(q.view(B, T, self.num_heads, self.head_dim))  # QK-norm comes before RoPE
        k = self.k_norm(k.view(B, T, self.num_kv_heads, self.head_dim))
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rope(k, cos, sin).transpose(1, 2)
        q = dual_chunk.rotate_queries(q) if dual_chunk is not None else apply_rope(q, cos, sin).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if dual_chunk is not None:
            y = dual_chunk.attention(q, k, v, mask, cached=cache is not None)
        elif isinstance(mask, flex.BlockMask):  # packed documents (see _attention_mask)
            y = flex_attention(q, k, v, mask, self.num_kv_heads != self.num_heads)
        elif T == 1 and cache is not None and mask is not None and (q.device.type == "cpu" or q.dtype == torch.float32):
            # one query per row: written out on the CPU, and for fp32 on the GPU, where SDPA has no GQA kernel and
            # its math fallback copies the keys and values once per query head; bf16 on the GPU uses SDPA's kernels
            y = decode_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None,
                                               enable_gqa=self.num_kv_heads != self.num_heads)
        return y.transpose(1, 2).reshape(B, T, -1)


# ----------------------------------------------------------------------------------------------------------------
# Dual Chunk Attention (ChunkLlama; Qwen2.5-1M): past the trained length without training
#
# The sequence is cut into chunks of chunk_len = chunk_size - local_size tokens. A key sits at p mod chunk_len; a
# query takes one of three positions, depending on the key's chunk: p mod chunk_len for keys of its own chunk (the
# true relative distance), min(p mod chunk_len + chunk_len, chunk_size) for the previous chunk, chunk_size for all
# earlier chunks. No relative distance then exceeds chunk_size, which stays within the trained length; up to
# chunk_size tokens it is plain attention. The three partial attentions are merged exactly by their log-sum-exp.

@dataclass
class DualChunkRope:
    """The rotations of one forward under Dual Chunk Attention (Qwen3ForCausalLM.dual_chunk_rope makes it).

    key_cos/key_sin (B, T, 1, rotary) rotate keys to p mod chunk_len. query_cos/query_sin (3, B, T, 1, rotary)
    rotate queries for keys of their own chunk, of the previous chunk, of earlier chunks. query_scale (B, T, 1, 1):
    the softmax scale 1/sqrt(head_dim), times YaRN's logit scale 0.1 ln(L / L_orig) + 1 (at least 1) when
    original_max_position_embeddings is set, with L = position + 1, the length a query sees (so a prefill and a
    token-by-token decode agree)."""
    chunk_len: int
    query_positions: torch.Tensor  # (B, T) absolute positions: which chunk each query is in
    key_cos: torch.Tensor
    key_sin: torch.Tensor
    query_cos: torch.Tensor
    query_sin: torch.Tensor
    query_scale: torch.Tensor
    part_bias: torch.Tensor | None = None  # (B, 3, T, S) of this forward, made by the first layer (one query block)

    def rotate_queries(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, T, H, D) scaled and under the three rotations: (3, B, H, T, D)."""
        q = (q * self.query_scale.to(q.dtype)).expand(3, *q.shape)  # (3, ...): partial RoPE keeps the rest of each
        return apply_rope(q, self.query_cos, self.query_sin).transpose(2, 3)

    def attention(self, queries, k, v, mask, cached: bool) -> torch.Tensor:
        """Over the keys of this forward (cached=False: key positions are the queries', mask None means causal,
        else a (B, 1, T, T) bool) or of a cache (its slot s holds position s, mask its (B, 1, T, S) bool).
        Queries go in blocks so that one block's scores stay under MAX_SCORES elements per part."""
        _, B, H, T, _ = queries.shape
        S = k.shape[2]
        if cached:
            key_positions = torch.arange(S, device=k.device)[None]
        else:
            key_positions = self.query_positions
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=k.device).tril()[None, None]
        step = max(1, MAX_SCORES // (B * H * S))
        if step >= T:  # one block: every layer of this forward has the same parts
            if self.part_bias is None:
                self.part_bias = chunk_part_bias(mask, self.query_positions, key_positions, self.chunk_len)
            return dual_chunk_attention(queries, k, v, self.part_bias)
        return torch.cat([dual_chunk_attention(queries[:, :, :, i:i + step], k, v, chunk_part_bias(
            mask[:, :, i:i + step], self.query_positions[:, i:i + step], key_positions, self.chunk_len))
            for i in range(0, T, step)], dim=2)


MAX_SCORES = 1 << 24


def chunk_part_bias(visible, query_positions, key_positions, chunk_len: int) -> torch.Tensor:
    """(B, 3, T, S) fp32: 0 where key j is in part p of query i (p = 0: its own chunk, 1: the previous chunk,
    2: earlier chunks) and visible to it at all (visible (B or 1, 1, T, S) bool: causality, padding), else -inf.
    query_positions (B, T) and key_positions (B or 1, S) are absolute."""
    apart = query_positions[:, :, None] // chunk_len - key_positions[:, None, :] // chunk_len  # (B, T, S) chunks
    parts = torch.stack((apart == 0, apart == 1, apart >= 2), dim=1) & visible
    return torch.zeros(parts.shape, device=parts.device).masked_fill_(~parts, float("-inf"))


def dual_chunk_attention(queries, k, v, part_bias) -> torch.Tensor:
    """Dual Chunk Attention in plain PyTorch (the reference): queries (3, B, H, T, D) rotated for keys of their own
    chunk, the previous chunk, earlier chunks and already scaled; k and v (B, KV, S, D); part_bias (B, 3, T, S)
    from chunk_part_bias. Returns (B, H, T, D): the three partial attentions merged by their log-sum-exp."""
    _, B, H, T, D = queries.shape
    KV = k.shape[1]
    G = H // KV
    # the query heads of a KV head, under all three rotations, in one matmul: each key is read once
    q = queries.view(3, B, KV, G, T, D).permute(1, 2, 0, 3, 4, 5).reshape(B, KV, 3 * G * T, D)
    scores = torch.matmul(q, k.transpose(-1, -2)).float().view(B, KV, 3, G, T, -1)
    outs, lses = partial_attention(scores + part_bias[:, None, :, None], v)  # (B, KV, 3, G, T, D), (.., T)
    y = merge_partial_attentions(outs, lses, dim=2)  # (B, KV, G, T, D)
    return y.reshape(B, H, T, D).to(v.dtype)


def partial_attention(scores: torch.Tensor, v: torch.Tensor):
    """Softmax attention with fp32 scores (..., S), -inf for keys a query does not see: (output (..., D) in fp32,
    log-sum-exp (...)). A query that sees no key gets output 0 and log-sum-exp -inf, so it weighs nothing in a
    merge. The leading dims of scores after v's batch dims go into one matmul against v (batch dims, S, D)."""
    peak = scores.amax(-1)
    peak = torch.where(peak.isfinite(), peak, 0.0)
    weights = torch.exp(scores - peak[..., None])  # one exp: the sum gives the log-sum-exp, the matmul the output
    total = weights.sum(-1)
    batch = v.dim() - 2
    out = torch.matmul(weights.to(v.dtype).flatten(batch, -2), v).view(*weights.shape[:-1], v.shape[-1])
    return out.float() / total.clamp(min=1e-30)[..., None], peak + total.log()


def merge_partial_attentions(outs: torch.Tensor, lses: torch.Tensor, dim: int) -> torch.Tensor:
    """The attention over the union of disjoint key sets from the partial attentions over each (stacked along
    dim): each output weighted by exp(its log-sum-exp - the total log-sum-exp)."""
    weights = torch.exp(lses - lses.logsumexp(dim, keepdim=True))
    return (weights[..., None] * outs).sum(dim)


_compiled_flex = None


def flex_attention(q, k, v, block_mask: flex.BlockMask, enable_gqa: bool) -> torch.Tensor:
    """FlexAttention over q (B, H, T, D), k and v (B, KV, T, D) with a block mask. It must run compiled (eager, it
    materialises the whole score matrix): inside a compiled region as it is, else through its own torch.compile."""
    global _compiled_flex
    if torch.is_autocast_enabled(q.device.type):  # autocast covers SDPA but not flex_attention
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if torch.compiler.is_compiling():
        return flex.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex.flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row over a cache: q (B, H, 1, D), k and v (B, KV, S, D), mask (B, 1, 1, S) bool.

    Two small matmuls with the query heads of each KV head grouped (keys and values read once) and a masked softmax
    in fp32: on the CPU cheaper than a general SDPA call for a single query."""
    B, H, _, D = q.shape
    KV = k.shape[1]
    scores = torch.matmul(q.reshape(B, KV, H // KV, D), k.transpose(-1, -2)).float()  # (B, KV, G, S)
    scores = (scores * D ** -0.5).masked_fill(~mask.reshape(-1, 1, 1, mask.shape[-1]), float("-inf"))
    y = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # (B, KV, G, D)
    return y.reshape(B, H, 1, D)


# ----------------------------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU, and the dropless mixture of experts

class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x, gate_up_weight: torch.Tensor | None = None):
        """gate_up_weight: [gate; up] stacked (the engine's decode step has them): one matmul instead of two."""
        if gate_up_weight is not None:
            gate, up = F.linear(x, gate_up_weight).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert (counts[e] rows for expert e) times weight[e].T: one grouped GEMM, no expert loop."""
    if _GROUPED_MM and (x.dtype == torch.bfloat16 or (x.device.type == "cpu" and not torch.compiler.is_compiling())):
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=ends)  # (compiled, it takes bf16 only)
    # fallback (fp32 on GPU, or compiled in fp32): one matmul per expert that received tokens
    out, start = x.new_empty(x.shape[0], weight.shape[1]), 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start:start + n] = x[start:start + n] @ weight[e].T
            start += n
    return out


_GROUPED_MM = hasattr(torch, "_grouped_mm")


class Experts(nn.Module):
    """All experts of one layer stacked into one tensor per projection (gate and up fused)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, expert_weight: torch.Tensor) -> torch.Tensor:
        N, k = expert_idx.shape
        flat = expert_idx.reshape(-1)
        order = flat.argsort(stable=True)  # group the N*k (token, expert) pairs by expert
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0])
        ends = counts.cumsum(0).to(torch.int32)
        token = order // k
        h = grouped_matmul(x[token], self.gate_up_proj, counts, ends)
        gate, up = h.chunk(2, dim=-1)
        y = grouped_matmul(F.silu(gate) * up, self.down_proj, counts, ends)
        y = y * expert_weight.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y)


class SparseMoE(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # over all experts, in fp32
        weight, idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return self.experts(x, idx, weight.to(x.dtype)).view(shape), router_logits


# ----------------------------------------------------------------------------------------------------------------
# Decoder

class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_sparse = config.is_sparse_layer(layer_idx)
        self.mlp = SparseMoE(config) if self.is_sparse else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask=None, cache=None, fused=None, dual_chunk=None):
        """fused: stacked projection weights (`fused.qkv[i]`, `fused.gate_up[i]`, None where a layer has none).
        dual_chunk: Dual Chunk Attention's query rotations (a DualChunkRope), None for plain attention."""
        i = self.self_attn.layer_idx
        qkv, gate_up = (fused.qkv[i], fused.gate_up[i]) if fused is not None else (None, None)
        if qkv is not None and gate_up is not None and x.shape[1] == 1 and cache is not None and \
                dual_chunk is None and kernels.available(x):
            return kernels.decode_layer(self, x, cos, sin, mask, cache, qkv, gate_up), None  # GPU decoding
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, qkv, dual_chunk)
        y = self.mlp(self.post_attention_layernorm(x), gate_up) if gate_up is not None else \
            self.mlp(self.post_attention_layernorm(x))
        router_logits = None
        if self.is_sparse:
            y, router_logits = y
        return x + y, router_logits


class Qwen3Model(nn.Module):
    layer_class, norm_class = DecoderLayer, RMSNorm

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = self.norm_class(config.hidden_size, config.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 (dense) and Qwen3-MoE causal LM. `model(input_ids)` returns a CausalLMOutput with `.logits`."""
    backbone = Qwen3Model

    def __init__(self, config: Qwen3Config):
        super().__init__()
        if config.is_hybrid and self.backbone is Qwen3Model:
            raise ValueError("a qwen3_next config builds Qwen3NextForCausalLM (nanoqwen.qwen3_next), or use load_model")
        self.config = config
        self.model = self.backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        inv_freq, self.attention_factor = rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    # --- construction helpers ---
    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms (as transformers); rebuilds the RoPE buffer."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def _apply(self, fn, recurse=True):
        # .to(bf16) and friends would round the RoPE frequencies too: re-derive them in fp32 on the new device
        super()._apply(fn, recurse)
        self.inv_freq = rope_parameters(self.config)[0].to(self.inv_freq.device)
        return self

    # --- forward ---
    def rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (batch, seq, 1, head_dim), computed in fp32 then cast."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)

    def dual_chunk_rope(self, position_ids: torch.Tensor, dtype) -> DualChunkRope:
        """The rotations of Dual Chunk Attention (config.dual_chunk_attention_config) at position_ids (B, T)."""
        d = self.config.dual_chunk_attention_config
        chunk_size = d["chunk_size"]
        chunk_len = chunk_size - d.get("local_size", 0)
        within = position_ids % chunk_len
        key_cos, key_sin = self.rope(within, dtype)
        successor = self.rope((within + chunk_len).clamp(max=chunk_size), dtype)
        inter = self.rope(torch.full_like(position_ids, chunk_size), dtype)
        scale = torch.full(position_ids.shape, self.config.head_dim ** -0.5, device=position_ids.device)
        original = d.get("original_max_position_embeddings")
        if original:
            scale = scale * (0.1 * torch.log((position_ids + 1).float() / original) + 1.0).clamp(min=1.0)
        return DualChunkRope(chunk_len, position_ids, key_cos, key_sin,
                             torch.stack((key_cos, successor[0], inter[0])), torch.stack((key_sin, successor[1],
                                                                                          inter[1])),
                             scale[:, :, None, None])

    def forward(self, input_ids: torch.Tensor, position_ids=None, attention_mask=None, document_ids=None,
                cache=None, labels=None, logits_to_keep: int = 0, output_router_logits: bool | None = None,
                expert_counter=None, fused=None) -> CausalLMOutput:
        """
        input_ids (B, T). Optional:
        - attention_mask (B, T): 1 for real tokens, 0 for padding.
        - document_ids (B, T): packed training sequences; attention never crosses a document, positions restart.
        - cache: a `generation.cache.CacheView` (cached inference, position_ids required): it takes this forward's
          keys and states, gives back all the keys to attend to, and its attention_mask says which ones each query
          sees (the attention_mask argument is not used then).
        - fused: stacked q/k/v and gate/up weights for these layers (`generation.decode.FusedProjections`).
        - labels (B, T): next-token targets as transformers (shifted inside, -100 ignored); returns the loss and no
          logits, computed chunk by chunk without materialising fp32 logits for the whole vocabulary.
        - logits_to_keep: compute logits for the last k positions only (0: all), or, a (B,) tensor, for one
          position of each row (a right-padded batch's last real tokens): logits (B, 1, vocab).
        """
        B, T = input_ids.shape
        if cache is not None:
            if position_ids is None:
                raise TypeError("a cached forward needs position_ids")
            mask, attention_mask = cache.attention_mask, None
        else:
            if position_ids is None:
                position_ids = _document_positions(document_ids) if document_ids is not None else \
                    torch.arange(T, device=input_ids.device)[None].expand(B, T)
            mask = _attention_mask(attention_mask, document_ids, T, input_ids.device)

        x = self.model.embed_tokens(input_ids)
        router_logits, extra = [], self.layer_inputs(T, attention_mask, document_ids, cache)
        if self.config.dual_chunk_attention_config:
            if document_ids is not None:
                raise ValueError("Dual Chunk Attention is for inference: packed documents (document_ids) are not "
                                 "supported with it")
            extra["dual_chunk"] = self.dual_chunk_rope(position_ids, x.dtype)
            cos, sin = extra["dual_chunk"].key_cos, extra["dual_chunk"].key_sin
        else:
            cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.model.layers:
            x, r = layer(x, cos, sin, mask, cache, fused, **extra)
            if r is not None:
                router_logits.append(r)
        return self.head(x, labels, attention_mask, router_logits, logits_to_keep, output_router_logits,
                         expert_counter, fused)

    def layer_inputs(self, T: int, attention_mask, document_ids, cache) -> dict:
        """Extra keyword inputs of every decoder layer (none here; the hybrid's DeltaNet layers take some)."""
        return {}

    def head(self, x, labels, attention_mask, router_logits, logits_to_keep, output_router_logits, expert_counter,
             fused=None):
        """The final norm and lm_head (logits) or the loss (with the MoE aux loss) from the last hidden states."""
        T = x.shape[1]
        out = CausalLMOutput()
        want_router = self.config.output_router_logits if output_router_logits is None else output_router_logits
        if labels is not None:
            out.loss = causal_lm_loss(self.model.norm(x), self.lm_head.weight, labels)
            if router_logits and (want_router or self.training):
                valid = attention_mask[:, -T:].reshape(-1).bool() if attention_mask is not None else None
                out.aux_loss = load_balancing_loss(router_logits, self.config.num_experts,
                                                   self.config.num_experts_per_tok, valid, expert_counter)
                out.loss = out.loss + self.config.router_aux_loss_coef * out.aux_loss
        elif fused is not None and T == 1 and kernels.available(x) and type(self.model.norm) is RMSNorm:
            # GPU decoding (the engine's decode step): the final norm fused into lm_head
            out.logits = kernels.gemv(x, self.lm_head.weight, norm=self.model.norm)
        else:
            out.logits = self.lm_head(self.model.norm(_keep_positions(x, logits_to_keep)))
        if want_router:
            out.router_logits = tuple(router_logits)
        return out


def _keep_positions(x: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The hidden states whose logits are wanted: the last k positions (0: all), or one position per row."""
    if isinstance(logits_to_keep, torch.Tensor):
        return x[torch.arange(x.shape[0], device=x.device), logits_to_keep][:, None]
    return x[:, -logits_to_keep:] if logits_to_keep else x


def _document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document, for packed rows of several documents."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


# Packed documents go to FlexAttention on CUDA: its block mask skips the blocks of other documents, where SDPA with
# a dense boolean mask runs off its flash kernel. NANOQWEN_FLEX_ATTENTION=0 keeps SDPA there; =1 uses FlexAttention
# on the CPU too (forward only there: it has no CPU backward). The CPU path stays SDPA with a boolean mask.
FLEX_ATTENTION = os.environ.get("NANOQWEN_FLEX_ATTENTION", "auto")


def document_block_mask(document_ids: torch.Tensor) -> flex.BlockMask:
    """FlexAttention block mask for packed rows: causal, and never across documents (document_ids (B, T))."""
    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (document_ids[b, q] == document_ids[b, kv])
    B, T = document_ids.shape
    return flex.create_block_mask(same_document_causal, B, None, T, T, device=document_ids.device)


def _attention_mask(attention_mask, document_ids, T: int, device):
    """Boolean (B, 1, T, T) mask, a FlexAttention block mask (packed documents on CUDA), or None for the plain
    causal case (then SDPA uses its fused causal kernels)."""
    if attention_mask is None and document_ids is None:
        return None
    if document_ids is not None:
        if attention_mask is None and (FLEX_ATTENTION == "1" or (FLEX_ATTENTION == "auto" and document_ids.is_cuda)):
            return document_block_mask(document_ids)
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]
        causal = torch.ones(same_doc.shape[-2:], dtype=torch.bool, device=same_doc.device).tril()
        mask = same_doc & causal
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]
        return mask[:, None]
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    # every query may see itself, so padding rows never softmax over nothing (that would give NaN)
    return (causal & attention_mask.bool()[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Losses

def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096):
    """Mean next-token cross-entropy over labels != -100, from the final hidden states and the lm_head weight.

    Works in row chunks: each chunk's logits live only inside `_ChunkedLinearCrossEntropy`, which returns the loss
    and keeps the gradient, so the full (tokens, vocab) fp32 logits never exist."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # shift: position t predicts token t+1
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, chunk_size)


def _chunk_loss_and_grad(h, weight, t, n_valid):
    """Summed cross-entropy of one chunk of rows, and d(mean loss)/d(logits) in the input dtype."""
    logits = (h @ weight.T).float()
    valid = t != -100
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, safe_t[:, None])[:, 0]) * valid).sum()
    g = torch.exp(logits - lse[:, None])  # softmax
    g = g.scatter_add(1, safe_t[:, None], -torch.ones_like(lse)[:, None])  # minus the one-hot target
    return loss, (g * (valid[:, None] / n_valid)).to(h.dtype)


_compiled_chunk = None


def _chunk_fn(device_type: str):
    """On GPU the elementwise chain (softmax, one-hot, scale, cast) is compiled into one pass over the logits."""
    global _compiled_chunk
    if device_type != "cuda":
        return _chunk_loss_and_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Fused lm_head + cross-entropy: the forward pass also computes the gradients, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        n_valid = (targets != -100).sum().clamp(min=1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        loss = hidden.new_zeros((), dtype=torch.float32)
        chunk_fn = _chunk_fn(hidden.device.type)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            chunk_loss, g = chunk_fn(h, weight, targets[start:start + chunk_size], n_valid)
            loss += chunk_loss
            if need_grad:
                grad_hidden[start:start + chunk_size] = g @ weight
                grad_weight += (g.T @ h).float()
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


class ExpertCounter:
    """Expert-selection counts of one global batch, for the global-batch load-balancing loss.

    Counts (and token totals) are all-reduced over the data-parallel group and accumulated over the gradient
    accumulation micro-batches of one optimizer step; call reset() after each step. The router probabilities are
    not shared: they stay local and carry the gradient."""

    def __init__(self, group=None):
        self.group = group
        self.reset()

    def reset(self):
        self.counts, self.tokens = None, 0.0

    def add(self, counts: torch.Tensor, tokens: torch.Tensor):
        counts, tokens = counts.detach().clone(), tokens.detach().float().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts, group=self.group)
            torch.distributed.all_reduce(tokens, group=self.group)
        self.counts = counts if self.counts is None else self.counts + counts
        self.tokens = self.tokens + tokens
        return self.counts, self.tokens


def load_balancing_loss(router_logits, num_experts: int, top_k: int, valid=None, counter: ExpertCounter | None = None):
    """E * sum_{k,e} f[k,e] * P[e] over the router logits of all MoE layers (transformers' formula; k when balanced).

    f[k,e]: fraction of tokens whose k-th choice is expert e (no gradient; global over the batch when a counter is
    given). P[e]: mean router probability of expert e over the local tokens (carries the gradient).
    `valid` (tokens,) marks real tokens; it is repeated for every layer."""
    logits = torch.cat(list(router_logits), dim=0) if isinstance(router_logits, (list, tuple)) else router_logits
    probs = F.softmax(logits.float(), dim=-1)
    selected = probs.topk(top_k, dim=-1).indices
    one_hot = F.one_hot(selected, num_experts).float()  # (tokens, k, E)
    if valid is not None:
        keep = valid.repeat(logits.shape[0] // valid.shape[0]).to(probs.device)
        probs, one_hot = probs[keep], one_hot[keep]
    counts, tokens = one_hot.sum(0), torch.tensor(float(one_hot.shape[0]), device=probs.device)
    if counter is not None:
        counts, tokens = counter.add(counts, tokens)
    fraction = counts / tokens.clamp(min=1)
    return num_experts * (fraction * probs.mean(0)[None]).sum()
