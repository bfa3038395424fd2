"""Load the authors' released checkpoints: taming-transformers and latent-diffusion VQGANs, and taming's
stage-two `Net2NetTransformer`, into this repo's models, computing what the original code computes.

All taming-specific logic lives here. What maps:

- VQGAN (`taming.models.vqgan.VQModel`, `ldm.models.autoencoder.VQModel`): the Lightning `state_dict`
  keys `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`, `quantize.embedding.weight` are
  our VQGAN's names 1:1 (checked: no missing, no unexpected key, equal shapes). `legacy_beta=True`
  reproduces taming's `VectorQuantizer2(legacy=True)` loss. `loss.*` (LPIPS, discriminator) is not part
  of the autoencoder; `loss.discriminator.main.*` maps to our `Discriminator.main.*` for fine-tuning.
- Transformer: `transformer.*` is minGPT with our `mingpt.GPT` names (minus the `*.attn.mask` buffers),
  `first_stage_model.*` is a VQGAN as above; conditioning comes from the YAML (see `TamingTransformer`).

What is refused, with a message saying why: Gumbel and EMA quantisers, index remapping (`remap`,
`quantize.used`), `double_z`, `give_pre_end`, `tanh_out`, non-vanilla attention, `resamp_with_conv:
false`, `out_ch != in_channels`, unknown ddconfig keys, ActNorm discriminators, permuters other than
Identity, and conditionings other than unconditional (SOS token) and class labels (`Labelator`).

Reading never runs code from the file (checkpoints.load_checkpoint). What comes out is plain data: a
config as a dict of VQGANConfig fields (or mingpt.GPTConfig ones) and state dicts; vqgan.load_vqgan and
transformer.load_transformer build the models from it. Nothing here imports a model but the
Discriminator, whose shapes check a fine-tuning source's discriminator weights.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoints import load_checkpoint
from cli import UserError

def _tensor_state_dict(ckpt: dict, path) -> dict:
    """A Lightning checkpoint's `state_dict`, refusing anything in it that is not a plain tensor."""
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict):
        raise UserError(f"{path} has no `state_dict`; not a taming/latent-diffusion Lightning checkpoint")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: state_dict entries that are not tensors: {bad[:5]}")
    return dict(sd)


# ============================================================================= detection

def checkpoint_format(ckpt: dict) -> str:
    """'ours', 'taming_vqgan', 'taming_transformer' or 'unknown'."""
    if "kind" in ckpt:
        return "ours"
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict):
        return "unknown"
    if "encoder.conv_in.weight" in sd:
        return "taming_vqgan"
    if any(k.startswith("transformer.") for k in sd) and "first_stage_model.encoder.conv_in.weight" in sd:
        return "taming_transformer"
    return "unknown"


# ============================================================================= YAML

def find_taming_config(ckpt_path) -> Path | None:
    """The YAML the authors ship beside a checkpoint: `X/configs/*project.yaml` for `X/checkpoints/
    *.ckpt` (taming), or `config.yaml` / `*project.yaml` in the checkpoint's folder (latent-diffusion)."""
    ckpt_path = Path(ckpt_path).expanduser().resolve()
    here = ckpt_path.parent
    for folder in (here.parent / "configs", here / "configs", here):
        found = sorted(folder.glob("*project.yaml"))
        if found:
            return found[-1]  # Lightning writes <timestamp>-project.yaml; the newest sorts last
    if (here / "config.yaml").is_file():
        return here / "config.yaml"
    return None


