"""The stage-one recipe options (LR schedule, GAN weight and ramp, GroupNorm discriminator, LeCAM,
time budget) and study.py, the tool that measures them."""

import contextlib
import json
import math

import pytest
import torch

import study
import training_vqgan as tv
from discriminator import Discriminator, LeCAM
from vqgan import VQGAN

AMP = contextlib.nullcontext()
ARGS = ["--preset", "tiny", "--perceptual-loss-factor", "0", "--num-workers", "0"]


def cfg_of(**kw):
    return tv.TrainConfig(**{**tv.TRAIN_PRESETS["tiny"], **kw})


def test_lr_factor_warmup_then_cosine_to_floor():
    cfg = cfg_of(warmup_steps=10, lr_decay="cosine", min_lr_ratio=0.1)
    f = [tv.lr_factor(s, 110, cfg) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone after warmup
    assert tv.lr_factor(50, 110, cfg_of(warmup_steps=0, lr_decay="none")) == 1.0  # taming: constant


def test_gan_factor_ramps_after_disc_start():
    cfg = cfg_of(disc_start=10, gan_ramp_steps=4, disc_factor=0.5)
    assert [tv.gan_factor(s, cfg) for s in (9, 10, 11, 13, 20)] == [0.0, 0.125, 0.25, 0.5, 0.5]
    assert tv.gan_factor(10, cfg_of(disc_start=10)) == 1.0  # no ramp: on at once, as taming
    assert tv.gan_factor(50, cfg_of(disc_start=10, disc_factor=0)) == 0.0


def test_fixed_gan_weight_and_ramp_scale_the_generator_gradient():
    """With --no-adaptive-weight the GAN term enters with weight disc_factor(step) x disc_weight: the
    generator's gradient is linear in it, so half the ramp gives the midpoint of off and fully on."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = {}
    for name, step in (("off", 9), ("half", 10), ("full", 11)):
        torch.manual_seed(0)
        cfg = cfg_of(disc_start=10, gan_ramp_steps=2, adaptive_weight=False, disc_weight=0.3, dead_code_steps=10 ** 6)
        model, disc = VQGAN(tv.model_config(cfg)), Discriminator(ndf=8, norm="group")
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        g = tv.generator_step(model, disc, None, x, step, cfg, opt, torch.amp.GradScaler("cpu", enabled=False), AMP)
        out[name] = (g, model.decoder.conv_out.weight.grad.clone())
    assert out["off"][0]["lambda"].item() == 0 and out["full"][0]["lambda"].item() == pytest.approx(0.3)
    assert out["half"][0]["disc_factor"] == 0.5
    torch.testing.assert_close(out["half"][1], (out["off"][1] + out["full"][1]) / 2, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(out["off"][1], out["full"][1])


def test_adaptive_weight_clamp():
    cfg = cfg_of(disc_start=0, max_adaptive_weight=1e-3)
    torch.manual_seed(0)
    model, disc = VQGAN(tv.model_config(cfg)), Discriminator(ndf=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    g = tv.generator_step(model, disc, None, torch.rand(2, 3, 32, 32) * 2 - 1, 0, cfg, opt,
                          torch.amp.GradScaler("cpu", enabled=False), AMP)
    assert g["lambda"].item() == pytest.approx(1e-3 * cfg.disc_weight)


def test_group_norm_discriminator_is_per_image():
    torch.manual_seed(0)
    d = Discriminator(ndf=8, norm="group").train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(d(x)[:1], d(x[:1]), rtol=1e-5, atol=1e-6)  # batch 1 = its row of batch 4
    bn = Discriminator(ndf=8).train()
    assert not torch.allclose(bn(x)[:1], bn(x[:1]), atol=1e-4)  # BatchNorm (control): depends on the batch
    assert set(d.state_dict()) < set(bn.state_dict())  # same weights, no running statistics
    with pytest.raises(ValueError, match="norm"):
        Discriminator(norm="layer")


def test_lecam_regulariser():
    lecam = LeCAM(decay=0.0).train()  # decay 0: the EMAs are the last batch's means
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    reg = lecam(real, fake)
    assert lecam.ema_real.item() == 2.0 and lecam.ema_fake.item() == -1.0
    # relu(real - ema_fake)^2 = (2^2 + 4^2)/2 = 10; relu(ema_real - fake)^2 = (4^2 + 2^2)/2 = 10
    assert reg.item() == pytest.approx(20.0)
    lecam.eval()
    lecam(real + 5, fake)
    assert lecam.ema_real.item() == 2.0  # eval mode leaves the EMAs alone


def test_main_with_gan_options_saves_lecam_and_resumes_exactly(tmp_path):
    opts = ["--disc-start", "2", "--gan-ramp-steps", "2", "--disc-norm", "group", "--lecam-weight", "0.1",
            "--warmup-steps", "2", "--lr-decay", "cosine", "--disc-learning-rate", "2e-4"]
    a, b = tmp_path / "a", tmp_path / "b"
    tv.main(ARGS + opts + ["--out-dir", str(a), "--max-steps", "5"])
    tv.main(ARGS + opts + ["--out-dir", str(b), "--max-steps", "3"])
    tv.main(["--out-dir", str(b), "--resume", "--max-steps", "5"])
    ca = torch.load(a / "checkpoints" / "vqgan_last.pt", weights_only=True)
    cb = torch.load(b / "checkpoints" / "vqgan_last.pt", weights_only=True)
    assert ca["lecam"]["ema_real"] != 0 and torch.equal(ca["lecam"]["ema_real"], cb["lecam"]["ema_real"])
    for k, v in ca["model"].items():
        torch.testing.assert_close(v, cb["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    recs = [json.loads(line) for line in (a / "results" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if "loss" in r]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]  # warmup, then decay
    assert [r["disc_factor"] for r in recs if "loss" in r][:4] == [0.0, 0.0, 0.5, 1.0]


def test_max_seconds_stops_and_saves(tmp_path):
    tv.main(ARGS + ["--out-dir", str(tmp_path), "--max-steps", "50", "--max-seconds", "1e-9"])
    ckpt = torch.load(tmp_path / "checkpoints" / "vqgan_last.pt", weights_only=True)
    assert ckpt["step"] == 1
    assert "--max-seconds" in (tmp_path / "log.txt").read_text()


def test_study_trains_evaluates_forks_and_reuses_results(tmp_path, monkeypatch, capsys):
    base = study.TAMING + ["--perceptual-loss-factor", "0"]
    monkeypatch.setattr(study, "RECIPES", {
        "a": study._r("base", *base),
        "b": study._r("no GAN after the fork", *base, fork=("a", 1)),
        "c": study._r("GAN after the fork", *base, "--disc-start", 1, "--disc-norm", "group", fork=("a", 1)),
    })
    argv = ["--preset", "tiny", "--max-steps", "2", "--out-dir", str(tmp_path), "--fid", "off",
            "--val-fraction", "0.2", "--extra", "--batch-size 2"]
    res = study.main(argv)
    assert set(res) == {"a", "b", "c"} and all(r["steps"] == 2 for r in res.values())
    for r in res.values():
        assert 0 < r["psnr"] < 60 and 0 <= r["lpips"] and 0 < r["codebook_usage"] <= 1 and r["num_images"] == 16
    # b resumed a's step-1 checkpoint without the GAN: it is a's run exactly
    assert res["b"]["psnr"] == pytest.approx(res["a"]["psnr"], abs=1e-9)
    assert res["c"]["psnr"] != pytest.approx(res["a"]["psnr"], abs=1e-6)
    table = (tmp_path / "study.md").read_text()
    assert table.count("\n") == 5 and "| c | GAN after the fork | 2 |" in table
    # saved results are reused: nothing trains again (training would fail on a missing folder)
    monkeypatch.setattr(study, "train_recipe", lambda *a: pytest.fail("retrained"))
    again = study.main(argv)
    assert again["c"]["psnr"] == res["c"]["psnr"]
    with pytest.raises(study.UserError, match="unknown recipe"):
        study.main(argv + ["--recipes", "nope"])


def test_resume_may_change_an_untrained_discriminator_only(tmp_path):
    """Before --disc-start the discriminator never trained: a resume may give it another shape (it starts
    fresh); after, the change is refused with a one-line error."""
    tv.main(ARGS + ["--out-dir", str(tmp_path), "--max-steps", "2", "--disc-start", "3"])
    tv.main(["--out-dir", str(tmp_path), "--resume", "--max-steps", "4", "--disc-norm", "group"])
    ckpt = torch.load(tmp_path / "checkpoints" / "vqgan_last.pt", weights_only=True)
    assert ckpt["config"]["disc_norm"] == "group" and not any("running" in k for k in ckpt["discriminator"])
    assert "starts from scratch" in (tmp_path / "log.txt").read_text()
    with pytest.raises(tv.UserError, match="disc_norm"):
        tv.main(["--out-dir", str(tmp_path), "--resume", "--max-steps", "5", "--disc-norm", "batch"])


def test_lr_schedule_survives_a_larger_budget_on_resume(tmp_path):
    """The cosine spans the planned run (--epochs), not a --max-steps cap: stopping at 3 and resuming
    to 6 logs the learning rates of one straight run of 6."""
    opts = ARGS + ["--epochs", "1", "--warmup-steps", "1", "--lr-decay", "cosine", "--disc-start", "100"]
    tv.main(opts + ["--out-dir", str(tmp_path / "a"), "--max-steps", "6"])
    tv.main(opts + ["--out-dir", str(tmp_path / "b"), "--max-steps", "3"])
    tv.main(["--out-dir", str(tmp_path / "b"), "--resume", "--max-steps", "6"])

    def lrs(run):
        lines = (tmp_path / run / "results" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["lr"] for x in lines if '"loss"' in x]
    assert len(lrs("a")) == 6 and lrs("a") == pytest.approx(lrs("b"))
    assert lrs("a")[-1] > 0.5 * lrs("a")[1]  # 6 of the epoch's 18 steps: early in the decay


def test_resume_of_a_run_saved_before_the_schedule_keeps_a_constant_lr(tmp_path):
    tv.main(ARGS + ["--out-dir", str(tmp_path), "--max-steps", "1", "--disc-start", "100"])
    path = tmp_path / "checkpoints" / "vqgan_last.pt"
    ckpt = torch.load(path, weights_only=True)
    for k in ("warmup_steps", "lr_decay"):
        del ckpt["config"][k]
    torch.save(ckpt, path)
    tv.main(["--out-dir", str(tmp_path), "--resume", "--max-steps", "3"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["warmup_steps"] == 0 and cfg["lr_decay"] == "none"
