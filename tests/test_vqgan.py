"""Stage-one model: shapes, codebook maths, straight-through gradients, round trips, losses."""

import copy
import os
from pathlib import Path

import pytest
import torch

from codebook import Codebook, codebook_stats
from decoder import Decoder
from discriminator import Discriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from encoder import Encoder
from vqgan import VQGAN, VQGANConfig, config_from_preset


def tiny(**kw) -> VQGANConfig:
    return config_from_preset("tiny", **kw)


@pytest.mark.parametrize("size", [16, 32, 48])
def test_tiny_shapes_any_divisible_size(size):
    torch.manual_seed(0)
    model = VQGAN(tiny()).eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    x_rec, idx, q = model(x)
    assert x_rec.shape == x.shape
    assert idx.shape == (2, size // 2, size // 2) and idx.dtype == torch.long
    assert q.ndim == 0 and torch.isfinite(q)


def test_non_square_and_bad_sizes():
    model = VQGAN(tiny()).eval()
    x_rec, idx, _ = model(torch.zeros(1, 3, 32, 16))
    assert x_rec.shape == (1, 3, 32, 16) and idx.shape == (1, 16, 8)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("preset,size,grid", [("demo", 64, 16), ("f16", 32, 2)])
def test_presets_shapes(preset, size, grid):
    cfg = config_from_preset(preset)
    model = VQGAN(cfg).eval()
    with torch.no_grad():
        z_q, idx, _ = model.encode(torch.zeros(1, 3, size, size))
        out = model.decode(z_q)
    assert z_q.shape == (1, cfg.latent_dim, grid, grid)
    assert idx.shape == (1, grid, grid)
    assert out.shape == (1, 3, size, size)


def test_f16_matches_paper_architecture():
    cfg = config_from_preset("f16")
    assert (cfg.image_size, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions) == \
        (256, 128, (1, 1, 2, 2, 4), 2, (16,))
    assert (cfg.num_codebook_vectors, cfg.latent_dim, cfg.downsample_factor) == (1024, 256, 16)
    model = VQGAN(cfg)
    # 256 -> 128 -> 64 -> 32 -> 16: attention after every res block of the 16x16 level, both halves
    assert len(model.encoder.down[4].attn) == 2 and len(model.decoder.up[4].attn) == 3
    assert all(len(model.encoder.down[i].attn) == 0 and len(model.decoder.up[i].attn) == 0 for i in range(4))
    # the decoder has num_res_blocks + 1 blocks per level, and upsamples on every level but level 0
    assert all(len(up.block) == 3 for up in model.decoder.up)
    assert not hasattr(model.decoder.up[0], "upsample") and all(hasattr(model.decoder.up[i], "upsample") for i in range(1, 5))
    assert not hasattr(model.encoder.down[4], "downsample")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)


def test_decoder_upsamples_after_blocks():
    """Upsampling closes each level (taming): the first level's blocks run at the latent resolution."""
    dec = Decoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16,
                  z_channels=8, num_groups=8)
    seen = []
    for blk in dec.up[1].block:
        blk.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    dec(torch.zeros(1, 8, 8, 8))
    assert seen == [8, 8]


def test_attention_uses_proj_out():
    enc = Encoder(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), resolution=8,
                  z_channels=8, num_groups=8)
    attn = enc.mid.attn_1
    x = torch.randn(1, 32, 8, 8)
    before = attn(x)
    with torch.no_grad():
        attn.proj_out.weight.mul_(2)
    assert not torch.allclose(before, attn(x))


@pytest.mark.parametrize("opts", [
    {}, {"l2_normalize": True}, {"codebook_dim": 4}, {"codebook_dim": 4, "l2_normalize": True},
    {"use_ema": True}])
def test_decode_indices_equals_decode(opts):
    torch.manual_seed(0)
    cfg = tiny(l2_normalize_codes=opts.get("l2_normalize", False), codebook_dim=opts.get("codebook_dim"),
               ema_codebook=opts.get("use_ema", False))
    model = VQGAN(cfg).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_q, idx, _ = model.encode(x)
        torch.testing.assert_close(model.quantize.lookup(idx), z_q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.decode_indices(idx), model.decode(z_q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opts", [
    dict(restart_dead_codes=True, dead_code_steps=1), dict(ema_codebook=True),
    dict(ema_codebook=True, restart_dead_codes=True, dead_code_steps=1),
    dict(l2_normalize_codes=True, restart_dead_codes=True, dead_code_steps=1),
    dict(l2_normalize_codes=True, codebook_dim=4, restart_dead_codes=True, dead_code_steps=1)])
