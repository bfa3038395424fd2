"""Stage two: a GPT over the codes of a frozen stage-one VQGAN (Esser, Rombach, Ommer, 2021, sec. 3.2).

An image becomes its (h, w) grid of code indices, read in raster order (row-major, as the codebook
returns them) into a sequence of h*w tokens. The GPT learns p(s_i | s_<i) behind a start token.

Token ids: codes 0..K-1, then the start-of-sequence token SOS = K (its own id, so it never collides
with code 0 as in the reference VQGAN-pytorch, which prepended code 0), then with class conditioning
one token per class, K + 1 + c, which replaces SOS. Classifier-free guidance (Ho & Salimans, 2022):
in training the class token is swapped for SOS with probability `cfg_dropout`, so the same GPT also
learns the unconditional model; sampling mixes the two, uncond + s * (cond - uncond).
"""

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin

import hub
from checkpoints import load_checkpoint
from cli import config_dict, dataclass_from_dict
from mingpt import GPT, cache_window, check_sampling, sample_next_token
from taming_compat import checkpoint_format, taming_transformer
from vqgan import VQGAN, VQGANConfig, vqgan_from_state_dict


@dataclass
class TransformerConfig:
    """The GPT and its token layout; the latent grid and codebook size come from the VQGAN."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    pkeep: float = 1.0          # share of input tokens kept in training; the rest become random codes
    num_classes: int = 0        # 0: unconditional
    cfg_dropout: float = 0.1    # P(class token -> SOS) in training, for classifier-free guidance
    # 'ours': the layout above. 'taming': a taming-transformers Net2NetTransformer's layout: the GPT's
    # vocabulary is `vocab_size` (its YAML's, = the number of codes in the released models), the
    # unconditional start token is `sos_token` (a code id, usually 0), the class-conditional start token
    # is the class id itself (Labelator), the head's full output is scored and sampled, as in taming.
    token_layout: str = "ours"
    sos_token: int | None = None      # taming layout: the unconditional start token
    vocab_size: int | None = None     # taming layout: the GPT's vocabulary (None: ours, K + 1 + classes)
    block_size: int | None = None     # taming layout: the GPT's block_size (None: h*w)
    n_unmasked: int = 0               # taming layout: GPT n_unmasked


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance uncond + s * (cond - uncond), written so that s = 1 gives cond exactly."""
    return cond + (scale - 1.0) * (cond - uncond)


