"""Speed benchmark on whatever device is present: training, data loading, file scan, sampling.

    python benchmark.py                                   # demo presets, auto device: the whole table
    python benchmark.py --compile                         # ... with compiled against eager
    python benchmark.py --preset f16 --image-size 256 --batch-size 8 --device cuda --json bench.json
    python benchmark.py --preset f16 --gpt-preset paper --sample-n-layer 4 --no-stage-one --no-loader \
        --no-stage-two --scan-files 0 --compile --clock cpu   # sampling against the reference's sample()

Measures, with random weights (speed does not depend on them):
- stage one: VQGAN training steps (training_vqgan.generator_step, then discriminator_step once the
  GAN is on) in images/s, before and after disc_start, with peak memory and FLOPs per step; with
  --compile also the torch.compile'd step, in the same rounds;
- loading: the stage-one DataLoader alone, in images/s (is it the bottleneck?);
- file scan: data.find_images on --scan-files generated JPEGs, first and cached (wall clock);
- stage two: GPT training in tokens/s on cached codes vs encoding every batch
  (benchmark_code_cache, on the demo photos);
- sampling: tokens/s of mingpt.GPT.generate with the static KV cache (eager, and compiled with
  --compile) against sampling without a cache: our generate(use_cache=False) and the loop of
  dome272/VQGAN-pytorch's sample() (reference_sample), on the same weights, checking the tokens agree.

Each measurement runs --warmup untimed rounds, then --repeats timed rounds of --steps steps; the
pipelines being compared alternate within each round, so load from other processes hits them alike,
and the table shows medians. The samplers without a cache take minutes at the paper's width: they
run --recompute-repeats rounds without warm-up. --clock cpu times the process's CPU seconds instead
of wall time, for one-thread runs on cores that other processes share.

Peak memory: on CUDA, torch.cuda.max_memory_allocated over the warm-up round (tensors only, not the
allocator's cache). On the CPU, the process's peak resident set size (resource ru_maxrss) after the
warm-up round: a high-water mark of the whole process, torch included, and monotonic, so a phase
can only show a peak at least as high as the phase before it.

FLOPs per step are counted once per phase with torch.utils.flop_counter.FlopCounterMode (matmuls
and convolutions, forward and backward) on the eager step. MFU (model FLOPs utilisation) is achieved
FLOP/s over the device's dense bf16/fp16 tensor peak, for the GPUs in DEVICE_PEAK_TFLOPS and bf16/fp16
precision only.
"""

import itertools
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cli
import data
import trainer
import training_vqgan
from cli import UserError, field
from devices import PRECISIONS, autocast, resolve_device, resolve_precision
from discriminator import Discriminator
from mingpt import GPT, GPT_PRESETS, compile_decode_step
from transformer import TransformerConfig, VQGANTransformer
from vqgan import PRESETS as ARCH_PRESETS, VQGAN, config_from_preset

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched
# against torch.cuda.get_device_name in this order (the first substring that matches wins).
DEVICE_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H200", 989.0),
    ("H100", 989.0),   # SXM
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", None),    # the AWS variant: no published tensor peak; keeps "A10" below from matching
    ("A10", 125.0),
    ("L4", 121.0),
    ("V100", 125.0),   # fp16 only; no bf16
)