def read_taming_config(config) -> dict:
    """`model` section ({'target': ..., 'params': {...}}) of a taming YAML given as a path or a dict.

    Accepts the whole file, its `model` section, or just its `params`."""
    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        if not path.is_file():
            raise UserError(f"config {str(path)!r} not found")
        try:
            import yaml
        except ImportError:
            raise UserError("reading a taming YAML needs pyyaml: `pip install pyyaml`") from None
        try:
            config = yaml.safe_load(path.read_text())  # safe_load: YAML tags can't build objects
        except yaml.YAMLError as e:
            raise UserError(f"could not parse {str(path)!r} as YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise UserError(f"a taming config must be a mapping, got {type(config).__name__}")
    if "model" in config:
        config = config["model"]
    if "params" not in config:
        config = {"target": None, "params": config}
    if not isinstance(config["params"], dict):
        raise UserError("the taming config's model.params is not a mapping")
    return config


# ============================================================================= VQGAN

# Our VQGAN runs these VQ autoencoder classes exactly (same modules and maths).
_SUPPORTED_VQ_TARGETS = {
    "taming.models.vqgan.VQModel", "taming.models.vqgan.VQNoDiscModel", "taming.models.vqgan.VQSegmentationModel",
    "ldm.models.autoencoder.VQModel", "ldm.models.autoencoder.VQModelInterface",
}
_REFUSED_VQ_TARGETS = {
    "taming.models.vqgan.GumbelVQ": "it uses GumbelQuantize (a learned projection to code logits and "
                                    "Gumbel-softmax sampling), not nearest-neighbour lookup",
    "taming.models.vqgan.EMAVQ": "it uses EMAVectorQuantizer, whose codebook buffers and loss differ",
    "ldm.models.autoencoder.AutoencoderKL": "it is a KL (Gaussian) autoencoder with no codebook",
}
# Every ddconfig key taming's Encoder/Decoder and latent-diffusion's read; anything else is refused
# because taming silently swallows it (**ignore_kwargs) and we can't tell whether it matters.
_DDCONFIG_KEYS = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                  "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "give_pre_end",
                  "tanh_out", "attn_type", "use_linear_attn"}


def _check_vq_target(target, where: str):
    if target is None or target in _SUPPORTED_VQ_TARGETS:
        return
    if target in _REFUSED_VQ_TARGETS:
        raise UserError(f"{where}: {target} is not supported: {_REFUSED_VQ_TARGETS[target]}")
    if target.endswith("Net2NetTransformer"):
        raise UserError(f"{where} describes a stage-two transformer; load it with transformer.load_transformer "
                        "(or pass it here for its first-stage VQGAN, which this loader also reads)")
    raise UserError(f"{where}: unknown model target {target!r}; supported: {sorted(_SUPPORTED_VQ_TARGETS)}")


def vqgan_config_from_taming(params: dict, where: str = "config") -> dict:
    """Our VQGANConfig's fields (a dict) for a taming/latent-diffusion `model.params` (ddconfig, n_embed,
    embed_dim)."""
    if "ddconfig" not in params or "n_embed" not in params or "embed_dim" not in params:
        raise UserError(f"{where}: expected model.params with ddconfig, n_embed and embed_dim")
    dd = dict(params["ddconfig"])
    unknown = sorted(set(dd) - _DDCONFIG_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown ddconfig keys {unknown}; they may change the model, so it is not "
                        "loaded (remove them from the YAML if you know they don't matter)")
    if params.get("remap") is not None:
        raise UserError(f"{where}: remap={params['remap']!r} renumbers the codes through a `used` table; "
                        "its index order differs from the codebook's, which is not supported")
    refusals = [
        (dd.get("double_z", True), "double_z: true gives a mean/log-variance encoder output (KL autoencoder)"),
        (dd.get("give_pre_end", False), "give_pre_end: true makes the decoder return features, not images"),
        (dd.get("tanh_out", False), "tanh_out: true adds a tanh our decoder doesn't have"),
        (dd.get("attn_type", "vanilla") != "vanilla" or dd.get("use_linear_attn", False),
         f"attn_type {dd.get('attn_type', 'linear')!r}: only vanilla spatial attention is supported"),
        (not dd.get("resamp_with_conv", True), "resamp_with_conv: false resamples without convolutions"),
        (dd.get("out_ch", dd.get("in_channels")) != dd.get("in_channels"),
         f"out_ch {dd.get('out_ch')} differs from in_channels {dd.get('in_channels')}"),
    ]
    for bad, why in refusals:
        if bad:
            raise UserError(f"{where}: not supported: {why}")
    try:
        return dict(
            image_size=int(dd["resolution"]), in_channels=int(dd["in_channels"]), ch=int(dd["ch"]),
            ch_mult=tuple(int(m) for m in dd["ch_mult"]), num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=tuple(int(r) for r in dd["attn_resolutions"]), dropout=float(dd.get("dropout", 0.0)),
            z_channels=int(dd["z_channels"]), num_groups=32, latent_dim=int(params["embed_dim"]),
            num_codebook_vectors=int(params["n_embed"]), commitment_beta=0.25, legacy_beta=True)
    except KeyError as e:
        raise UserError(f"{where}: ddconfig is missing {e}") from None


