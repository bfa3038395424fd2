"""VQGAN encoder, following taming-transformers' `Encoder` (taming/modules/diffusionmodules/model.py).

The building blocks (ResnetBlock, AttnBlock, Downsample) live here and the decoder imports them,
so both halves share one definition. Parameter names match taming's so its checkpoints map 1:1.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def Normalize(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm(32, eps=1e-6), the normalisation used throughout taming's autoencoder."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish, x * sigmoid(x)."""
    return F.silu(x)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: norm-swish-conv, norm-swish-dropout-conv, plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 num_groups: int = 32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            # taming's default (conv_shortcut=False) is a 1x1 "network-in-network" projection.
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H, W)."""
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions, with its output projection."""

    def __init__(self, channels: int, num_groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head whose width is the channel count
        q, k, v = (t(h).reshape(B, 1, C, H * W).transpose(2, 3) for t in (self.q, self.k, self.v))
        # SDPA's default scale is C^-0.5, taming's `w_ * (int(c)**(-0.5))`
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)  # the reference repo computed proj_out and dropped it


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H/2, W/2)."""
        # taming pads (left=0, right=1, top=0, bottom=1); torch conv padding can't be asymmetric
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Encoder(nn.Module):
    """Image -> latent grid, downsampling by 2 at every level but the last."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int,
                 in_channels: int = 3, dropout: float = 0.0, num_groups: int = 32):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in, num_groups))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, num_groups)
        self.mid.attn_1 = AttnBlock(block_in, num_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, num_groups)
        self.norm_out = Normalize(block_in, num_groups)
        # VQGAN uses double_z=False: no mean/logvar split as in the KL autoencoder
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> z: (B, z_channels, H/f, W/f), f = 2**(levels-1)."""
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))