@dataclass
class BenchConfig:
    """What to measure."""
    preset: str = field("demo", "stage-one preset (architecture + training defaults) of training_vqgan.py",
                        choices=list(training_vqgan.TRAIN_PRESETS))
    image_size: int = field(0, "stage-one image side (0: the preset's)")
    batch_size: int = field(0, "stage-one images per step (0: the preset's)")
    gpt_preset: str = field("demo", "stage-two GPT size (mingpt.GPT_PRESETS)", choices=list(GPT_PRESETS))
    gpt_batch_size: int = field(16, "stage-two sequences per training step")
    sample_batch_size: int = field(8, "sequences sampled at once")
    sample_n_layer: int = field(0, "layers of the sampling GPT (0: --gpt-preset's); --gpt-preset paper "
                                   "--sample-n-layer 4 is the paper's width at 4 layers")
    top_k: int = field(100, "top-k of every sampler (100: the reference sample()'s default)")
    recompute_repeats: int = field(1, "rounds of the samplers without a cache, no warm-up (0: skip them; "
                                      "minutes per round at the paper's width)")
    reference: bool = field(True, "also time dome272/VQGAN-pytorch's sample() loop (reference_sample)")
    compile: bool = field(False, "also measure torch.compile'd models: stage-one step and sampling "
                                 "decode step, against eager in the same run (compile time reported apart)")
    device: str = field("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = field("auto", "auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16",
                           choices=list(PRECISIONS))
    perceptual: bool = field(True, "include LPIPS in the stage-one step, as training does (needs VGG16 weights)")
    steps: int = field(3, "steps per timed round")
    warmup: int = field(1, "untimed rounds before timing")
    repeats: int = field(5, "timed rounds; the table shows medians")
    channels_last: bool = field(False, "stage one in channels-last memory (training_vqgan --channels-last)")
    num_workers: int = field(-1, "loader workers of the loading benchmark (-1: the preset's)")
    dataset_path: str = field("", "images for the loading benchmark (default: the demo photos)")
    scan_files: int = field(2000, "time the file scan, first and cached, on this many generated JPEGs in a "
                                  "temporary folder (0: skip)")
    stage_one: bool = field(True, "measure stage-one training")
    loader: bool = field(True, "measure the stage-one data loader alone")
    stage_two: bool = field(True, "measure stage-two training (cached codes vs encoding per batch)")
    sampling: bool = field(True, "measure sampling (KV cache vs full recompute)")
    clock: str = field("wall", "wall: elapsed seconds; cpu: this process's CPU seconds (all threads "
                               "summed), steadier when other processes share the cores; CPU device only",
                       choices=["wall", "cpu"])
    json: str = field("", "also write the results to this JSON file")
    seed: int = field(0, "random seed")

    def validate(self):
        """Raise UserError (one line: the flag, its range, what to do) for counts out of range and for a
        stage-one configuration (--preset with --image-size, --batch-size) that training would refuse;
        the sampling benchmark runs the same architecture's code grid."""
        cli.check_ranges(self, {"image_size": ">= 0", "batch_size": ">= 0", "gpt_batch_size": ">= 1",
                                  "sample_batch_size": ">= 1", "steps": ">= 1", "warmup": ">= 0", "repeats": ">= 1",
                                  "seed": cli.SEED_RANGE, "top_k": ">= 1", "sample_n_layer": ">= 0",
                                  "recompute_repeats": ">= 0", "num_workers": ">= -1", "scan_files": ">= 0"})
        stage_one_config(self).validate()


