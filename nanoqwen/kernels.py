"""Triton kernels for batch-1 decoding on the GPU: matrix-vector products with the neighbouring small steps fused in.

At batch 1 a decode step reads every weight once and does little else, so its speed is the memory bandwidth the
matrix-vector products reach and the number of kernels per layer. cuBLAS launches too few blocks for these skinny
products (1.3-2.1 TB/s on an H100) and every RMSNorm, SwiGLU and residual add around them is a kernel of its own.
`gemv` reads the weight rows in coalesced tiles over the whole GPU and folds the RMSNorm before it (each program
recomputes the row's statistics: the row is a few KB), the SwiGLU before it, or the residual add after it into the
same kernel. `decode_layer` is one dense decoder layer for a single new token written with them: four weight
kernels plus the attention, instead of about twelve kernels.

Opt-in (NANOQWEN_TRITON_DECODE=1, or `kernels.ENABLED = True`): the engine's decode step then uses them on CUDA in
bf16/fp16 for dense layers at batch <= MAX_ROWS (`available()`); everything else takes the model's own forward. The
results equal the unfused layer up to the order of the floating-point sums (tests/test_kernels.py runs the kernels
in Triton's interpreter on the CPU). They are off by default until their speed is measured on a GPU
(bench/profile_engine.py --variants default kernels).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch ships without Triton
    triton = None

MAX_ROWS = 4  # batch sizes the kernels take; larger batches are matrix products, where cuBLAS is right
ENABLED = os.environ.get("NANOQWEN_TRITON_DECODE") == "1"  # off: the model's own forward everywhere

if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, res_ptr, norm_ptr, N, K: tl.constexpr, x_stride, eps,
                     PROLOGUE: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[b, rows] = W[rows] @ f(x[b]) (+ res[b, rows]); f: 0 identity, 1 RMSNorm (weight norm_ptr), 2 SwiGLU of
        x = [gate; up] (2K wide). Program (i, b) computes BLOCK_N outputs of row b."""
        pid, b = tl.program_id(0), tl.program_id(1)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        x_row = x_ptr + b * x_stride
        dtype = w_ptr.dtype.element_ty
        if PROLOGUE == 1:  # the row's RMS in fp32 (as RMSNorm)
            squares = tl.zeros([BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                v = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
                squares += v * v
            rstd = tl.rsqrt(tl.sum(squares, 0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            col_ok = k0 + cols < K
            w = tl.load(w_ptr + rows[:, None] * K + k0 + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0, eviction_policy="evict_first")
            if PROLOGUE == 1:  # normalised in fp32, rounded to the model dtype, times the norm weight (rounded)
                v = (tl.load(x_row + k0 + cols, mask=col_ok, other=0.0).to(tl.float32) * rstd).to(dtype)
                v = (v.to(tl.float32) * tl.load(norm_ptr + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)).to(dtype)
            elif PROLOGUE == 2:  # silu(gate) * up, each rounded as the unfused ops round
                g = tl.load(x_row + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)
                u = tl.load(x_row + K + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)
                v = ((g * tl.sigmoid(g)).to(dtype).to(tl.float32) * u).to(dtype)
            else:
                v = tl.load(x_row + k0 + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * v.to(tl.float32)[None, :]
        y = tl.sum(acc, 1)
        if RESIDUAL:  # the product is rounded first, as `x + linear(...)`
            y = y.to(dtype).to(tl.float32) + tl.load(res_ptr + b * N + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + b * N + rows, y.to(dtype), mask=row_ok)


    CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
               for n, k, w in [(4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 256, 4), (16, 512, 8), (2, 1024, 2),
                               (4, 512, 2), (32, 256, 8)]]
    # tuned once per shape on the GPU; Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) runs the first
    _gemv_tuned = _gemv_kernel if os.environ.get("TRITON_INTERPRET") == "1" else \
        triton.autotune(configs=CONFIGS, key=["N", "K", "PROLOGUE", "RESIDUAL"])(_gemv_kernel)


def available(x: torch.Tensor) -> bool:
    """Whether the kernels take this activation: CUDA, half precision, at most MAX_ROWS rows, Triton installed."""
    return ENABLED and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and \
        x.numel() // x.shape[-1] <= MAX_ROWS


@torch.library.custom_op("nanoqwen::gemv", mutates_args=())
def _gemv(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None,
          eps: float, swiglu: bool) -> torch.Tensor:
    N, K = weight.shape
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1])
    y = torch.empty(rows, N, dtype=weight.dtype, device=weight.device)
    prologue = 2 if swiglu else 1 if norm_weight is not None else 0
    res = residual.reshape(rows, N) if residual is not None else y
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), rows)  # noqa: E731
    tuning = {} if _gemv_tuned is not _gemv_kernel else dict(BLOCK_N=4, BLOCK_K=256)
    _gemv_tuned[grid](x2, weight, y, res, norm_weight if norm_weight is not None else weight, N, K, x2.stride(0),
                       eps, PROLOGUE=prologue, RESIDUAL=residual is not None, **tuning)
    return y.view(*x.shape[:-1], N)


@_gemv.register_fake
def _(x, weight, residual, norm_weight, eps, swiglu):
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=weight.dtype)


def gemv(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, norm=None,
         swiglu: bool = False) -> torch.Tensor:
    """linear(f(x), weight) (+ residual) for a few rows: f is `norm` (an RMSNorm module) or, with swiglu, silu(gate) *
    up of x = [gate; up]. The Triton kernel where it applies (`available`, shapes that tile), else plain torch."""
    N, K = weight.shape
    if available(x) and weight.is_contiguous() and x.stride(-1) == 1:
        return _gemv(x, weight, residual, None if norm is None else norm.weight, norm.eps if norm else 0.0, swiglu)
    if norm is not None:
        x = norm(x)
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = F.linear(x, weight)
    return y if residual is None else residual + y


def decode_layer(layer, x, cos, sin, mask, cache, qkv_weight, gate_up_weight):
    """One dense decoder layer (`model.DecoderLayer`) for one new token per row, with its q/k/v and gate/up weights
    stacked (qkv_weight, gate_up_weight)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = gemv(x, qkv_weight, norm=layer.input_layernorm)
    y = attn.attend(*attn.split_qkv(qkv), cos, sin, mask, cache)
    x = gemv(y, attn.o_proj.weight, residual=x)
    return gemv(gemv(x, gate_up_weight, norm=layer.post_attention_layernorm), mlp.down_proj.weight,
                residual=x, swiglu=True)
