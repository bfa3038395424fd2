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
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import plots
import utils
from mingpt import GPT_PRESETS
from training_vqgan import EpochBatchSampler, StopFlag
from transformer import TransformerConfig, VQGANTransformer, build_from_checkpoint, model_dict, weights_digest
from utils import UserError, field
from vqgan import VQGAN, config_from_preset, load_vqgan

GPT_FIELDS = ("n_layer", "n_head", "n_embd", "embd_pdrop", "resid_pdrop", "attn_pdrop")
CACHE_VERSION = 1  # bump when the cache layout or the augmentations change


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
    vqgan_path: str = field("", "stage-one checkpoint (default: <out-dir>/checkpoints/vqgan_last.pt, "
                                "what training_vqgan.py writes)")
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
                           choices=list(utils.PRECISIONS))
    num_workers: int = field(2, "data loader workers for the one-off encoding pass")
    # Speed switches; none of them changes what is saved (checkpoints come from the plain modules).
    compile: bool = field(False, "torch.compile the model for the training step (validation and grids run "
                                 "the plain model); see README, Speed")
    tf32: bool = field(True, "on CUDA: TF32 tensor cores for fp32 matmuls (--precision fp32)")
    fused_optimizer: bool = field(True, "fused AdamW kernels (fused=True, CUDA and CPU); off: torch's default "
                                        "(foreach on CUDA, a per-parameter loop on the CPU)")
    seed: int = field(0, "random seed")
    log_every: int = field(10, "steps between metrics.jsonl records")
    num_grid_images: int = field(4, "rows of the per-epoch grid, each original | reconstruction | "
                                    "completion | sample (0: no grids)")
    temperature: float = field(1.0, "sampling temperature for the grids (0: greedy)")
    top_k: int | None = field(None, "sample from the k most likely codes only (none: all)")
    top_p: float | None = field(None, "nucleus sampling mass (none: off)")
    cfg_scale: float = field(1.0, "classifier-free guidance scale for conditional grids (1: none)")
    resume: bool = field(False, "continue from <out-dir>/checkpoints/transformer_last.pt at its exact step")