def stage_one_config(cfg: BenchConfig) -> training_vqgan.TrainConfig:
    """The stage-one training config measured: the preset's, with --image-size, --batch-size,
    --channels-last and --num-workers, and the GAN switching on at step 1 (step 0: GAN off; step 1: GAN on)."""
    overrides = {"disc_start": 1, "disc_factor": 1.0, "channels_last": cfg.channels_last}
    if cfg.image_size:
        overrides["image_size"] = cfg.image_size
    if cfg.batch_size:
        overrides["batch_size"] = cfg.batch_size
    if cfg.num_workers >= 0:
        overrides["num_workers"] = cfg.num_workers
    if not cfg.perceptual:
        overrides["perceptual_loss_factor"] = 0.0
    return training_vqgan.TrainConfig(**{**training_vqgan.TRAIN_PRESETS[cfg.preset], **overrides})


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """Dense tensor peak of a known CUDA device for bf16/fp16, else None."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DEVICE_PEAK_TFLOPS if key in name), None)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux


def _reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


_CLOCK = time.perf_counter  # main() switches it to time.process_time for --clock cpu


def _timed(fn, device) -> float:
    """Seconds that fn() takes, the device synchronised before and after."""
    _sync(device)
    t0 = _CLOCK()
    fn()
    _sync(device)
    return _CLOCK() - t0


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(phases: dict, device, warmup: int, repeats: int, work_per_call: float) -> dict:
    """Time each of phases {name: fn} -> {name: {"median", "runs", "peak_mem_mb"}} in units of
    work_per_call / s. Warm-up calls run phase by phase (and give the peak memory), timed ones interleaved."""
    out = {name: {"runs": []} for name in phases}
    for name, fn in phases.items():
        _reset_peak_memory(device)
        for _ in range(max(warmup, 1)):
            fn()
        _sync(device)
        out[name]["peak_mem_mb"] = _peak_memory_mb(device)
    for _ in range(repeats):
        for name, fn in phases.items():
            out[name]["runs"].append(work_per_call / _timed(fn, device))
    for r in out.values():
        r["median"] = statistics.median(r["runs"])
    return out


# ----------------------------------------------------------------------------- the three benchmarks

def bench_stage_one(cfg: BenchConfig, device, precision: str) -> dict:
    """Stage-one training images/s before and after disc_start, peak memory, FLOPs per step; with
    --compile also the compiled step (torch.compile of the VQGAN, discriminator and LPIPS, as
    training_vqgan --compile does), timed in the same rounds, its compile time apart."""
    tcfg = stage_one_config(cfg)  # checked by BenchConfig.validate
    torch.manual_seed(cfg.seed)
    memory_format = torch.channels_last if tcfg.channels_last else torch.contiguous_format
    model = VQGAN(training_vqgan.model_config(tcfg)).to(device, memory_format=memory_format).train()
    disc = Discriminator(tcfg.in_channels, tcfg.disc_ndf, tcfg.disc_layers).to(device, memory_format=memory_format)
    disc.train()
    perceptual, note = None, "no LPIPS (--no-perceptual)"
    if cfg.perceptual:
        try:
            perceptual = training_vqgan.build_perceptual(tcfg, device).to(memory_format=memory_format)
            note = "with LPIPS"
        except UserError as e:
            note = f"no LPIPS: VGG16 weights not found ({str(e)[:60]}...)"
    if perceptual is None:
        tcfg.perceptual_loss_factor = 0.0
    betas = (tcfg.beta1, tcfg.beta2)
    fused = True if tcfg.fused_optimizer else None  # as training_vqgan
    opt_g = torch.optim.Adam(model.parameters(), lr=tcfg.learning_rate, betas=betas, fused=fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=tcfg.learning_rate, betas=betas, fused=fused)
    scaler_g = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    scaler_d = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp = autocast(device, precision)
    x = torch.rand(tcfg.batch_size, 3, tcfg.image_size, tcfg.image_size, device=device) * 2 - 1
    x = x.contiguous(memory_format=memory_format)

    def step(gan_on: bool, nets=(model, disc, perceptual)):
        m, d, p = nets
        g = training_vqgan.generator_step(m, d, p, x, int(gan_on), tcfg, opt_g, scaler_g, amp)
        if g["disc_on"]:
            training_vqgan.discriminator_step(d, x, g["x_rec"], opt_d, scaler_d, amp, tcfg.disc_factor)

    phases = {"before_disc_start": lambda: [step(False) for _ in range(cfg.steps)],
              "after_disc_start": lambda: [step(True) for _ in range(cfg.steps)]}
    compile_s = {}
    if cfg.compile:
        nets = (trainer.compile_module(model), trainer.compile_module(disc),
                trainer.compile_module(perceptual) if perceptual else None)
        for name, gan_on in (("before_disc_start", False), ("after_disc_start", True)):
            compile_s[name] = _timed(lambda: step(gan_on, nets), device)  # the first call compiles
        phases["before_disc_start_compiled"] = lambda: [step(False, nets) for _ in range(cfg.steps)]
        phases["after_disc_start_compiled"] = lambda: [step(True, nets) for _ in range(cfg.steps)]
    res = measure(phases, device, cfg.warmup, cfg.repeats, cfg.steps * tcfg.batch_size)
    peak = device_peak_tflops(device, precision)
    for name, r in res.items():
        gan_on = name.startswith("after")
        r["images_per_sec"] = r.pop("median")
        # counted on the eager step (the counter does not see inside compiled graphs); the same math
        r["flops_per_step"] = _flops(lambda: step(gan_on))
        r["tflops_per_sec"] = r["flops_per_step"] * r["images_per_sec"] / tcfg.batch_size / 1e12
        if peak is not None:
            r["utilization"] = r["tflops_per_sec"] / peak  # model FLOPs utilisation (MFU)
        if name.endswith("_compiled"):
            r["compile_seconds"] = compile_s[name.removesuffix("_compiled")]
            r["speedup_over_eager"] = r["images_per_sec"] / res[name.removesuffix("_compiled")]["images_per_sec"]
    return {**res, "ratio_after_before": res["after_disc_start"]["images_per_sec"]
            / res["before_disc_start"]["images_per_sec"], "batch_size": tcfg.batch_size,
            "image_size": tcfg.image_size, "perceptual": note, "peak_tflops": peak,
            "channels_last": tcfg.channels_last}


def bench_loader(cfg: BenchConfig, device) -> dict:
    """Images/s of the stage-one data loader alone (training_vqgan.make_loader over --dataset-path or the
    demo photos: decode, resize, crop, flip, collate, copy to the device), epoch after epoch: when it is
    below the training step's images/s, loading is the bottleneck."""
    tcfg = stage_one_config(cfg)
    root = Path(cfg.dataset_path).expanduser() if cfg.dataset_path else data.DEMO_DATA
    dataset = data.ImageDataset(data.find_images(root), tcfg.image_size, train=True)
    if len(dataset) < tcfg.batch_size:
        raise UserError(f"--batch-size {tcfg.batch_size} is larger than the {len(dataset)} images in {root}")
    loader = training_vqgan.make_loader(dataset, tcfg, 0, device=device)

    def batches():
        for epoch in itertools.count():
            loader.batch_sampler.set_epoch(epoch)
            yield from loader

    it = batches()

    def pull():
        for _ in range(cfg.steps):
            next(it)[0].to(device, non_blocking=True)

    res = measure({"loader": pull}, device, cfg.warmup, cfg.repeats, cfg.steps * tcfg.batch_size)["loader"]
    res["images_per_sec"] = res.pop("median")
    return {**res, "num_workers": tcfg.num_workers, "images": len(dataset), "root": str(root)}


