"""Stage two: train a GPT over the codes of a trained stage-one VQGAN.

    python training_vqgan.py && python training_transformer.py    # the whole pipeline on the demo photos
    python training_transformer.py --vqgan-path run1/checkpoints/vqgan_last.pt --preset paper
    python training_transformer.py --conditional --dataset-path ~/photos   # classes = first-level subfolders
    python training_transformer.py --resume                                # continue at the exact step

Before training, every image is encoded once (a centre crop plus random crops/flips) and the codes
are cached in <out-dir>/cache/; the GPT then trains on integer codes only and never runs the VQGAN
encoder per step. Writes <out-dir>/results/ (grids, metrics.jsonl shared with stage one),
<out-dir>/checkpoints/transformer_last.pt (self-contained: it embeds the VQGAN), log.txt and
config.json.
"""

import dataclasses
import hashlib
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path

import PIL
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import checkpoints
import cli
import data
import distributed
import hub
import loggers
import plots
import trainer
import utils
from cli import UserError, field
from devices import PRECISIONS
from mingpt import GPT_PRESETS, check_sampling
from transformer import TransformerConfig, VQGANTransformer, build_from_checkpoint, model_dict, weights_digest
from vqgan import load_vqgan

GPT_FIELDS = ("n_layer", "n_head", "n_embd", "embd_pdrop", "resid_pdrop", "attn_pdrop")
CACHE_VERSION = 1  # bump when the cache file's layout changes; the augmentation code is hashed (cache_key)


