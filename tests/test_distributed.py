"""Both training scripts under DDP (gloo, 2 CPU processes): identical ranks, one writer, equivalence with
one process on the same global batch, gradient accumulation, resume on another process count, EMA weights.

The two processes run once per module (`ddp_runs`): each calls the scripts' main() with RANK/WORLD_SIZE
set, as torchrun would start them, and reports digests of its weights; the tests compare those and the
files rank 0 wrote against one-process runs made here."""

import contextlib
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import training_transformer as tt
import training_vqgan as tv
from discriminator import Discriminator
from transformer import load_transformer, weights_digest
from vqgan import VQGAN, load_vqgan

VQ = ["--preset", "tiny", "--perceptual-loss-factor", "0", "--num-workers", "0", "--log-every", "1",
      "--sample-every", "1000", "--save-every", "1000"]
GPT = ["--preset", "tiny", "--num-augmentations", "2", "--num-grid-images", "0", "--num-workers", "0"]
# one step with the GAN off: the discriminator's BatchNorm uses per-rank batch statistics by design
VQ_EQ = VQ + ["--max-steps", "1", "--disc-start", "100", "--no-restart-dead-codes"]  # restarts pick from rank 0 only
GPT_EQ = GPT + ["--max-steps", "1", "--pkeep", "1"]  # pkeep < 1 draws per-rank random tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params_digest(module) -> str:
    """weights_digest over parameters only."""
    return weights_digest(torch.nn.ParameterList(module.parameters()))


