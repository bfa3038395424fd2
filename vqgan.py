"""VQGAN (Esser, Rombach, Ommer, 2021): encoder -> codebook -> decoder.

Mirrors taming-transformers' `VQModel`: `encoder`, `quant_conv`, `quantize`, `post_quant_conv`,
`decoder`, so the parameter names of its checkpoints map 1:1.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin

import hub
import taming_compat
from checkpoints import load_checkpoint
from cli import UserError, dataclass_from_dict
from codebook import Codebook
from decoder import Decoder
from encoder import Encoder


@dataclass
class VQGANConfig:
    """Architecture of the autoencoder and its codebook."""
    image_size: int = 64            # training resolution; sets which levels get attention
    in_channels: int = 3
    ch: int = 64                    # base channel count
    # channel multiplier per level; f = 2**(len-1). The demo's 16x16 code grid at 64 px (f4) from
    # three levels: +2.2 dB held-out PSNR over the former 8x8 grid (ch_mult 1,2,2,4) at the same cost
    # per step (study.py, 150 steps on the demo photos: 17.31 vs 15.16 dB; README "Stage-one study")
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    z_channels: int = 64            # encoder output / decoder input channels
    num_groups: int = 32            # GroupNorm groups; taming uses 32
    latent_dim: int = 64            # code vector size (taming's embed_dim)
    num_codebook_vectors: int = 512
    # the commitment loss weight β (VQ-VAE); `beta` in older checkpoints and as a flag (the reference's
    # --beta), renamed as it sat beside Adam's --beta1/--beta2
    commitment_beta: float = dataclasses.field(default=0.25, metadata={
        "aliases": ("beta",), "help": "commitment loss weight beta (VQ-VAE); --beta is an alias"})
    legacy_beta: bool = False       # taming's placement of beta, for its released checkpoints
    codebook_dim: int | None = None  # low-dimensional lookup space; None = latent_dim
    l2_normalize_codes: bool = False
    ema_codebook: bool = False
    ema_decay: float = 0.99
    restart_dead_codes: bool = False
    dead_code_steps: int = 100      # optimiser steps (Codebook.step calls) without use before a restart

    def __post_init__(self):
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def latent_size(self, image_size: int | None = None) -> int:
        """Side of the code grid for an image side (default: image_size)."""
        return (image_size or self.image_size) // self.downsample_factor


# Named architectures. `f16` is the paper's ImageNet model (taming configs/imagenet_vqgan.yaml).
PRESETS: dict[str, dict] = {
    "tiny": dict(image_size=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                 z_channels=16, num_groups=8, latent_dim=16, num_codebook_vectors=64),
    "demo": dict(image_size=64, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                 z_channels=64, latent_dim=64, num_codebook_vectors=512),
    "f16": dict(image_size=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                attn_resolutions=(16,), z_channels=256, latent_dim=256, num_codebook_vectors=1024),
}


def config_from_preset(name: str, **overrides) -> VQGANConfig:
    """VQGANConfig of a named preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown VQGAN preset {name!r}; choose from {sorted(PRESETS)}")
    return VQGANConfig(**{**PRESETS[name], **overrides})


