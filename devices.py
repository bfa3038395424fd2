"""Where and how a run computes: the device ('auto' picks one) and the precision with its autocast."""

import contextlib

import torch

from cli import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"invalid --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} asked for MPS, but it is not available; use --device auto or cpu")
    return device


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on CUDA (when supported) and fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return precision


def setup_cuda_math(device: torch.device, tf32: bool, cudnn_benchmark: bool = False):
    """On CUDA: TF32 tensor cores for fp32 matmuls and convolutions (inputs rounded to 10 mantissa bits,
    fp32 accumulation: NVIDIA's default for cuDNN convolutions, and PyTorch's for matmuls before 1.12)
    or full IEEE fp32; and whether cuDNN times its convolution algorithms once per input shape.
    Process-wide settings; nothing happens on other devices."""
    if device.type != "cuda":
        return
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
    torch.backends.cudnn.benchmark = cudnn_benchmark


def autocast(device: torch.device, precision: str):
    """The one autocast context of a training step (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