def test_training_steps_with_in_place_codebook_updates(opts):
    """EMA updates and restarts rewrite the codes in place (Codebook.step); training still works."""
    torch.manual_seed(0)
    model = VQGAN(tiny(**opts)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = model.quantize.embedding.weight.detach().clone()
    for _ in range(3):
        x_rec, _, q = model(torch.rand(2, 3, 32, 32) * 2 - 1)
        opt.zero_grad()
        ((x_rec ** 2).mean() + q).backward()
        opt.step()
        model.quantize.step()
    assert not torch.equal(before, model.quantize.embedding.weight)


def test_nearest_code_and_index_order():
    cb = Codebook(5, 3)
    z = torch.randn(2, 3, 4, 6)
    z_q, idx, _ = cb(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    expect = torch.cdist(flat, cb.embedding.weight).argmin(1).reshape(2, 4, 6)
    assert torch.equal(idx, expect)
    torch.testing.assert_close(z_q, cb.embedding.weight[idx].permute(0, 3, 1, 2))


def test_straight_through_gradient():
    cb = Codebook(16, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = cb(z)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    torch.testing.assert_close(z.grad, g)  # identity Jacobian from z_q back to z
    assert cb.embedding.weight.grad is None or cb.embedding.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("legacy", [False, True])
def test_beta_placement(legacy):
    beta = 0.25
    cb = Codebook(8, 4, beta=beta, legacy_beta=legacy)
    z = torch.randn(3, 4, 2, 2, requires_grad=True)
    _, idx, loss = cb(z)
    loss.backward()
    e = cb.embedding.weight.detach()[idx].permute(0, 3, 1, 2)
    n = z.numel()
    # commitment term ||z - sg[e]||^2 is the only one that reaches z; codebook term reaches e only
    w_commit = 1.0 if legacy else beta
    torch.testing.assert_close(z.grad, w_commit * 2 * (z.detach() - e) / n)
    w_code = beta if legacy else 1.0
    grad_e = torch.zeros_like(cb.embedding.weight)
    flat_idx = idx.reshape(-1)
    diff = (e - z.detach()).permute(0, 2, 3, 1).reshape(-1, 4)
    grad_e.index_add_(0, flat_idx, w_code * 2 * diff / n)
    torch.testing.assert_close(cb.embedding.weight.grad, grad_e)


def test_ema_moves_codes_towards_data():
    torch.manual_seed(0)
    cb = Codebook(4, 2, use_ema=True, ema_decay=0.5)
    assert not cb.embedding.weight.requires_grad
    target = torch.tensor([3.0, -2.0])
    z = target.view(1, 2, 1, 1).expand(1, 2, 4, 4).clone()
    _, idx, _ = cb(z)
    cb.step()
    code = idx[0, 0, 0]
    d0 = (cb.embedding.weight[code] - target).norm()
    for _ in range(10):
        cb(z)
        cb.step()
    assert (cb.embedding.weight[code] - target).norm() < 0.05 * d0


def test_dead_codes_restart_at_encoder_outputs():
    torch.manual_seed(0)
    cb = Codebook(8, 2, restart_dead_codes=True, dead_code_steps=2)
    z = torch.randn(1, 2, 4, 4) * 5
    cb(z)
    cb.step()
    used = set(cb(z)[1].flatten().tolist())
    cb.step()
    dead_before = [k for k in range(8) if k not in used]
    assert dead_before, "expected some unused codes"
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in dead_before:
        # each restarted code is one of the batch's encoder outputs
        assert torch.cdist(cb.embedding.weight[k:k + 1], flat).min() < 1e-5
    cb.eval()
    _, idx, _ = cb(z)
    assert len(set(idx.flatten().tolist())) >= len(used)


@pytest.mark.parametrize("use_ema", [False, True])
def test_codebook_updates_once_per_optimiser_step(use_ema):
    """Forwards only gather statistics; step() applies them once. Two micro-batches then one step()
    equal one forward of both (the EMA), and count as one step towards dead_code_steps."""
    torch.manual_seed(0)
    z = torch.randn(4, 4, 3, 3)
    big = Codebook(64, 4, use_ema=use_ema, restart_dead_codes=True, dead_code_steps=2).train()
    accum = copy.deepcopy(big)
    before = big.embedding.weight.detach().clone()
    _, idx, _ = big(z)
    assert torch.equal(big.embedding.weight, before)  # nothing changes before step()
    big.step()
    accum(z[:2])
    accum(z[2:])
    accum.step()
    unused = torch.bincount(idx.flatten(), minlength=64) == 0
    assert unused.any()
    # one optimiser step: unused codes are 1 step old, not 2 (and so not restarted)
    assert torch.equal(accum.steps_since_used, unused.long())
    torch.testing.assert_close(accum.embedding.weight, big.embedding.weight, rtol=1e-6, atol=1e-7)
    if use_ema:
        assert not torch.equal(big.embedding.weight, before)


def test_codebook_stats():
    usage, ppl = codebook_stats(torch.tensor([0, 1, 2, 3]), 8)
    assert usage == 0.5 and abs(ppl - 4.0) < 1e-9
    usage, ppl = codebook_stats(torch.zeros(10, dtype=torch.long), 4)
    assert usage == 0.25 and abs(ppl - 1.0) < 1e-9


def test_discriminator_shapes_and_init():
    d = Discriminator()
    out = d(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and abs(convs[1].weight.std().item() - 0.02) < 0.003
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 3
    assert [k for k in d.state_dict() if k.endswith("weight")][:3] == ["main.0.weight", "main.2.weight", "main.3.weight"]


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    lam = adaptive_weight(torch.full((4,), 3.0), torch.full((4,), 1.5), 0.8)
    assert lam.item() == pytest.approx(0.8 * 2 * 3.0 / (2 * 1.5 + 1e-4))


def test_two_eval_passes_agree_and_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(tiny()).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = model(x)[0], model(x)[0]
    assert torch.equal(a, b)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    other = VQGAN(tiny()).eval()
    other.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(other(x)[0], a)


GOLDEN = Path(__file__).parent / "data" / "vqgan_golden.pt"


def golden_outputs() -> dict:
    """The forward pass pinned in tests/data/vqgan_golden.pt: a small VQGAN (16 px, one attention level,
    16 codes) with weights drawn from a fixed generator, not from the init code (so only a change to
    the forward maths moves the outputs), on a fixed ramp image, in eval mode."""
    cfg = tiny(image_size=16, ch=8, num_groups=4, z_channels=8, latent_dim=8, num_codebook_vectors=16,
               attn_resolutions=(8,))
    model = VQGAN(cfg).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            w = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(w * p[0].numel() ** -0.5)  # conv/linear weights and codes ~ 1/sqrt(fan-in)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * w)  # GroupNorm scales near 1
            else:
                p.copy_(0.1 * w)  # biases
        x = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16).sin()  # (2, 3, 16, 16) in [-1, 1]
        x_rec, indices, q_loss = model(x)
    return {"x_rec": x_rec, "indices": indices, "q_loss": q_loss}


def test_forward_matches_golden_outputs():
    """The reconstruction, codes and codebook loss of a fixed model and input equal the saved ones.

    After an intended change to the forward maths, regenerate the file and commit it:
        VQGAN_WRITE_GOLDEN=1 python -m pytest -q tests/test_vqgan.py -k golden
    """
    out = golden_outputs()
    if os.environ.get("VQGAN_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        torch.save(out, GOLDEN)
        pytest.skip(f"wrote {GOLDEN}")
    saved = torch.load(GOLDEN, weights_only=True)
    assert len(set(saved["indices"].flatten().tolist())) > 4  # a meaningful pin: many codes in use
    torch.testing.assert_close(out["x_rec"], saved["x_rec"], rtol=1e-4, atol=1e-5)
    assert torch.equal(out["indices"], saved["indices"])
    torch.testing.assert_close(out["q_loss"], saved["q_loss"], rtol=1e-4, atol=1e-6)


def test_load_vqgan_raises_the_documented_errors(tmp_path):
    from checkpoints import save_checkpoint
    from cli import UserError, config_dict
    from vqgan import load_vqgan

    with pytest.raises(UserError, match="not found"):
        load_vqgan(tmp_path / "missing.pt")
    cfg = tiny()
    good = {"kind": "vqgan", "model_config": config_dict(cfg), "model": VQGAN(cfg).state_dict()}
    save_checkpoint({**good, "kind": "transformer"}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="not a stage-one"):
        load_vqgan(tmp_path / "t.pt")
    save_checkpoint(good, tmp_path / "v.pt")
    with pytest.raises(ValueError, match="own model_config"):
        load_vqgan(tmp_path / "v.pt", config={})
    save_checkpoint({**good, "model_config": {**good["model_config"], "latent_dim": 8}}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError):
        load_vqgan(tmp_path / "bad.pt")
