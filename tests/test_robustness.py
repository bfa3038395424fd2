"""Never lose a run: SIGTERM and resume, SIGKILL mid-save, NaN batches, fp16/bf16, wrong checkpoints and
flags, malicious pickles and a full disk. The folder cases are in test_data.py."""

import errno
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import cli
import devices
import evaluate
import sample_transformer
import trainer
import training_transformer as tt
import training_vqgan as tv
from codebook import Codebook
from data import DEMO_DATA
from transformer import TransformerConfig, VQGANTransformer, load_transformer
from vqgan import VQGAN, config_from_preset, load_vqgan

REPO = Path(__file__).resolve().parent.parent
VQ = ["--preset", "tiny", "--perceptual-loss-factor", "0", "--num-workers", "0"]
GPT = ["--preset", "tiny", "--num-augmentations", "2", "--batch-size", "8", "--num-grid-images", "0"]
# one thread in the child too: the same kernels as this process, so losses compare exactly
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-step stage-one run and a 1-step stage-two run on it: (vqgan_last.pt, transformer_last.pt)."""
    out = tmp_path_factory.mktemp("runs")
    tv.main(VQ + ["--out-dir", str(out), "--max-steps", "1"])
    tt.main(GPT + ["--out-dir", str(out), "--max-steps", "1"])
    return out / "checkpoints" / "vqgan_last.pt", out / "checkpoints" / "transformer_last.pt"


def metrics(out, stage):
    rows = [json.loads(line) for line in (out / "results" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and "loss" in r]


def fails(main, argv, capsys) -> str:
    """Run a script's main as its __main__ does; assert exit code 2 and one line; return that line."""
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- interruptions