TRAIN_PRESETS: dict[str, dict] = {
    "tiny": {**GPT_PRESETS["tiny"], "batch_size": 4, "epochs": 1, "warmup_steps": 2, "log_every": 1,
             "num_augmentations": 2, "num_workers": 0, "num_grid_images": 2},
    "demo": {**GPT_PRESETS["demo"]},
    # taming's transformer configs: base_learning_rate 4.5e-6 scaled by the batch size, dropout 0
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
        self.centre = utils.ImageDataset(files, image_size, train=False)
        self.random = utils.ImageDataset(files, image_size, train=True)
        self.num_augmentations, self.first_index = num_augmentations, first_index

    def __len__(self) -> int:
        return len(self.centre)

    def __getitem__(self, i):
        views = [self.centre[i][0]]
        k = self.first_index + i  # the file's index in the whole list
        views += [self.random[(i, k * 1_000_003 + a)][0] for a in range(1, self.num_augmentations)]
        return torch.stack(views)  # (A, 3, S, S)


def cache_key(vqgan_digest: str, files: list[Path], image_size: int, num_augmentations: int) -> str:
    """Hash of what the cached codes depend on: the VQGAN's weights, the files (with sizes and
    modification times), the image size and the number of views."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{vqgan_digest}:{image_size}:{num_augmentations}".encode())
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


def load_or_encode_codes(model, files, image_size, cfg, cache_dir: Path, device, amp, logger) -> torch.Tensor:
    """The (N, A, h*w) int16/int32 codes of all files, from <cache_dir>/codes_<key>.pt or by encoding
    them once."""
    key = cache_key(weights_digest(model.vqgan), files, image_size, cfg.num_augmentations)
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
    if not utils.any_rank(cached_codes is None):
        logger.log(f"reusing cached codes {path}")
        return cached_codes
    t0 = time.perf_counter()
    # Under DDP each rank encodes a contiguous block of the files; the blocks are gathered once, in
    # rank order (= file order), and rank 0 writes the cache while the others wait.
    rank, world = utils.rank_world()
    lo, hi = rank * len(files) // world, (rank + 1) * len(files) // world
    codes = encode_dataset(model, files[lo:hi], image_size, cfg.num_augmentations, cfg.batch_size,
                           cfg.num_workers, device, amp, first_index=lo)
    codes = utils.all_gather_rows(codes.to(device)).cpu()  # (N, A, h*w)
    codes = codes.to(torch.int16 if model.num_codes <= 2 ** 15 else torch.int32)  # 4x smaller than int64
    if rank == 0:
        utils.save_checkpoint({"key": key, "codes": codes, "files": [str(p) for p in files],
                               "image_size": image_size, "num_augmentations": cfg.num_augmentations}, path)
    utils.barrier()
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
        with utils.no_sync(model, i == len(chunks) - 1):
            with amp:
                logits, targets = model(c, y)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
            scaler.scale(loss / len(chunks)).backward()
        losses.append(loss.detach())
    loss = torch.stack(losses).mean()
    if scaler.is_enabled():
        scaler.unscale_(opt)
    params = utils.unwrap(model).gpt.parameters()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    # the gradients are all-reduced, so grad_norm agrees across ranks; the loss is per rank
    finite = not utils.any_rank(not (bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))))
    if scaler.is_enabled():
        scaler.step(opt)  # skips the update itself on inf/NaN gradients
        scaler.update()
    elif finite:
        opt.step()
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
    utils.save_grid([grid.flatten(0, 1)], path, nrow=4)


# ----------------------------------------------------------------------------- setup

def resolve_vqgan_path(cfg: TrainConfig) -> Path:
    return Path(cfg.vqgan_path).expanduser() if cfg.vqgan_path else Path(cfg.out_dir) / "checkpoints" / "vqgan_last.pt"


def load_stage_one(path: Path, device, explicit: bool):
    """The frozen stage-one VQGAN, with errors that name the fix."""
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
    return utils.resumed_config(cfg, given, ckpt["config"], fixed, "model or data")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg, given = utils.parse_config(TrainConfig, argv, TRAIN_PRESETS, description=__doc__.split("\n")[0])
    out = Path(cfg.out_dir)
    last_path = out / "checkpoints" / "transformer_last.pt"
    ckpt = None
    if cfg.resume:
        if not last_path.exists():
            raise UserError(f"--resume: no checkpoint at {last_path}; train without --resume first")
        ckpt = utils.load_checkpoint(last_path)
        if ckpt.get("kind") != "transformer":
            raise UserError(f"{last_path} is not a stage-two checkpoint (kind: {ckpt.get('kind')})")
        cfg = resume_config(cfg, given, ckpt)
    if cfg.batch_size < 1 or cfg.num_augmentations < 1 or cfg.grad_accum_steps < 1:
        raise UserError("--batch-size, --num-augmentations and --grad-accum-steps must be at least 1")
    if not 0.0 <= cfg.weight_ema_decay < 1.0:
        raise UserError("--weight-ema-decay must be in [0, 1)")
    if not 0.0 < cfg.pkeep <= 1.0 or not 0.0 <= cfg.cfg_dropout < 1.0:
        raise UserError("--pkeep must be in (0, 1] and --cfg-dropout in [0, 1)")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}")

    # Under torchrun (RANK set) this joins the job: NCCL on cuda:LOCAL_RANK, else gloo.
    dinfo, device = utils.setup_distributed(utils.resolve_device(cfg.device))
    rank, world = dinfo.rank, dinfo.world_size
    precision = utils.resolve_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16 is not supported on this GPU; use fp16 or fp32")
    amp = utils.autocast(device, precision)
    utils.setup_cuda_math(device, cfg.tf32)
    utils.seed_everything(cfg.seed)

    data_root = Path(cfg.dataset_path).expanduser() if cfg.dataset_path else utils.DEMO_DATA
    files = utils.find_images(data_root, cache_file=out / "cache" / "file_scan.json")  # vetted once per file
    class_names = sorted(set(utils.class_names(data_root, files))) if cfg.conditional else []
    labels_all = None
    if cfg.conditional:
        names = utils.class_names(data_root, files)
        labels_all = torch.tensor([class_names.index(c) for c in names])

    # The model: a resumed run brings its own VQGAN (embedded in the checkpoint).
    if ckpt is not None:
        model = build_from_checkpoint(ckpt).to(device)
        if ckpt.get("class_names", []) != class_names:
            raise UserError(f"--resume: the classes in {data_root} differ from the checkpoint's "
                            f"{ckpt.get('class_names')}; use the same --dataset-path")
        vqgan_path = Path(ckpt["config"].get("vqgan_path") or resolve_vqgan_path(cfg))
    else:
        vqgan_path = resolve_vqgan_path(cfg)
        vqgan = load_stage_one(vqgan_path, device, explicit=bool(cfg.vqgan_path))
        model = VQGANTransformer(vqgan, transformer_config(cfg, len(class_names)), class_names).to(device)
    image_size = model.vqgan.config.image_size

    logger = utils.RunLogger(out, "transformer", enabled=dinfo.is_main)
    cache = load_or_encode_codes(model, files, image_size, cfg, out / "cache", device, amp, logger)
    codes_all = cache.to(device)  # (N, A, T), kept in int16/int32; batches become int64 when used
    # Encoding draws from the global RNG (DataLoader seeds) only on a cache miss: reseed, so training
    # is the same whether or not the codes came from the cache. Per rank (pkeep corruption, class-token
    # dropout, dropout); the data order comes from the shared cfg.seed.
    utils.seed_everything(cfg.seed + rank)
    # split by index, with the same helper and seed as stage one's image split
    train_idx, val_idx = utils.split_files(list(range(len(files))), cfg.val_fraction, cfg.seed)
    train_idx, val_idx = torch.tensor(train_idx), torch.tensor(val_idx or train_idx)
    A, T = codes_all.shape[1], codes_all.shape[2]
    train_codes = codes_all[train_idx.to(device)].reshape(-1, T)  # (N_train * A, T), image-major
    val_codes = codes_all[val_idx.to(device), 0].long()  # (N_val, T): centre crops only
    if labels_all is not None:
        labels_all = labels_all.to(device)
        train_labels = labels_all[train_idx.to(device)].repeat_interleave(A)  # (N_train * A,)
        val_labels = labels_all[val_idx.to(device)]
    else:
        train_labels = val_labels = None

    global_batch = cfg.batch_size * cfg.grad_accum_steps * world
    if global_batch > len(train_codes):
        product = (f" x --grad-accum-steps {cfg.grad_accum_steps} x {world} processes = {global_batch}"
                   if global_batch != cfg.batch_size else "")
        raise UserError(f"--batch-size {cfg.batch_size}{product} is larger than the {len(train_codes)} cached "
                        "training sequences; lower --batch-size or raise --num-augmentations")
    steps_per_epoch = len(train_codes) // global_batch
    # The schedule spans --epochs (or --max-steps with --epochs 0); --max-steps alone only stops
    # early, so a run stopped there and resumed follows the same learning rates as an unbroken one.
    schedule_steps = cfg.epochs * steps_per_epoch if cfg.epochs > 0 else cfg.max_steps
    total_steps = min(schedule_steps, cfg.max_steps) if cfg.max_steps > 0 else schedule_steps

    opt = model.gpt.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                         fused=cfg.fused_optimizer)
    # GradScaler only for fp16 (bf16 and fp32 need none)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step, epoch, samples_in_epoch = 0, 0, 0
    # An EMA copy of the GPT on rank 0 (which alone evaluates, draws grids and saves); it shares the
    # frozen VQGAN, so ema.state_dict() is a whole model's state.
    ema = None
    if cfg.weight_ema_decay > 0 and dinfo.is_main:
        ema = VQGANTransformer(model.vqgan, model.config, model.class_names).to(device)
        ema.gpt.load_state_dict(model.gpt.state_dict())
        ema.eval().requires_grad_(False)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, samples_in_epoch, saved_batch = utils.restore_progress(ckpt, rank, world, cfg.seed)
        if ema is not None and ckpt.get("ema_model"):
            ema.load_state_dict(ckpt["ema_model"])
        logger.truncate_after(step)
        logger.log(f"resumed from {last_path} at step {step} (epoch {epoch}, sample {samples_in_epoch})")
        if saved_batch != global_batch:
            logger.log(f"note: the global batch changed from {saved_batch} to {global_batch}; steps from here "
                       "count the new batch, and --learning-rate is not rescaled")
        del ckpt
    shown = ema if ema is not None else model  # what grids and validation use
    utils.broadcast_module_state(model)  # every rank starts from rank 0's GPT
    # A compiled wrapper for the training step only; it shares the model's parameters, so checkpoints
    # (saved from model), EMA, validation and grids see the plain model.
    ddp_model = utils.compile_module(model) if cfg.compile else model
    if world > 1:
        # The frozen VQGAN's parameters need no gradients, so DDP leaves them out of its reducer;
        # the GPT's all get gradients, so find_unused_parameters stays False.
        ddp_model = DistributedDataParallel(ddp_model, device_ids=[device.index] if device.type == "cuda" else None,
                                            forward_sync_buffers=False)

    cfg = dataclasses.replace(cfg, vqgan_path=str(vqgan_path))
    if dinfo.is_main:
        (out / "config.json").write_text(json.dumps(utils.config_dict(cfg), indent=2) + "\n")
    logger.log(f"config: {json.dumps(utils.config_dict(cfg))}")
    h, w = model.latent_hw
    logger.log(f"device {device}, precision {precision}; stage one {vqgan_path} ({image_size}px, latent grid "
               f"{h}x{w}, {model.num_codes} codes); {len(train_idx)} train / {len(val_idx)} val images x {A} views "
               f"from {data_root}" + (f"; {len(class_names)} classes" if cfg.conditional else "")
               + f"; GPT {model.gpt.num_params() / 1e6:.2f}M params, vocab {model.vocab_size}; "
               f"{steps_per_epoch} steps/epoch, {total_steps} steps; {world} process(es), global batch "
               f"{global_batch} = {cfg.batch_size} x {cfg.grad_accum_steps} accumulated x {world}")
    if cfg.conditional and len(class_names) < 2:
        logger.log(f"warning: --conditional, but {data_root} has {len(class_names)} class "
                   "(first-level subfolders); the class token carries no information")
    if total_steps <= step:
        logger.log(f"nothing to do: already at step {step} of {total_steps}")

    n_show = min(cfg.num_grid_images, len(val_idx)) if dinfo.is_main else 0
    if n_show > 0:
        show_set = utils.ImageDataset([files[i] for i in val_idx[:n_show].tolist()], image_size, train=False)
        show_images = torch.stack([show_set[j][0] for j in range(n_show)])  # (n, 3, S, S), the centre crops
        show_codes = val_codes[:n_show]
        show_labels = val_labels[:n_show] if val_labels is not None else None

    def save():
        """Every rank calls this (its RNG state is gathered); rank 0 alone writes. The position in the
        epoch is kept in samples, so a resume on another number of processes continues at the next one."""
        rng_ranks = utils.all_gather_objects(utils.rng_state())[1:]
        if not dinfo.is_main:
            return
        state = {**model_dict(model), "step": step, "epoch": epoch,
                 "batch_in_epoch": samples_in_epoch // global_batch, "samples_in_epoch": samples_in_epoch,
                 "global_batch": global_batch,
                 "config": utils.config_dict(cfg), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "lr": lr_at(step, cfg, schedule_steps), "rng": utils.rng_state(),
                 "torch_version": str(torch.__version__)}
        if ema is not None:
            state["ema_model"] = ema.state_dict()  # transformer.load_transformer prefers these weights
        if rng_ranks:
            state["rng_ranks"] = rng_ranks
        utils.save_checkpoint(state, last_path)

    def grid(name: str):
        """The epoch grid, and the loss curves brought up to date with it."""
        if n_show > 0:
            save_transformer_grid(shown, show_images, show_codes, show_labels, logger.results / name, cfg,
                                  cfg.seed)
        if logger.enabled:
            plots.update_plots(logger.results)

    def end_epoch():
        """Validation (rank 0), the grid and a checkpoint when an epoch has run to its end."""
        nonlocal epoch, samples_in_epoch
        if dinfo.is_main:
            val_bpt = evaluate_bits_per_token(shown, val_codes, val_labels, cfg.batch_size, amp)
            logger.metrics({"step": step, "epoch": epoch, "val_bits_per_token": val_bpt})
            logger.log(f"(step={step:07d}) epoch {epoch} val: {val_bpt:.4f} bits/token")
            grid(f"transformer_epoch{epoch:04d}.png")
        epoch, samples_in_epoch = epoch + 1, 0
        if bad_steps == 0:  # never overwrite the last good checkpoint inside a non-finite run
            save()

    model.train()
    bad_steps = 0
    stopping = False
    per_rank = cfg.batch_size * cfg.grad_accum_steps
    pbar = tqdm(total=total_steps, initial=step, desc="transformer", dynamic_ncols=True,
                disable=None if dinfo.is_main else True)
    with StopFlag() as stop:
        while step < total_steps and not stopping:
            # this rank's share of each step, from the shared seed's permutation (see EpochBatchSampler)
            sampler = EpochBatchSampler(len(train_codes), per_rank, cfg.seed, epoch, rank=rank, world_size=world,
                                        start_sample=samples_in_epoch)
            for batch in sampler:
                t0 = time.perf_counter()
                rows = torch.tensor([i for i, _ in batch], device=device)
                y = train_labels[rows] if train_labels is not None else None
                lr = lr_at(step, cfg, schedule_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                r = train_step(ddp_model, train_codes[rows].long(), y, opt, scaler, amp, cfg.grad_clip,
                               cfg.grad_accum_steps)
                if ema is not None and r["finite"]:
                    utils.ema_update(ema.gpt, model.gpt, cfg.weight_ema_decay)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                step += 1
                samples_in_epoch += global_batch
                bad_steps = 0 if r["finite"] else bad_steps + 1
                if not r["finite"]:
                    logger.log(f"step {step}: non-finite loss or gradient, update skipped ({bad_steps} in a row)")
                    if bad_steps >= 10:
                        raise UserError("10 consecutive non-finite steps; stopping. The last good checkpoint "
                                        f"{last_path} is untouched; try a lower --learning-rate or --precision fp32")
                tok_s = global_batch * T / dt
                pbar.update(1)
                pbar.set_postfix(loss=f"{r['loss'].item():.3f}", tok_s=f"{tok_s:.0f}")
                if step % cfg.log_every == 0 or step == total_steps:
                    # every rank takes part: averaged over ranks
                    m = utils.all_reduce_mean({"loss": r["loss"], "grad_norm": r["grad_norm"], "step_time": dt})
                    logger.metrics({"step": step, "epoch": epoch, "loss": m["loss"],
                                    "bits_per_token": m["loss"] / math.log(2),
                                    "grad_norm": m["grad_norm"], "lr": lr, "step_time": m["step_time"],
                                    "tokens_per_sec": global_batch * T / m["step_time"]})
                # a signal may reach the ranks at different steps: they all stop at the first one's
                stopping = utils.any_rank(stop.requested)
                if step >= total_steps or stopping:
                    break
            if samples_in_epoch + global_batch > len(train_codes):  # no full step left in this epoch
                end_epoch()
                continue
            break
    pbar.close()
    save()
    if stopping:
        logger.log(f"stopped at step {step}; checkpoint saved to {last_path}. "
                   f"Resume with: python training_transformer.py --out-dir {cfg.out_dir} --resume")
    elif dinfo.is_main:
        val_bpt = evaluate_bits_per_token(shown, val_codes, val_labels, cfg.batch_size, amp)
        logger.metrics({"step": step, "epoch": epoch, "val_bits_per_token": val_bpt})
        grid("transformer_final.png")
        logger.log(f"done: {step} steps, val {val_bpt:.4f} bits/token; checkpoint {last_path}, "
                   f"grids and metrics in {logger.results}")
    utils.cleanup_distributed()
    # the trained model (unwrapped) is returned for callers such as tests; the checkpoint is the record
    return {"step": step, "checkpoint": str(last_path), "model": model, "ema": ema}


# ----------------------------------------------------------------------------- benchmark

def benchmark_code_cache(steps: int = 5, repeats: int = 5, batch_size: int = 16, device: str = "cpu",
                         seed: int = 0, threads: int | None = None, vqgan_preset: str = "demo",
                         gpt_preset: str = "demo") -> dict:
    """GPT training throughput on cached codes vs encoding every batch through the VQGAN encoder.

    By default both use the `demo` presets (VQGAN 64px -> 8x8 codes, GPT 4x4x128; `vqgan_preset`
    names a vqgan.PRESETS entry, `gpt_preset` a mingpt.GPT_PRESETS one), with random weights. Three
    pipelines, each `steps` training steps on batches of the demo photos:
      cached:      index the pre-encoded codes, as main() does;
      encode:      run the encoder on images already in memory (no loading: the lower bound);
      load_encode: load, crop and flip the batch's photos, then encode, as the reference does per step.
    They are measured interleaved (cached, encode, load_encode, cached, ...) `repeats` times after
    one warm-up round, and medians are taken, so load from other processes hits all alike.
    `threads` sets torch's CPU threads for the measurement (None: unchanged).

    Returns {"cached_tokens_per_sec", "encode_tokens_per_sec", "load_encode_tokens_per_sec"
    (medians), "speedup" (cached / encode), "speedup_with_loading" (cached / load_encode),
    "runs" ({pipeline: per-repeat tokens/s}), "batch_size", "steps", "repeats",
    "tokens_per_sequence", "threads", "vqgan_preset", "gpt_preset"}.
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _benchmark_code_cache(steps, repeats, batch_size, device, seed, vqgan_preset, gpt_preset)
    finally:
        torch.set_num_threads(old_threads)


def _benchmark_code_cache(steps, repeats, batch_size, device, seed, vqgan_preset, gpt_preset) -> dict:
    """The measurement of benchmark_code_cache."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    vq_cfg = config_from_preset(vqgan_preset)
    model = VQGANTransformer(VQGAN(vq_cfg), TransformerConfig(**GPT_PRESETS[gpt_preset])).to(dev)
    model.train()
    opt = model.gpt.configure_optimizers(0.01, 3e-4, (0.9, 0.95))
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    amp = utils.autocast(dev, "fp32")
    files = utils.find_images(utils.DEMO_DATA)
    dataset = utils.ImageDataset(files, vq_cfg.image_size, train=True)
    n = len(files)
    batches = [[(i * batch_size + j) % n for j in range(batch_size)] for i in range(steps)]
    images = torch.stack([dataset[(i, i)][0] for i in range(n)]).to(dev)  # (N, 3, S, S) in memory
    cache = torch.cat([model.encode_to_indices(images[i : i + batch_size]) for i in range(0, n, batch_size)])
    T = cache.shape[1]

    def codes_for(mode: str, rows: list[int], step: int) -> torch.Tensor:
        if mode == "cached":
            return cache[torch.tensor(rows, device=dev)]  # (B, T)
        if mode == "encode":
            return model.encode_to_indices(images[torch.tensor(rows, device=dev)])
        x = torch.stack([dataset[(r, step * n + r)][0] for r in rows]).to(dev)  # (B, 3, S, S)
        return model.encode_to_indices(x)

    def run(mode: str) -> float:
        t0 = time.perf_counter()
        for step, rows in enumerate(batches):
            train_step(model, codes_for(mode, rows, step), None, opt, scaler, amp, 1.0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch_size * T / (time.perf_counter() - t0)

    modes = ("cached", "encode", "load_encode")
    for mode in modes:  # warm-up
        run(mode)
    runs = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            runs[mode].append(run(mode))
    med = {mode: statistics.median(r) for mode, r in runs.items()}
    return {"cached_tokens_per_sec": med["cached"], "encode_tokens_per_sec": med["encode"],
            "load_encode_tokens_per_sec": med["load_encode"], "speedup": med["cached"] / med["encode"],
            "speedup_with_loading": med["cached"] / med["load_encode"], "runs": runs, "batch_size": batch_size,
            "steps": steps, "repeats": repeats, "tokens_per_sequence": T, "threads": torch.get_num_threads(),
            "vqgan_preset": vqgan_preset, "gpt_preset": gpt_preset}


if __name__ == "__main__":
    utils.run_main(main)