@dataclass
class TrainConfig:
    """Stage-two hyperparameters; presets set the GPT size and its training defaults."""
    preset: str = field("demo", "named size: GPT + training defaults", choices=list(GPT_PRESETS))
    n_layer: int = field(4, "transformer blocks")
    n_head: int = field(4, "attention heads")
    n_embd: int = field(128, "embedding width")
    embd_pdrop: float = field(0.0, "dropout on token + position embeddings")
    resid_pdrop: float = field(0.0, "dropout on residual branches")
    attn_pdrop: float = field(0.0, "dropout on attention weights")
    vqgan_path: str = field("", "stage-one checkpoint, save_pretrained folder or Hugging Face Hub repo id "
                                "(default: <out-dir>/checkpoints/vqgan_last.pt, what training_vqgan.py writes); "
                                "--checkpoint-path, the reference's name, is an alias", aliases=("checkpoint_path",))
    dataset_path: str = field("", "folder of images, searched recursively (default: the embedded demo photos)")
    out_dir: str = field(".", "run folder: results/, checkpoints/, cache/, log.txt and config.json go here")
    batch_size: int = field(16, "code sequences per process per micro-step; global batch = batch-size x "
                                "processes x grad-accum-steps (scale --learning-rate with it by hand)")
    grad_accum_steps: int = field(1, "micro-batches whose gradients are summed into one optimizer step")
    weight_ema_decay: float = field(0.0, "keep an EMA of the GPT's weights with this decay (e.g. 0.999), saved "
                                         "as ema_model and used for grids, validation and load_transformer (0: off)")
    epochs: int = field(30, "passes over the cached codes (every image x every augmentation)")
    max_steps: int = field(0, "stop after this many steps in total (0: no limit); the learning-rate "
                              "schedule still spans --epochs, or --max-steps when --epochs is 0")
    learning_rate: float = field(3e-4, "peak AdamW learning rate")
    min_lr_ratio: float = field(0.1, "cosine decay ends at this fraction of the peak")
    weight_decay: float = field(0.01, "AdamW weight decay on Linear weights only (taming: 0.01)")
    beta1: float = field(0.9, "AdamW beta1")
    beta2: float = field(0.95, "AdamW beta2 (minGPT/taming: 0.95)")
    warmup_steps: int = field(100, "linear warmup steps, then cosine decay to the last step")
    grad_clip: float = field(1.0, "clip the gradient norm to this (0: no clipping)")
    pkeep: float = field(0.9, "share of input tokens kept in training, the rest random codes "
                              "(1: off, taming's default; the reference used 0.5)")
    conditional: bool = field(False, "class-conditional: classes are the dataset's first-level subfolders")
    cfg_dropout: float = field(0.1, "P(drop the class token) in training, for classifier-free guidance")
    num_augmentations: int = field(4, "cached views per image: its centre crop plus random crops/flips")
    val_fraction: float = field(0.1, "share of images held out for the validation loss")
    device: str = field("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = field("auto", "auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16",
                           choices=list(PRECISIONS))
    num_workers: int = field(2, "data loader workers for the one-off encoding pass")
    # Speed switches; none of them changes what is saved (checkpoints come from the plain modules).
    compile: bool = field(False, "torch.compile the model for the training step (validation and grids run "
                                 "the plain model); see README, Speed")
    tf32: bool = field(True, "on CUDA: TF32 tensor cores for fp32 matmuls (--precision fp32)")
    fused_optimizer: bool = field(True, "fused AdamW kernels (fused=True, CUDA and CPU); off: torch's default "
                                        "(foreach on CUDA, a per-parameter loop on the CPU)")
    seed: int = field(0, "random seed")
    log_every: int = field(10, "steps between metrics.jsonl records")
    logger: tuple[str, ...] = field((), "live dashboards besides results/metrics.jsonl: tensorboard, wandb or none; "
                                        "repeat the flag or give a comma list (default: none)", repeatable=True)
    num_grid_images: int = field(4, "rows of the per-epoch grid, each original | reconstruction | "
                                    "completion | sample (0: no grids)")
    temperature: float = field(1.0, "sampling temperature for the grids (0: greedy)")
    top_k: int | None = field(None, "sample from the k most likely codes only (none: all)")
    top_p: float | None = field(None, "nucleus sampling mass (none: off)")
    cfg_scale: float = field(1.0, "classifier-free guidance scale for conditional grids (1: none)")
    resume: bool = field(False, "continue from <out-dir>/checkpoints/transformer_last.pt at its exact step")

    def validate(self):
        """Raise UserError (one line: the flag, its range, what to do) for any setting this run would
        fail on, at any point: numeric ranges, the GPT's shape, and the sampling settings of the
        per-epoch and final grids (mingpt.check_sampling), so a bad one never costs an epoch."""
        cli.check_ranges(self, {
            "n_layer": ">= 1", "n_head": ">= 1", "n_embd": ">= 1", "embd_pdrop": "[0, 1)", "resid_pdrop": "[0, 1)",
            "attn_pdrop": "[0, 1)", "batch_size": ">= 1", "grad_accum_steps": ">= 1", "weight_ema_decay": "[0, 1)",
            "epochs": ">= 0", "max_steps": ">= 0", "learning_rate": ">= 0", "min_lr_ratio": "[0, 1]",
            "weight_decay": ">= 0", "beta1": "[0, 1)", "beta2": "[0, 1)", "warmup_steps": ">= 0",
            "grad_clip": ">= 0", "pkeep": "(0, 1]", "cfg_dropout": "[0, 1)", "num_augmentations": ">= 1",
            "num_workers": ">= 0", "seed": cli.SEED_RANGE, "log_every": ">= 1", "num_grid_images": ">= 0"})
        trainer.check_split_and_length(self)
        if self.n_embd % self.n_head:
            raise UserError(f"--n-embd {self.n_embd} must be divisible by --n-head {self.n_head}")
        with cli.as_user_error():
            check_sampling(self.temperature, self.top_k, self.top_p, self.cfg_scale,
                           labels_given=self.conditional, flags=True, labels_name="--conditional")
        if self.cfg_scale != 1 and self.cfg_dropout == 0:
            raise UserError(f"--cfg-scale {self.cfg_scale} needs an unconditional model, which --cfg-dropout 0 "
                            "never trains; use --cfg-dropout 0.1 or --cfg-scale 1")


TRAIN_PRESETS: dict[str, dict] = {
    "tiny": {**GPT_PRESETS["tiny"], "batch_size": 4, "epochs": 1, "warmup_steps": 2, "log_every": 1,
             "num_augmentations": 2, "num_workers": 0, "num_grid_images": 2},
    "demo": {**GPT_PRESETS["demo"]},
    # taming's transformer configs: base_learning_rate 4.5e-6 scaled by the batch size, dropout 0. Unlike
    # taming, the defaults below add cosine decay to 0.1x, gradient clipping at 1 and pkeep 0.9; taming's
    # recipe (constant rate, no clipping, pkeep 1) is --min-lr-ratio 1 --grad-clip 0 --pkeep 1.
    "paper": {**GPT_PRESETS["paper"], "batch_size": 16, "learning_rate": 4.5e-6 * 16, "warmup_steps": 0},
}