def start(script, args, out):
    return subprocess.Popen([sys.executable, script, *args, "--out-dir", str(out)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(cond, proc, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"process ended early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out:\n{proc.communicate()[0]}")
        time.sleep(0.02)


def sigterm_after_first_step(script, args, out, stage) -> int:
    """Start a long run, SIGTERM it once a step is in metrics.jsonl; check the clean exit; return its step."""
    proc = start(script, args, out)
    path = out / "results" / "metrics.jsonl"
    wait_until(lambda: path.exists() and '"loss"' in path.read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SIGTERM received" in output
    assert f"Resume with: python {script} --out-dir {out} --resume" in output
    step = checkpoints.load_checkpoint(out / "checkpoints" / f"{stage}_last.pt")["step"]
    assert step >= 1 and [r["step"] for r in metrics(out, stage)] == list(range(1, step + 1))
    return step


def assert_same_losses(a, b, stage, keys):
    ra, rb = metrics(a, stage), metrics(b, stage)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert {k: x.get(k) for k in keys} == {k: y.get(k) for k in keys}, x["step"]


def test_sigterm_then_resume_equals_an_unbroken_run_vqgan(tmp_path):
    cut, straight = tmp_path / "cut", tmp_path / "straight"
    k = sigterm_after_first_step("training_vqgan.py", VQ + ["--epochs", "0", "--max-steps", "100000"], cut, "vqgan")
    tv.main(["--out-dir", str(cut), "--resume", "--max-steps", str(k + 3)])
    tv.main(VQ + ["--out-dir", str(straight), "--epochs", "0", "--max-steps", str(k + 3)])
    assert_same_losses(cut, straight, "vqgan", ("loss", "rec_loss", "q_loss", "g_loss", "d_loss", "lambda"))


def test_sigterm_then_resume_equals_an_unbroken_run_transformer(runs, tmp_path):
    vq = ["--vqgan-path", str(runs[0]), "--epochs", "50"]
    cut, straight = tmp_path / "cut", tmp_path / "straight"
    k = sigterm_after_first_step("training_transformer.py", GPT + vq + ["--max-steps", "100000"], cut,
                                 "transformer")
    tt.main(["--out-dir", str(cut), "--resume", "--max-steps", str(k + 3)])
    tt.main(GPT + vq + ["--out-dir", str(straight), "--max-steps", str(k + 3)])
    assert_same_losses(cut, straight, "transformer", ("loss", "grad_norm", "lr"))


def test_stop_flag_first_signal_asks_second_ctrl_c_quits(capsys):
    with trainer.StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested  # the step finishes; the loop then saves and exits
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert "Ctrl-C again to quit at once" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored on exit


# Runs training_vqgan.py with torch.save patched: once vqgan_last.pt exists, the next save of it writes
# half its bytes into the temp file, touches $MARK and hangs there, for the test to SIGKILL it mid-write.
SLOW_SAVE = """
import io, os, runpy, sys, time
from pathlib import Path
import torch
real_save = torch.save
def hanging_save(obj, f, *args, **kwargs):
    if "vqgan_last.pt.tmp" in str(getattr(f, "name", f)) and Path(os.environ["LAST"]).exists():
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        Path(os.environ["MARK"]).touch()
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = hanging_save
sys.argv = ["training_vqgan.py", *sys.argv[1:]]
runpy.run_path("training_vqgan.py", run_name="__main__")
"""


def test_sigkill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    last, mark = out / "checkpoints" / "vqgan_last.pt", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *VQ, "--out-dir", str(out), "--max-steps", "6"],
                            cwd=REPO, env={**ENV, "LAST": str(last), "MARK": str(mark)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(mark.exists, proc)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate(timeout=30)
    partial = list(last.parent.glob(".vqgan_last.pt.tmp*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the kill landed mid-write
    ckpt = checkpoints.load_checkpoint(last)
    assert ckpt["step"] == 2  # the previous save (save_every 2), whole
    load_vqgan(last)
    tv.main(["--out-dir", str(out), "--resume", "--max-steps", "3"])
    assert checkpoints.load_checkpoint(last)["step"] == 3
    assert not partial[0].exists()  # the dead process's temp file is cleaned up by the next save


# ----------------------------------------------------------------------------- numerical faults

def nan_batches(monkeypatch, bad_steps):
    """Make training_vqgan feed a batch with a NaN pixel at the given 0-based step indices."""
    real = tv.generator_step

    def step_with_nan(model, disc, perceptual, x, step, *args):
        if step in bad_steps:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return real(model, disc, perceptual, x, step, *args)

    monkeypatch.setattr(tv, "generator_step", step_with_nan)


def test_a_nan_batch_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    nan_batches(monkeypatch, {2})
    assert tv.main(VQ + ["--out-dir", str(tmp_path), "--max-steps", "4"])["step"] == 4
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row)" in (tmp_path / "log.txt").read_text()
    losses = [r["loss"] for r in metrics(tmp_path, "vqgan")]
    assert math.isnan(losses[2]) and all(math.isfinite(v) for i, v in enumerate(losses) if i != 2)
    ckpt = checkpoints.load_checkpoint(tmp_path / "checkpoints" / "vqgan_last.pt")
    for part in ("model", "discriminator"):
        assert all(torch.isfinite(t).all() for t in ckpt[part].values() if t.is_floating_point()), part


def test_ten_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    nan_batches(monkeypatch, set(range(4, 1000)))
    saved = []
    real_save = checkpoints.save_checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda obj, path: (saved.append(obj["step"]), real_save(obj, path)))
    err = fails(tv.main, VQ + ["--out-dir", str(tmp_path), "--epochs", "0", "--max-steps", "40"], capsys)
    assert "10 consecutive non-finite steps" in err and "untouched" in err and "--learning-rate" in err
    assert max(saved) == 4  # nothing written during the bad run (steps 5..14)
    last = tmp_path / "checkpoints" / "vqgan_last.pt"
    assert checkpoints.load_checkpoint(last)["step"] == 4
    assert "step 14: non-finite loss or gradient, update skipped (10 in a row)" in (tmp_path / "log.txt").read_text()


def test_ten_nan_steps_stop_stage_two(runs, tmp_path, monkeypatch, capsys):
    real = VQGANTransformer.forward
    calls = []

    def nan_after_first_epoch(self, indices, labels=None):
        logits, targets = real(self, indices, labels)
        calls.append(1) if self.training else None
        return (logits * float("nan") if self.training and len(calls) > 18 else logits), targets

    monkeypatch.setattr(VQGANTransformer, "forward", nan_after_first_epoch)
    err = fails(tt.main, GPT + ["--vqgan-path", str(runs[0]), "--out-dir", str(tmp_path), "--max-steps", "60",
                                "--epochs", "5"], capsys)
    assert "10 consecutive non-finite steps" in err
    ckpt = checkpoints.load_checkpoint(tmp_path / "checkpoints" / "transformer_last.pt")
    assert ckpt["step"] == 18  # the epoch-end save before the bad run
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_ema_codebook_ignores_a_nan_batch():
    cb = Codebook(16, 4, use_ema=True, restart_dead_codes=True, dead_code_steps=1).train()
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    z = torch.randn(2, 4, 3, 3)
    z[0, 0, 0, 0] = float("nan")
    cb(z)
    cb.step()
    for k, v in cb.state_dict().items():
        assert torch.equal(v, before[k]), k
    cb(torch.randn(2, 4, 3, 3))  # a finite batch still updates
    cb.step()
    assert not torch.equal(cb.embedding.weight, before["embedding.weight"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_end_to_end(tmp_path, precision):
    # fp16 convolutions are very slow on the CPU, hence two steps without the discriminator
    tv.main(VQ + ["--out-dir", str(tmp_path), "--max-steps", "2", "--precision", precision, "--sample-every", "100",
                  "--disc-start", "100"])
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path, "vqgan"))
    scaler = checkpoints.load_checkpoint(tmp_path / "checkpoints" / "vqgan_last.pt")["scaler_g"]
    assert (scaler.get("scale") == 65536.0) if precision == "fp16" else scaler == {}


def test_fp16_grad_scaler_in_stage_two_steps():
    torch.manual_seed(0)
    model = VQGANTransformer(VQGAN(config_from_preset("tiny")), TransformerConfig(n_layer=1, n_head=2, n_embd=32))
    opt = model.gpt.configure_optimizers(0.01, 1e-3, (0.9, 0.95))
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    codes = torch.randint(0, 64, (2, 256))
    for _ in range(2):
        r = tt.train_step(model, codes, None, opt, scaler, devices.autocast(torch.device("cpu"), "fp16"), 1.0)
        assert r["finite"] and math.isfinite(r["loss"].item())
    assert scaler.get_scale() == 65536.0


# ----------------------------------------------------------------------------- wrong inputs

def test_stage_two_checkpoint_given_to_stage_one(runs, tmp_path, capsys):
    _, gpt = runs
    err = fails(tv.main, VQ + ["--checkpoint-path", str(gpt), "--out-dir", str(tmp_path)], capsys)
    assert "not a stage-one VQGAN checkpoint (kind: transformer)" in err and "vqgan_last.pt" in err
    with pytest.raises(ValueError, match="not a stage-one VQGAN checkpoint"):
        load_vqgan(gpt)
    err = fails(evaluate.main, ["--checkpoint-path", str(gpt), "--device", "cpu"], capsys)
    assert "not a stage-one VQGAN checkpoint" in err and "training_vqgan.py" in err


def test_stage_one_checkpoint_given_to_stage_two(runs, tmp_path, capsys):
    vq, _ = runs
    err = fails(sample_transformer.main, ["--transformer-path", str(vq), "--out-dir", str(tmp_path)], capsys)
    assert "not a stage-two checkpoint (kind: vqgan)" in err and "training_transformer.py" in err
    with pytest.raises(ValueError, match="not a stage-two checkpoint"):
        load_transformer(vq)


def test_resume_with_a_different_config_is_refused(runs, capsys):
    out = str(runs[0].parent.parent)
    err = fails(tt.main, ["--out-dir", out, "--resume", "--n-layer", "3"], capsys)
    assert "n_layer: checkpoint 2 vs flag 3" in err and "new --out-dir" in err
    err = fails(tv.main, ["--out-dir", out, "--resume", "--latent-dim", "8"], capsys)
    assert "latent_dim" in err and "new --out-dir" in err


def test_finetune_flags_that_contradict_the_checkpoint(runs, tmp_path, capsys):
    err = fails(tv.main, VQ + ["--checkpoint-path", str(runs[0]), "--out-dir", str(tmp_path), "--ch", "64"], capsys)
    assert "ch: checkpoint 32 vs flag 64" in err and "drop those flags" in err
    err = fails(tv.main, VQ + ["--image-size", "33", "--out-dir", str(tmp_path)], capsys)
    assert "divisible by the downsampling factor 2" in err and "try 32" in err


def test_batch_larger_than_the_data_set(runs, tmp_path, capsys):
    data = tmp_path / "three"
    data.mkdir()
    for p in sorted(DEMO_DATA.glob("*.jpg"))[:3]:
        (data / p.name).write_bytes(p.read_bytes())
    err = fails(tv.main, VQ + ["--dataset-path", str(data), "--out-dir", str(tmp_path / "a")], capsys)
    assert "--batch-size 4 is larger than the 2 training images" in err
    err = fails(tt.main, GPT + ["--dataset-path", str(data), "--vqgan-path", str(runs[0]),
                                "--out-dir", str(tmp_path / "b")], capsys)
    assert "--batch-size 8 is larger than the 4 cached training sequences" in err


class Exploit:
    """What a malicious checkpoint pickles: unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickles_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    zipped, legacy = tmp_path / "evil.pt", tmp_path / "evil_legacy.ckpt"
    torch.save({"kind": "vqgan", "model": Exploit(marker)}, zipped)
    with open(legacy, "wb") as f:
        pickle.dump({"kind": "vqgan", "model": Exploit(marker)}, f, protocol=2)
    for path in (zipped, legacy):
        for load in (checkpoints.load_checkpoint, load_vqgan, load_transformer):
            with pytest.raises(cli.UserError, match="safely|refusing"):
                load(path)
        fails(tv.main, VQ + ["--checkpoint-path", str(path), "--out-dir", str(tmp_path / "o")], capsys)
        fails(sample_transformer.main, ["--transformer-path", str(path), "--out-dir", str(tmp_path / "o")], capsys)
    assert not marker.exists()
    with open(legacy, "rb") as f:
        pickle.load(f)  # control: a plain unpickler does run the payload
    assert marker.exists()


# ----------------------------------------------------------------------------- disk

def disk_full_after(monkeypatch, n_ok: int):
    """torch.save works n_ok times, then writes a few bytes and fails with ENOSPC."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > n_ok:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    disk_full_after(monkeypatch, 0)
    with pytest.raises(cli.UserError, match=r"disk full while saving .*ckpt\.pt.*previous checkpoint .* is intact"):
        checkpoints.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    with pytest.raises(cli.UserError, match="no earlier checkpoint"):
        checkpoints.save_checkpoint({"step": 1}, tmp_path / "new.pt")


def test_disk_full_stops_training_with_the_resume_hint(tmp_path, monkeypatch, capsys):
    # saves: step 2 -> vqgan_last.pt and its step copy; step 4 -> vqgan_last.pt fails
    disk_full_after(monkeypatch, 2)
    err = fails(tv.main, VQ + ["--out-dir", str(tmp_path), "--max-steps", "6"], capsys)
    assert "disk full while saving" in err and "vqgan_last.pt is intact" in err and "--resume" in err
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["vqgan_last.pt", "vqgan_step0000002.pt"]
    assert checkpoints.load_checkpoint(ckpts / "vqgan_last.pt")["step"] == 2
