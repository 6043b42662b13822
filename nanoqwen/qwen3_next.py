"""Qwen3-Next, the hybrid of the family: Gated DeltaNet (linear attention) layers between gated full-attention layers.

Three of every four layers are Gated DeltaNet: a recurrent state S (key dim x value dim per head) that decays and is
corrected toward each new value (the delta rule), S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
read with o_t = S_t^T q_t. The fourth is Qwen3 attention with an output gate (q_proj also makes a per-head gate,
`attn * sigmoid(gate)`) and RoPE on a quarter of head_dim. Norms are zero-centred (`x_hat * (1 + w)`, w starts at 0 and
decays towards 0 in training). The MoE adds a shared expert scaled by `sigmoid(shared_expert_gate(x))`.

Everything else is the Qwen3 model of model.py: embedding, RoPE, the cache protocol, the MoE experts, losses. Names mirror
the HF checkpoint, so it loads and saves through checkpoint.py as the others do. The multi-token-prediction head that
released checkpoints carry (`mtp.*`, which transformers does not load) is `MultiTokenPredictor`: an auxiliary loss in
training, a drafter for speculative decoding (generation/speculative.py).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Qwen3Config
from .model import (MLP, Attention, CausalLMOutput, Qwen3ForCausalLM, Qwen3Model, SparseMoE, _attention_mask,
                    _document_positions, causal_lm_loss)


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose gain is 1 + weight (weight starts at 0), all in fp32 before casting back."""
    weight_decay = True  # decaying the weight pulls the gain towards 1 (the trainer reads this)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """The DeltaNet output norm: RMSNorm of each head's output (gain starting at 1), then times silu(z)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return (y * F.silu(gate.float())).to(x.dtype)


class GatedAttention(Attention):
    """Qwen3 attention (QK-norm, GQA, the KV cache) with a sigmoid output gate per head and channel."""

    def __init__(self, config: Qwen3Config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        hd = self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, 2 * self.num_heads * hd, bias=config.attention_bias)
        self.q_norm = ZeroCenteredRMSNorm(hd, config.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, dual_chunk=None):
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)  # per head [q | gate]
        y = self.attend(q.reshape(B, T, -1), self.k_proj(x), self.v_proj(x), cos, sin, mask, cache, dual_chunk)
        return self.o_proj(y * torch.sigmoid(gate.reshape(B, T, -1)))


# ----------------------------------------------------------------------------------------------------------------
# Gated DeltaNet