def transformer_config(cfg: TrainConfig, num_classes: int) -> TransformerConfig:
    return TransformerConfig(**{k: getattr(cfg, k) for k in GPT_FIELDS}, pkeep=cfg.pkeep,
                             num_classes=num_classes, cfg_dropout=cfg.cfg_dropout)


def lr_at(step: int, cfg: TrainConfig, schedule_steps: int) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio * peak at schedule_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    span = max(schedule_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate * ratio


# ----------------------------------------------------------------------------- the code cache

class AugmentedImages(Dataset):
    """Item i: (A, 3, S, S) in [-1, 1], the centre crop of image i followed by A-1 seeded random
    crops/flips. The seeds depend only on (first_index + i, view), so the same files give the same views,
    also when a rank encodes the block of them that starts at first_index."""

    def __init__(self, files, image_size: int, num_augmentations: int, first_index: int = 0):
        self.centre = data.ImageDataset(files, image_size, train=False)
        self.random = data.ImageDataset(files, image_size, train=True)
        self.num_augmentations, self.first_index = num_augmentations, first_index

    def __len__(self) -> int:
        return len(self.centre)

    def __getitem__(self, i):
        views = [self.centre[i][0]]
        k = self.first_index + i  # the file's index in the whole list
        views += [self.random[(i, k * 1_000_003 + a)][0] for a in range(1, self.num_augmentations)]
        return torch.stack(views)  # (A, 3, S, S)


def augmentation_digest() -> str:
    """sha256 of the source of the code that turns a file into its cached views (and of the library
    versions that resize it), so an edit to any of it is a new cache without a hand-kept version."""
    h = hashlib.sha256(f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}".encode())
    for code in (AugmentedImages, encode_dataset, data.ImageDataset, data.load_image, data.to_rgb):
        h.update(inspect.getsource(code).encode())
    return h.hexdigest()


def cache_key(vqgan_digest: str, files: list[Path], image_size: int, num_augmentations: int,
              precision: str, device_type: str) -> str:
    """Hash of what the cached codes depend on: the VQGAN's weights, the files (with sizes and
    modification times), the image size, the number of views, the augmentation code, and the precision
    and device type of the encoding pass (bf16 moves a few % of the codes; CUDA's fp32 convolutions
    may use TF32)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{vqgan_digest}:{image_size}:{num_augmentations}:{precision}:"
                       f"{device_type}:{augmentation_digest()}".encode())
    for p in files:
        st = p.stat()
        h.update(f"|{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_dataset(model: VQGANTransformer, files, image_size: int, num_augmentations: int, batch_size: int,
                   num_workers: int, device, amp, first_index: int = 0) -> torch.Tensor:
    """Codes of every view of every file: (N, A, h*w) int64, in file order (`files` may be the block of
    a longer list that starts at first_index)."""
    loader = DataLoader(AugmentedImages(files, image_size, num_augmentations, first_index), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    chunks = []
    for views in tqdm(loader, desc="encoding", dynamic_ncols=True, disable=None, leave=False):
        B, A = views.shape[:2]
        with amp:
            idx = model.encode_to_indices(views.flatten(0, 1).to(device))  # (B*A, h*w)
        chunks.append(idx.view(B, A, -1).cpu())  # (B, A, h*w)
    return torch.cat(chunks)


def load_or_encode_codes(model, files, image_size, cfg, cache_dir: Path, device, amp, logger,
                         precision: str) -> torch.Tensor:
    """The (N, A, h*w) int16/int32 codes of all files, from <cache_dir>/codes_<key>.pt or by encoding
    them once (under `amp`, whose precision is `precision`)."""
    key = cache_key(weights_digest(model.vqgan), files, image_size, cfg.num_augmentations, precision,
                    torch.device(device).type)
    path = cache_dir / f"codes_{key}.pt"
    cached_codes = None
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                cached_codes = cached["codes"]
        except Exception as e:  # a damaged cache only costs one more encoding pass
            logger.log(f"warning: ignoring unreadable code cache {path}: {str(e).splitlines()[0]}")
    # under DDP the cache is used only when every rank could read it; otherwise all encode together
    if not distributed.any_rank(cached_codes is None):
        logger.log(f"reusing cached codes {path}")
        return cached_codes
    t0 = time.perf_counter()
    # Under DDP each rank encodes a contiguous block of the files; the blocks are gathered once, in
    # rank order (= file order), and rank 0 writes the cache while the others wait.
    rank, world = distributed.rank_world()
    lo, hi = rank * len(files) // world, (rank + 1) * len(files) // world
    codes = encode_dataset(model, files[lo:hi], image_size, cfg.num_augmentations, cfg.batch_size,
                           cfg.num_workers, device, amp, first_index=lo)
    codes = distributed.all_gather_rows(codes.to(device)).cpu()  # (N, A, h*w)
    codes = codes.to(torch.int16 if model.num_codes <= 2 ** 15 else torch.int32)  # 4x smaller than int64
    if rank == 0:
        checkpoints.save_checkpoint({"key": key, "codes": codes, "files": [str(p) for p in files],
                               "image_size": image_size, "num_augmentations": cfg.num_augmentations}, path)
    distributed.barrier()
    logger.log(f"encoded {len(files)} images x {cfg.num_augmentations} views in "
               f"{time.perf_counter() - t0:.1f}s" + (f" on {world} processes" if world > 1 else "")
               + f"; cached codes to {path}")
    return codes


# ----------------------------------------------------------------------------- steps and evaluation

def train_step(model, codes, labels, opt, scaler, amp, grad_clip: float, accum_steps: int = 1) -> dict:
    """One GPT update on codes (K*B, h*w) (labels (K*B,) or None) in K = accum_steps micro-batches,
    their gradients summed; under DDP (`model` wrapped) all-reduced once, after the last. Returns
    detached scalars."""
    opt.zero_grad(set_to_none=True)
    chunks = codes.chunk(accum_steps)
    label_chunks = labels.chunk(accum_steps) if labels is not None else [None] * len(chunks)
    losses = []
    for i, (c, y) in enumerate(zip(chunks, label_chunks)):
        with distributed.no_sync(model, i == len(chunks) - 1):
            with amp:
                logits, targets = model(c, y)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
            scaler.scale(loss / len(chunks)).backward()
        losses.append(loss.detach())
    loss = torch.stack(losses).mean()
    grad_norm = trainer.unscale_and_clip(distributed.unwrap(model).gpt.parameters(), opt, scaler,
                                         grad_clip if grad_clip > 0 else float("inf"))
    # the gradients are all-reduced, so grad_norm agrees across ranks; the loss is per rank
    finite = trainer.optimizer_step(opt, scaler, loss, grad_norm)
    return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "finite": finite}


@torch.no_grad()
def evaluate_bits_per_token(model, codes, labels, batch_size: int, amp) -> float:
    """Mean validation cross-entropy in bits per code token (eval mode: no corruption, no label drop)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(codes), batch_size):
        c = codes[i : i + batch_size]
        y = labels[i : i + batch_size] if labels is not None else None
        with amp:
            logits, targets = model(c, y)
        total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                 reduction="sum").item()
        n += targets.numel()
    model.train(was_training)
    return total / max(n, 1) / math.log(2)


