"""The training scaffold both stages share (in the manner of 1d-tokenizer's train_utils and DiT's train.py):
setup of device, precision and torchrun; resume; the global-batch check; EMA, broadcast and DDP wrapping;
the optimiser step with its fp16 scaler and non-finite check; and `Loop`, which counts steps and epochs,
stops on signals, --max-seconds or a run of non-finite steps, and saves exact-resume checkpoints.

A script's `main` then reads: setup, data, models, `for batch in loop.batches(...)`: its own step, finish.
"""

import contextlib
import copy
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import checkpoints
import data
import distributed
import loggers
import utils
from cli import UserError, check_ranges, config_dict
from devices import autocast, resolve_device, resolve_precision, setup_cuda_math

MAX_BAD_STEPS = 10  # consecutive non-finite steps after which a run stops, its last good checkpoint intact


# ----------------------------------------------------------------------------- setup

@dataclass
class Run:
    """Where this process trains: device, precision and its autocast context, place in a torchrun job."""
    device: torch.device
    precision: str
    amp: contextlib.AbstractContextManager
    dist: distributed.DistInfo

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


def setup(cfg) -> Run:
    """Device (cfg.device), precision (cfg.precision), CUDA math (cfg.tf32, cfg.cudnn_benchmark when the
    config has it) and, under torchrun (RANK set), the process group: NCCL on cuda:LOCAL_RANK, else gloo."""
    dinfo, device = distributed.setup_distributed(resolve_device(cfg.device))
    precision = resolve_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16 is not supported on this GPU; use fp16 or fp32")
    # --tf32 and (stage one only) --cudnn-benchmark; nothing happens off CUDA
    setup_cuda_math(device, cfg.tf32, getattr(cfg, "cudnn_benchmark", False))
    return Run(device, precision, autocast(device, precision), dinfo)


def check_split_and_length(cfg):
    """The checks both training configs share: --val-fraction leaves images to train on, and --epochs
    or --max-steps gives something to train (UserError otherwise)."""
    if cfg.val_fraction >= 1:
        raise UserError(f"--val-fraction {cfg.val_fraction} would hold out every image for validation, "
                        "leaving none to train on; use a value in [0, 1), e.g. 0.1")
    check_ranges(cfg, {"val_fraction": "[0, 1)"})
    if cfg.epochs == 0 and cfg.max_steps == 0:
        raise UserError("--epochs 0 and --max-steps 0 leave nothing to train; give one of them")


def resume_checkpoint(cfg, given: set, last_path: Path, kind: str, stage: str, resume_config):
    """(cfg, checkpoint) for --resume: <last_path> read, its kind checked, and its saved config updated
    with the flags `given` now by `resume_config(cfg, given, ckpt)`; (cfg, None) without --resume."""
    if not cfg.resume:
        return cfg, None
    if not last_path.exists():
        raise UserError(f"--resume: no checkpoint at {last_path}; train without --resume first")
    ckpt = checkpoints.load_checkpoint(last_path)
    if ckpt.get("kind") != kind:
        raise UserError(f"{last_path} is not a {stage} checkpoint (kind: {ckpt.get('kind')})")
    return resume_config(cfg, given, ckpt), ckpt


def data_root(cfg) -> Path:
    """--dataset-path, or the embedded demo photos."""
    return Path(cfg.dataset_path).expanduser() if cfg.dataset_path else data.DEMO_DATA


def split(items: list, cfg, root: Path) -> tuple[list, list]:
    """(train, val) by data.split_files with --val-fraction and --seed; an empty training split is a UserError."""
    train, val = data.split_files(items, cfg.val_fraction, cfg.seed)
    if not train:
        raise UserError(f"--val-fraction {cfg.val_fraction} holds out all {len(items)} images in {root} "
                        "for validation, leaving none to train on; lower --val-fraction (e.g. 0.1) or add images")
    return train, val