class VQGAN(nn.Module, PyTorchModelHubMixin, paper_url=hub.PAPER_URL, tags=["vqgan", "image-tokenizer"]):
    """The autoencoder. Hugging Face Hub: `save_pretrained(dir)`, `VQGAN.from_pretrained(dir_or_repo_id)` and
    `push_to_hub(repo_id)` (PyTorchModelHubMixin) use the config.json + model.safetensors layout of hub.py."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = c = config
        arch = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                    attn_resolutions=c.attn_resolutions, resolution=c.image_size,
                    z_channels=c.z_channels, dropout=c.dropout, num_groups=c.num_groups)
        self.encoder = Encoder(in_channels=c.in_channels, **arch)
        self.decoder = Decoder(out_channels=c.in_channels, **arch)
        self.quant_conv = nn.Conv2d(c.z_channels, c.latent_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.latent_dim, c.z_channels, 1)
        self.quantize = Codebook(
            c.num_codebook_vectors, c.latent_dim, beta=c.commitment_beta, legacy_beta=c.legacy_beta,
            codebook_dim=c.codebook_dim, l2_normalize=c.l2_normalize_codes, use_ema=c.ema_codebook,
            ema_decay=c.ema_decay, restart_dead_codes=c.restart_dead_codes,
            dead_code_steps=c.dead_code_steps)

    @property
    def codebook(self) -> Codebook:
        return self.quantize

    def _check_input(self, x: torch.Tensor):
        f = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {tuple(x.shape[2:])} must be divisible by the downsampling "
                             f"factor {f} (2**(len(ch_mult)-1))")

    def encode(self, x: torch.Tensor):
        """x: (B, 3, H, W) in [-1, 1] -> z_q (B, latent_dim, H/f, W/f), indices (B, H/f, W/f), q_loss."""
        self._check_input(x)
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z_q: torch.Tensor, return_last_input: bool = False):
        """z_q: (B, latent_dim, h, w) -> image (B, 3, h*f, w*f), trained towards [-1, 1]."""
        return self.decoder(self.post_quant_conv(z_q), return_last_input=return_last_input)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: (B, h, w) int64 in [0, num_codebook_vectors) -> image (B, 3, h*f, w*f)."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: torch.Tensor, return_last_input: bool = False):
        """x: (B, 3, H, W) in [-1, 1] -> (x_rec (B, 3, H, W), indices (B, h, w), q_loss scalar).

        With return_last_input, x_rec is followed by the decoder's input to its last conv (see Decoder).
        """
        z_q, indices, q_loss = self.encode(x)
        if return_last_input:
            x_rec, h_last = self.decode(z_q, return_last_input=True)
            return x_rec, h_last, indices, q_loss
        return self.decode(z_q), indices, q_loss

    # ------------------------------------------------------------------------- Hugging Face Hub folders

    def _save_pretrained(self, save_directory: Path):
        """PyTorchModelHubMixin's hook: config.json (kind "vqgan") and model.safetensors."""
        hub.write_folder(save_directory, "vqgan", dataclasses.asdict(self.config), self.state_dict())

    @classmethod
    def _from_pretrained(cls, *, model_id: str, config=None, map_location="cpu", subfolder: str = "", **download):
        """PyTorchModelHubMixin's hook: a VQGAN (eval mode, on map_location) from `subfolder` of a folder or
        Hub repo; `download` holds hf_hub_download's options (revision, cache_dir, token, ...). The mixin's
        `config` drops keys it does not know, "kind" among them, so config.json is read again here."""
        config = dataclass_from_dict(VQGANConfig, hub.read_config(model_id, "vqgan", subfolder, **download))
        with torch.device("meta"):  # no random init: every tensor comes from the file
            model = cls(config)
        state = hub.read_weights(model_id, model.state_dict(), subfolder, **download)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(map_location).eval()