@torch.no_grad()
def save_transformer_grid(model, images, codes, labels, path, cfg, seed: int):
    """One row per example: original | reconstruction | bottom half completed | new sample.

    images: (n, 3, H, W) in [-1, 1]; codes: (n, h*w) their cached codes. Sampling uses its own
    generator, so grids never shift the training RNG (exact resume)."""
    n = len(images)
    kw = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, labels=labels,
              cfg_scale=cfg.cfg_scale)
    g = torch.Generator(device=codes.device).manual_seed(seed)
    rec = model.indices_to_image(codes)
    completion = model.indices_to_image(model.complete_indices(codes, 0.5, generator=g, **kw))
    sample = model.indices_to_image(model.generate(n, generator=g, **kw))
    grid = torch.stack([images.to(rec.device), rec, completion, sample], dim=1)  # (n, 4, 3, H, W)
    loggers.save_grid([grid.flatten(0, 1)], path, nrow=4)


# ----------------------------------------------------------------------------- setup

def resolve_vqgan_path(cfg: TrainConfig) -> Path:
    return Path(cfg.vqgan_path).expanduser() if cfg.vqgan_path else Path(cfg.out_dir) / "checkpoints" / "vqgan_last.pt"


def load_stage_one(path: Path, device, explicit: bool):
    """The frozen stage-one VQGAN, with errors that name the fix. `path` may also be a save_pretrained
    folder or a Hugging Face Hub repo id (see hub.py)."""
    if hub.is_pretrained(path):
        return load_vqgan(path, device)
    if not path.is_file() and explicit:
        raise UserError(f"--vqgan-path {path}: no such file; pass the vqgan_last.pt written by training_vqgan.py")
    if not path.is_file():
        raise UserError(f"no stage-one VQGAN checkpoint at {path}; train one first with "
                        f"`python training_vqgan.py --out-dir {path.parent.parent}` or pass --vqgan-path")
    try:
        return load_vqgan(path, device)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a usable stage-one VQGAN checkpoint ({str(e).splitlines()[0]}); "
                        "pass the vqgan_last.pt written by training_vqgan.py with --vqgan-path") from None


