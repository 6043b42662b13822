"""The fused batch-1 decode kernels (nanoqwen/kernels.py) against the model's own unfused ops.

On a machine without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before Triton is imported): the same kernel code, index arithmetic, masks and roundings, executed with numpy."""
import pytest
import torch
import torch.nn.functional as F

from nanoqwen import kernels
from nanoqwen.generation.cache_manager import PagedCache
from nanoqwen.generation.decode import FusedProjections
from nanoqwen.model import RMSNorm

from test_engine import random_model
from test_model import cached_forward

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(kernels.triton is None, reason="Triton is not installed (pip install triton)")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def on(monkeypatch):
    """The kernels switched on, and (in the interpreter) taking CPU tensors too."""
    monkeypatch.setattr(kernels, "ENABLED", True)
    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "available", lambda x: x.dtype in (torch.bfloat16, torch.float16) and
                            x.numel() // x.shape[-1] <= kernels.MAX_ROWS)


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the bf16 spacing at b's largest magnitude."""
    return float((a.float() - b.float()).abs().max() / (torch.finfo(torch.bfloat16).eps * b.float().abs().max()))


@pytest.mark.parametrize("rows,n,k", [(1, 64, 256), (2, 40, 300), (3, 96, 1030), (4, 7, 64)])
def test_gemv_matches_unfused_ops(on, rows, n, k):
    """Plain, RMSNorm-before, SwiGLU-before and residual-after forms, on shapes that do not fill the tiles."""
    torch.manual_seed(rows)
    dt = torch.bfloat16
    x = torch.randn(rows, 1, k, device=DEVICE).to(dt)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dt)
    residual = torch.randn(rows, 1, n, device=DEVICE).to(dt)
    norm = RMSNorm(k).to(DEVICE, dt)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(k, device=DEVICE).to(dt))
        gate_up = torch.randn(rows, 1, 2 * k, device=DEVICE).to(dt)
        gate, up = gate_up.chunk(2, dim=-1)
        cases = [(kernels.gemv(x, w), F.linear(x, w)),
                 (kernels.gemv(x, w, norm=norm), F.linear(norm(x), w)),
                 (kernels.gemv(gate_up, w, residual=residual, swiglu=True), residual + F.linear(F.silu(gate) * up, w)),
                 (kernels.gemv(x, w, residual=residual, norm=norm), residual + F.linear(norm(x), w))]
    for got, want in cases:
        assert got.shape == want.shape and got.dtype == want.dtype
        assert error(got, want) <= 2  # the sums run in another order; the roundings are the unfused ops'
    with torch.no_grad():  # a wrong prologue is far off: the check can fail
        assert error(kernels.gemv(x, w, norm=norm), F.linear(x, w)) > 8  # (x has unit RMS: the norm is only its weight)


def test_gemv_falls_back_outside_its_range():
    """Many rows, fp32, or the kernels switched off: plain torch, the same numbers as the unfused ops."""
    x, w = torch.randn(8, 16), torch.randn(5, 16)
    norm = RMSNorm(16)
    torch.testing.assert_close(kernels.gemv(x, w, norm=norm), F.linear(norm(x), w))
    assert not kernels.available(torch.randn(1, 16, dtype=torch.bfloat16))  # a CPU tensor: never the kernels


def test_decode_with_kernels_matches_model(on):
    """Every decode step through kernels.decode_layer (and the norm fused into lm_head) gives the logits of the
    model's own layers, and greedy generation picks the same tokens."""
    model = random_model(num_hidden_layers=2).to(DEVICE, torch.bfloat16)
    fused = FusedProjections(model)
    prompt = torch.tensor([[5, 9, 2, 7, 3]], device=DEVICE)
    logits = {}
    for use in (False, True):
        kernels.ENABLED = use
        cache = PagedCache(model, rows=1, max_len=8, block_size=4)
        with torch.no_grad():
            cached_forward(model, cache, prompt[:, :4], 0, fused=fused)
            logits[use] = cached_forward(model, cache, prompt[:, 4:], 4, fused=fused).logits
    kernels.ENABLED = True
    assert logits[True].shape == logits[False].shape
    assert (logits[True].float() - logits[False].float()).abs().max() < 0.05 * logits[False].float().abs().max()
    assert logits[True].argmax(-1).tolist() == logits[False].argmax(-1).tolist()
