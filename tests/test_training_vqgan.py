"""Stage-one training: GAN step hygiene, adaptive weight, overfitting, resume, the script end to end."""

import contextlib
import copy
import json

import pytest
import torch
from torch.nn.grad import conv2d_weight

import checkpoints
import cli
import data
import training_vqgan as tv
from discriminator import Discriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from vqgan import VQGAN, load_vqgan

AMP = contextlib.nullcontext()


def setup(disc_start=0, **kw):
    torch.manual_seed(0)
    cfg = tv.TrainConfig(**{**tv.TRAIN_PRESETS["tiny"], "disc_start": disc_start, **kw})
    model = VQGAN(tv.model_config(cfg))
    disc = Discriminator(ndf=16)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    return cfg, model, disc, opt_g, opt_d, scaler, x


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_discriminator_loss_never_reaches_generator():
    """The generator's gradients are identical with and without the discriminator's own update."""
    cfg, model, disc, opt_g, opt_d, scaler, x = setup()
    perceptual = None
    model_b, disc_b = copy.deepcopy(model), copy.deepcopy(disc)

    g = tv.generator_step(model, disc, perceptual, x, 0, cfg, opt_g, scaler, AMP)
    assert g["disc_on"]
    before = grads(model)
    assert before, "generator step produced no gradients"
    tv.discriminator_step(disc, x, g["x_rec"], opt_d, scaler, AMP, cfg.disc_factor)
    after = grads(model)
    assert before.keys() == after.keys()
    for n in before:
        assert torch.equal(before[n], after[n]), n
    # ...and the discriminator's parameters got no gradient from the generator step
    opt_g_b = torch.optim.Adam(model_b.parameters(), lr=1e-3)
    tv.generator_step(model_b, disc_b, perceptual, x, 0, cfg, opt_g_b, scaler, AMP)
    assert all(p.grad is None for p in disc_b.parameters())

    # Control: the reference repo's leak (d_loss on a non-detached reconstruction) would change them,
    # so this test can fail.
    x_rec, _, _ = model(x)
    leak = hinge_d_loss(disc(x), disc(x_rec))
    leak.backward()
    assert any(not torch.equal(before[n], p.grad) for n, p in model.named_parameters() if n in before)


def test_generator_step_matches_taming_loss_backward():
    """Our single-backward generator step equals taming's autograd.grad lambda + loss.backward()."""
    cfg, model, disc, opt_g, _, scaler, x = setup()
    ref_model, ref_disc = copy.deepcopy(model), copy.deepcopy(disc)

    # the reference: taming's VQLPIPSWithDiscriminator, perceptual off (tested separately)
    x_rec, _, q_loss = ref_model(x)
    nll = (x - x_rec).abs().mean()
    g_loss = hinge_g_loss(ref_disc(x_rec))
    last = ref_model.decoder.conv_out.weight
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    lam_ref = adaptive_weight(nll_grad, g_grad, cfg.disc_weight)
    (nll + lam_ref * cfg.disc_factor * g_loss + q_loss).backward()

    out = tv.generator_step(model, disc, None, x, 0, cfg, opt_g, scaler, AMP)
    torch.testing.assert_close(out["lambda"], lam_ref, rtol=1e-4, atol=1e-6)
    ref_grads = grads(ref_model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fp16_loss_scale_does_not_change_lambda():
    """lambda's epsilon is in the units of the true gradients: a loss-scaled (fp16) step gives taming's
    lambda and, after unscaling, the same gradients. A weak discriminator (tiny GAN gradient) makes
    the epsilon matter, as it did when the scaled gradients met it (eps / scale)."""
    cfg, model, disc, _, _, _, x = setup()
    with torch.no_grad():
        disc.main[-1].weight.mul_(1e-4)
    out, grad = {}, {}
    for scaled in (False, True):
        m, d = copy.deepcopy(model), copy.deepcopy(disc)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=scaled)
        out[scaled] = tv.generator_step(m, d, None, x, 0, cfg, opt, scaler, AMP)
        grad[scaled] = grads(m)
    torch.testing.assert_close(out[True]["lambda"], out[False]["lambda"], rtol=1e-5, atol=0)
    for n, g in grad[False].items():
        torch.testing.assert_close(grad[True][n], g, rtol=1e-4, atol=1e-7, msg=n)