def gan_generator_step(x, accum: int = 1, ddp: bool = False) -> dict:
    """lambda and gradients of one GAN-on generator step of a seeded tiny VQGAN on x (this rank's share).
    The discriminator's BatchNorm is in eval mode: in training mode it normalises each rank's own batch
    by design (see README), which no one-process run reproduces; this isolates lambda and the step."""
    torch.manual_seed(0)
    cfg = tv.TrainConfig(**{**tv.TRAIN_PRESETS["tiny"], "disc_start": 0, "grad_accum_steps": accum})
    model, disc = VQGAN(tv.model_config(cfg)), Discriminator(ndf=16).eval()
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = tv.generator_step(wrapped, disc, None, x, 0, cfg, opt, torch.amp.GradScaler("cpu", enabled=False),
                            contextlib.nullcontext())
    return {"lambda": out["lambda"], "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def gan_batch() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _worker(rank: int, world: int, port: int, root: str):
    """One DDP process: the runs the tests compare, then a report of this rank's weights."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    # The group spans all runs; each main() finds it running, uses it and leaves it open.
    dist.init_process_group("gloo")
    report = {}
    for accum in (1, 2):
        torch.save(gan_generator_step(gan_batch()[2 * rank : 2 * rank + 2], accum, ddp=True),
                   f"{root}/gan_step{rank}_accum{accum}.pt")
    # GAN on through both DDP wrappers, EMA codebook, a dead-code restart after every unused step
    r = tv.main(VQ + ["--out-dir", f"{root}/vq", "--max-steps", "4", "--batch-size", "2", "--disc-start", "1",
                      "--ema-codebook", "--restart-dead-codes", "--dead-code-steps", "1", "--weight-ema-decay", "0.9"])
    report["vqgan"] = weights_digest(r["model"])  # parameters and buffers: the codebook and its statistics
    report["codebook"] = weights_digest(r["model"].quantize)
    report["disc_params"] = params_digest(r["discriminator"])
    tv.main(VQ_EQ + ["--out-dir", f"{root}/vq_eq", "--batch-size", "2"])
    tv.main(VQ_EQ + ["--out-dir", f"{root}/vq_two", "--batch-size", "2", "--max-steps", "2"])
    r = tt.main(GPT + ["--out-dir", f"{root}/gpt", "--vqgan-path", f"{root}/vq/checkpoints/vqgan_last.pt",
                       "--max-steps", "3", "--batch-size", "4", "--weight-ema-decay", "0.9"])
    report["gpt"] = weights_digest(r["model"])
    tt.main(GPT_EQ + ["--out-dir", f"{root}/gpt_eq", "--vqgan-path", f"{root}/vq/checkpoints/vqgan_last.pt",
                      "--batch-size", "4"])
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_update(a: dict, b: dict, opt_key: str, atol: float = 5e-6, rel: float = 1e-4):
    """Two checkpoints after the same steps agree: weights within atol (5% of one Adam step at lr 1e-4,
    as Adam's first step is ~lr * sign(grad) and float noise in near-zero gradients moves it), and Adam's
    first moments, which carry the gradient itself, within rel of each tensor's largest entry."""
    for k, v in a["model"].items():
        torch.testing.assert_close(v, b["model"][k], rtol=0, atol=atol, msg=k)
    sa, sb = a[opt_key]["state"], b[opt_key]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        ma, mb = sa[i]["exp_avg"], sb[i]["exp_avg"]
        assert (ma - mb).abs().max() <= rel * mb.abs().max(), (i, (ma - mb).abs().max(), mb.abs().max())


def test_ranks_stay_identical_and_only_rank0_writes(ddp_runs):
    r0, r1 = (json.loads((ddp_runs / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # VQGAN (codebook included), discriminator parameters, GPT: bitwise equal
    vq = ddp_runs / "vq"
    metrics = [json.loads(line) for line in (vq / "results" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]  # one writer: no duplicated records
    assert any(m["codebook_usage"] < 1 for m in train)  # unused codes, so restarts happened
    assert all(m["lambda"] > 0 for m in train[1:])  # the GAN was on
    log = (vq / "log.txt").read_text()
    assert log.count("done:") == 1 and "2 process(es), global batch 4" in log
    assert [p.name for p in (vq / "checkpoints").iterdir()] == ["vqgan_last.pt"]
    c = ckpt(vq / "checkpoints" / "vqgan_last.pt")
    assert c["step"] == 4 and c["global_batch"] == 4 and c["samples_in_epoch"] == 16 and len(c["rng_ranks"]) == 1
    assert "ema_model" in c and not any(k.startswith("module.") for k in c["model"])
    assert weights_digest(load_vqgan(vq / "checkpoints" / "vqgan_last.pt")) != r0["vqgan"]  # the EMA weights
    g = ckpt(ddp_runs / "gpt" / "checkpoints" / "transformer_last.pt")
    assert g["step"] == 3 and "ema_model" in g


def test_vqgan_two_processes_equal_one_process_same_global_batch(ddp_runs, tmp_path):
    two = ckpt(ddp_runs / "vq_eq" / "checkpoints" / "vqgan_last.pt")
    tv.main(VQ_EQ + ["--out-dir", str(tmp_path / "one"), "--batch-size", "4"])
    tv.main(VQ_EQ + ["--out-dir", str(tmp_path / "accum"), "--batch-size", "2", "--grad-accum-steps", "2"])
    one = ckpt(tmp_path / "one" / "checkpoints" / "vqgan_last.pt")
    accum = ckpt(tmp_path / "accum" / "checkpoints" / "vqgan_last.pt")
    assert_same_update(two, one, "opt_g")
    assert_same_update(accum, one, "opt_g")
    # control: half the batch is a different update, so the comparison can fail
    tv.main(VQ_EQ + ["--out-dir", str(tmp_path / "half"), "--batch-size", "2"])
    with pytest.raises(AssertionError):
        assert_same_update(ckpt(tmp_path / "half" / "checkpoints" / "vqgan_last.pt"), one, "opt_g")


def test_gan_step_two_processes_equal_one_process_and_accumulation(ddp_runs):
    """GAN on: 2 processes x 2 images (also as 2 x 1 accumulated), 1 x 4, and 2 x 2 accumulated make one
    lambda (from the last-layer gradients of the whole global batch) and the same generator gradients."""
    two, two_accum = (torch.load(ddp_runs / f"gan_step0_accum{k}.pt", weights_only=True) for k in (1, 2))
    one, accum = gan_generator_step(gan_batch()), gan_generator_step(gan_batch(), accum=2)
    for other in (two, two_accum, accum):
        torch.testing.assert_close(other["lambda"], one["lambda"], rtol=1e-5, atol=0)
        for n, g in one["grads"].items():  # gradients ~1e-2; summation order moves them by ~1e-7
            torch.testing.assert_close(other["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)
    # control: rank 0's own half of the batch gives another lambda
    assert not torch.allclose(gan_generator_step(gan_batch()[:2])["lambda"], one["lambda"], rtol=1e-3)


def test_two_process_checkpoint_resumes_in_one_process(ddp_runs, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(ddp_runs / "vq_eq", out)
    r = tv.main(["--out-dir", str(out), "--resume", "--max-steps", "2", "--batch-size", "4"])
    assert r["step"] == 2
    resumed = ckpt(out / "checkpoints" / "vqgan_last.pt")
    assert resumed["samples_in_epoch"] == 8 and resumed["batch_in_epoch"] == 2
    # the same two steps as the unbroken 2-process run
    assert_same_update(resumed, ckpt(ddp_runs / "vq_two" / "checkpoints" / "vqgan_last.pt"), "opt_g")
    steps = [json.loads(line)["step"] for line in (out / "results" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2]


def test_transformer_cache_and_step_match_one_process(ddp_runs, tmp_path):
    vqgan_path = str(ddp_runs / "vq" / "checkpoints" / "vqgan_last.pt")
    tt.main(GPT_EQ + ["--out-dir", str(tmp_path / "one"), "--vqgan-path", vqgan_path, "--batch-size", "8"])
    tt.main(GPT_EQ + ["--out-dir", str(tmp_path / "accum"), "--vqgan-path", vqgan_path, "--batch-size", "4",
                      "--grad-accum-steps", "2"])
    # the sharded, gathered encoding pass wrote the same cache as one process
    (c2,), (c1,) = (list((d / "cache").glob("codes_*.pt")) for d in (ddp_runs / "gpt_eq", tmp_path / "one"))
    assert c1.name == c2.name and torch.equal(ckpt(c1)["codes"], ckpt(c2)["codes"])
    one = ckpt(tmp_path / "one" / "checkpoints" / "transformer_last.pt")
    two = ckpt(ddp_runs / "gpt_eq" / "checkpoints" / "transformer_last.pt")
    accum = ckpt(tmp_path / "accum" / "checkpoints" / "transformer_last.pt")
    assert_same_update(two, one, "optimizer")
    assert_same_update(accum, one, "optimizer")


def test_ema_weights_are_saved_and_loaded(tmp_path):
    tv.main(VQ + ["--out-dir", str(tmp_path), "--max-steps", "2", "--disc-start", "100", "--weight-ema-decay", "0.5"])
    c = ckpt(tmp_path / "checkpoints" / "vqgan_last.pt")
    loaded = load_vqgan(tmp_path / "checkpoints" / "vqgan_last.pt").state_dict()
    for k, v in c["ema_model"].items():
        assert torch.equal(loaded[k], v), k
    assert any(not torch.equal(c["model"][k], v) for k, v in c["ema_model"].items())
    tt.main(GPT + ["--out-dir", str(tmp_path), "--max-steps", "2", "--batch-size", "8", "--weight-ema-decay", "0.5"])
    g = ckpt(tmp_path / "checkpoints" / "transformer_last.pt")
    loaded = load_transformer(tmp_path / "checkpoints" / "transformer_last.pt").state_dict()
    for k, v in g["ema_model"].items():
        assert torch.equal(loaded[k], v), k
    assert any(not torch.equal(g["model"][k], v) for k, v in g["ema_model"].items())


def test_torchrun_starts_both_scripts(tmp_path):
    """The real entry points under torchrun: RANK/WORLD_SIZE/LOCAL_RANK from the launcher, gloo started and
    ended by the scripts themselves."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script, args in (("training_vqgan.py", VQ + ["--batch-size", "2", "--disc-start", "1"]),
                         ("training_transformer.py", GPT + ["--batch-size", "4"])):
        p = subprocess.run(run + [os.path.join(repo, script), *args, "--out-dir", str(tmp_path), "--max-steps", "2"],
                           env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert log.count("2 process(es)") == 2 and log.count("done:") == 2
    assert ckpt(tmp_path / "checkpoints" / "vqgan_last.pt")["step"] == 2
    assert ckpt(tmp_path / "checkpoints" / "transformer_last.pt")["step"] == 2
