"""Loading the authors' taming-transformers / latent-diffusion checkpoints.

No taming code and nothing downloaded: the state dicts below are built with taming's exact key names and
shapes (restated from taming/modules/diffusionmodules/model.py, vqvae/quantize.py, losses/vqperceptual.py,
losses/lpips.py, discriminator/model.py, transformer/mingpt.py), wrapped as Lightning-style `.ckpt` dicts
with a YAML beside them in the authors' layout. The forward pass is checked against a minimal functional
re-statement of taming's maths written here, independent of encoder.py/decoder.py/codebook.py.
"""

import math
import os
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import yaml

import checkpoints
import taming_compat
from checkpoints import load_checkpoint
from cli import UserError
from discriminator import Discriminator
from taming_compat import load_taming_transformer_parts, vqgan_config_from_taming
from vqgan import VQGAN, VQGANConfig, load_any_vqgan_for_finetune, load_vqgan

# ============================================================================= taming's names and shapes

TINY_DD = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
               num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
TINY_PARAMS = dict(embed_dim=4, n_embed=16, ddconfig=TINY_DD)
# taming configs/imagenet_vqgan.yaml (the released f16 models use n_embed 1024 and 16384)
F16_DD = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
# latent-diffusion models/first_stage_models/vq-f8/config.yaml
VQF8_DD = dict(double_z=False, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
               ch_mult=[1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[32], dropout=0.0)


def _resnet(p, cin, cout):
    s = {p + "norm1.weight": (cin,), p + "norm1.bias": (cin,), p + "conv1.weight": (cout, cin, 3, 3),
         p + "conv1.bias": (cout,), p + "norm2.weight": (cout,), p + "norm2.bias": (cout,),
         p + "conv2.weight": (cout, cout, 3, 3), p + "conv2.bias": (cout,)}
    if cin != cout:  # conv_shortcut=False: a 1x1 nin_shortcut
        s.update({p + "nin_shortcut.weight": (cout, cin, 1, 1), p + "nin_shortcut.bias": (cout,)})
    return s


def _attn(p, c):
    s = {p + "norm.weight": (c,), p + "norm.bias": (c,)}
    for n in ("q", "k", "v", "proj_out"):
        s.update({p + n + ".weight": (c, c, 1, 1), p + n + ".bias": (c,)})
    return s


def taming_vq_shapes(dd, n_embed, embed_dim) -> dict:
    """{key: shape} of taming's VQModel without its loss module, restated from its constructors."""
    ch, mult, nrb, z = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]
    s = {"encoder.conv_in.weight": (ch, dd["in_channels"], 3, 3), "encoder.conv_in.bias": (ch,)}
    res, in_mult = dd["resolution"], [1] + list(mult)
    for i in range(len(mult)):
        bin_, bout = ch * in_mult[i], ch * mult[i]
        for j in range(nrb):
            s.update(_resnet(f"encoder.down.{i}.block.{j}.", bin_, bout))
            bin_ = bout
            if res in dd["attn_resolutions"]:
                s.update(_attn(f"encoder.down.{i}.attn.{j}.", bin_))
        if i != len(mult) - 1:
            s.update({f"encoder.down.{i}.downsample.conv.weight": (bin_, bin_, 3, 3),
                      f"encoder.down.{i}.downsample.conv.bias": (bin_,)})
            res //= 2
    top = ch * mult[-1]
    for half in ("encoder", "decoder"):
        s.update(_resnet(f"{half}.mid.block_1.", top, top))
        s.update(_attn(f"{half}.mid.attn_1.", top))
        s.update(_resnet(f"{half}.mid.block_2.", top, top))
    s.update({"encoder.norm_out.weight": (top,), "encoder.norm_out.bias": (top,),
              "encoder.conv_out.weight": (z, top, 3, 3), "encoder.conv_out.bias": (z,)})
    s.update({"decoder.conv_in.weight": (top, z, 3, 3), "decoder.conv_in.bias": (top,)})
    bin_, res = top, dd["resolution"] // 2 ** (len(mult) - 1)
    for i in reversed(range(len(mult))):
        bout = ch * mult[i]
        for j in range(nrb + 1):
            s.update(_resnet(f"decoder.up.{i}.block.{j}.", bin_, bout))
            bin_ = bout
            if res in dd["attn_resolutions"]:
                s.update(_attn(f"decoder.up.{i}.attn.{j}.", bin_))
        if i != 0:
            s.update({f"decoder.up.{i}.upsample.conv.weight": (bin_, bin_, 3, 3),
                      f"decoder.up.{i}.upsample.conv.bias": (bin_,)})
            res *= 2
    s.update({"decoder.norm_out.weight": (bin_,), "decoder.norm_out.bias": (bin_,),
              "decoder.conv_out.weight": (dd["out_ch"], bin_, 3, 3), "decoder.conv_out.bias": (dd["out_ch"],)})
    s.update({"quantize.embedding.weight": (n_embed, embed_dim), "quant_conv.weight": (embed_dim, z, 1, 1),
              "quant_conv.bias": (embed_dim,), "post_quant_conv.weight": (z, embed_dim, 1, 1),
              "post_quant_conv.bias": (z,)})
    return s


