"""PatchGAN discriminator (Isola et al., 2017) as taming-transformers' `NLayerDiscriminator`, and the
GAN losses of taming's `VQLPIPSWithDiscriminator`."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Discriminator(nn.Module):
    """x: (B, 3, H, W) in [-1, 1] -> patch logits (B, 1, H/8 - 2, W/8 - 2) for 3 layers.

    `norm="batch"` is taming's BatchNorm (its checkpoints load into it). `norm="group"` uses GroupNorm
    (32 groups, or fewer where the channels don't divide): it normalises each image on its own, so the
    logits don't depend on the batch (batch 1, gradient accumulation and DDP ranks all see the same
    discriminator), as MaskBit and LlamaGen's tokenizer discriminators do. Same state-dict keys
    except the norm layers' running statistics, which GroupNorm has none of.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        self.norm = norm
        kw, padw = 4, 1
        layers = [nn.Conv2d(in_channels, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=stride, padding=padw, bias=False),
                       self._norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw))
        self.main = nn.Sequential(*layers)  # `main.N` as in taming, so its `loss.discriminator.*` maps
        self.apply(self._init_weights)

    def _norm_layer(self, channels: int) -> nn.Module:
        if self.norm == "batch":
            return nn.BatchNorm2d(channels)
        return nn.GroupNorm(math.gcd(32, channels), channels)

    @staticmethod
    def _init_weights(m: nn.Module):
        # DCGAN init (Radford et al., 2016), as pix2pix and taming use
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> logits (B, 1, h, w), one per patch."""
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


def adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, disc_weight: float,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_L nll|| / (||grad_L g|| + 1e-4), clamped to [0, max_weight], times disc_weight
    (taming's `calculate_adaptive_weight`, paper eq. 7; taming clamps at 1e4), from the two gradients
    w.r.t. the decoder's last layer L."""
    lam = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return torch.clamp(lam, 0.0, max_weight).detach() * disc_weight


class LeCAM(nn.Module):
    """LeCAM regulariser for the discriminator (Tseng et al., CVPR 2021, "Regularizing Generative
    Adversarial Networks under Limited Data", eq. 3): keeps D's outputs near EMAs of its outputs on
    the other kind of input, which bounds how far it can separate real from fake on little data.

    reg = E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(G(z)))^2]; the EMAs (decay 0.99 as in the
    paper's code) are buffers, so they are saved with the state dict and a resume continues them.
    """

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """logits_*: D's patch logits, any shape -> scalar regulariser; updates the EMAs in training."""
        if self.training:
            with torch.no_grad():
                self.ema_real.lerp_(logits_real.detach().float().mean(), 1 - self.decay)
                self.ema_fake.lerp_(logits_fake.detach().float().mean(), 1 - self.decay)
        return (F.relu(logits_real - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake).pow(2).mean())
