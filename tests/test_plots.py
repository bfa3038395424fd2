"""plots.py: PNGs from a synthetic metrics.jsonl, incremental reading, and never raising."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import plots


def _write_metrics(path, vqgan_steps=300, transformer_steps=100):
    with open(path, "w") as f:
        for s in range(1, vqgan_steps + 1):
            gan = s > vqgan_steps // 2
            r = {"stage": "vqgan", "step": s, "rec_loss": 1 / math.sqrt(s), "perceptual_loss": 0.5 / math.sqrt(s),
                 "q_loss": 0.1 + 0.01 * math.sin(s), "g_loss": 0.3 if gan else 0.0, "lambda": 0.5 if gan else 0.0,
                 "codebook_usage": min(1.0, s / 200)}
            if gan:
                r["d_loss"] = 1.0
            f.write(json.dumps(r) + "\n")
            if s % 100 == 0:
                f.write(json.dumps({"stage": "vqgan", "step": s, "val_rec_loss": 0.9 / math.sqrt(s)}) + "\n")
        for s in range(1, transformer_steps + 1):
            f.write(json.dumps({"stage": "transformer", "step": s, "loss": 3 / math.sqrt(s),
                                "bits_per_token": 3 / math.sqrt(s) / math.log(2)}) + "\n")
        f.write(json.dumps({"stage": "transformer", "step": transformer_steps, "val_bits_per_token": 0.5}) + "\n")


def test_update_plots_writes_loss_curves(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    out = plots.update_plots(tmp_path)
    assert out == tmp_path / "loss_curves.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 600 and img.height > 400  # 2 rows x 3 panels
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file was renamed away


def test_update_plots_with_only_stage_one_and_no_metrics(tmp_path):
    assert plots.update_plots(tmp_path) is None  # nothing logged yet
    _write_metrics(tmp_path / "metrics.jsonl", vqgan_steps=5, transformer_steps=0)
    assert plots.update_plots(tmp_path).is_file()


def test_read_metrics_is_incremental_and_survives_truncation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "vqgan", "step": 1}\n{"stage": "vqgan", "st')  # torn last line
    assert [r["step"] for r in plots.read_metrics(path)] == [1]
    with open(path, "a") as f:
        f.write('ep": 2}\nnot json\n{"stage": "vqgan", "step": 3}\n')
    assert [r["step"] for r in plots.read_metrics(path)] == [1, 2, 3]
    path.write_text('{"stage": "vqgan", "step": 1}\n')  # a resume truncated the file
    assert [r["step"] for r in plots.read_metrics(path)] == [1]


@pytest.mark.parametrize("counts", [torch.tensor([5, 0, 3, 0, 1, 9]), np.zeros(64), list(range(1024))])
def test_plot_codebook_usage_writes_a_png(tmp_path, counts):
    _write_metrics(tmp_path / "metrics.jsonl", vqgan_steps=50, transformer_steps=0)
    out = plots.plot_codebook_usage(counts, tmp_path / "metrics.jsonl", tmp_path / "codebook_usage.png")
    with Image.open(out) as img:
        assert img.format == "PNG"


def test_errors_warn_once_and_never_raise(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "_warned", set())
    (tmp_path / "metrics.jsonl").write_text('{"stage": "vqgan", "step": 1, "rec_loss": 0.5}\n')
    monkeypatch.setattr(plots, "_save", lambda fig, out: 1 / 0)
    with pytest.warns(RuntimeWarning, match="update_plots failed"):
        assert plots.update_plots(tmp_path) is None
    with pytest.warns(RuntimeWarning, match="plot_codebook_usage failed"):
        assert plots.plot_codebook_usage([1, 2], None, tmp_path / "c.png") is None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure is silent
        assert plots.update_plots(tmp_path) is None