def taming_disc_shapes(in_nc=3, ndf=64, n_layers=3, prefix="loss.discriminator.") -> dict:
    """NLayerDiscriminator (BatchNorm, so the middle convs have no bias)."""
    s = {f"{prefix}main.0.weight": (ndf, in_nc, 4, 4), f"{prefix}main.0.bias": (ndf,)}
    idx, mult = 2, 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        s[f"{prefix}main.{idx}.weight"] = (ndf * mult, ndf * prev, 4, 4)
        for b in ("weight", "bias", "running_mean", "running_var"):
            s[f"{prefix}main.{idx + 1}.{b}"] = (ndf * mult,)
        s[f"{prefix}main.{idx + 1}.num_batches_tracked"] = ()
        idx += 3
    s.update({f"{prefix}main.{idx}.weight": (1, ndf * mult, 4, 4), f"{prefix}main.{idx}.bias": (1,)})
    return s


def taming_lpips_shapes(prefix="loss.perceptual_loss.") -> dict:
    s = {prefix + "scaling_layer.shift": (1, 3, 1, 1), prefix + "scaling_layer.scale": (1, 3, 1, 1)}
    convs = {1: [(0, 3, 64), (2, 64, 64)], 2: [(5, 64, 128), (7, 128, 128)],
             3: [(10, 128, 256), (12, 256, 256), (14, 256, 256)],
             4: [(17, 256, 512), (19, 512, 512), (21, 512, 512)], 5: [(24, 512, 512), (26, 512, 512), (28, 512, 512)]}
    for sl, layers in convs.items():
        for i, cin, cout in layers:
            s[f"{prefix}net.slice{sl}.{i}.weight"] = (cout, cin, 3, 3)
            s[f"{prefix}net.slice{sl}.{i}.bias"] = (cout,)
    for i, c in enumerate([64, 128, 256, 512, 512]):
        s[f"{prefix}lin{i}.model.1.weight"] = (1, c, 1, 1)
    return s


def random_state_dict(shapes: dict, seed=0) -> dict:
    """Random weights of the given shapes, scaled so activations stay O(1) through a deep stack."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_out.weight", "running_var")):
            sd[k] = 1.0 + 0.1 * torch.rand(shape, generator=g)
        elif len(shape) == 4:
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(shape[1] * shape[2] * shape[3])
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    if "quantize.embedding.weight" in sd:
        sd["quantize.embedding.weight"] = torch.randn(shapes["quantize.embedding.weight"], generator=g)
    return sd


# ----------------------------------------------------------------------------- Lightning-style files

def _fake_module(name: str, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        v.__module__ = name
        setattr(mod, k, v)
    return mod


class AttributeDict(dict):
    """Stands for pytorch_lightning.utilities.parsing.AttributeDict (a dict with attribute access)."""


class DictConfig:
    """Stands for omegaconf.DictConfig, which pickles through __getstate__/__setstate__."""

    def __init__(self, content):
        self._content = content

    def __getstate__(self):
        return {"_content": self._content, "_metadata": {"flags": {}}}

    def __setstate__(self, state):
        self.__dict__.update(state)


class ModelCheckpoint:
    """Stands for pytorch_lightning's callback class, which old Lightning used as a dict key."""


LIGHTNING_MODULES = {
    "pytorch_lightning.utilities.parsing": dict(AttributeDict=AttributeDict),
    "omegaconf.dictconfig": dict(DictConfig=DictConfig),
    "pytorch_lightning.callbacks.model_checkpoint": dict(ModelCheckpoint=ModelCheckpoint),
}