def bench_scan(cfg: BenchConfig) -> dict:
    """Seconds data.find_images spends on --scan-files generated 32x32 JPEGs (1000 per subfolder, in a
    temporary folder): the first scan vets every file; the second finds each in the run folder's scan
    cache. Both run with the files in the OS page cache (just written), so a cold disk is slower."""
    import io
    import tempfile

    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((32, 32), 64).convert("RGB").save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    with tempfile.TemporaryDirectory(prefix="vqgan_scan_bench_") as tmp:
        root, cache = Path(tmp) / "images", Path(tmp) / "run" / "cache" / "file_scan.json"
        for i in range(cfg.scan_files):
            if i % 1000 == 0:
                (root / f"{i // 1000:05d}").mkdir(parents=True)
            (root / f"{i // 1000:05d}" / f"{i:07d}.jpg").write_bytes(jpeg)
        times = {}
        for name in ("first_scan", "cached_scan"):
            t0 = time.perf_counter()
            n = len(data.find_images(root, cache_file=cache))
            times[name] = time.perf_counter() - t0
        assert n == cfg.scan_files
    return {"files": cfg.scan_files, **{f"{k}_seconds": v for k, v in times.items()},
            **{f"{k}_files_per_sec": cfg.scan_files / v for k, v in times.items()}}


def bench_stage_two(cfg: BenchConfig, device) -> dict | None:
    """benchmark_code_cache, or None when stage two (training_transformer.py) can't be imported."""
    try:
        import training_transformer  # noqa: F401  (its train_step is what benchmark_code_cache times)
    except ImportError:
        return None
    return benchmark_code_cache(
        steps=cfg.steps, repeats=cfg.repeats, batch_size=cfg.gpt_batch_size, device=str(device),
        seed=cfg.seed, vqgan_preset=cfg.preset, gpt_preset=cfg.gpt_preset)


