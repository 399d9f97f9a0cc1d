"""The compute precision of a run: bf16 autocast or plain fp32."""

import torch


def uses_bf16(precision, device):
    """Whether the `precision` key computes in bf16: when asked for, or on CUDA under "auto"."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def bf16_autocast(precision, device):
    """The autocast context of the `precision` key (disabled, so fp32, unless bf16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))
