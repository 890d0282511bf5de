"""Compute precision follows the device: fp32 on the CPU (some CPUs here emulate bf16 at 1% of the fp32 rate),
the checkpoint's half precision on CUDA. Statistics, scores and gradient sums are fp32 or fp64 whatever this is."""

import torch

HALF = (torch.bfloat16, torch.float16)


def compute_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    return weight_dtype if device.type == "cuda" and weight_dtype in HALF else torch.float32


def compute_bytes(device: str, checkpoint_bytes: int) -> int:
    """Bytes per value of the compute dtype, for the memory plan (which sees the device by name)."""
    return checkpoint_bytes if device == "cuda" else 4