def test_bf16_lambda_from_fp32_reconstruction_gradients():
    """Under bf16 the NLL and GAN gradients are taken w.r.t. the fp32 reconstruction, not the bf16
    one (whose gradient autograd rounds to bf16): lambda equals the one from fp32 gradients."""
    cfg, model, disc, opt_g, _, scaler, x = setup()
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    ref_model, ref_disc = copy.deepcopy(model), copy.deepcopy(disc)
    with amp:
        x_rec, h, _, _ = ref_model(x, return_last_input=True)
    x32 = x_rec.detach().float().requires_grad_()
    with amp:
        nll = (x - x32).abs().mean()
        g_loss = hinge_g_loss(ref_disc(x32).float())
    shape = ref_model.decoder.conv_out.weight.shape
    w_nll, w_adv = (conv2d_weight(h.float(), shape, torch.autograd.grad(loss, x32)[0], padding=1)
                    for loss in (nll, g_loss))
    lam_ref = adaptive_weight(w_nll, w_adv, cfg.disc_weight)
    out = tv.generator_step(model, disc, None, x, 0, cfg, opt_g, scaler, amp)
    torch.testing.assert_close(out["lambda"], lam_ref, rtol=1e-5, atol=0)


def gan_step(accum: int, disc_eval: bool = False):
    """One GAN-on generator + discriminator step on the 4 images of setup(), in `accum` micro-batches."""
    cfg, model, disc, opt_g, opt_d, scaler, x = setup(grad_accum_steps=accum)
    disc.train(not disc_eval)
    g = tv.generator_step(model, disc, None, x, 0, cfg, opt_g, scaler, AMP)
    g_grads = grads(model)
    bn_after_g = [b.clone() for b in disc.buffers()]
    d = tv.discriminator_step(disc, x, g["x_rec"], opt_d, scaler, AMP, cfg.disc_factor)
    buffers = {**{"model." + n: b for n, b in model.named_buffers()}, **{"disc." + n: b for n, b in disc.named_buffers()}}
    return {"g": g, "d": d, "g_grads": g_grads, "d_grads": grads(disc), "bn_after_g": bn_after_g, "buffers": buffers}


