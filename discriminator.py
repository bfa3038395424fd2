"""PatchGAN discriminator (Isola et al., 2017) as taming-transformers' `NLayerDiscriminator`, and the
GAN losses of taming's `VQLPIPSWithDiscriminator`."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Discriminator(nn.Module):
    """x: (B, 3, H, W) in [-1, 1] -> patch logits (B, 1, H/8 - 2, W/8 - 2) for 3 layers."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        kw, padw = 4, 1
        layers = [nn.Conv2d(in_channels, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=stride, padding=padw, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw))
        self.main = nn.Sequential(*layers)  # `main.N` as in taming, so its `loss.discriminator.*` maps
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # DCGAN init (Radford et al., 2016), as pix2pix and taming use
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def min_input_size(n_layers: int = 3) -> int:
    """Smallest image side the discriminator takes: its n_layers stride-2 4x4 convs (padding 1) halve the
    side, then two stride-1 ones take a pixel each, and at least one must remain: 3 * 2**n_layers."""
    return 3 * 2 ** n_layers


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator's adversarial loss: -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """lambda = ||grad_L nll|| / (||grad_L g|| + 1e-4), clamped to [0, 1e4], times disc_weight (taming's
    `calculate_adaptive_weight`; paper eq. 7), from the two gradients w.r.t. the decoder's last layer L."""
    lam = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return torch.clamp(lam, 0.0, 1e4).detach() * disc_weight
