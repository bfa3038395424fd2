"""benchmark.py end to end at the tiny presets, plus its helpers."""

import json
import sys

import pytest
import torch

import benchmark

TINY = ["--preset", "tiny", "--gpt-preset", "tiny", "--steps", "1", "--repeats", "2", "--warmup", "1",
        "--no-perceptual", "--batch-size", "2", "--gpt-batch-size", "2", "--sample-batch-size", "2",
        "--device", "cpu", "--num-workers", "0", "--scan-files", "30"]


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
    assert sm["baseline"] == "reference" and len(sm["reference"]["runs"]) == 1  # --recompute-repeats 1
    assert sm["speedup"]["kv_cache"] == pytest.approx(
        sm["kv_cache"]["tokens_per_sec"] / sm["reference"]["tokens_per_sec"])
    # the static cache, our sampler without a cache and the reference's loop draw the same tokens
    assert sm["same_tokens"] == {"full_recompute": True, "reference": True}
    assert saved["loader"]["images_per_sec"] > 0 and saved["loader"]["num_workers"] == 0
    assert saved["scan"]["files"] == 30 and saved["scan"]["cached_scan_seconds"] > 0
    assert results["device"] == "cpu"
    table = capsys.readouterr().out
    for label in ("before disc_start", "data loading only", "file scan, cached", "cached / encode",
                  "static KV cache / reference sample()", "same tokens"):
        assert label in table


def test_benchmark_skips_stage_two_without_the_hook(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "training_transformer", None)  # stage two not importable
    results = benchmark.main(TINY + ["--no-stage-one", "--no-sampling", "--no-loader", "--scan-files", "0"])
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


def test_reference_sample_is_the_reference_loop():
    """reference_sample against a plain restatement of dome272's loop with the model's own forward
    (SDPA attention): same tokens, and it keeps the given codes after the start token."""
    torch.manual_seed(0)
    gpt = benchmark.GPT(20, 12, n_layer=2, n_head=2, n_embd=16).eval()
    c, x = torch.full((3, 1), 19), torch.randint(0, 19, (3, 4))
    torch.manual_seed(1)
    ours = benchmark.reference_sample(gpt, x, c, 7, top_k=5)
    torch.manual_seed(1)
    seq = torch.cat((c, x), dim=1)
    with torch.no_grad():
        for _ in range(7):
            logits = gpt(seq)[0][:, -1]
            logits[logits < torch.topk(logits, 5).values[:, [-1]]] = -float("inf")
            seq = torch.cat((seq, torch.multinomial(logits.softmax(-1), 1)), dim=1)
    assert ours.shape == (3, 11) and torch.equal(ours[:, :4], x) and torch.equal(ours, seq[:, 1:])


@pytest.mark.slow
def test_benchmark_compiled_phases():
    results = benchmark.main(TINY + ["--no-stage-two", "--no-loader", "--scan-files", "0", "--compile",
                                     "--recompute-repeats", "0", "--repeats", "1"])
    s1, sm = results["stage_one"], results["sampling"]
    for phase in ("before_disc_start_compiled", "after_disc_start_compiled"):
        assert s1[phase]["images_per_sec"] > 0 and s1[phase]["compile_seconds"] > 0
    assert sm["same_tokens"] == {"kv_cache_compiled": True} and sm["compile_seconds"] > 0
