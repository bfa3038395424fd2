"""Pixel metrics shared by training's validation (training_vqgan.evaluate_val) and evaluate.py, so a
checkpoint gets one PSNR wherever it is measured: on 8-bit pixels, as if both images were saved to PNG."""

import torch


def to_uint8_range(x: torch.Tensor) -> torch.Tensor:
    """x: (B, 3, H, W) in [-1, 1] -> same shape, whole numbers in [0, 255] (8-bit quantised), float."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).round()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """x, y: (B, C, H, W) in [0, data_range] -> (B,) PSNR in dB; identical images are capped at ~148 dB."""
    dtype = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    mse = (x.to(dtype) - y.to(dtype)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-10))


def psnr_8bit(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """x, x_rec: (B, 3, H, W) in [-1, 1] (x_rec is clamped) -> (B,) PSNR in dB of both quantised to
    8 bits, on [0, 255]."""
    return psnr(to_uint8_range(x), to_uint8_range(x_rec))