def causal_conv(x: torch.Tensor, weight: torch.Tensor, past: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over time of x (B, T, C) with weight (C, 1, K): (output (B, T, C), the inputs
    it read (B, C, K-1+T)). past (B, C, K-1): the inputs before x (None: zeros); with document_ids no tap reaches
    into another document."""
    B, T, C = x.shape
    K = weight.shape[-1]
    if CAUSAL_CONV1D is not None and x.is_cuda and past is None and document_ids is None:
        out = CAUSAL_CONV1D(x.transpose(1, 2).to(weight.dtype), weight[:, 0], None, activation=None)
        return out.transpose(1, 2), F.pad(x.transpose(1, 2).to(weight.dtype), (K - 1, 0))
    x = x.transpose(1, 2).to(weight.dtype)
    past = past.to(x.dtype) if past is not None else x.new_zeros(B, C, K - 1)
    full = torch.cat((past, x), dim=-1)  # (B, C, K-1+T)
    if document_ids is None:
        return F.conv1d(full, weight, groups=C).transpose(1, 2), full
    out = torch.zeros_like(x)
    for lag in range(K):  # tap weight[..., K-1-lag] multiplies the input `lag` steps back
        same = torch.ones_like(document_ids, dtype=torch.bool) if lag == 0 else \
            F.pad(document_ids[:, lag:] == document_ids[:, :-lag], (lag, 0), value=False)
        out += weight[:, 0, K - 1 - lag, None] * full[:, :, K - 1 - lag:K - 1 - lag + T] * same[:, None, :]
    return out.transpose(1, 2), full


def _optional_kernels():
    """flash-linear-attention's gated delta rule and causal-conv1d's conv (`pip install nanoqwen[gpu]`), used on
    CUDA when installed (NANOQWEN_FLA=0 keeps the PyTorch path); None where missing."""
    if os.environ.get("NANOQWEN_FLA", "1") == "0":
        return None, None
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        delta = (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule)
    except ImportError:
        delta = None
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        causal_conv1d_fn = None
    return delta, causal_conv1d_fn


FLA_DELTA_RULE, CAUSAL_CONV1D = _optional_kernels()


def _kernel_delta_rule(q, k, v, g, beta, initial_state, document_ids):
    """The gated delta rule by flash-linear-attention's kernels (same contract as gated_delta_rule, no recording):
    fused recurrent for one token, chunked otherwise; packed documents become variable-length sequences."""
    chunk, recurrent = FLA_DELTA_RULE
    B, T, H = v.shape[:3]
    q, k = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (q, k))
    if document_ids is None:
        fn = recurrent if T == 1 else chunk
        o, state = fn(q, k, v, g=g, beta=beta, initial_state=initial_state, output_final_state=True,
                      use_qk_l2norm_in_kernel=True)
        return o.to(v.dtype), state.float(), None
    # one flat sequence of all rows, cut where a document (or a row) starts: every piece starts from zero
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    cu_seqlens = F.pad(starts.reshape(-1).nonzero()[:, 0], (0, 1), value=B * T)
    flat = [t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, g, beta)]
    o, _ = chunk(*flat[:3], g=flat[3], beta=flat[4], output_final_state=False, cu_seqlens=cu_seqlens,
                 use_qk_l2norm_in_kernel=True)
    return o.view(B, T, H, -1).to(v.dtype), None, None


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def gated_delta_rule(q, k, v, g, beta, initial_state=None, document_ids=None, chunk_size: int = 64,
                     record_every: int = 0):
    """The gated delta rule over a sequence, in fp32: q, k (B, T, Hk, Dk), v (B, T, H, Dv), g (log decay <= 0) and
    beta (B, T, H). Each key head serves H/Hk consecutive value heads.

    Returns (o (B, T, H, Dv) in v's dtype, the final state (B, H, Dk, Dv) fp32, the recorded states or None).
    initial_state: where the state starts (None: zeros). document_ids (B, T): the state starts over at every
    document boundary (packed training rows). record_every=n also returns the state after every n tokens
    (B, T // n, H, Dk, Dv): n=1 runs the recurrence token by token, n > 1 must be a multiple of chunk_size. One
    token, or n=1, is the recurrence itself (decoding, speculative steps); longer inputs go chunk by chunk: inside a
    chunk the C sequential updates collapse into a triangular solve (the WY/UT form of DeltaNet), then one matmul
    carries the state across the chunk."""
    if FLA_DELTA_RULE is not None and v.is_cuda and not record_every and \
            (document_ids is None or initial_state is None):
        return _kernel_delta_rule(q, k, v, g, beta, initial_state, document_ids)
    with torch.autocast(v.device.type, enabled=False):  # the state stays fp32 under bf16 autocast too
        return _gated_delta_rule(q, k, v, g, beta, initial_state, document_ids, chunk_size, record_every)


def _gated_delta_rule(q, k, v, g, beta, initial_state, document_ids, chunk_size, record_every):
    dtype, H = v.dtype, v.shape[2]
    q, k = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (q, k))
    q, k, v, g, beta = (t.transpose(1, 2).float() for t in (q, k, v, g, beta))  # (B, H, T, ...)
    q, k = _l2norm(q) * q.shape[-1] ** -0.5, _l2norm(k)
    B, _, T, Dk = k.shape
    S = initial_state.float() if initial_state is not None else q.new_zeros(B, H, Dk, v.shape[-1])
    recorded = None
    if (T == 1 or record_every == 1) and document_ids is None:
        outputs, states = [], []
        for i in range(T):  # the recurrence itself: decoding, and the few tokens of a speculative step
            S = S * g[..., i, None, None].exp()
            u = beta[..., i, None] * (v[:, :, i] - torch.einsum("bhkv,bhk->bhv", S, k[:, :, i]))
            S = S + k[:, :, i, :, None] * u[:, :, None, :]
            outputs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, i]))
            states.append(S)
        o = torch.stack(outputs, dim=2)
        if record_every == 1:
            recorded = torch.stack(states, dim=1)  # (B, T, H, Dk, Dv)
    else:
        o, S, states = _chunked(q, k, v, g, beta, S, document_ids, chunk_size)
        if record_every and T >= record_every:  # the state after each chunk ending on a multiple of it
            every = record_every // chunk_size
            recorded = torch.stack(states[every - 1::every][:T // record_every], dim=1)
    return o.transpose(1, 2).to(dtype), S, recorded


def _chunked(q, k, v, g, beta, S, document_ids, C):
    B, H, T, _ = k.shape
    pad = -T % C
    if pad:  # zero keys, values and beta and no decay leave the state as it is
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
        if document_ids is not None:
            document_ids = torch.cat((document_ids, document_ids[:, -1:].expand(-1, pad)), dim=1)
    N = (T + pad) // C
    q, k, v = (t.reshape(B, H, N, C, -1) for t in (q, k, v))
    g, beta = g.reshape(B, H, N, C), beta.reshape(B, H, N, C)
    gamma = g.cumsum(-1)  # log decay from the chunk's start to each position
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if document_ids is None:
        same, carry = causal, torch.ones_like(gamma, dtype=torch.bool)
    else:
        doc = document_ids.reshape(B, 1, N, C)
        same = causal & (doc[..., :, None] == doc[..., None, :])  # (B, 1, N, C, C)
        before = torch.cat((doc[:, :, :1, :1], doc[:, :, :-1, -1:]), dim=2)  # the document the state belongs to
        carry = doc == before  # positions that continue the state's document
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~same, float("-inf")).exp()  # (B, H, N, C, C)
    from_state = gamma.exp() * carry  # how much of the chunk's start state each position still sees
    # u_i = beta_i (v_i - k_i^T S_{i-1}): unrolled over the chunk, (I + A) u = beta v - beta from_state k S_0, where
    # A[i, j] = beta_i decay[i, j] k_i.k_j for j < i; solved once for both right-hand sides
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    rhs = torch.cat((beta[..., None] * v, (beta * from_state)[..., None] * k), dim=-1)
    solved = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u0, w = solved.split([v.shape[-1], k.shape[-1]], dim=-1)  # u = u0 - w S_0
    attn = (q @ k.transpose(-1, -2)) * decay  # within-chunk reads, decayed
    q_state = q * from_state[..., None]
    k_end = k * decay[..., -1, :, None]  # each key's weight in the chunk's end state
    end_carry = from_state[..., -1, None, None]
    out, states = torch.empty_like(v), []
    for n in range(N):
        u = u0[:, :, n] - w[:, :, n] @ S
        out[:, :, n] = q_state[:, :, n] @ S + attn[:, :, n] @ u
        S = end_carry[:, :, n] * S + k_end[:, :, n].transpose(-1, -2) @ u
        states.append(S)
    return out.reshape(B, H, N * C, -1)[:, :, :T], S, states


class GatedDeltaNet(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int = 0):
        super().__init__()
        c = config
        self.layer_idx = layer_idx  # which of the cache's layers is this one's
        self.num_k_heads, self.num_v_heads = c.linear_num_key_heads, c.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = c.linear_key_head_dim, c.linear_value_head_dim
        self.key_dim, self.value_dim = self.num_k_heads * self.head_k_dim, self.num_v_heads * self.head_v_dim
        conv_dim = c.linear_conv_dim
        # projections grouped per key head: [q | k | v of its value heads | z of its value heads], [b | a]
        self.in_proj_qkvz = nn.Linear(c.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(c.hidden_size, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, c.linear_conv_kernel_dim, groups=conv_dim, bias=False,
                                padding=c.linear_conv_kernel_dim - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, c.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, c.hidden_size, bias=False)

    def forward(self, x, cache=None, valid=None, document_ids=None):
        """cache: a generation.cache.CacheView; the rows start from its state and leave theirs in it."""
        if valid is not None:  # padding must not reach the state (below: it neither decays nor updates it)
            x = x * valid[..., None].to(x.dtype)
        B, T, _ = x.shape
        Hk, Dk, Dv, per_key = self.num_k_heads, self.head_k_dim, self.head_v_dim, self.num_v_heads // self.num_k_heads
        q, k, v, z = self.in_proj_qkvz(x).view(B, T, Hk, -1).split([Dk, Dk, per_key * Dv, per_key * Dv], dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, Hk, 2 * per_key).split([per_key, per_key], dim=-1)
        mixed = torch.cat((q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)), dim=-1)
        past, start = cache.read_state(self.layer_idx) if cache is not None else (None, None)
        mixed, conv_inputs = causal_conv(mixed, self.conv1d.weight, past, document_ids)
        mixed = F.silu(mixed).to(x.dtype)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        beta = b.reshape(B, T, -1).sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.reshape(B, T, -1).float() + self.dt_bias)
        if valid is not None:  # right padding after a row's tokens, or a cached state before left padding
            beta, g = beta * valid[..., None], g * valid[..., None]
        o, end, recorded = gated_delta_rule(q.view(B, T, Hk, Dk), k.view(B, T, Hk, Dk), v.view(B, T, -1, Dv), g, beta,
                                            start, document_ids, record_every=cache.record_every if cache else 0)
        if cache is not None:
            cache.write_state(self.layer_idx, conv_inputs, end, recorded)
        o = self.norm(o, z.reshape(B, T, -1, Dv))
        return self.out_proj(o.reshape(B, T, -1))


# ----------------------------------------------------------------------------------------------------------------
# Decoder

class SharedExpertMoE(SparseMoE):
    def __init__(self, config: Qwen3Config):
        super().__init__(config)
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x):
        y, router_logits = super().forward(x)
        return y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x), router_logits


class HybridDecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int, mtp: bool = False):
        """mtp: a layer of the multi-token-prediction head (full attention, MoE when the model has experts);
        layer_idx is then its cache slot past the model's layers."""
        super().__init__()
        self.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_linear = not mtp and config.is_linear_layer(layer_idx)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = GatedAttention(config, layer_idx)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_sparse = config.is_moe if mtp else config.is_sparse_layer(layer_idx)
        self.mlp = SharedExpertMoE(config) if self.is_sparse else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask=None, cache=None, fused=None, valid=None, document_ids=None, dual_chunk=None):
        h = self.input_layernorm(x)
        if self.is_linear:
            x = x + self.linear_attn(h, cache, valid, document_ids)
        else:
            x = x + self.self_attn(h, cos, sin, mask, cache, dual_chunk)
        y, router_logits = self.mlp(self.post_attention_layernorm(x)), None
        if self.is_sparse:
            y, router_logits = y
        return x + y, router_logits


class Qwen3NextModel(Qwen3Model):
    layer_class, norm_class = HybridDecoderLayer, ZeroCenteredRMSNorm


# ----------------------------------------------------------------------------------------------------------------
# Multi-token prediction

@dataclass
class HybridLMOutput(CausalLMOutput):
    mtp_loss: torch.Tensor | None = None  # the MTP head's loss, unscaled (`loss` holds it times mtp_loss_weight)


class MultiTokenPredictor(nn.Module):
    """The multi-token-prediction head (`mtp.*`): from the main model's final hidden state at t (after its norm) and
    the embedding of token t+1, hidden states whose lm_head logits predict token t+2:
    fc(cat(norm_e(embed(x[t+1])), norm_h(h[t]))) -> a full-attention decoder layer with the MoE -> norm.
    Embedding and lm_head are the main model's. Chained for drafts, the output is the next depth's h; depth d
    runs layer d % num_nextn_predict_layers (as vLLM). Layer i keeps its keys in cache layer num_hidden_layers + i."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.pre_fc_norm_embedding = ZeroCenteredRMSNorm(H, eps)
        self.pre_fc_norm_hidden = ZeroCenteredRMSNorm(H, eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, config.num_hidden_layers + i, mtp=True)
                                    for i in range(config.num_nextn_predict_layers))
        self.norm = ZeroCenteredRMSNorm(H, eps)

    def forward(self, embeds, hidden, cos, sin, mask=None, cache=None, depth: int = 0):
        """embeds (B, T, H): the tokens one past those `hidden` (B, T, H) were computed at. Returns the normed
        hidden states (B, T, H) and the layer's router logits (None without experts)."""
        x = self.fc(torch.cat((self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)), dim=-1))
        x, router_logits = self.layers[depth % len(self.layers)](x, cos, sin, mask, cache)
        return self.norm(x), router_logits


class Qwen3NextForCausalLM(Qwen3ForCausalLM):
    """Qwen3-Next causal LM: the same interface as Qwen3ForCausalLM (forward, losses, the cache protocol), plus the
    multi-token-prediction head `mtp` when config.num_nextn_predict_layers > 0. In training (labels given, train
    mode) its loss joins the main one: loss = next-token loss + router aux + mtp_loss_weight * mtp_loss."""
    backbone = Qwen3NextModel

    def __init__(self, config: Qwen3Config):
        super().__init__(config)
        self.mtp = MultiTokenPredictor(config) if config.num_nextn_predict_layers else None
        self._mtp_batch = None  # what the MTP loss needs of the batch, set by forward for head

    def init_weights(self) -> None:
        """As transformers: Normal(0, initializer_range) for matrices and the conv, zero-centred norm weights 0,
        the DeltaNet output norm 1, dt_bias 1, A = exp(A_log) uniform in (0.01, 16). Routers: see
        normalise_routers."""
        super().init_weights()
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, ZeroCenteredRMSNorm):
                    module.weight.zero_()
                elif isinstance(module, GatedDeltaNet):
                    module.dt_bias.fill_(1.0)
                    module.A_log.copy_(torch.empty_like(module.A_log).uniform_(0.01, 16).log())
        normalise_routers(self)

    def layer_inputs(self, T: int, attention_mask, document_ids, cache) -> dict:
        # the DeltaNet layers zero padding (never the one new token of a decode step) and restart at documents
        if cache is not None:
            return dict(valid=cache.valid, document_ids=document_ids)
        valid = attention_mask.bool() if attention_mask is not None and T > 1 else None
        return dict(valid=valid, document_ids=document_ids)

    def forward(self, input_ids, position_ids=None, attention_mask=None, document_ids=None, cache=None, labels=None,
                **rest):
        wants_mtp = labels is not None and cache is None and self.training and self.mtp is not None and \
            self.config.mtp_loss_weight > 0
        self._mtp_batch = (input_ids, labels, position_ids, attention_mask, document_ids) if wants_mtp else None
        try:
            return super().forward(input_ids, position_ids, attention_mask, document_ids, cache, labels, **rest)
        finally:
            self._mtp_batch = None

    def head(self, x, labels, attention_mask, *rest, **kwargs):
        out = super().head(x, labels, attention_mask, *rest, **kwargs)
        if self._mtp_batch is None:
            return out
        mtp_loss = self.mtp_loss(self.model.norm(x), *self._mtp_batch)
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        fields["loss"] = out.loss + self.config.mtp_loss_weight * mtp_loss
        return HybridLMOutput(**fields, mtp_loss=mtp_loss)

    def mtp_loss(self, hidden, input_ids, labels, position_ids=None, attention_mask=None, document_ids=None):
        """Mean over the head's depths d of the loss of predicting token t+2+d at each position t, chained as
        drafting chains it. hidden: the main model's final normed hidden states (B, T, H). Targets in another
        document than position t are ignored. Each depth's summed loss is divided by the batch's next-token targets
        (not its own, a few fewer): micro-batches and ranks then add up exactly as for the main loss."""
        B, T = input_ids.shape
        next_token_targets = (labels[:, 1:] != -100).sum().clamp(min=1)
        if position_ids is None:
            position_ids = _document_positions(document_ids) if document_ids is not None else \
                torch.arange(T, device=input_ids.device)[None].expand(B, T)
        embeds, losses, h = self.model.embed_tokens(input_ids), [], hidden
        for depth in range(self.config.num_nextn_predict_layers):
            L = T - 1 - depth  # positions t whose token t+1+depth is known
            if L < 2:
                break
            docs = document_ids[:, :L] if document_ids is not None else None
            mask = _attention_mask(attention_mask[:, :L] if attention_mask is not None else None, docs, L,
                                   input_ids.device)
            cos, sin = self.rope(position_ids[:, :L], h.dtype)
            h, _ = self.mtp(embeds[:, 1 + depth:1 + depth + L], h[:, :L], cos, sin, mask, depth=depth)
            target = labels[:, 1 + depth:1 + depth + L]  # causal_lm_loss shifts once more: t predicts t+2+depth
            if document_ids is not None:
                other = document_ids[:, 2 + depth:1 + depth + L] != document_ids[:, :L - 1]
                target = torch.cat((target[:, :1], target[:, 1:].masked_fill(other, -100)), dim=1)
            share = (target[:, 1:] != -100).sum() / next_token_targets
            losses.append(causal_lm_loss(h, self.lm_head.weight, target) * share)
        return torch.stack(losses).mean() if losses else hidden.new_zeros((), dtype=torch.float32)


def normalise_routers(model: nn.Module) -> None:
    """Every router row (one expert's gate vector) scaled to the same norm, std * sqrt(hidden): with random normal
    rows an expert whose row came out longer has a wider logit spread and wins the top-k more often, for every input
    alike. Equal norms make each expert's logit equally spread, so all start equally chosen (the Qwen3-Next notes:
    router parameters initialised normalised, so each expert is selected unbiasedly early in training)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SparseMoE):
                w = module.gate.weight
                target = model.config.initializer_range * w.shape[1] ** 0.5
                w.mul_(target / w.float().norm(dim=1, keepdim=True).clamp(min=1e-12).to(w.dtype))