class VQGANTransformer(nn.Module, PyTorchModelHubMixin, paper_url=hub.PAPER_URL,
                       tags=["vqgan", "image-generation"]):
    """A frozen VQGAN (encode/decode) and a GPT over its code indices.

    Hugging Face Hub: `save_pretrained(dir)`, `VQGANTransformer.from_pretrained(dir_or_repo_id)` and
    `push_to_hub(repo_id)` (PyTorchModelHubMixin) use hub.py's layout, the VQGAN in a `vqgan/` subfolder."""

    def __init__(self, vqgan: VQGAN, config: TransformerConfig, class_names: list[str] | None = None):
        super().__init__()
        if class_names and len(class_names) != config.num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={config.num_classes}")
        self.config = config
        self.class_names = list(class_names or [])  # label c is class_names[c], when known
        self.vqgan = vqgan.eval().requires_grad_(False)
        self.num_codes = vqgan.config.num_codebook_vectors
        side = vqgan.config.latent_size()  # image_size // downsample_factor of the stage-one run
        self.latent_hw = (side, side)
        self.num_classes = config.num_classes
        self.taming = config.token_layout == "taming"
        if config.token_layout not in ("ours", "taming"):
            raise ValueError(f"token_layout must be 'ours' or 'taming', got {config.token_layout!r}")
        block_size = side * side
        if self.taming:
            if config.vocab_size is None or config.vocab_size < self.num_codes:
                raise ValueError(f"taming layout: vocab_size {config.vocab_size} must cover the "
                                 f"{self.num_codes} codes")
            if (config.sos_token is None) == (config.num_classes == 0):
                raise ValueError("taming layout: give sos_token (unconditional) or num_classes (class ids), "
                                 "not both or neither")
            if config.sos_token is not None and not 0 <= config.sos_token < config.vocab_size:
                raise ValueError(f"taming layout: sos_token {config.sos_token} outside the vocabulary")
            if config.num_classes > config.vocab_size:
                raise ValueError(f"taming layout: {config.num_classes} classes exceed the vocabulary")
            block_size = config.block_size if config.block_size is not None else block_size
            if block_size < side * side:
                raise ValueError(f"taming layout: block_size {block_size} is shorter than the {side * side} "
                                 "codes of an image (taming's sliding-window sampling is not supported)")
            self.sos_token = config.sos_token
            self.vocab_size = config.vocab_size
            # Taming samples from the head's whole output; when it is wider than the codebook, only the
            # codes can be decoded, so sampling is restricted to them.
            self.sample_vocab = min(self.vocab_size, self.num_codes)
        else:
            self.sos_token = self.num_codes
            self.vocab_size = self.num_codes + 1 + config.num_classes
            self.sample_vocab = self.num_codes
        # The last code is predicted but never fed back, so h*w positions hold [start, s_0 .. s_{h*w-2}].
        self.gpt = GPT(self.vocab_size, block_size, config.n_layer, config.n_head, config.n_embd,
                       config.embd_pdrop, config.resid_pdrop, config.attn_pdrop,
                       config.n_unmasked if self.taming else 0)

    @property
    def num_tokens(self) -> int:
        return self.latent_hw[0] * self.latent_hw[1]

    def train(self, mode: bool = True):
        """Switch the GPT only: the VQGAN stays in eval mode (frozen, no codebook updates)."""
        super().train(mode)
        self.vqgan.eval()
        return self

    # ------------------------------------------------------------------------- codes <-> images

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> codes (B, h*w) int64 in raster order."""
        _, indices, _ = self.vqgan.encode(x)  # (B, h, w)
        return indices.flatten(1)  # (B, h*w)

    @torch.no_grad()
    def indices_to_image(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: (B, h*w) or (B, h, w) int64 in [0, K) -> images (B, 3, H, W) clamped to [-1, 1]."""
        indices = indices.reshape(indices.shape[0], *self.latent_hw)  # (B, h, w)
        return self.vqgan.decode_indices(indices).clamp(-1, 1)

    # ------------------------------------------------------------------------- tokens

    def start_tokens(self, batch_size: int, labels: torch.Tensor | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
        """(B, 1) int64: SOS, or the class token K + 1 + label per row when labels (B,) are given.
        Taming layout: sos_token (unconditional models), or the label itself (class-conditional ones)."""
        device = device or self.gpt.head.weight.device
        if self.taming and labels is None and self.num_classes:
            raise ValueError(f"this taming model is class-conditional: give {batch_size} labels "
                             f"in [0, {self.num_classes})")
        if labels is None:
            return torch.full((batch_size, 1), self.sos_token, dtype=torch.long, device=device)
        if self.num_classes == 0:
            raise ValueError("labels given, but this model is unconditional (num_classes=0)")
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() != batch_size or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"expected {batch_size} labels in [0, {self.num_classes}), got {labels.tolist()}")
        if self.taming:
            return labels[:, None]  # (B, 1): class ids share the vocabulary with the codes (Labelator)
        return (self.num_codes + 1 + labels)[:, None]  # (B, 1)

    def forward(self, indices: torch.Tensor, labels: torch.Tensor | None = None):
        """indices: (B, h*w) or (B, h, w) int64 codes; labels: (B,) int64 or None.

        Returns (logits (B, h*w, K) over the codes only, targets (B, h*w) = the uncorrupted codes).
        Taming layout: logits over the GPT's whole vocabulary, noise drawn from it, no cfg dropout (as
        taming's Net2NetTransformer.forward).
        In training mode, inputs are corrupted with random codes (keep prob `pkeep`) and class tokens
        are dropped to SOS with prob `cfg_dropout`; both draw from the global torch RNG.
        """
        indices = indices.reshape(indices.shape[0], -1)  # (B, T), T = h*w
        B, T = indices.shape
        if T != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} codes per image ({self.latent_hw}), got {T}")
        start = self.start_tokens(B, labels, indices.device)  # (B, 1)
        inputs = indices
        if self.training:
            if self.config.pkeep < 1.0:
                keep = torch.rand(indices.shape, device=indices.device) < self.config.pkeep
                noise = torch.randint_like(indices, self.vocab_size if self.taming else self.num_codes)
                inputs = torch.where(keep, indices, noise)
            if labels is not None and self.config.cfg_dropout > 0 and not self.taming:
                drop = torch.rand(B, 1, device=indices.device) < self.config.cfg_dropout
                start = torch.where(drop, torch.full_like(start, self.sos_token), start)
        tokens = torch.cat([start, inputs[:, :-1]], dim=1)  # (B, T): predict s_i from [start, s_<i]
        logits, _ = self.gpt(tokens)  # (B, T, V)
        if self.taming:
            return logits, indices  # taming's cross-entropy runs over the whole head
        # Only codes are ever targets, so special tokens get no probability mass at all.
        return logits[..., : self.num_codes], indices

    def loss(self, indices: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats per code token."""
        logits, targets = self(indices, labels)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    # ------------------------------------------------------------------------- sampling

    def _sample_tokens(self, start: torch.Tensor, uncond_start: torch.Tensor | None, prefix: torch.Tensor,
                       cfg_scale: float, temperature: float, top_k, top_p, generator, use_cache: bool,
                       decode_step=None):
        """Sample codes after start (B, 1) + prefix (B, n); with uncond_start (B, 1), cond and uncond run
        as one doubled batch and their logits are mixed. Returns (B, h*w) codes with prefix kept.
        decode_step: the GPT's one-token step after the prefill (default gpt.decode_step; see
        mingpt.compile_decode_step)."""
        B, n = prefix.shape
        T = self.num_tokens
        out = torch.empty(B, T, dtype=torch.long, device=prefix.device)  # (B, T)
        out[:, :n] = prefix
        if n == T:
            return out
        starts = start if uncond_start is None else torch.cat([start, uncond_start])  # (B or 2B, 1)
        seq = torch.cat([starts, prefix.repeat(starts.shape[0] // B, 1)], dim=1)  # (B', 1 + n)
        cache = self.gpt.allocate_cache(seq.shape[0], T) if use_cache else None
        # Taming's first n_unmasked positions attend to each other both ways, so their keys and values
        # change with every token added there: recompute until that prefix is complete, then fill the
        # cache once (GPT.generate refuses such prompts instead).
        n_unmasked, filled = self.gpt.config.n_unmasked, False
        decode_step = decode_step or self.gpt.decode_step
        for i in range(n, T):
            if not use_cache or seq.shape[1] < n_unmasked:
                logits = self.gpt(seq)[0][:, -1]  # (B', V): recomputes the whole prefix
            elif not filled:
                logits = self.gpt.forward_cached(seq, cache, 0)[:, -1]  # prefill, (B', V)
                filled = True
                # position of the last token fed; the next one goes at pos + 1
                pos = torch.full((1,), seq.shape[1] - 1, dtype=torch.long, device=prefix.device)
            else:
                pos += 1  # in place: no host-to-device copy per token
                logits = decode_step(seq[:, -1:], cache_window(cache, seq.shape[1]), pos)  # (B', V)
            logits = logits[:, : self.sample_vocab].float()  # (B', K)
            if uncond_start is not None:
                logits = guided_logits(logits[:B], logits[B:], cfg_scale)  # (B, K)
            nxt = sample_next_token(logits, temperature, top_k, top_p, generator=generator)  # (B, 1)
            out[:, i : i + 1] = nxt
            if i + 1 < T:
                seq = torch.cat([seq, nxt.repeat(seq.shape[0] // B, 1)], dim=1)
        return out

    @torch.no_grad()
    def generate(self, num_samples: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, generator: torch.Generator | None = None,
                 labels=None, cfg_scale: float = 1.0, prefix: torch.Tensor | None = None,
                 use_cache: bool = True, decode_step=None) -> torch.Tensor:
        """Sample num_samples code grids -> (B, h*w) int64 in raster order.

        prefix: (B, n) codes to keep as the first n tokens (completion). labels: (B,) class ids, or
        None for unconditional; with labels and cfg_scale != 1, classifier-free guidance.
        temperature 0 is greedy. seed makes a private generator; the global RNG is never touched.
        Settings out of range (mingpt.check_sampling), or cfg_scale != 1 without labels, raise ValueError.
        decode_step: mingpt.compile_decode_step(model.gpt) for the compiled step (same tokens).
        """
        check_sampling(temperature, top_k, top_p, cfg_scale, labels_given=labels is not None)
        device = self.gpt.head.weight.device
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        if prefix is None:
            prefix = torch.empty(num_samples, 0, dtype=torch.long, device=device)
        prefix = prefix.reshape(prefix.shape[0], -1).to(device)  # (B, n)
        if prefix.shape[0] != num_samples or prefix.shape[1] > self.num_tokens:
            raise ValueError(f"prefix of shape {tuple(prefix.shape)} does not fit {num_samples} samples "
                             f"of {self.num_tokens} tokens")
        start = self.start_tokens(num_samples, labels, device)  # (B, 1)
        uncond = None
        if labels is not None and cfg_scale != 1.0:
            if self.taming:
                raise ValueError("classifier-free guidance needs an unconditional token; taming's "
                                 "class-conditional models have none (use cfg_scale=1)")
            uncond = self.start_tokens(num_samples, None, device)
        was_training = self.training
        self.eval()
        try:
            return self._sample_tokens(start, uncond, prefix, cfg_scale, temperature, top_k, top_p,
                                       generator, use_cache, decode_step)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def sample(self, num_samples: int, **kwargs) -> torch.Tensor:
        """New images (B, 3, H, W) in [-1, 1]; keyword arguments as for generate."""
        return self.indices_to_image(self.generate(num_samples, **kwargs))

    def num_kept(self, keep_fraction: float) -> int:
        """Tokens kept by a completion: the first round(h * keep_fraction) rows of the grid."""
        check_sampling(keep_fraction=keep_fraction)
        return round(self.latent_hw[0] * keep_fraction) * self.latent_hw[1]

    @torch.no_grad()
    def complete_indices(self, indices: torch.Tensor, keep_fraction: float = 0.5, **kwargs) -> torch.Tensor:
        """indices: (B, h*w) or (B, h, w) -> (B, h*w): the top rows kept exactly, the rest sampled."""
        indices = indices.reshape(indices.shape[0], -1)  # (B, h*w)
        n = self.num_kept(keep_fraction)
        return self.generate(indices.shape[0], prefix=indices[:, :n], **kwargs)

    @torch.no_grad()
    def complete(self, x: torch.Tensor, keep_fraction: float = 0.5, **kwargs) -> torch.Tensor:
        """x: images (B, 3, H, W) in [-1, 1] or codes (B, h*w) / (B, h, w) int64 -> completed images
        (B, 3, H, W): the top keep_fraction of the code rows kept, the bottom sampled."""
        indices = self.encode_to_indices(x) if x.is_floating_point() else x
        return self.indices_to_image(self.complete_indices(indices, keep_fraction, **kwargs))

    # ------------------------------------------------------------------------- Hugging Face Hub folders

    def _own_state_dict(self) -> dict:
        """The weights that are not the VQGAN's (the GPT's, "gpt.*"): model.safetensors of a folder."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vqgan.")}

    def _save_pretrained(self, save_directory: Path):
        """PyTorchModelHubMixin's hook: config.json (kind "transformer", the class names), the GPT's
        model.safetensors, and the VQGAN as its own folder in vqgan/."""
        config = {**dataclasses.asdict(self.config), "class_names": list(self.class_names)}
        hub.write_folder(save_directory, "transformer", config, self._own_state_dict())
        self.vqgan._save_pretrained(Path(save_directory) / "vqgan")

    @classmethod
    def _from_pretrained(cls, *, model_id: str, config=None, class_names=None, map_location="cpu", **download):
        """PyTorchModelHubMixin's hook: the model (eval mode, on map_location) from a folder or Hub repo;
        `download` holds hf_hub_download's options. config.json is read again with its kind checked (the
        mixin's `config` and `class_names` come from the same file)."""
        raw = hub.read_config(model_id, "transformer", **download)
        vqgan = VQGAN._from_pretrained(model_id=model_id, subfolder="vqgan", **download)
        with torch.device("meta"):  # the GPT's tensors all come from the file
            model = cls(vqgan, dataclass_from_dict(TransformerConfig, raw), raw.get("class_names") or None)
        state = hub.read_weights(model_id, model._own_state_dict(), **download)
        model.load_state_dict(state, strict=False, assign=True)  # exactly the non-VQGAN keys (checked above)
        return model.to(map_location).eval()