def resume_config(cfg, given: set, ckpt: dict) -> TrainConfig:
    """The saved run's config, updated with the flags given now; model or data changes are refused."""
    fixed = GPT_FIELDS + ("conditional", "num_augmentations", "dataset_path", "val_fraction", "seed")
    return cli.resumed_config(cfg, given, ckpt["config"], fixed, "model or data")


def build_model(cfg, ckpt, class_names: list[str], root: Path, device) -> tuple[VQGANTransformer, Path]:
    """The VQGANTransformer and its stage-one path: a resumed run brings its own VQGAN (embedded in the
    checkpoint), a new one loads --vqgan-path."""
    if ckpt is not None:
        if ckpt.get("class_names", []) != class_names:
            raise UserError(f"--resume: the classes in {root} differ from the checkpoint's "
                            f"{ckpt.get('class_names')}; use the same --dataset-path")
        return build_from_checkpoint(ckpt).to(device), Path(ckpt["config"].get("vqgan_path") or resolve_vqgan_path(cfg))
    vqgan_path = resolve_vqgan_path(cfg)
    vqgan = load_stage_one(vqgan_path, device, explicit=bool(cfg.vqgan_path))
    return VQGANTransformer(vqgan, transformer_config(cfg, len(class_names)), class_names).to(device), vqgan_path


def checkpoint_state(model, opt, scaler, ema, lr: float) -> dict:
    """Stage two's part of a checkpoint (trainer.Loop.save adds the position, config and RNG states):
    the model with its VQGAN embedded, optimiser, scaler, learning rate and EMA weights."""
    state = {**model_dict(model), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "lr": lr}
    if ema is not None:
        state["ema_model"] = ema.state_dict()  # transformer.load_transformer prefers these weights
    return state


def ema_copy(model: VQGANTransformer, device) -> VQGANTransformer:
    """A copy of the GPT for its EMA that shares the frozen VQGAN (its state_dict is a whole model's)."""
    ema = VQGANTransformer(model.vqgan, model.config, model.class_names).to(device)
    ema.gpt.load_state_dict(model.gpt.state_dict())
    return ema