def load_vqgan(path, device="cpu", config=None) -> VQGAN:
    """Load a stage-one checkpoint into a ready, frozen, eval-mode VQGAN.

    Accepts the files training_vqgan.py and convert_checkpoint.py write, and the authors' taming-
    transformers / latent-diffusion `.ckpt` files (see taming_compat). `config` is the taming YAML (path
    or dict) for those; by default it is looked up beside the checkpoint, else inferred from the weights.
    A folder written by `save_pretrained`, or a Hugging Face Hub repo id ("owner/name"), loads through
    `VQGAN.from_pretrained` (see hub.py); bad folders raise a one-line UserError.

    Raises:
        cli.UserError: the file is missing, unreadable or not safe to unpickle, or a taming file (or
            its YAML) describes a model this code can't build; the message names the problem.
        ValueError: the file is not a stage-one checkpoint (e.g. a stage-two one), or `config` is given
            for one of ours, which carries its own.
        RuntimeError: its weights don't fit its own model_config (load_state_dict, strict).
    """
    if hub.is_pretrained(path):
        if config is not None:
            raise ValueError(f"{path} carries its own config.json; `config` is only for taming checkpoints")
        return hub.load_pretrained(VQGAN, path, "vqgan").to(device).eval().requires_grad_(False)
    ckpt = load_checkpoint(path)  # never runs code from the file
    if taming_compat.checkpoint_format(ckpt) in ("taming_vqgan", "taming_transformer"):
        t = taming_compat.taming_vqgan(ckpt, path, config)
        model = vqgan_from_state_dict(t.config, t.state_dict)
    else:
        if config is not None:
            raise ValueError(f"{path} carries its own model_config; `config` is only for taming checkpoints")
        if ckpt.get("kind") != "vqgan" or "model_config" not in ckpt:
            kind = ckpt.get("kind", "unknown")
            raise ValueError(f"{path} is not a stage-one VQGAN checkpoint (kind: {kind}); "
                             "pass the file written by training_vqgan.py (checkpoints/vqgan_last.pt)")
        model = VQGAN(dataclass_from_dict(VQGANConfig, ckpt["model_config"]))
        state = ckpt.get("ema_model") or ckpt["model"]
        model.load_state_dict(state, strict=True)
    model.to(device).eval().requires_grad_(False)
    return model


def vqgan_from_state_dict(config: VQGANConfig | dict, sd: dict, device="cpu") -> VQGAN:
    """A VQGAN built on the meta device and given the weights of `sd` (a converted taming state dict):
    no random init. `config` may be VQGANConfig fields as a dict (what taming_compat returns). Raises
    UserError unless `sd` has exactly the model's keys and shapes (taming_compat.check_state_dict)."""
    config = config if isinstance(config, VQGANConfig) else VQGANConfig(**config)
    with torch.device("meta"):
        model = VQGAN(config)
    taming_compat.check_state_dict(model.state_dict(), sd)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                          strict=True, assign=True)
    return model.to(device)


def own_vqgan_config(ckpt: dict, path) -> VQGANConfig:
    """The VQGANConfig stored in one of our stage-one checkpoints."""
    if ckpt.get("kind") != "vqgan" or "model_config" not in ckpt:
        raise UserError(f"{path} is not a stage-one VQGAN checkpoint (kind: {ckpt.get('kind', 'unknown')}); "
                        "pass the file written by training_vqgan.py (checkpoints/vqgan_last.pt)")
    return dataclass_from_dict(VQGANConfig, ckpt["model_config"])


def load_any_vqgan_for_finetune(path, config=None) -> tuple[VQGANConfig, dict, dict | None]:
    """(VQGANConfig, model state dict, discriminator state dict or None) from our checkpoint, our
    .safetensors, a taming/latent-diffusion one, or a save_pretrained folder / Hub repo id (no
    discriminator), to initialise training (weights only, no optimiser state). `config`: the taming YAML
    (path or dict); ours carry their own. Raises UserError for a file it can't use."""
    if hub.is_pretrained(path):
        if config is not None:
            raise UserError(f"{path} carries its own config.json; drop the taming config")
        model = hub.load_pretrained(VQGAN, path, "vqgan")
        return model.config, model.state_dict(), None
    ckpt = load_checkpoint(path)
    if taming_compat.checkpoint_format(ckpt) == "ours":
        if config is not None:
            raise UserError(f"{path} is one of our checkpoints and carries its own config; drop the config")
        return own_vqgan_config(ckpt, path), ckpt["model"], ckpt.get("discriminator")
    t = taming_compat.taming_vqgan(ckpt, path, config)
    model = vqgan_from_state_dict(t.config, t.state_dict)  # checks the weights against the architecture
    return model.config, t.state_dict, t.discriminator_state_dict