# ----------------------------------------------------------------------------- checkpoints

def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, shapes, dtypes, bytes): the identity of its weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_dict(model: VQGANTransformer) -> dict:
    """What a transformer checkpoint needs to rebuild the model: both configs, all weights (VQGAN included)."""
    return {
        "kind": "transformer",
        "transformer_config": config_dict(model.config),
        "vqgan_config": config_dict(model.vqgan.config),
        "class_names": list(model.class_names),
        "model": model.state_dict(),
    }


def build_from_checkpoint(ckpt: dict, use_ema: bool = False) -> VQGANTransformer:
    """A VQGANTransformer (on the CPU, weights loaded) from a dict written by model_dict; with use_ema,
    the EMA weights (`ema_model`, written by training_transformer.py with --weight-ema-decay) when the
    checkpoint has them."""
    vqgan = VQGAN(dataclass_from_dict(VQGANConfig, ckpt["vqgan_config"]))
    config = dataclass_from_dict(TransformerConfig, ckpt["transformer_config"])
    model = VQGANTransformer(vqgan, config, ckpt.get("class_names") or None)
    state = ckpt["ema_model"] if use_ema and ckpt.get("ema_model") else ckpt["model"]
    model.load_state_dict(state, strict=True)
    return model


def from_taming_parts(parts) -> VQGANTransformer:
    """A taming-layout VQGANTransformer (CPU) from a mapped Net2NetTransformer checkpoint
    (taming_compat.TamingTransformer): its VQGAN and GPT weights, loaded strictly."""
    g = parts.gpt_config
    config = TransformerConfig(n_layer=g["n_layer"], n_head=g["n_head"], n_embd=g["n_embd"],
                               embd_pdrop=g["embd_pdrop"], resid_pdrop=g["resid_pdrop"],
                               attn_pdrop=g["attn_pdrop"], pkeep=1.0,
                               num_classes=parts.n_classes if parts.conditioning == "class" else 0,
                               cfg_dropout=0.0, token_layout="taming", sos_token=parts.sos_token,
                               vocab_size=g["vocab_size"], block_size=g["block_size"],
                               n_unmasked=g["n_unmasked"])
    vqgan = vqgan_from_state_dict(parts.vqgan_config, parts.vqgan_state_dict)
    model = VQGANTransformer(vqgan, config)
    model.gpt.load_state_dict(parts.gpt_state_dict, strict=True)
    return model