def test_gan_step_with_accumulation_equals_one_large_batch():
    """B x 2 accumulated micro-batches make the update of one batch of 2B with the GAN on: lambda from
    the whole batch's last-layer gradients, the discriminator's BatchNorm over the whole batch (in the
    generator's GAN loss and in its own step): the same gradients, and the same statistics after it
    (weights after one Adam step, ~lr * sign(grad), would only show float noise in tiny gradients)."""
    one, accum = gan_step(1), gan_step(2)
    for k in ("lambda", "g_loss", "loss", "rec_loss", "q_loss"):
        torch.testing.assert_close(accum["g"][k], one["g"][k], rtol=1e-5, atol=1e-7, msg=k)
    for k in ("d_loss", "logits_real", "logits_fake"):
        torch.testing.assert_close(accum["d"][k], one["d"][k], rtol=1e-5, atol=1e-7, msg=k)
    for which in ("g_grads", "d_grads"):
        assert accum[which].keys() == one[which].keys()
        for n, g in one[which].items():
            torch.testing.assert_close(accum[which][n], g, rtol=1e-4, atol=1e-7, msg=f"{which} {n}")
    for a, b in zip(accum["bn_after_g"], one["bn_after_g"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert accum["buffers"].keys() == one["buffers"].keys()
    for n, v in one["buffers"].items():  # BatchNorm running statistics, dead-code counters
        torch.testing.assert_close(accum["buffers"][n], v, rtol=1e-5, atol=1e-7, msg=n)
    # control: half the batch gives another lambda, so the comparison can fail
    cfg, model, disc, opt_g, _, scaler, x = setup()
    half = tv.generator_step(model, disc, None, x[:2], 0, cfg, opt_g, scaler, AMP)
    assert not torch.allclose(half["lambda"], one["g"]["lambda"], rtol=1e-3)


def test_accumulated_gan_step_replays_the_same_forward():
    """With K > 1 the GAN step runs each micro-batch's forward twice (without, then with a graph): the
    two must be the same forward, also with dropout (RNG replayed) and an EMA codebook (which changes
    only in step())."""
    cfg, model, disc, opt_g, _, scaler, x = setup(grad_accum_steps=2, dropout=0.3, ema_codebook=True)
    recs = []
    model.decoder.conv_out.register_forward_hook(lambda m, i, out: recs.append(out.detach().clone()))
    tv.generator_step(model, disc, None, x, 0, cfg, opt_g, scaler, AMP)
    assert len(recs) == 4  # two micro-batches, two passes
    assert torch.equal(recs[0], recs[2]) and torch.equal(recs[1], recs[3])
    assert not torch.equal(recs[0], recs[1])


def test_no_discriminator_compute_before_disc_start():
    cfg, model, disc, opt_g, _, scaler, x = setup(disc_start=100)
    calls = []
    disc.register_forward_hook(lambda *a: calls.append(1))
    out = tv.generator_step(model, disc, None, x, 5, cfg, opt_g, scaler, AMP)
    assert not out["disc_on"] and calls == [] and out["lambda"].item() == 0


def test_dead_code_steps_count_optimiser_steps_not_micro_batches():
    """With --grad-accum-steps 2 a step runs two forwards; codes unused in it are one step old."""
    cfg, model, disc, opt_g, _, scaler, x = setup(disc_start=10 ** 9, grad_accum_steps=2,
                                                  restart_dead_codes=True, dead_code_steps=2)
    out = tv.generator_step(model, disc, None, x, 0, cfg, opt_g, scaler, AMP)
    unused = torch.bincount(out["indices"].flatten(), minlength=cfg.num_codebook_vectors) == 0
    assert unused.any()
    assert torch.equal(model.quantize.steps_since_used, unused.long())  # not restarted after 2 forwards


def test_overfits_one_batch():
    cfg, model, disc, _, _, scaler, x = setup(disc_start=10 ** 9)
    x = x[:2]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.9))
    first = last = None
    for i in range(400):
        out = tv.generator_step(model, disc, None, x, i, cfg, opt, scaler, AMP)
        last = out["rec_loss"].item()
        first = first if first is not None else last
        if last < first / 5:
            break
    assert last < first / 5, (first, last)


def test_non_finite_step_is_skipped():
    cfg, model, disc, opt_g, _, scaler, x = setup(disc_start=10 ** 9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    out = tv.generator_step(model, disc, None, x, 0, cfg, opt_g, scaler, AMP)
    assert not out["finite"]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_evaluate_val_covers_the_split_restores_the_mode_and_uses_8bit_psnr(mode):
    """Validation runs every held-out batch (not the first 8), leaves the model in the mode it found
    (an EMA copy stays in eval), and its PSNR is evaluate.py's 8-bit one."""
    import evaluate

    cfg, model, _, _, _, _, _ = setup()
    model.train(mode == "train")
    images = torch.rand(20, 3, 32, 32) * 2 - 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(20)), batch_size=2)
    val = tv.evaluate_val(model, None, loader, "cpu", AMP)
    assert model.training == (mode == "train")
    assert val["val_images"] == 20
    model.eval()
    with torch.no_grad():
        x_rec = model(images)[0].clamp(-1, 1)
    expect = evaluate.psnr(evaluate.to_uint8_range(images), evaluate.to_uint8_range(x_rec)).mean().item()
    assert val["val_psnr"] == pytest.approx(expect, rel=1e-6)
    assert val["val_rec_loss"] == pytest.approx((images - x_rec).abs().mean().item(), rel=1e-5)


