"""VQGAN decoder, following taming-transformers' `Decoder` (taming/modules/diffusionmodules/model.py)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoder import AttnBlock, Normalize, ResnetBlock, nonlinearity


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """Latent grid -> image. Each level has num_res_blocks + 1 blocks; upsampling ends every level but
    the highest-resolution one, exactly where taming puts it (the reference repo misplaced it)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int,
                 out_channels: int = 3, dropout: float = 0.0, num_groups: int = 32):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, num_groups)
        self.mid.attn_1 = AttnBlock(block_in, num_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, num_groups)

        # Built from the lowest resolution up, stored lowest-level-first as in taming (up[0] is full res).
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in, num_groups))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)

        self.norm_out = Normalize(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, stride=1, padding=1)

    def forward(self, z: torch.Tensor, return_last_input: bool = False):
        """z: (B, z_channels, h, w) -> image (B, 3, h*f, w*f), unbounded (trained towards [-1, 1]).

        With return_last_input, also returns the activation fed to `conv_out`, which the adaptive
        GAN weight needs to form the last layer's weight gradient without a second backward pass.
        """
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        h = nonlinearity(self.norm_out(h))
        out = self.conv_out(h)
        return (out, h) if return_last_input else out

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight is measured on (taming's `get_last_layer`)."""
        return self.conv_out.weight