def infer_vqgan_config(sd: dict) -> dict:
    """VQGANConfig fields (a dict) from the weight shapes of a taming VQGAN state dict (no YAML at hand).

    Everything but the training resolution is in the shapes; the resolution only decides which levels
    get attention, so it is set to 256 (all released models) and attn_resolutions follow from the
    levels that have attention weights."""
    try:
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        num_res_blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        z_channels = sd["quant_conv.weight"].shape[1]
        n_embed, embed_dim = sd["quantize.embedding.weight"].shape
    except (KeyError, ValueError) as e:
        raise UserError(f"cannot infer the architecture from the weights (missing {e}); pass the YAML "
                        "as config") from None
    image_size = max(256, 2 ** (levels - 1))
    attn = tuple(image_size // 2 ** i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
    return dict(image_size=image_size, in_channels=in_channels, ch=ch, ch_mult=ch_mult,
                       num_res_blocks=num_res_blocks, attn_resolutions=attn, dropout=0.0, z_channels=z_channels,
                       num_groups=32, latent_dim=embed_dim, num_codebook_vectors=n_embed,
                       commitment_beta=0.25, legacy_beta=True)


# state_dict entries that are not the autoencoder and are left out of it
_IGNORED_PREFIXES = (
    "loss.",       # LPIPS + discriminator, training only (the discriminator: taming_discriminator_state_dict)
    "colorize",    # a random projection buffer used only to log segmentation maps
    "model_ema.",  # latent-diffusion's optional EMA copy; its VQModel.forward uses the raw weights too
)


def split_taming_vqgan_state_dict(sd: dict, prefix: str = "") -> tuple[dict, list[str]]:
    """(our VQGAN's state dict, ignored keys) from a taming VQModel state dict, whose keys start with
    `prefix` (e.g. 'first_stage_model.'). Unsupported quantisers are refused here by their keys."""
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "quantize.used" in sub:
        raise UserError("the checkpoint's quantizer remaps indices (quantize.used); not supported")
    if "quantize.embed.weight" in sub or "quantize.proj.weight" in sub:
        raise UserError("the checkpoint uses GumbelQuantize (quantize.proj / quantize.embed); not supported: "
                        "it samples codes from learned logits instead of nearest-neighbour lookup")
    if any(k.startswith("quantize.embedding.") and k != "quantize.embedding.weight" for k in sub):
        raise UserError("the checkpoint uses EMAVectorQuantizer (quantize.embedding.cluster_size / embed_avg); "
                        "not supported")
    model = {k: v for k, v in sub.items() if not k.startswith(_IGNORED_PREFIXES)}
    ignored = sorted(prefix + k for k in sub if k.startswith(_IGNORED_PREFIXES))
    return model, ignored


def check_state_dict(expected: dict, got: dict, what: str = "VQGAN"):
    """Refuse unless `got` has exactly the keys of `expected` (a state dict or {key: shape}) with
    equal shapes."""
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in expected.items()}
    missing = sorted(set(shapes) - set(got))
    unexpected = sorted(set(got) - set(shapes))
    wrong = sorted(f"{k}: file {tuple(got[k].shape)} vs model {shapes[k]}" for k in set(shapes) & set(got)
                   if tuple(got[k].shape) != shapes[k])
    if missing or unexpected or wrong:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
                 if keys]
        raise UserError(f"the checkpoint's {what} weights don't match the architecture: " + "; ".join(parts)
                        + ". Check that the YAML (config) belongs to this checkpoint")