def save_lightning(obj, path, legacy=False):
    """torch.save with the Lightning/OmegaConf classes importable under their real names, then
    removed again: loading can't import them, as on a machine without Lightning."""
    added = []
    for name, attrs in LIGHTNING_MODULES.items():
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent not in sys.modules:
                sys.modules[parent] = types.ModuleType(parent)
                added.append(parent)
        sys.modules[name] = _fake_module(name, **attrs)
        added.append(name)
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    finally:
        for name in added:
            sys.modules.pop(name, None)


def lightning_ckpt(state_dict, with_objects=True) -> dict:
    ckpt = {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "state_dict": state_dict}
    if with_objects:
        ckpt["hyper_parameters"] = AttributeDict(ddconfig=DictConfig(dict(TINY_DD)), lr=4.5e-6)
        ckpt["callbacks"] = {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x"}}
        ckpt["optimizer_states"] = [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}]
    return ckpt


def write_run(root, state_dict, model_cfg: dict | None, ckpt_name="last.ckpt", legacy=False, with_objects=True):
    """The authors' layout: <run>/checkpoints/last.ckpt and <run>/configs/<time>-project.yaml."""
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    path = root / "checkpoints" / ckpt_name
    save_lightning(lightning_ckpt(state_dict, with_objects), path, legacy=legacy)
    if model_cfg is not None:
        (root / "configs").mkdir(exist_ok=True)
        (root / "configs" / "2020-11-09T13-33-36-project.yaml").write_text(yaml.safe_dump({"model": model_cfg}))
    return path


def vq_yaml(params=TINY_PARAMS, target="taming.models.vqgan.VQModel", disc_layers=2):
    return {"base_learning_rate": 4.5e-6, "target": target, "params": {
        **params, "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                 "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 1,
                                            "disc_weight": 0.6, "disc_num_layers": disc_layers}}}}


def tiny_taming_sd(seed=0, loss=True, disc_layers=2, ndf=8):
    shapes = taming_vq_shapes(TINY_DD, TINY_PARAMS["n_embed"], TINY_PARAMS["embed_dim"])
    if loss:
        shapes.update(taming_disc_shapes(3, ndf, disc_layers))
    sd = random_state_dict(shapes, seed)
    if loss:  # LPIPS (14.7M weights) is ignored; stride-0 views give its exact shapes in a few bytes on disk
        sd.update({k: torch.zeros(1).expand(s) for k, s in taming_lpips_shapes().items()})
    return sd


# ============================================================================= taming's maths, restated

def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[p + "weight"], sd[p + "bias"], eps=1e-6)


def _swish(x):
    return x * torch.sigmoid(x)


def _conv(sd, p, x, stride=1, padding=1):
    return F.conv2d(x, sd[p + "weight"], sd[p + "bias"], stride=stride, padding=padding)


def ref_resnet(sd, p, x):
    h = _conv(sd, p + "conv1.", _swish(_gn(sd, p + "norm1.", x)))
    h = _conv(sd, p + "conv2.", _swish(_gn(sd, p + "norm2.", h)))
    if p + "nin_shortcut.weight" in sd:
        x = _conv(sd, p + "nin_shortcut.", x, padding=0)
    return x + h


def ref_attn(sd, p, x):
    h_ = _gn(sd, p + "norm.", x)
    q, k, v = (_conv(sd, p + n + ".", h_, padding=0) for n in ("q", "k", "v"))
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)  # b, hw, c
    k = k.reshape(b, c, h * w)  # b, c, hw
    w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
    w_ = torch.softmax(w_, dim=2)
    v = v.reshape(b, c, h * w)
    h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + _conv(sd, p + "proj_out.", h_, padding=0)


