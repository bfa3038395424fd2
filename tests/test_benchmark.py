"""benchmark.py end to end at the tiny presets, plus its helpers."""

import json
import sys

import pytest
import torch

import benchmark

TINY = ["--preset", "tiny", "--gpt-preset", "tiny", "--steps", "1", "--repeats", "2", "--warmup", "1",
        "--no-perceptual", "--batch-size", "2", "--gpt-batch-size", "2", "--sample-batch-size", "2",
        "--device", "cpu"]


def test_benchmark_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = benchmark.main(TINY + ["--json", str(out)])
    saved = json.loads(out.read_text())
    s1 = saved["stage_one"]
    for phase in ("before_disc_start", "after_disc_start"):
        assert s1[phase]["images_per_sec"] > 0 and len(s1[phase]["runs"]) == 2
        assert s1[phase]["peak_mem_mb"] > 0
        assert "utilization" not in s1[phase]  # no known peak on the CPU
    # the GAN adds the discriminator's forward and backward passes
    assert s1["after_disc_start"]["flops_per_step"] > s1["before_disc_start"]["flops_per_step"] > 0
    assert s1["ratio_after_before"] == pytest.approx(
        s1["after_disc_start"]["images_per_sec"] / s1["before_disc_start"]["images_per_sec"])
    assert saved["stage_two"]["cached_tokens_per_sec"] > 0 and saved["stage_two"]["speedup"] > 0
    sm = saved["sampling"]
    assert sm["tokens_per_sample"] == 16 * 16 and sm["kv_cache"]["tokens_per_sec"] > 0
    base = sm["baseline"]  # issue 13: speedups of every sampler over the uncached baseline
    assert sm["speedup"]["kv_cache"] == pytest.approx(sm["kv_cache"]["tokens_per_sec"] / sm[base]["tokens_per_sec"])
    assert results["device"] == "cpu"
    table = capsys.readouterr().out
    for label in ("before disc_start", "cached / encode", "static KV cache / reference sample()"):
        assert label in table


def test_benchmark_skips_stage_two_without_the_hook(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "training_transformer", None)  # stage two not importable
    results = benchmark.main(TINY + ["--no-stage-one", "--no-sampling"])
    assert results["stage_two"] is None
    assert "stage two skipped" in capsys.readouterr().err


def test_device_peak_lookup(monkeypatch):
    assert benchmark.device_peak_tflops(torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert benchmark.device_peak_tflops(torch.device("cuda"), "bf16") == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert benchmark.device_peak_tflops(torch.device("cuda"), "fp16") == 989.0
    assert benchmark.device_peak_tflops(torch.device("cuda"), "fp32") is None  # TF32 peaks differ
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert benchmark.device_peak_tflops(torch.device("cuda"), "bf16") is None


def test_bad_counts_are_user_errors():
    with pytest.raises(benchmark.UserError, match="at least 1"):
        benchmark.main(["--repeats", "0"])