def _float32(sd: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


@dataclass
class TamingVQGAN:
    """A taming/latent-diffusion VQGAN checkpoint, mapped: our config and weights, plus what was left out."""
    config: dict                  # VQGANConfig(**config)
    state_dict: dict              # checked against the architecture when vqgan.vqgan_from_state_dict builds it
    discriminator_state_dict: dict | None
    ignored_keys: list
    config_source: str  # the YAML path, 'config dict', or 'inferred from weight shapes'
    global_step: int | None


def _resolve_config(path, config):
    """(taming `model` section or None, where it came from)."""
    if config is None:
        found = find_taming_config(path)
        if found is None:
            return None, "inferred from weight shapes"
        return read_taming_config(found), str(found)
    return read_taming_config(config), (str(config) if isinstance(config, (str, Path)) else "config dict")


def taming_vqgan(ckpt: dict, path, config=None) -> TamingVQGAN:
    """Map an already-read taming VQGAN (or Net2NetTransformer, for its first stage) checkpoint."""
    fmt = checkpoint_format(ckpt)
    if fmt not in ("taming_vqgan", "taming_transformer"):
        raise UserError(f"{path} is not a taming-transformers/latent-diffusion VQGAN checkpoint")
    sd = _tensor_state_dict(ckpt, path)
    model_cfg, source = _resolve_config(path, config)
    prefix = "first_stage_model." if fmt == "taming_transformer" else ""
    if model_cfg is not None and fmt == "taming_transformer":
        if "first_stage_config" not in model_cfg["params"]:
            raise UserError(f"{source}: a transformer config without first_stage_config")
        model_cfg = model_cfg["params"]["first_stage_config"]
        model_cfg.setdefault("params", {})
    model_sd, ignored = split_taming_vqgan_state_dict(sd, prefix)
    if model_cfg is not None:
        _check_vq_target(model_cfg.get("target"), source)
        cfg = vqgan_config_from_taming(model_cfg["params"], source)
    else:
        cfg = infer_vqgan_config(model_sd)
    disc = taming_discriminator_state_dict(sd) if fmt == "taming_vqgan" else None
    ignored = [k for k in ignored if not k.startswith(prefix + "loss.discriminator.")] if disc else ignored
    step = ckpt.get("global_step")
    return TamingVQGAN(cfg, _float32(model_sd), disc, ignored, source, int(step) if isinstance(step, int) else None)


# ----------------------------------------------------------------------------- discriminator

def taming_discriminator_state_dict(sd: dict) -> dict | None:
    """`loss.discriminator.main.*` -> our Discriminator's `main.*`; None when there is none (DummyLoss,
    VQNoDiscModel). Refuses ActNorm discriminators, which our BatchNorm one can't hold."""
    prefix = "loss.discriminator."
    disc = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not disc:
        return None
    if any(k.endswith((".loc", ".scale", ".initialized")) for k in disc):
        raise UserError("the checkpoint's discriminator uses ActNorm (use_actnorm: true); ours uses BatchNorm")
    from discriminator import Discriminator
    dcfg = discriminator_config(disc)
    check_state_dict(Discriminator(**dcfg).state_dict(), disc, what="discriminator")
    return {k: v.float() if v.is_floating_point() else v for k, v in disc.items()}


def discriminator_config(disc_sd: dict) -> dict:
    """Discriminator(**this) arguments (in_channels, ndf, n_layers) from a `main.*` state dict."""
    convs = sorted((int(k.split(".")[1]) for k, v in disc_sd.items()
                    if k.startswith("main.") and k.endswith(".weight") and v.ndim == 4))
    if len(convs) < 2:
        raise UserError("the discriminator weights have fewer than two conv layers")
    ndf, in_channels = disc_sd[f"main.{convs[0]}.weight"].shape[:2]
    return {"in_channels": int(in_channels), "ndf": int(ndf), "n_layers": len(convs) - 2}


# ============================================================================= transformer

@dataclass
class TamingTransformer:
    """A taming `Net2NetTransformer` checkpoint, mapped.

    Conditioning as taming's: `conditioning == 'unconditional'`: every sequence starts with the one
    token `sos_token` (taming's SOSProvider); `'class'`: it starts with the class id as a token
    (taming's Labelator; ids share the GPT's vocabulary). The GPT is trained on [c, z_1..z_n][:-1] and
    the logits from position 0 on predict z (taming's `forward`: `logits[:, c_len - 1:]`)."""
    gpt_config: dict              # mingpt.GPTConfig(**gpt_config)
    gpt_state_dict: dict          # keys of mingpt.GPT (taming's, `transformer.` and `*.attn.mask` removed)
    vqgan_config: dict            # VQGANConfig(**vqgan_config)
    vqgan_state_dict: dict
    conditioning: str             # 'unconditional' or 'class'
    sos_token: int | None         # the start token of unconditional models
    n_classes: int | None         # of class-conditional models
    config_source: str

    def start_tokens(self, batch_size: int, labels=None) -> torch.Tensor:
        """(B, 1) int64 first tokens as taming feeds them: sos_token, or the class id itself (no
        offset: class ids and codes share the GPT's vocabulary, as in taming's Labelator)."""
        if self.conditioning == "unconditional":
            if labels is not None:
                raise ValueError("labels given, but this taming model is unconditional")
            return torch.full((batch_size, 1), self.sos_token, dtype=torch.long)
        if labels is None:
            raise ValueError(f"this taming model is class-conditional: give {batch_size} labels in [0, {self.n_classes})")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != batch_size or labels.min() < 0 or labels.max() >= self.n_classes:
            raise ValueError(f"expected {batch_size} labels in [0, {self.n_classes}), got {labels.tolist()}")
        return labels[:, None]  # (B, 1)


def taming_gpt_state_dict(sd: dict, prefix: str = "transformer.") -> dict:
    """Our mingpt.GPT's state dict from taming's: keys under `prefix`, minus the causal-mask buffers."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.endswith(".attn.mask")}


def n_unmasked_from_mask(mask: torch.Tensor) -> int:
    """taming sets mask[:n_unmasked, :n_unmasked] = 1 on a causal mask; recover n_unmasked."""
    first_row = int(mask.reshape(mask.shape[-2], mask.shape[-1])[0].sum())
    return first_row if first_row > 1 else 0


def taming_transformer(ckpt: dict, path, config=None) -> TamingTransformer:
    """Map an already-read Net2NetTransformer checkpoint; the YAML (beside it or given) is required,
    since n_head and the conditioning are not in the weights."""
    if checkpoint_format(ckpt) != "taming_transformer":
        raise UserError(f"{path} is not a taming Net2NetTransformer checkpoint (no transformer.* and "
                        "first_stage_model.* weights)")
    model_cfg, source = _resolve_config(path, config)
    if model_cfg is None:
        raise UserError(f"{path}: a transformer checkpoint needs its YAML (n_head and the conditioning "
                        "are not in the weights); pass config= or keep configs/*project.yaml beside it")
    target, params = model_cfg.get("target"), model_cfg["params"]
    if target is not None and not target.endswith("Net2NetTransformer"):
        raise UserError(f"{source}: model target {target!r} is not a Net2NetTransformer")
    sd = _tensor_state_dict(ckpt, path)

    perm = params.get("permuter_config")
    if perm is not None and not str(perm.get("target", "")).endswith("permuter.Identity"):
        raise UserError(f"{source}: permuter {perm.get('target')!r} reorders the codes; only Identity is supported")
    cond = params.get("cond_stage_config")
    sos_token, n_classes = None, None
    if cond == "__is_unconditional__" or params.get("unconditional", False):
        conditioning, sos_token = "unconditional", int(params.get("sos_token", 0))
    elif isinstance(cond, dict) and str(cond.get("target", "")).endswith("SOSProvider"):
        conditioning, sos_token = "unconditional", int(cond.get("params", {}).get("sos_token", 0))
    elif isinstance(cond, dict) and str(cond.get("target", "")).endswith("Labelator"):
        conditioning, n_classes = "class", int(cond["params"]["n_classes"])
    else:
        what = cond if isinstance(cond, str) else (cond or {}).get("target")
        raise UserError(f"{source}: conditioning {what!r} is not supported (only unconditional and class labels)")
    others = sorted(k for k in sd if not k.startswith(("transformer.", "first_stage_model.")))
    if others:
        raise UserError(f"{path}: unexpected weights outside transformer.* and first_stage_model.*: {others[:6]}")

    tp = params["transformer_config"].get("params", {})
    gpt_sd = taming_gpt_state_dict(sd)
    n_unmasked = int(tp.get("n_unmasked", 0))
    mask = sd.get("transformer.blocks.0.attn.mask")
    if mask is not None and n_unmasked_from_mask(mask) != (n_unmasked if n_unmasked > 1 else 0):
        raise UserError(f"{source}: n_unmasked {n_unmasked} disagrees with the checkpoint's attention mask")
    try:
        gpt_config = dict(vocab_size=int(tp["vocab_size"]), block_size=int(tp["block_size"]),
                          n_layer=int(tp.get("n_layer", 12)), n_head=int(tp.get("n_head", 8)),
                          n_embd=int(tp.get("n_embd", 256)), embd_pdrop=float(tp.get("embd_pdrop", 0.0)),
                          resid_pdrop=float(tp.get("resid_pdrop", 0.0)), attn_pdrop=float(tp.get("attn_pdrop", 0.0)),
                          n_unmasked=n_unmasked)
    except KeyError as e:
        raise UserError(f"{source}: transformer_config.params is missing {e}") from None
    _check_gpt_shapes(gpt_config, gpt_sd)
    if conditioning == "class" and n_classes > gpt_config["vocab_size"]:
        raise UserError(f"{source}: {n_classes} classes don't fit the vocabulary of {gpt_config['vocab_size']}")
    if sos_token is not None and not 0 <= sos_token < gpt_config["vocab_size"]:
        raise UserError(f"{source}: sos_token {sos_token} is outside the vocabulary")

    vq = taming_vqgan(ckpt, path, model_cfg)
    return TamingTransformer(gpt_config, _float32(gpt_sd), vq.config, vq.state_dict, conditioning,
                             sos_token, n_classes, source)


def _check_gpt_shapes(c: dict, sd: dict):
    """Taming's GPT key names and shapes for GPTConfig `c`, checked against `sd`."""
    C, V, T = c["n_embd"], c["vocab_size"], c["block_size"]
    shapes = {"tok_emb.weight": (V, C), "pos_emb": (1, T, C), "ln_f.weight": (C,), "ln_f.bias": (C,),
              "head.weight": (V, C)}
    for i in range(c["n_layer"]):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes.update({p + ln + ".weight": (C,), p + ln + ".bias": (C,)})
        for lin in ("key", "query", "value", "proj"):
            shapes.update({p + f"attn.{lin}.weight": (C, C), p + f"attn.{lin}.bias": (C,)})
        shapes.update({p + "mlp.0.weight": (4 * C, C), p + "mlp.0.bias": (4 * C,),
                       p + "mlp.2.weight": (C, 4 * C), p + "mlp.2.bias": (C,)})
    if C % c["n_head"]:
        raise UserError(f"n_embd {C} is not divisible by n_head {c['n_head']}")
    check_state_dict(shapes, sd, what="GPT")


def load_taming_transformer_parts(path, config=None) -> TamingTransformer:
    """Read and map a taming Net2NetTransformer `.ckpt` (for transformer.load_transformer)."""
    return taming_transformer(load_checkpoint(path), path, config)