def benchmark_code_cache(steps: int = 5, repeats: int = 5, batch_size: int = 16, device: str = "cpu",
                         seed: int = 0, threads: int | None = None, vqgan_preset: str = "demo",
                         gpt_preset: str = "demo") -> dict:
    """GPT training throughput on cached codes vs encoding every batch through the VQGAN encoder.

    By default both use the `demo` presets (VQGAN 64px -> 8x8 codes, GPT 4x4x128; `vqgan_preset`
    names a vqgan.PRESETS entry, `gpt_preset` a mingpt.GPT_PRESETS one), with random weights. Three
    pipelines, each `steps` training steps on batches of the demo photos:
      cached:      index the pre-encoded codes, as training_transformer.main does;
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
    from training_transformer import train_step
    torch.manual_seed(seed)
    dev = torch.device(device)
    vq_cfg = config_from_preset(vqgan_preset)
    model = VQGANTransformer(VQGAN(vq_cfg), TransformerConfig(**GPT_PRESETS[gpt_preset])).to(dev)
    model.train()
    opt = model.gpt.configure_optimizers(0.01, 3e-4, (0.9, 0.95))
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    amp = autocast(dev, "fp32")
    files = data.find_images(data.DEMO_DATA)
    dataset = data.ImageDataset(files, vq_cfg.image_size, train=True)
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


def reference_forward(gpt: GPT, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """dome272/VQGAN-pytorch's mingpt.GPT.forward (karpathy's minGPT) restated on our GPT's weights
    (same parameter names): idx (B, T) -> logits (B, T, V). Its attention is written out: scores
    masked by a (1, 1, block, block) lower-triangular buffer, softmax, times v, and each layer also
    stacks its (k, v) as `present`, which its sample() never uses. mask: that buffer."""
    B, T = idx.shape
    x = gpt.drop(gpt.tok_emb(idx) + gpt.pos_emb[:, :T])  # (B, T, C)
    for block in gpt.blocks:
        a, h = block.attn, block.ln1(x)
        C, nh = h.size(-1), block.attn.n_head
        k = a.key(h).view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        q = a.query(h).view(B, T, nh, C // nh).transpose(1, 2)
        v = a.value(h).view(B, T, nh, C // nh).transpose(1, 2)
        present = torch.stack((k, v))  # noqa: F841 (computed there on every call)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(mask[:, :, :T, :T] == 0, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        x = x + a.resid_drop(a.proj(y))
        x = x + block.mlp(block.ln2(x))
    return gpt.head(gpt.ln_f(x))  # (B, T, V)


@torch.no_grad()
def reference_sample(gpt: GPT, x: torch.Tensor, c: torch.Tensor, steps: int, temperature: float = 1.0,
                     top_k: int = 100) -> torch.Tensor:
    """The loop of dome272/VQGAN-pytorch's VQGANTransformer.sample(x, c, steps), restated: every new token
    runs reference_forward over the whole sequence so far (no cache); top-k by clone and masked
    assignment; torch.multinomial on the global RNG. c: (B, 1) start tokens, x: (B, n) given codes ->
    (B, n + steps) codes. The same weights and seed give the same tokens as GPT.generate up to
    floating-point differences (benchmark.py reports whether they matched)."""
    mask = torch.tril(torch.ones(gpt.block_size, gpt.block_size, device=x.device)).view(
        1, 1, gpt.block_size, gpt.block_size)
    x = torch.cat((c, x), dim=1)
    for _ in range(steps):
        logits = reference_forward(gpt, x, mask)[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, top_k)
            logits = logits.clone()
            logits[logits < v[..., [-1]]] = -float("inf")
        probs = F.softmax(logits, dim=-1)
        ix = torch.multinomial(probs, num_samples=1)
        x = torch.cat((x, ix), dim=1)
    return x[:, c.shape[1]:]


def bench_sampling(cfg: BenchConfig, device, precision: str) -> dict:
    """Tokens/s of sampling a full code grid: GPT.generate with the static KV cache (eager, and compiled
    with --compile), and without a cache: GPT.generate(use_cache=False) and the reference's own loop
    (reference_sample); all on the same weights and seed, also checking that the tokens agree."""
    arch = ARCH_PRESETS[cfg.preset]
    side = (cfg.image_size or arch["image_size"]) // 2 ** (len(arch["ch_mult"]) - 1)
    tokens = side * side
    size = {**GPT_PRESETS[cfg.gpt_preset], **({"n_layer": cfg.sample_n_layer} if cfg.sample_n_layer else {})}
    torch.manual_seed(cfg.seed)
    gpt = GPT(arch["num_codebook_vectors"] + 1, tokens, **size).to(device).eval().requires_grad_(False)
    start = torch.full((cfg.sample_batch_size, 1), arch["num_codebook_vectors"], dtype=torch.long, device=device)
    amp = autocast(device, precision)
    top_k = min(cfg.top_k, arch["num_codebook_vectors"] + 1)
    out = {}  # the tokens each sampler drew

    def sample(name, **kw):
        # the start token plus tokens - 1 fed-back codes fill the block exactly
        with amp:
            out[name] = gpt.generate(start, tokens, top_k=top_k, generator=torch.Generator(device).manual_seed(0),
                                     **kw)[:, 1:]

    def sample_reference():
        torch.manual_seed(0)  # the reference draws from the global RNG; seeded like the others
        with amp:
            out["reference"] = reference_sample(gpt, start[:, :0], start, tokens, top_k=top_k)

    phases = {"kv_cache": lambda: sample("kv_cache")}
    compile_s = None
    if cfg.compile:
        step = compile_decode_step(gpt)
        t0 = time.perf_counter()
        sample("kv_cache_compiled", decode_step=step)  # the first call compiles
        _sync(device)
        compile_s = time.perf_counter() - t0
        phases["kv_cache_compiled"] = lambda: sample("kv_cache_compiled", decode_step=step)
    res = measure(phases, device, cfg.warmup, cfg.repeats, cfg.sample_batch_size * tokens)
    if cfg.recompute_repeats:
        # Minutes per round at the paper's width: no warm-up, --recompute-repeats rounds, interleaved.
        slow = {"full_recompute": lambda: sample("full_recompute", use_cache=False)}
        if cfg.reference:
            slow["reference"] = sample_reference
        runs = {name: [] for name in slow}
        for _ in range(cfg.recompute_repeats):
            for name, fn in slow.items():
                runs[name].append(cfg.sample_batch_size * tokens / _timed(fn, device))
        res.update({name: {"runs": r, "median": statistics.median(r)} for name, r in runs.items()})
    for r in res.values():
        r["tokens_per_sec"] = r.pop("median")
    base = "reference" if "reference" in res else "full_recompute" if "full_recompute" in res else None
    result = {**res, "tokens_per_sample": tokens, "batch_size": cfg.sample_batch_size, "top_k": top_k,
              "gpt": size, "baseline": base, "compile_seconds": compile_s,
              "same_tokens": {name: bool(torch.equal(t, out["kv_cache"])) for name, t in out.items()
                              if name != "kv_cache"}}
    if base is not None:
        result["speedup"] = {name: res[name]["tokens_per_sec"] / res[base]["tokens_per_sec"]
                             for name in res if name != base}
    return result


# ----------------------------------------------------------------------------- report

def format_table(results: dict) -> str:
    """Aligned table of the medians, with ratios, memory and FLOP/s where measured."""
    rows = []  # (what, value, unit, extra)
    s1 = results.get("stage_one")
    if s1:
        for name in ("before_disc_start", "after_disc_start", "before_disc_start_compiled", "after_disc_start_compiled"):
            if name not in s1:
                continue
            r = s1[name]
            label = name.replace("_disc_start", " disc_start").replace("_compiled", ", compiled")
            extra = f"peak {r['peak_mem_mb']:.0f} MiB, {r['flops_per_step'] / 1e9:.1f} GFLOP/step"
            if "utilization" in r:
                extra += f", {r['tflops_per_sec']:.1f} TFLOP/s = {100 * r['utilization']:.1f}% MFU"
            if "compile_seconds" in r:
                extra += f", {r['speedup_over_eager']:.2f}x eager, compile {r['compile_seconds']:.1f} s"
            rows.append((f"stage 1 train, {label}", r["images_per_sec"], "images/s", extra))
        rows.append(("  after / before", s1["ratio_after_before"], "x", s1["perceptual"]
                     + (", channels-last" if s1.get("channels_last") else "")))
    ld = results.get("loader")
    if ld:
        note = f"{ld['num_workers']} workers, {ld['images']} images"
        if s1:
            note += f"; {ld['images_per_sec'] / s1['before_disc_start']['images_per_sec']:.1f}x the eager step's rate"
        rows.append(("stage 1 data loading only", ld["images_per_sec"], "images/s", note))
    sc = results.get("scan")
    if sc:
        rows.append((f"file scan, first ({sc['files']} files)", sc["first_scan_seconds"], "s",
                     f"{sc['first_scan_files_per_sec']:.0f} files/s, wall clock"))
        rows.append((f"file scan, cached ({sc['files']} files)", sc["cached_scan_seconds"], "s",
                     f"{sc['cached_scan_files_per_sec']:.0f} files/s, wall clock"))
    s2 = results.get("stage_two")
    if s2:
        rows.append(("stage 2 train, cached codes", s2["cached_tokens_per_sec"], "tokens/s", ""))
        rows.append(("stage 2 train, encode per batch", s2["encode_tokens_per_sec"], "tokens/s", ""))
        if "load_encode_tokens_per_sec" in s2:
            rows.append(("stage 2 train, load + encode", s2["load_encode_tokens_per_sec"], "tokens/s", ""))
        rows.append(("  cached / encode", s2["speedup"], "x", ""))
    sm = results.get("sampling")
    if sm:
        g = sm["gpt"]
        shape = (f"{g['n_layer']}x{g['n_head']}x{g['n_embd']}, batch {sm['batch_size']}, "
                 f"{sm['tokens_per_sample']} tokens, top-k {sm['top_k']}")
        labels = {"kv_cache": "static KV cache", "kv_cache_compiled": "static KV cache, compiled",
                  "full_recompute": "no cache (generate)", "reference": "reference sample()"}
        for name, label in labels.items():
            if name in sm:
                note = shape if name == "kv_cache" else ""
                if name == "kv_cache_compiled":
                    note = f"compile {sm['compile_seconds']:.1f} s"
                if name in sm["same_tokens"]:
                    note += ("; " if note else "") + ("same tokens" if sm["same_tokens"][name] else "TOKENS DIFFER")
                rows.append((f"sampling, {label}", sm[name]["tokens_per_sec"], "tokens/s", note))
        for name, ratio in sm.get("speedup", {}).items():
            rows.append((f"  {labels[name]} / {labels[sm['baseline']]}", ratio, "x", ""))
    w = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"{'benchmark':<{w}}  {'median':>10}  {'unit':<8}  notes", f"{'-' * w}  {'-' * 10}  {'-' * 8}  -----"]
    lines += [f"{a:<{w}}  {b:>10.2f}  {c:<8}  {d}".rstrip() for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv=None):
    cfg, _ = cli.parse_config(BenchConfig, argv, description=__doc__.split("\n")[0])
    cfg.validate()
    device = resolve_device(cfg.device)
    if min(cfg.steps, cfg.repeats, cfg.gpt_batch_size, cfg.sample_batch_size, cfg.top_k) < 1 or cfg.warmup < 0:
        raise UserError("--steps, --repeats, --top-k and the batch sizes must be at least 1, --warmup at least 0")
    if min(cfg.sample_n_layer, cfg.recompute_repeats, cfg.scan_files) < 0:
        raise UserError("--sample-n-layer, --recompute-repeats and --scan-files must be at least 0")
    if cfg.clock == "cpu" and device.type != "cpu":
        raise UserError(f"--clock cpu times CPU work only; on {device} use --clock wall")
    global _CLOCK
    _CLOCK = time.process_time if cfg.clock == "cpu" else time.perf_counter
    precision = resolve_precision(cfg.precision, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    results = {"device": str(device), "device_name": name, "precision": precision, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "preset": cfg.preset, "gpt_preset": cfg.gpt_preset,
               "steps": cfg.steps, "warmup": cfg.warmup, "repeats": cfg.repeats, "clock": cfg.clock}
    print(f"benchmark on {name} ({device}, {precision}, {torch.get_num_threads()} CPU threads); "
          f"preset {cfg.preset}, GPT {cfg.gpt_preset}; medians of {cfg.repeats} rounds of {cfg.steps} steps")
    if cfg.stage_one:
        results["stage_one"] = bench_stage_one(cfg, device, precision)
    if cfg.loader:
        results["loader"] = bench_loader(cfg, device)
    if cfg.scan_files:
        results["scan"] = bench_scan(cfg)
    if cfg.stage_two:
        results["stage_two"] = bench_stage_two(cfg, device)
        if results["stage_two"] is None:
            print("stage two skipped: training_transformer.py is not available", file=sys.stderr)
    if cfg.sampling:
        results["sampling"] = bench_sampling(cfg, device, precision)
    print(format_table(results))
    if cfg.json:
        print(f"wrote {cli.write_json(cfg.json, results)}")
    return results


if __name__ == "__main__":
    cli.run_main(main)