def global_batch(cfg, run: Run, available: int, what: str, hint: str) -> int:
    """batch-size x grad-accum-steps x processes, refused when it exceeds the `available` training items
    (`what` names them, `hint` says what to change)."""
    n = cfg.batch_size * cfg.grad_accum_steps * run.world
    if n > available:
        product = (f" x --grad-accum-steps {cfg.grad_accum_steps} x {run.world} processes = {n}"
                   if n != cfg.batch_size else "")
        raise UserError(f"--batch-size {cfg.batch_size}{product} is larger than the {available} {what}; {hint}")
    return n


def total_steps(cfg, steps_per_epoch: int) -> int:
    """--epochs x steps per epoch, capped by --max-steps (which alone sets it with --epochs 0)."""
    steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps > 0:
        steps = min(steps, cfg.max_steps) if cfg.epochs > 0 else cfg.max_steps
    return steps


def grad_scaler(run: Run) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 and fp32 need none); one per optimiser."""
    return torch.amp.GradScaler(run.device.type, enabled=run.precision == "fp16")


# ----------------------------------------------------------------------------- models

def make_ema(build, decay: float, run: Run, ckpt: dict | None):
    """An EMA copy of the weights on rank 0, which alone evaluates, draws grids and saves: `build()`
    (a copy of the model, in eval mode without gradients), with the checkpoint's `ema_model` weights
    when resuming; None when `decay` is 0 or on other ranks. Call it before restore_progress: nothing
    here may draw from the restored RNG."""
    if decay <= 0 or not run.is_main:
        return None
    ema = build().eval().requires_grad_(False)
    if ckpt is not None and ckpt.get("ema_model"):
        ema.load_state_dict(ckpt["ema_model"])
    return ema


def copy_for_ema(model: torch.nn.Module):
    """make_ema's default `build`: a deep copy of the (unwrapped) model."""
    return lambda: copy.deepcopy(model)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    """ema <- decay * ema + (1 - decay) * model over every floating-point parameter (frozen ones too:
    an EMA codebook's vectors are parameters without gradients); buffers are copied as they are."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def compile_module(module: torch.nn.Module):
    """torch.compile(module) for a training step: a wrapper sharing the module's parameters (save from the
    module itself: its state-dict keys have no "_orig_mod." prefix). fallback_random: random ops
    (dropout, stage two's pkeep noise) draw from the global RNG exactly as in eager mode, so compiled and
    eager runs see the same random numbers and a run resumes the same with or without --compile."""
    return torch.compile(module, options={"fallback_random": True})


def wrap_ddp(module: torch.nn.Module, run: Run, compile: bool = False) -> torch.nn.Module:
    """The module as the training step calls it. Every rank starts from rank 0's parameters and buffers;
    with `compile` (--compile) a compiled wrapper (compile_module); with several processes that is
    wrapped in DistributedDataParallel without buffer broadcasts (forward_sync_buffers False: the
    codebook keeps itself identical, BatchNorm statistics stay per rank, rank 0's are saved). Every
    trainable parameter gets a gradient, so find_unused_parameters stays False. Checkpoints, EMA and
    grids use `module` itself."""
    distributed.broadcast_module_state(module)
    wrapped = compile_module(module) if compile else module
    if run.world == 1:
        return wrapped
    return DistributedDataParallel(wrapped, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                                   forward_sync_buffers=False)


# ----------------------------------------------------------------------------- the optimiser step

def unscale_and_clip(params, opt, scaler, max_norm: float = float("inf")) -> torch.Tensor:
    """The gradients' total norm, after the fp16 loss scale is divided out; clipped to max_norm."""
    if scaler.is_enabled():
        scaler.unscale_(opt)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def optimizer_step(opt, scaler, *values: torch.Tensor) -> bool:
    """Step `opt` unless a value (a loss, a gradient norm) is non-finite on any rank; returns whether
    every rank's values were finite. Under fp16 the scaler skips the update itself on inf/NaN gradients
    and lowers its scale."""
    finite = not distributed.any_rank(not all(bool(torch.isfinite(v)) for v in values))
    if scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
    elif finite:
        opt.step()
    return finite


def restore_progress(ckpt: dict, rank: int, world: int, seed: int) -> tuple[int, int, int, int]:
    """Step, epoch, samples seen in the epoch and the saved global batch of a training checkpoint, with
    this rank's RNG restored (a fresh per-rank stream when it was saved on another process count)."""
    step, epoch = ckpt["step"], ckpt["epoch"]
    saved_batch = ckpt.get("global_batch", ckpt["config"]["batch_size"])  # older files: one process
    samples_in_epoch = ckpt.get("samples_in_epoch", ckpt.get("batch_in_epoch", 0) * saved_batch)
    rng_ranks = ckpt.get("rng_ranks", [])
    if rank == 0:
        utils.set_rng_state(ckpt["rng"])
    elif len(rng_ranks) == world - 1:
        utils.set_rng_state(rng_ranks[rank - 1])
    else:
        utils.seed_everything(seed + rank + 1_000_003 * step)
    return step, epoch, samples_in_epoch, saved_batch


# ----------------------------------------------------------------------------- the loop

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


class Loop:
    """Steps and epochs of one training run, and its checkpoints.

    `state()` returns the script's part of a checkpoint (weights, optimisers, scalers, its config);
    `save` adds the position (step, epoch, samples seen in the epoch, so a resume on another number of
    processes continues at the next sample) and every rank's RNG state, and rank 0 writes it to
    `last_path` atomically (with `copies`, a name prefix, also a numbered copy, `keep` of them kept).
    A run of MAX_BAD_STEPS non-finite steps stops training with a UserError; no checkpoint is written
    inside such a run, so the last good one is left exactly as it was.

        with Loop(...) as loop:
            for batch in loop.batches(epoch_batches, end_epoch):
                t0 = time.perf_counter(); r = <the step>; dt = loop.step_done(r["finite"], t0)
        if loop.finish(): <final grids>
    """

    def __init__(self, run: Run, cfg, logger, stage: str, last_path: Path, state, total_steps: int,
                 global_batch: int, num_train: int, progress: tuple[int, int, int] = (0, 0, 0),
                 max_seconds: float = 0.0, copies: str = "", keep: int = 0):
        self.run, self.cfg, self.logger, self.stage, self.last_path = run, cfg, logger, stage, Path(last_path)
        self.state, self.total_steps, self.global_batch, self.num_train = state, total_steps, global_batch, num_train
        self.step, self.epoch, self.samples_in_epoch = progress
        self.max_seconds, self.copies, self.keep = max_seconds, copies, keep
        self.saved_copies = sorted(self.last_path.parent.glob(f"{copies}*.pt")) if copies else []
        self.bad_steps, self.stopping = 0, False
        if self.total_steps <= self.step:
            logger.log(f"nothing to do: already at step {self.step} of {self.total_steps}")

    def __enter__(self):
        self._stop = StopFlag().__enter__()
        self.pbar = tqdm(total=self.total_steps, initial=self.step, desc=self.stage, dynamic_ncols=True,
                         disable=None if self.run.is_main else True)
        return self

    def __exit__(self, *exc):
        self.pbar.close()
        self._stop.__exit__(*exc)

    def batches(self, epoch_batches, end_epoch):
        """Yield this rank's batches from `epoch_batches(epoch, start_sample)` until the last step, a stop
        signal or --max-seconds; when an epoch has no full step left, call `end_epoch()` (validation,
        grids), then count the epoch and save."""
        start = time.perf_counter()
        while self.step < self.total_steps and not self.stopping:
            for batch in epoch_batches(self.epoch, self.samples_in_epoch):
                yield batch
                # a signal may reach the ranks at different steps: they all stop at the first one's
                self.stopping = distributed.any_rank(self._stop.requested)
                if self.max_seconds > 0 and distributed.any_rank(time.perf_counter() - start >= self.max_seconds):
                    self.logger.log(f"--max-seconds {self.max_seconds:g} reached at step {self.step}")
                    self.total_steps = self.step
                if self.step >= self.total_steps or self.stopping:
                    break
            if self.samples_in_epoch + self.global_batch > self.num_train:  # no full step left in this epoch
                end_epoch()
                self.epoch, self.samples_in_epoch = self.epoch + 1, 0
                if self.bad_steps == 0:  # never overwrite the last good checkpoint inside a non-finite run
                    self.save()
                continue
            break

    def step_done(self, finite: bool, t0: float) -> float:
        """Count a step that started at `t0` (perf_counter) and return its seconds; a non-finite one
        (its update skipped) is logged, and the MAX_BAD_STEPS-th in a row raises UserError."""
        if self.run.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        self.samples_in_epoch += self.global_batch
        self.bad_steps = 0 if finite else self.bad_steps + 1
        if not finite:
            self.logger.log(f"step {self.step}: non-finite loss or gradient, update skipped "
                            f"({self.bad_steps} in a row)")
            if self.bad_steps >= MAX_BAD_STEPS:
                raise UserError(f"{MAX_BAD_STEPS} consecutive non-finite steps; stopping. The last good checkpoint "
                                f"{self.last_path} is untouched; try a lower --learning-rate or --precision fp32")
        self.pbar.update(1)
        return dt

    def save(self, tag_copy: bool = False):
        """Every rank calls this (its RNG state is gathered); rank 0 alone writes."""
        rng_ranks = distributed.all_gather_objects(utils.rng_state())[1:]
        if not self.run.is_main:
            return
        state = {**self.state(), "step": self.step, "epoch": self.epoch,
                 "batch_in_epoch": self.samples_in_epoch // self.global_batch,
                 "samples_in_epoch": self.samples_in_epoch, "global_batch": self.global_batch,
                 "config": config_dict(self.cfg), "rng": utils.rng_state(), "torch_version": str(torch.__version__)}
        if rng_ranks:
            state["rng_ranks"] = rng_ranks  # ranks 1.., for a resume on as many processes
        checkpoints.save_checkpoint(state, self.last_path)
        if tag_copy and self.copies:
            path = self.last_path.parent / f"{self.copies}{self.step:07d}.pt"
            checkpoints.save_checkpoint(state, path)
            self.saved_copies.append(path)
            while self.keep > 0 and len(self.saved_copies) > self.keep:
                self.saved_copies.pop(0).unlink(missing_ok=True)

    def finish(self, script: str) -> bool:
        """The last checkpoint; after a stop signal, how to resume. Returns True when training ran to
        its end on rank 0 (which then draws the final grids)."""
        self.save()
        if self.stopping:
            self.logger.log(f"stopped at step {self.step}; checkpoint saved to {self.last_path}. "
                            f"Resume with: python {script} --out-dir {self.cfg.out_dir} --resume")
        return not self.stopping and self.run.is_main


def start_logging(cfg, out: Path, stage: str, logger: loggers.RunLogger, run: Run, step: int):
    """config.json (rank 0), the dashboards of --logger from `step` on, and the config as the first log line."""
    if run.is_main:
        (out / "config.json").write_text(json.dumps(config_dict(cfg), indent=2) + "\n")
        logger.attach(loggers.Dashboards(cfg.logger, out, stage, config_dict(cfg), step))
    logger.log(f"config: {json.dumps(config_dict(cfg))}")


def resume_progress(ckpt: dict, cfg, run: Run, logger, last_path: Path, global_batch: int) -> tuple[int, int, int]:
    """(step, epoch, samples in the epoch) of a resumed run, with its RNG restored (restore_progress)
    and metrics.jsonl cut back to the step; (0, 0, 0) for a new run."""
    if ckpt is None:
        return 0, 0, 0
    step, epoch, samples_in_epoch, saved_batch = restore_progress(ckpt, run.rank, run.world, cfg.seed)
    logger.truncate_after(step)
    logger.log(f"resumed from {last_path} at step {step} (epoch {epoch}, sample {samples_in_epoch})")
    if saved_batch != global_batch:
        logger.log(f"note: the global batch changed from {saved_batch} to {global_batch}; steps from here "
                   "count the new batch, and --learning-rate is not rescaled")
    return step, epoch, samples_in_epoch


def close(logger):
    """Flush the dashboards and leave the process group."""
    logger.close()
    distributed.cleanup_distributed()