def load_transformer(path, device="cpu", config=None) -> VQGANTransformer:
    """Load a checkpoint written by training_transformer.py (its EMA weights when it has them, as
    vqgan.load_vqgan does), or a taming-transformers Net2NetTransformer `.ckpt` (taming layout; its
    YAML given as `config` or found beside it), into a ready eval-mode model on device. A folder written
    by `save_pretrained`, or a Hugging Face Hub repo id ("owner/name"), loads through
    `VQGANTransformer.from_pretrained` (see hub.py); bad folders raise a one-line UserError.

    Raises:
        cli.UserError: the file is missing, unreadable or not safe to unpickle, or a taming file (or
            its YAML) describes a model this code can't build; the message names the problem.
        ValueError: the file is not a stage-two checkpoint (e.g. a stage-one one), or its configs
            describe an invalid token layout.
        RuntimeError: its weights don't fit its own configs (load_state_dict, strict).
    """
    if hub.is_pretrained(path):
        if config is not None:
            raise ValueError(f"{path} carries its own config.json; `config` is only for taming checkpoints")
        return hub.load_pretrained(VQGANTransformer, path, "transformer").to(device).eval().requires_grad_(False)
    ckpt = load_checkpoint(path)  # weights_only, or the restricted unpickler for Lightning files
    if checkpoint_format(ckpt) == "taming_transformer":
        model = from_taming_parts(taming_transformer(ckpt, path, config))
        return model.to(device).eval().requires_grad_(False)
    if ckpt.get("kind") != "transformer" or "transformer_config" not in ckpt:
        raise ValueError(f"{path} is not a stage-two checkpoint (kind: {ckpt.get('kind', 'unknown')}); "
                         "pass the file written by training_transformer.py (checkpoints/transformer_last.pt)")
    return build_from_checkpoint(ckpt, use_ema=True).to(device).eval().requires_grad_(False)
