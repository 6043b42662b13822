"""Distribution, activation checkpointing and compilation, applied to the model from outside (as torchtitan does).

The model file knows nothing of this. Order matters: activation checkpointing wraps each block's forward, compile
compiles each block (the fused loss and the layer loop stay eager), then FSDP2 shards each block and the root (or DDP
wraps the whole model). Under torchrun, NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group when launched by torchrun (RANK in the environment)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        atexit.register(shut_down_distributed)
    return dist.get_rank(), dist.get_world_size(), device


def shut_down_distributed() -> None:
    """Destroy the process group at exit, while the interpreter is whole (init_distributed registers this; atexit runs
    before finalization), as PyTorch asks of every program. Left to finalization, a gloo worker thread that lets go
    of a collective's last tensors (Python objects) after the interpreter began tearing down aborts the rank with
    "terminate called without an active exception"."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def apply_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass. The layer's forward is wrapped in place,
    so parameter names (and the HF checkpoint layout) do not change."""
    for layer in model.model.layers:
        forward = layer.forward
        layer.forward = lambda *args, _forward=forward, **kwargs: checkpoint(_forward, *args, use_reentrant=False,
                                                                             **kwargs)


def apply_compile(model) -> None:
    """torch.compile each decoder layer: every layer has the same graph, so one compilation serves all."""
    for layer in model.model.layers:
        layer.compile()


def apply_fsdp(model, param_dtype=None) -> None:
    """FSDP2: shard each decoder layer and the root. On GPU the parameters are gathered in bf16 and the gradients
    reduced in fp32 (the fp32 master weights and the optimizer state stay sharded)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def parallelize(model, device: torch.device, mode: str = "fsdp", compile: bool = False,
                activation_checkpointing: bool = False):
    """The model ready to train; returns the module to call (the model itself, or its DDP wrapper)."""
    if mode not in ("fsdp", "ddp"):
        raise ValueError(f"parallel mode must be 'fsdp' or 'ddp', got {mode!r}")
    model.to(device)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if not is_distributed():
        return model
    if mode == "fsdp":
        apply_fsdp(model, torch.bfloat16 if device.type == "cuda" else None)
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