def ref_vqmodel(sd, dd, x, beta=0.25):
    """taming VQModel.forward + its VectorQuantizer2(legacy=True) loss and indices."""
    L, nrb = len(dd["ch_mult"]), dd["num_res_blocks"]
    h = _conv(sd, "encoder.conv_in.", x)
    for i in range(L):
        for j in range(nrb):
            h = ref_resnet(sd, f"encoder.down.{i}.block.{j}.", h)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = ref_attn(sd, f"encoder.down.{i}.attn.{j}.", h)
        if i != L - 1:
            h = _conv(sd, f"encoder.down.{i}.downsample.conv.", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = ref_resnet(sd, "encoder.mid.block_2.", ref_attn(sd, "encoder.mid.attn_1.",
                                                         ref_resnet(sd, "encoder.mid.block_1.", h)))
    h = _conv(sd, "encoder.conv_out.", _swish(_gn(sd, "encoder.norm_out.", h)))
    z = _conv(sd, "quant_conv.", h, padding=0)

    e = sd["quantize.embedding.weight"]
    zp = z.permute(0, 2, 3, 1).contiguous()  # b h w c
    zf = zp.view(-1, e.shape[1])
    d = torch.sum(zf ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1) - 2 * zf @ e.t()
    idx = torch.argmin(d, dim=1)
    zq = e[idx].view(zp.shape)
    loss = torch.mean((zq.detach() - zp) ** 2) + beta * torch.mean((zq - zp.detach()) ** 2)
    zq = (zp + (zq - zp).detach()).permute(0, 3, 1, 2)

    h = _conv(sd, "decoder.conv_in.", _conv(sd, "post_quant_conv.", zq, padding=0))
    h = ref_resnet(sd, "decoder.mid.block_2.", ref_attn(sd, "decoder.mid.attn_1.",
                                                         ref_resnet(sd, "decoder.mid.block_1.", h)))
    for i in reversed(range(L)):
        for j in range(nrb + 1):
            h = ref_resnet(sd, f"decoder.up.{i}.block.{j}.", h)
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = ref_attn(sd, f"decoder.up.{i}.attn.{j}.", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv.", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    out = _conv(sd, "decoder.conv_out.", _swish(_gn(sd, "decoder.norm_out.", h)))
    return out, idx.view(x.shape[0], z.shape[2], z.shape[3]), loss


# ============================================================================= tests

@pytest.fixture
def tiny_run(tmp_path):
    sd = tiny_taming_sd()
    return write_run(tmp_path / "2020-11-09T13-33-36_tiny_vqgan", sd, vq_yaml()), sd


def test_every_key_maps_and_loss_weights_are_left_out(tiny_run):
    path, sd = tiny_run
    t = taming_compat.taming_vqgan(load_checkpoint(path), path)
    assert t.config_source.endswith("-project.yaml") and t.global_step == 1234
    with torch.device("meta"):
        ours = VQGAN(VQGANConfig(**t.config)).state_dict()
    vq_keys = set(taming_vq_shapes(TINY_DD, 16, 4))
    assert set(ours) == vq_keys == set(t.state_dict)  # no missing, no unexpected
    assert all(tuple(ours[k].shape) == tuple(sd[k].shape) for k in vq_keys)
    assert all(torch.equal(t.state_dict[k], sd[k]) for k in vq_keys)
    assert t.config["legacy_beta"] and t.config["num_codebook_vectors"] == 16 and t.config["latent_dim"] == 4
    assert t.ignored_keys and all(k.startswith("loss.perceptual_loss.") for k in t.ignored_keys)


def test_forward_matches_restated_taming_maths(tiny_run):
    path, sd = tiny_run
    model = load_vqgan(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        x_rec, idx, q_loss = model(x)
        ref_rec, ref_idx, ref_loss = ref_vqmodel(sd, TINY_DD, x)
    assert torch.equal(idx, ref_idx)
    assert len(idx.unique()) > 3  # the comparison exercises several codes
    torch.testing.assert_close(x_rec, ref_rec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q_loss, ref_loss, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # decoding the indices gives the same image (taming's decode_code)
        torch.testing.assert_close(model.decode_indices(idx), ref_rec, atol=1e-5, rtol=1e-5)


def test_legacy_beta_gradients_match_taming(tiny_run):
    """Both loss terms have the same value; only gradients show where beta sits."""
    path, sd = tiny_run
    model = load_vqgan(path).requires_grad_(True)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    _, _, q_loss = model(x)
    q_loss.backward()
    ref_sd = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in sd.items()}
    _, _, ref_loss = ref_vqmodel(ref_sd, TINY_DD, x)
    ref_loss.backward()
    for ours, theirs in ((model.quantize.embedding.weight, "quantize.embedding.weight"),
                         (model.quant_conv.weight, "quant_conv.weight"),
                         (model.encoder.conv_in.weight, "encoder.conv_in.weight")):
        torch.testing.assert_close(ours.grad, ref_sd[theirs].grad, atol=1e-6, rtol=1e-4)


def test_inference_only_checkpoint_without_loss_and_without_yaml(tmp_path):
    sd = tiny_taming_sd(loss=False)
    path = write_run(tmp_path / "run", sd, None, with_objects=False)
    t = taming_compat.taming_vqgan(load_checkpoint(path), path)
    assert t.config_source == "inferred from weight shapes" and t.discriminator_state_dict is None
    c = VQGANConfig(**t.config)
    assert (c.ch, c.ch_mult, c.num_res_blocks, c.z_channels, c.latent_dim, c.num_codebook_vectors) == \
        (32, (1, 2), 1, 8, 4, 16)
    model, ref = load_vqgan(path), ref_vqmodel
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(sd, TINY_DD, x)[0], atol=1e-5, rtol=1e-5)


def test_latent_diffusion_layout_and_explicit_config(tmp_path):
    sd = tiny_taming_sd(loss=False)
    folder = tmp_path / "vq-f8"
    folder.mkdir()
    save_lightning(lightning_ckpt(sd), folder / "model.ckpt")
    cfg = vq_yaml(target="ldm.models.autoencoder.VQModel")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": cfg}))
    assert taming_compat.find_taming_config(folder / "model.ckpt") == folder / "config.yaml"
    assert load_vqgan(folder / "model.ckpt").config.latent_dim == 4
    # config given as a dict (whole file, model section or params) and as a path elsewhere
    for given in ({"model": cfg}, cfg, cfg["params"], folder / "config.yaml"):
        assert load_vqgan(folder / "model.ckpt", config=given).config.num_codebook_vectors == 16


def test_legacy_serialization_loads(tmp_path):
    sd = tiny_taming_sd(loss=False)
    for with_objects in (False, True):
        path = write_run(tmp_path / f"run{with_objects}", sd, vq_yaml(), legacy=True, with_objects=with_objects)
        model = load_vqgan(path)
        assert torch.equal(model.quantize.embedding.weight, sd["quantize.embedding.weight"])


@pytest.mark.parametrize("dd,n_embed,embed_dim,grid", [
    (F16_DD, 1024, 256, 16), (F16_DD, 16384, 256, 16), (VQF8_DD, 16384, 4, 32)])
def test_released_configs_build_taming_shapes(dd, n_embed, embed_dim, grid):
    cfg = VQGANConfig(**vqgan_config_from_taming({"ddconfig": dd, "n_embed": n_embed, "embed_dim": embed_dim}))
    assert cfg.latent_size() == grid and cfg.legacy_beta
    with torch.device("meta"):
        ours = VQGAN(cfg).state_dict()
    expected = taming_vq_shapes(dd, n_embed, embed_dim)
    assert set(ours) == set(expected)
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    # the same architecture is recovered from the shapes alone (no YAML)
    inferred = VQGANConfig(**taming_compat.infer_vqgan_config({k: torch.empty(s, device="meta")
                                                               for k, s in expected.items()}))
    assert (inferred.ch_mult, inferred.attn_resolutions, inferred.z_channels) == \
        (cfg.ch_mult, cfg.attn_resolutions, cfg.z_channels)


def test_discriminator_maps_to_ours_for_finetuning(tiny_run, tmp_path):
    path, sd = tiny_run
    cfg, model_sd, disc_sd = load_any_vqgan_for_finetune(path)
    assert cfg.legacy_beta and set(model_sd) == set(taming_vq_shapes(TINY_DD, 16, 4))
    dcfg = taming_compat.discriminator_config(disc_sd)
    assert dcfg == {"in_channels": 3, "ndf": 8, "n_layers": 2}
    disc = Discriminator(**dcfg)
    disc.load_state_dict(disc_sd, strict=True)
    assert torch.equal(disc.main[0].weight, sd["loss.discriminator.main.0.weight"])
    assert torch.equal(disc.main[3].running_var, sd["loss.discriminator.main.3.running_var"])
    # n_layers 3 (taming's default) maps too
    sd3 = tiny_taming_sd(disc_layers=3, ndf=16)
    p3 = write_run(tmp_path / "run3", sd3, vq_yaml(disc_layers=3))
    assert taming_compat.discriminator_config(load_any_vqgan_for_finetune(p3)[2])["n_layers"] == 3


def test_finetune_loader_reads_our_checkpoints(tmp_path):
    import convert_checkpoint
    sd = tiny_taming_sd()
    src = write_run(tmp_path / "run", sd, vq_yaml())
    convert_checkpoint.main([str(src), "--out", str(tmp_path / "ours.pt")])
    cfg, model_sd, disc_sd = load_any_vqgan_for_finetune(tmp_path / "ours.pt")
    assert cfg.legacy_beta and torch.equal(model_sd["quantize.embedding.weight"], sd["quantize.embedding.weight"])
    assert disc_sd is not None and set(disc_sd) == set(Discriminator(3, 8, 2).state_dict())
    with pytest.raises(UserError, match="carries its own config"):
        load_any_vqgan_for_finetune(tmp_path / "ours.pt", config=vq_yaml())


def test_convert_checkpoint_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    import convert_checkpoint
    sd = tiny_taming_sd()
    src = write_run(tmp_path / "run", sd, vq_yaml())
    out, st = tmp_path / "vqgan.pt", tmp_path / "vqgan.safetensors"
    convert_checkpoint.main([str(src), "--out", str(out), "--safetensors", str(st)])
    plain = torch.load(out, weights_only=True)  # a plain dict: loads without any allowlist
    assert plain["kind"] == "vqgan" and plain["model_config"]["legacy_beta"] is True
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = load_vqgan(src)(x)
        for p in (out, st):
            got = load_vqgan(p)(x)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # converting our own file again gives the same weights
    convert_checkpoint.main([str(out), "--out", str(tmp_path / "again.pt")])
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert all(torch.equal(again["model"][k], plain["model"][k]) for k in plain["model"])


def test_convert_checkpoint_errors(tmp_path, capsys):
    import convert_checkpoint
    from cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(convert_checkpoint.main, [str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o.pt")])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_checkpoint.main([str(tmp_path / "nope.ckpt")])  # neither --out nor --safetensors


# ----------------------------------------------------------------------------- refusals

def _refused(tmp_path, sd, cfg, match):
    path = write_run(tmp_path / "bad", sd, cfg)
    with pytest.raises(UserError, match=match):
        load_vqgan(path)


def test_key_mismatches_fail_loudly(tmp_path):
    sd = tiny_taming_sd(loss=False)
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
    _refused(tmp_path / "a", missing, vq_yaml(), r"missing \(1\): decoder.conv_out.bias")
    extra = {**sd, "encoder.extra.weight": torch.zeros(1)}
    _refused(tmp_path / "b", extra, vq_yaml(), r"unexpected \(1\): encoder.extra.weight")
    params = {**TINY_PARAMS, "n_embed": 32}  # YAML disagrees with the codebook
    _refused(tmp_path / "c", sd, vq_yaml(params), "shape mismatch.*quantize.embedding.weight")


@pytest.mark.parametrize("change,match", [
    (dict(give_pre_end=True), "give_pre_end"), (dict(tanh_out=True), "tanh_out"),
    (dict(attn_type="none"), "attn_type"), (dict(double_z=True), "double_z"),
    (dict(resamp_with_conv=False), "resamp_with_conv"), (dict(out_ch=1), "out_ch"),
    (dict(use_checkpoint=True), "unknown ddconfig keys"),
])
def test_unsupported_ddconfig_refused(tmp_path, change, match):
    params = {**TINY_PARAMS, "ddconfig": {**TINY_DD, **change}}
    _refused(tmp_path, tiny_taming_sd(loss=False), vq_yaml(params), match)


def test_unsupported_quantizers_refused(tmp_path):
    sd = tiny_taming_sd(loss=False)
    _refused(tmp_path / "a", sd, vq_yaml({**TINY_PARAMS, "remap": "data/used.npy"}), "remap")
    _refused(tmp_path / "b", {**sd, "quantize.used": torch.arange(8)}, None, "remaps indices")
    _refused(tmp_path / "c", sd, vq_yaml(target="taming.models.vqgan.GumbelVQ"), "GumbelQuantize")
    gumbel = {k: v for k, v in sd.items() if not k.startswith("quantize.")}
    gumbel.update({"quantize.proj.weight": torch.zeros(16, 8, 1, 1), "quantize.proj.bias": torch.zeros(16),
                   "quantize.embed.weight": torch.zeros(16, 4)})
    _refused(tmp_path / "d", gumbel, None, "GumbelQuantize")
    ema = {**sd, "quantize.embedding.cluster_size": torch.zeros(16), "quantize.embedding.embed_avg": torch.zeros(16, 4)}
    _refused(tmp_path / "e", ema, None, "EMAVectorQuantizer")
    _refused(tmp_path / "f", sd, vq_yaml(target="taming.models.vqgan.EMAVQ"), "EMAVectorQuantizer")
    _refused(tmp_path / "g", sd, vq_yaml(target="ldm.models.autoencoder.AutoencoderKL"), "KL")


def test_actnorm_discriminator_refused(tmp_path):
    sd = tiny_taming_sd(loss=False)
    sd.update({"loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4),
               "loss.discriminator.main.3.loc": torch.zeros(1, 16, 1, 1)})
    path = write_run(tmp_path / "run", sd, vq_yaml())
    with pytest.raises(UserError, match="ActNorm"):
        load_any_vqgan_for_finetune(path)


# ----------------------------------------------------------------------------- safe loading

class PlantMarker:
    """A pickle that calls a function of this test module on load, if anything ever calls it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


class SystemCall:
    """The classic: __reduce__ -> os.system('touch MARKER')."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _touch(path):
    open(path, "w").close()


def test_plain_unpickling_would_run_the_plant(tmp_path):
    """The planted pickles are real: an unrestricted load executes them (so the tests below can fail)."""
    for i, plant in enumerate((PlantMarker, SystemCall)):
        marker = tmp_path / f"MARKER{i}"
        torch.save({"state_dict": {}, "hyper_parameters": plant(str(marker))}, tmp_path / f"p{i}.ckpt")
        torch.load(tmp_path / f"p{i}.ckpt", weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_os_system_is_refused(tmp_path, legacy):
    marker = tmp_path / "MARKER"
    ckpt = lightning_ckpt(tiny_taming_sd(loss=False))
    ckpt["hyper_parameters"]["evil"] = SystemCall(str(marker))
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    save_lightning(ckpt, path, legacy=legacy)
    with pytest.raises(UserError, match="refusing.*system.*malicious"):
        load_vqgan(path)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["hyper_parameters", "state_dict"])
def test_unknown_callable_is_inert(tmp_path, where):
    """A global outside the deny list becomes an inert stand-in: never called. Inside state_dict it is refused."""
    marker = tmp_path / "MARKER"
    sd = tiny_taming_sd(loss=False)
    ckpt = lightning_ckpt(sd)
    if where == "state_dict":
        ckpt["state_dict"]["encoder.evil"] = PlantMarker(str(marker))
    else:
        ckpt["hyper_parameters"]["evil"] = PlantMarker(str(marker))
    path = write_run(tmp_path / "run", {}, vq_yaml())
    save_lightning(ckpt, path)
    if where == "state_dict":
        with pytest.raises(UserError, match="not tensors.*encoder.evil"):
            load_vqgan(path)
    else:
        raw = load_checkpoint(path)
        evil = raw["hyper_parameters"].items["evil"]
        assert isinstance(evil, checkpoints.InertGlobal) and evil.args == (str(marker),)
        assert evil.global_name.endswith("_touch")
        load_vqgan(path)
    assert not marker.exists()


def test_lightning_objects_become_inert_stand_ins(tiny_run):
    path, _ = tiny_run
    with pytest.raises(pickle.UnpicklingError):  # torch's own weights_only refuses the file...
        torch.load(path, weights_only=True)
    raw = load_checkpoint(path)  # ...ours reads it, turning the objects into records
    hp = raw["hyper_parameters"]
    assert hp.global_name == "pytorch_lightning.utilities.parsing.AttributeDict"
    assert hp.items["lr"] == 4.5e-6 and hp.items["ddconfig"].state["_content"]["ch"] == 32
    (key,) = raw["callbacks"]
    assert key.global_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


def test_stand_in_classes_cannot_be_patched():
    cls = checkpoints._inert_class("omegaconf.dictconfig.DictConfig")
    with pytest.raises(pickle.UnpicklingError):
        cls.__setitem__ = print


# ============================================================================= transformer

TINY_GPT = dict(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8)


def taming_gpt_shapes(vocab_size, block_size, n_layer, n_head, n_embd, prefix="transformer.") -> dict:
    C = n_embd
    s = {prefix + "tok_emb.weight": (vocab_size, C), prefix + "pos_emb": (1, block_size, C),
         prefix + "ln_f.weight": (C,), prefix + "ln_f.bias": (C,), prefix + "head.weight": (vocab_size, C)}
    for i in range(n_layer):
        p = f"{prefix}blocks.{i}."
        s.update({p + "ln1.weight": (C,), p + "ln1.bias": (C,), p + "ln2.weight": (C,), p + "ln2.bias": (C,),
                  p + "attn.mask": (1, 1, block_size, block_size),
                  p + "mlp.0.weight": (4 * C, C), p + "mlp.0.bias": (4 * C,),
                  p + "mlp.2.weight": (C, 4 * C), p + "mlp.2.bias": (C,)})
        for n in ("key", "query", "value", "proj"):
            s.update({p + f"attn.{n}.weight": (C, C), p + f"attn.{n}.bias": (C,)})
    return s


def net2net_sd(n_unmasked=0):
    sd = random_state_dict(taming_gpt_shapes(**TINY_GPT), seed=3)
    mask = torch.tril(torch.ones(8, 8))
    mask[:n_unmasked, :n_unmasked] = 1
    for i in range(TINY_GPT["n_layer"]):
        sd[f"transformer.blocks.{i}.attn.mask"] = mask.view(1, 1, 8, 8)
    vq = random_state_dict(taming_vq_shapes(TINY_DD, 16, 4), seed=4)
    sd.update({"first_stage_model." + k: v for k, v in vq.items()})
    return sd, vq


def net2net_yaml(cond, **extra):
    return {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "cond_stage_key": "class_label", **extra,
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": dict(TINY_GPT)},
        "first_stage_config": {"target": "taming.models.vqgan.VQModel",
                               "params": {**TINY_PARAMS, "lossconfig": {"target": "taming.modules.losses.DummyLoss"}}},
        "cond_stage_config": cond}}


def test_transformer_class_conditional(tmp_path):
    sd, vq = net2net_sd()
    path = write_run(tmp_path / "cin", sd, net2net_yaml({"target": "taming.modules.util.Labelator",
                                                         "params": {"n_classes": 10}}))
    t = load_taming_transformer_parts(path)
    assert (t.conditioning, t.n_classes, t.sos_token) == ("class", 10, None)
    assert t.gpt_config == {**TINY_GPT, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0, "n_unmasked": 0}
    assert not any(k.endswith("attn.mask") for k in t.gpt_state_dict) and "tok_emb.weight" in t.gpt_state_dict
    assert set(t.vqgan_state_dict) == set(vq)
    assert t.start_tokens(2, [7, 9]).tolist() == [[7], [9]]  # class id itself, no offset
    with pytest.raises(ValueError):
        t.start_tokens(1, [10])
    # the same file's first stage loads as a VQGAN
    assert torch.equal(load_vqgan(path).quantize.embedding.weight, vq["quantize.embedding.weight"])
    mingpt = pytest.importorskip("mingpt")
    gpt = mingpt.GPT(**t.gpt_config)
    gpt.load_state_dict(t.gpt_state_dict, strict=True)


def test_transformer_unconditional_sos_token(tmp_path):
    sd, _ = net2net_sd()
    path = write_run(tmp_path / "ffhq", sd, net2net_yaml("__is_unconditional__", sos_token=3, unconditional=True))
    t = load_taming_transformer_parts(path)
    assert (t.conditioning, t.sos_token, t.n_classes) == ("unconditional", 3, None)
    assert t.start_tokens(2).tolist() == [[3], [3]]


def test_transformer_refusals(tmp_path):
    sd, _ = net2net_sd()
    cases = [
        (net2net_yaml("__is_first_stage__"), "conditioning"),
        (net2net_yaml({"target": "taming.modules.misc.coord.CoordStage", "params": {}}), "conditioning"),
        (net2net_yaml("__is_unconditional__", permuter_config={"target": "taming.modules.transformer.permuter.ZCurve"}),
         "permuter"),
        (net2net_yaml("__is_unconditional__", sos_token=99), "sos_token"),
    ]
    for i, (cfg, match) in enumerate(cases):
        path = write_run(tmp_path / f"r{i}", sd, cfg)
        with pytest.raises(UserError, match=match):
            load_taming_transformer_parts(path)
    path = write_run(tmp_path / "noyaml", sd, None)
    with pytest.raises(UserError, match="needs its YAML"):
        load_taming_transformer_parts(path)
    sd4, _ = net2net_sd(n_unmasked=4)  # mask says 4, YAML says 0
    path = write_run(tmp_path / "mask", sd4, net2net_yaml("__is_unconditional__"))
    with pytest.raises(UserError, match="n_unmasked"):
        load_taming_transformer_parts(path)