def split_codes(cache: torch.Tensor, train_idx: list, val_idx: list, labels, device):
    """cache (N, A, T) -> train codes (N_train * A, T), image-major, in the cache's int16/int32 (batches
    become int64 when used); val codes (N_val, T), the centre crops only; and their labels (or None)."""
    codes = cache.to(device)
    train_idx, val_idx = torch.tensor(train_idx, device=device), torch.tensor(val_idx, device=device)
    A, T = codes.shape[1], codes.shape[2]
    train_codes = codes[train_idx].reshape(-1, T)  # (N_train * A, T)
    val_codes = codes[val_idx, 0].long()  # (N_val, T)
    if labels is None:
        return train_codes, val_codes, None, None
    labels = labels.to(device)
    return train_codes, val_codes, labels[train_idx].repeat_interleave(A), labels[val_idx]


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg, given = cli.parse_config(TrainConfig, argv, TRAIN_PRESETS, description=__doc__.split("\n")[0])
    out = Path(cfg.out_dir)
    last_path = out / "checkpoints" / "transformer_last.pt"
    cfg, ckpt = trainer.resume_checkpoint(cfg, given, last_path, "transformer", "stage-two", resume_config)
    cfg.validate()  # the whole run's settings (the grids' sampling too), before any data, encoding or training
    loggers.parse_names(cfg.logger)  # an unknown name or a missing package fails before any work
    run = trainer.setup(cfg)
    utils.seed_everything(cfg.seed)

    root = trainer.data_root(cfg)
    files = data.find_images(root, cache_file=out / "cache" / "file_scan.json")  # vetted once per file
    # split by index, with the same helper and seed as stage one's image split; checked before encoding
    train_idx, val_idx = trainer.split(list(range(len(files))), cfg, root)
    global_batch = trainer.global_batch(cfg, run, len(train_idx) * cfg.num_augmentations,
                                        "cached training sequences", "lower --batch-size or raise --num-augmentations")
    names = data.class_names(root, files) if cfg.conditional else []
    class_names = sorted(set(names))
    labels_all = torch.tensor([class_names.index(c) for c in names]) if cfg.conditional else None
    model, vqgan_path = build_model(cfg, ckpt, class_names, root, run.device)
    image_size = model.vqgan.config.image_size

    logger = loggers.RunLogger(out, "transformer", enabled=run.is_main)
    cache = load_or_encode_codes(model, files, image_size, cfg, out / "cache", run.device, run.amp, logger,
                                 run.precision)
    # Encoding draws from the global RNG (DataLoader seeds) only on a cache miss: reseed, so training
    # is the same whether or not the codes came from the cache. Per rank (pkeep corruption, class-token
    # dropout, dropout); the data order comes from the shared cfg.seed.
    utils.seed_everything(cfg.seed + run.rank)
    if not val_idx:
        logger.log(f"note: no validation split ({len(files)} image(s), --val-fraction {cfg.val_fraction}): "
                   "val_bits_per_token and grids use training images")
    val_idx = val_idx or train_idx
    train_codes, val_codes, train_labels, val_labels = split_codes(cache, train_idx, val_idx, labels_all, run.device)
    A, T = cache.shape[1], cache.shape[2]
    steps_per_epoch = len(train_codes) // global_batch
    # The schedule spans --epochs (or --max-steps with --epochs 0); --max-steps alone only stops
    # early, so a run stopped there and resumed follows the same learning rates as an unbroken one.
    schedule_steps = cfg.epochs * steps_per_epoch if cfg.epochs > 0 else cfg.max_steps

    opt = model.gpt.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                         fused=cfg.fused_optimizer)
    scaler = trainer.grad_scaler(run)
    ema = trainer.make_ema(lambda: ema_copy(model, run.device), cfg.weight_ema_decay, run, ckpt)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    progress = trainer.resume_progress(ckpt, cfg, run, logger, last_path, global_batch)
    del ckpt
    shown = ema if ema is not None else model  # what grids and validation use
    # The frozen VQGAN's parameters need no gradients, so DDP leaves them out of its reducer. With
    # --compile a compiled wrapper for the training step only; it shares the model's parameters, so
    # checkpoints (saved from model), EMA, validation and grids see the plain model.
    ddp_model = trainer.wrap_ddp(model, run, compile=cfg.compile)

    cfg = dataclasses.replace(cfg, vqgan_path=str(vqgan_path))
    trainer.start_logging(cfg, out, "transformer", logger, run, progress[0])
    h, w = model.latent_hw
    total_steps = trainer.total_steps(cfg, steps_per_epoch)
    logger.log(f"device {run.device}, precision {run.precision}; stage one {vqgan_path} ({image_size}px, latent "
               f"grid {h}x{w}, {model.num_codes} codes); {len(train_idx)} train / {len(val_idx)} val images x {A} "
               f"views from {root}" + (f"; {len(class_names)} classes" if cfg.conditional else "")
               + f"; GPT {model.gpt.num_params() / 1e6:.2f}M params, vocab {model.vocab_size}; "
               f"{steps_per_epoch} steps/epoch, {total_steps} steps; {run.world} process(es), global batch "
               f"{global_batch} = {cfg.batch_size} x {cfg.grad_accum_steps} accumulated x {run.world}")
    if cfg.conditional and len(class_names) < 2:
        logger.log(f"warning: --conditional, but {root} has {len(class_names)} class "
                   "(first-level subfolders); the class token carries no information")

    loop = trainer.Loop(run, cfg, logger, "transformer", last_path, total_steps=total_steps,
                        global_batch=global_batch, num_train=len(train_codes), progress=progress,
                        state=lambda: checkpoint_state(model, opt, scaler, ema, lr_at(loop.step, cfg, schedule_steps)))
    n_show = min(cfg.num_grid_images, len(val_idx)) if run.is_main else 0
    show_set = data.ImageDataset([files[i] for i in val_idx[:n_show]], image_size, train=False)
    show_images = torch.stack([show_set[j][0] for j in range(n_show)]) if n_show else None  # centre crops

    def validate(name: str) -> float:
        """Validation bits per token, the grid `name` (rank 0 only) and the loss curves."""
        val_bpt = evaluate_bits_per_token(shown, val_codes, val_labels, cfg.batch_size, run.amp)
        logger.metrics({"step": loop.step, "epoch": loop.epoch, "val_bits_per_token": val_bpt})
        if n_show > 0:
            save_transformer_grid(shown, show_images, val_codes[:n_show],
                                  val_labels[:n_show] if val_labels is not None else None,
                                  logger.results / name, cfg, cfg.seed)
            logger.image(logger.results / name, loop.step)
        plots.update_plots(logger.results)
        return val_bpt

    def end_epoch():
        if run.is_main:
            val_bpt = validate(f"transformer_epoch{loop.epoch:04d}.png")
            logger.log(f"(step={loop.step:07d}) epoch {loop.epoch} val: {val_bpt:.4f} bits/token")

    def epoch_batches(epoch: int, start: int):
        """This rank's share of each step, from the shared seed's permutation (see data.EpochBatchSampler)."""
        per_rank = cfg.batch_size * cfg.grad_accum_steps
        return data.EpochBatchSampler(len(train_codes), per_rank, cfg.seed, epoch, rank=run.rank,
                                      world_size=run.world, start_sample=start)

    model.train()
    with loop:
        for batch in loop.batches(epoch_batches, end_epoch):
            t0 = time.perf_counter()
            rows = torch.tensor([i for i, _ in batch], device=run.device)
            y = train_labels[rows] if train_labels is not None else None
            lr = lr_at(loop.step, cfg, schedule_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            r = train_step(ddp_model, train_codes[rows].long(), y, opt, scaler, run.amp, cfg.grad_clip,
                           cfg.grad_accum_steps)
            if ema is not None and r["finite"]:
                trainer.ema_update(ema.gpt, model.gpt, cfg.weight_ema_decay)
            dt = loop.step_done(r["finite"], t0)
            loop.pbar.set_postfix(loss=f"{r['loss'].item():.3f}", tok_s=f"{global_batch * T / dt:.0f}")
            if loop.step % cfg.log_every == 0 or loop.step == loop.total_steps:
                # every rank takes part: averaged over ranks
                m = distributed.all_reduce_mean({"loss": r["loss"], "grad_norm": r["grad_norm"], "step_time": dt})
                logger.metrics({"step": loop.step, "epoch": loop.epoch, "loss": m["loss"],
                                "bits_per_token": m["loss"] / math.log(2), "grad_norm": m["grad_norm"], "lr": lr,
                                "step_time": m["step_time"], "tokens_per_sec": global_batch * T / m["step_time"]})
    if loop.finish("training_transformer.py"):
        val_bpt = validate("transformer_final.png")
        logger.log(f"done: {loop.step} steps, val {val_bpt:.4f} bits/token; checkpoint {last_path}, "
                   f"grids and metrics in {logger.results}")
    trainer.close(logger)
    # the trained model (unwrapped) is returned for callers such as tests; the checkpoint is the record
    return {"step": loop.step, "checkpoint": str(last_path), "model": model, "ema": ema}


if __name__ == "__main__":
    cli.run_main(main)