def test_epoch_sampler_resumes_mid_epoch_and_shards():
    full = list(data.EpochBatchSampler(20, 3, seed=1, epoch=2))
    assert len(full) == 6
    assert list(data.EpochBatchSampler(20, 3, seed=1, epoch=2, start_batch=4)) == full[4:]
    assert full != list(data.EpochBatchSampler(20, 3, seed=1, epoch=3))
    r0 = list(data.EpochBatchSampler(20, 3, seed=1, epoch=2, rank=0, world_size=2))
    r1 = list(data.EpochBatchSampler(20, 3, seed=1, epoch=2, rank=1, world_size=2))
    seen = [i for b in r0 + r1 for i, _ in b]
    assert len(seen) == len(set(seen)) == 18
    # a kept sampler (persistent loader workers) moved to another epoch serves what a new one would
    kept = data.EpochBatchSampler(20, 3, seed=1, epoch=0)
    kept.set_epoch(2, start_sample=12)
    assert list(kept) == full[4:]


def test_speed_flags_range_checked(tmp_path):
    with pytest.raises(cli.UserError, match="--prefetch-factor 0 is out of range"):
        tv.main(["--preset", "tiny", "--prefetch-factor", "0", "--max-steps", "1", "--out-dir", str(tmp_path)])


@pytest.mark.slow
def test_compiled_training_step_matches_eager(tmp_path):
    """--compile: the same losses and weights after a step as eager (to float tolerance), the same keys saved."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        # dead codes restart after one unused step: Codebook.step rewrites the codes in place after the
        # compiled backward, and its bookkeeping in the forward stays out of the graph
        tv.main(["--preset", "tiny", "--perceptual-loss-factor", "0", "--max-steps", "2", "--disc-start", "1",
                 "--dead-code-steps", "1", "--log-every", "1", "--sample-every", "100", "--out-dir", str(out)]
                + extra)
        metrics = [json.loads(line) for line in (out / "results" / "metrics.jsonl").read_text().splitlines()]
        ckpt = torch.load(out / "checkpoints" / "vqgan_last.pt", weights_only=True)
        runs[name] = ([m for m in metrics if "loss" in m], ckpt)
    (m_e, c_e), (m_c, c_c) = runs["eager"], runs["compiled"]
    assert [m["step"] for m in m_c] == [m["step"] for m in m_e] == [1, 2]  # step 2 has the GAN on
    for a, b in zip(m_e, m_c):
        for k in ("loss", "rec_loss", "q_loss", "g_loss", "d_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    # Adam's first steps move each weight by about lr whatever its gradient's size, so an element whose
    # gradient is near zero and rounds to the other sign can end up 2 x lr (1e-4) away; seen: 1.4e-4
    # in one discriminator weight, <1e-5 everywhere else.
    for part in ("model", "discriminator"):
        assert c_c[part].keys() == c_e[part].keys()  # no "_orig_mod." prefix
        for k, v in c_e[part].items():
            torch.testing.assert_close(c_c[part][k], v, rtol=0, atol=3e-4, msg=k)


def test_dataset_augmentation_is_seeded():
    files = data.find_images(data.DEMO_DATA)[:2]
    ds = data.ImageDataset(files, 32, train=True)
    a, _ = ds[(0, 123)]
    b, _ = ds[(0, 123)]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert -1 <= a.min() and a.max() <= 1
    evals = data.ImageDataset(files, 32, train=False)
    assert torch.equal(evals[0][0], evals[0][0])


ARGS = ["--preset", "tiny", "--perceptual-loss-factor", "0"]


def read_metrics(out):
    return [json.loads(line) for line in (out / "results" / "metrics.jsonl").read_text().splitlines()]


def test_main_writes_grid_metrics_checkpoint_and_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    tv.main(ARGS + ["--out-dir", str(straight), "--max-steps", "6"])
    assert (straight / "config.json").exists() and (straight / "log.txt").exists()
    assert list((straight / "results").glob("rec_step*.png"))
    ckpt = torch.load(straight / "checkpoints" / "vqgan_last.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["kind"] == "vqgan"
    assert {"model", "discriminator", "opt_g", "opt_d", "scaler_g", "scaler_d", "rng", "config"} <= ckpt.keys()
    model = load_vqgan(straight / "checkpoints" / "vqgan_last.pt")
    assert not model.training and model(torch.zeros(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)
    recs = [r for r in read_metrics(straight) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(k in recs[-1] for k in ("codebook_usage", "perplexity", "lambda", "d_loss", "step_time"))

    split = tmp_path / "split"
    tv.main(ARGS + ["--out-dir", str(split), "--max-steps", "3"])
    tv.main(["--out-dir", str(split), "--resume", "--max-steps", "6"])
    resumed = [r for r in read_metrics(split) if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(recs, resumed):
        for k in ("loss", "rec_loss", "q_loss", "g_loss", "d_loss", "lambda"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)


def test_resume_rejects_architecture_change(tmp_path):
    tv.main(ARGS + ["--out-dir", str(tmp_path), "--max-steps", "1"])
    with pytest.raises(cli.UserError, match="latent_dim"):
        tv.main(["--out-dir", str(tmp_path), "--resume", "--latent-dim", "8"])


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "no images"),
])
def test_bad_dataset_folder_exits_2(tmp_path, capsys, make, match):
    with pytest.raises(SystemExit) as e:
        cli.run_main(tv.main, ARGS + ["--dataset-path", str(make(tmp_path)), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tv.main(["--no-such-flag"])
    assert e.value.code == 2
    with pytest.raises(cli.UserError, match="divisible"):
        tv.main(ARGS + ["--image-size", "33", "--out-dir", str(tmp_path)])
    with pytest.raises(cli.UserError, match="batch-size"):
        tv.main(ARGS + ["--batch-size", "1000", "--out-dir", str(tmp_path)])


def test_commitment_beta_flag_aliases_and_old_checkpoints(tmp_path):
    """--commitment-beta is the codebook's beta; the reference's --beta still sets it (not Adam's
    --beta1/--beta2), and checkpoints saved under the old name `beta` load with their value."""
    cfg, given = cli.parse_config(tv.TrainConfig, ["--beta", "0.5", "--beta1", "0.7"], tv.TRAIN_PRESETS)
    assert cfg.commitment_beta == 0.5 and cfg.beta1 == 0.7 and given == {"commitment_beta", "beta1"}
    assert cli.parse_config(tv.TrainConfig, ["--commitment-beta", "0.4"])[0].commitment_beta == 0.4
    model = VQGAN(tv.model_config(cfg))
    old = cli.config_dict(tv.model_config(cfg))
    old["beta"] = old.pop("commitment_beta")
    checkpoints.save_checkpoint({"kind": "vqgan", "model_config": old, "model": model.state_dict()}, tmp_path / "old.pt")
    assert load_vqgan(tmp_path / "old.pt").quantize.beta == 0.5
    saved = {**cli.config_dict(cfg), "beta": 0.3}
    del saved["commitment_beta"]
    assert cli.resumed_config(tv.TrainConfig(), set(), saved, (), "architecture").commitment_beta == 0.3


def test_finetune_from_checkpoint(tmp_path):
    src = tmp_path / "src"
    tv.main(ARGS + ["--out-dir", str(src), "--max-steps", "1"])
    src_ckpt = src / "checkpoints" / "vqgan_last.pt"
    start = load_vqgan(src_ckpt).state_dict()
    # fine-tune at a different crop size and learning rate; zero steps leaves the weights as loaded
    dst = tmp_path / "dst"
    tv.main(["--checkpoint-path", str(src_ckpt), "--out-dir", str(dst), "--image-size", "64",
             "--perceptual-loss-factor", "0", "--max-steps", "1", "--learning-rate", "0", "--disc-start", "100",
             "--no-restart-dead-codes",
             "--num-workers", "0"])
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["image_size"] == 64 and cfg["attn_resolutions"] == [32] and cfg["ch"] == 32
    tuned = load_vqgan(dst / "checkpoints" / "vqgan_last.pt").state_dict()
    assert set(tuned) == set(start) - {"quantize.steps_since_used"}  # restarts switched off
    for k, v in tuned.items():
        assert torch.equal(v, start[k]), k
    with pytest.raises(cli.UserError, match="fixes the architecture"):
        tv.main(["--checkpoint-path", str(src_ckpt), "--out-dir", str(dst), "--ch", "64"])
