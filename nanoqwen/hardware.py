"""Peak numbers of accelerators, for MFU and for bandwidth-bound ratios: dense bf16 tensor FLOP/s and memory bandwidth
from the vendors' data sheets, keyed by the device name torch reports (the first key found in the name wins, so the
more specific names come first). A CPU has no entry: MFU is not reported there."""
from __future__ import annotations

DEVICES = {  # name substring: (dense bf16 FLOP/s, memory bytes/s)
    "GH200": (989e12, 4.0e12),
    "H200": (989e12, 4.8e12),
    "H100 PCIe": (756e12, 2.0e12),
    "H100 NVL": (835e12, 3.9e12),
    "H100": (989e12, 3.35e12),
    "H800": (989e12, 3.35e12),
    "B200": (2250e12, 8.0e12),
    "A100-SXM4-80GB": (312e12, 2.04e12),
    "A100 80GB PCIe": (312e12, 1.94e12),
    "A100": (312e12, 1.56e12),
    "L40S": (362e12, 0.864e12),
    "L4": (121e12, 0.3e12),
    "A10G": (70e12, 0.6e12),
    "RTX 4090": (165e12, 1.0e12),
}


def device_peak(device=None) -> tuple[str, float, float] | None:
    """(table key, peak FLOP/s, peak bytes/s) of a CUDA device (default: the current one); None on a CPU or an
    unknown device."""
    import torch
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda")
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((key, *values) for key, values in DEVICES.items() if key in name), None)
