"""Quality study: train named stage-one recipes for one budget, then evaluate each on held-out images.

    python study.py --list                                          # the recipes and what each changes
    python study.py --recipes taming,v1,v1-16x16,v1-lr2e-4-cosine,v1-betas,16x16-narrow --val-fraction 0.2
    python study.py --recipes final,final-gan-taming,final-gan --max-steps 450   # the GAN from step 300
    python study.py --recipes dome272,optim-f16 --dome272-path ~/src/VQGAN-pytorch --preset f16 \
        --extra "--image-size 64 --attn-resolutions 4 --batch-size 4" --val-fraction 0.2

Every recipe trains `training_vqgan.py` on the same train split of `--dataset-path` with the same seed,
data order and budget (`--max-steps`, and optionally `--max-seconds` of training wall time), then is
evaluated on the held-out split (`--val-fraction`, the split training itself holds out) with the
metrics of evaluate.py: PSNR and SSIM on 8-bit pixels, LPIPS-VGG, rFID and KID (InceptionV3 pool3),
and the share of the codebook used on the held-out images. Each recipe's result is saved as
<out-dir>/<recipe>/study.json and reused while its flags and budget are unchanged, so a long study can
stop and go on later (`--rerun` retrains). The table goes to stdout and <out-dir>/study.md.

A recipe may start from another's checkpoint (`fork`): a run that switches the GAN on at step S and
the same run without it then share their first S steps exactly (training resumes bit-exactly), which
halves the cost of GAN comparisons.

`dome272` runs dome272/VQGAN-pytorch's own model and training loop (from a local clone given by
--dome272-path; nothing of it is part of this project) on the same batches, through
baseline_dome272.py in a separate process, and is evaluated in the same way.
"""

import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoints
import cli
import data
import devices
import loggers
from cli import UserError, field

# taming's recipe on our code: plain codes, beta on the codebook term, lr 4.5e-6 per image (batch 8)
TAMING = ["--no-l2-normalize-codes", "--no-restart-dead-codes", "--legacy-beta", "--learning-rate", "3.6e-5",
          "--beta1", "0.5", "--beta2", "0.9", "--disc-start", "100000", "--dead-code-steps", "10",
          "--codebook-dim", "none", "--perceptual-loss-factor", "1.0", "--weight-ema-decay", "0",
          "--warmup-steps", "0", "--lr-decay", "none", "--disc-norm", "batch", "--lecam-weight", "0",
          "--gan-ramp-steps", "0", "--disc-weight", "0.8", "--adaptive-weight"]
# the defaults of this project before the study (cosine codes, restarts every 10 unused steps, lr 1e-4)
V1 = TAMING + ["--l2-normalize-codes", "--restart-dead-codes", "--no-legacy-beta", "--learning-rate", "1e-4"]
# a 16x16 token grid at 64 px (f4) at about the old 8x8 grid's cost: three levels of 64, 128, 128 channels
GRID16_NARROW = ["--ch-mult", "1", "2", "2", "--attn-resolutions", "16"]
# the optimisation changes that won at 150 steps: lr 2e-4 with 20 warmup steps and cosine decay, and
# Adam betas (0.9, 0.99)
OPTIM = ["--learning-rate", "2e-4", "--warmup-steps", "20", "--lr-decay", "cosine", "--beta1", "0.9", "--beta2", "0.99"]
FINAL = V1 + GRID16_NARROW + OPTIM
# the GAN phase: per-image (GroupNorm) discriminator, a gentler adaptive weight reached over a ramp, LeCAM
GAN = ["--disc-norm", "group", "--disc-weight", "0.1", "--gan-ramp-steps", "50", "--lecam-weight", "0.1"]


@dataclass(frozen=True)
class Recipe:
    """A named set of training_vqgan.py flags; `fork` = (recipe, step) starts from that recipe's
    checkpoint at that step (its flags up to then are the same as this one's)."""
    change: str
    flags: tuple
    fork: tuple | None = None


def _r(change: str, *flags, fork=None) -> Recipe:
    return Recipe(change, tuple(str(f) for f in flags), fork)


# One change at a time; the README's ablation table is this list's output. Each flag list is complete
# (it restates earlier changes), so changing the project's defaults never changes a recipe.
RECIPES: dict[str, Recipe] = {
    "taming": _r("taming's recipe: plain codes, legacy beta, lr 4.5e-6 x batch", *TAMING),
    "v1": _r("previous defaults: cosine codes + restarts, lr 1e-4", *V1),
    "v1-16x16": _r("v1 with a 16x16 token grid at 64 px (f4: ch_mult 1,2,4, attention at 16)",
                   *V1, "--ch-mult", 1, 2, 4, "--attn-resolutions", 16),
    "v1-lr2e-4-cosine": _r("v1 + lr 2e-4, 20 warmup steps, cosine decay to 0.1x",
                           *V1, "--learning-rate", 2e-4, "--warmup-steps", 20, "--lr-decay", "cosine"),
    "v1-betas": _r("v1 + Adam betas (0.9, 0.99)", *V1, "--beta1", 0.9, "--beta2", 0.99),
    "v1-dead50": _r("v1 + dead-code restarts after 50 unused steps (not 10)", *V1, "--dead-code-steps", 50),
    "v1-cbdim8": _r("v1 + 8-dimensional code lookup (ViT-VQGAN factorised codes)", *V1, "--codebook-dim", 8),
    # the new recipe (README: the demo preset's defaults), and the GAN switched on at step 300 of 450
    "final": _r("16x16-narrow + the optimisation changes, no GAN", *FINAL),
    "final-gan-taming": _r("final + taming's GAN from step 300: BatchNorm D, adaptive weight x 0.8, no ramp",
                           *FINAL, "--disc-start", 300, fork=("final", 300)),
    "final-gan": _r("final + GAN from step 300: GroupNorm D, adaptive weight x 0.1, 50-step ramp, LeCAM 0.1",
                    *FINAL, "--disc-start", 300, *GAN, fork=("final", 300)),
    "v1-optim": _r("v1 + both optimisation changes (lr 2e-4, warmup, cosine; betas 0.9, 0.99)", *V1, *OPTIM),
    "optim-f16": _r("the new optimisation on the f16 architecture (for the dome272 comparison)", *V1, *OPTIM),
    "16x16-narrow": _r("v1 with a 16x16 grid from three levels of 64-128-128 channels (ch_mult 1,2,2)",
                       *V1, *GRID16_NARROW),
    "16x16-narrow-dead50": _r("16x16-narrow + restarts after 50 unused steps", *V1, *GRID16_NARROW,
                              "--dead-code-steps", 50),
    "16x16-narrow-cbdim8": _r("16x16-narrow + 8-dimensional code lookup", *V1, *GRID16_NARROW,
                              "--codebook-dim", 8),
}


def recipe_flags(name: str) -> list[str]:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)} (see --list)")
    return list(RECIPES[name].flags)


@dataclass
class StudyConfig:
    """What to compare, on which images, for how long."""
    recipes: str = field("", "comma-separated recipe names (default: all that fit --max-steps; see --list)")
    list: bool = field(False, "print the recipes and exit")
    dataset_path: str = field("", "folder of images (default: the embedded demo photos)")
    out_dir: str = field("runs/study", "study folder: one run folder and study.json per recipe, study.md")
    preset: str = field("demo", "training_vqgan.py preset every recipe starts from")
    max_steps: int = field(150, "training steps per recipe")
    max_seconds: float = field(0.0, "also stop each recipe after this many seconds of training (0: no limit)")
    extra: str = field("", "flags added to every recipe, e.g. '--batch-size 4 --image-size 64'")
    val_fraction: float = field(0.1, "share of the images held out for evaluation")
    seed: int = field(0, "seed of the split, the data order and the initialisation")
    device: str = field("auto", "auto, cpu, cuda, cuda:N or mps")
    fid: str = field("auto", "FID network for rFID/KID: auto, pytorch-fid, fid-helper, or off",
                     choices=["auto", "pytorch-fid", "fid-helper", "off"])
    baseline: str = field("", "recipe the table's delta columns compare against (default: the first)")
    rerun: bool = field(False, "train and evaluate again even where a result is saved")
    dome272_path: str = field("", "local clone of dome272/VQGAN-pytorch, for the 'dome272' recipe")


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def heldout_metrics(pairs, perceptual, inception, kid_seed: int = 0) -> dict:
    """pairs: iterable of (x, x_rec), each (B, 3, H, W) in [-1, 1] -> PSNR, SSIM, LPIPS, rFID, KID.

    As evaluate.py: both images quantised to 8 bits first; rFID and KID from InceptionV3 pool3
    features of inputs vs reconstructions (KID subsets capped at the number of images)."""
    from evaluate import fid_from_features, kernel_inception_distance, psnr, ssim, to_uint8_range
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    real, rec, n = [], [], 0
    for x, x_rec in pairs:
        p, p_rec = to_uint8_range(x), to_uint8_range(x_rec)
        sums["psnr"] += psnr(p, p_rec).sum().item()
        sums["ssim"] += ssim(p, p_rec).sum().item()
        if perceptual is not None:
            sums["lpips"] += perceptual(p / 127.5 - 1, p_rec / 127.5 - 1).sum().item()
        if inception is not None:
            real.append(inception(p / 127.5 - 1).cpu())
            rec.append(inception(p_rec / 127.5 - 1).cpu())
        n += len(x)
    out = {"psnr": sums["psnr"] / n, "ssim": sums["ssim"] / n,
           "lpips": sums["lpips"] / n if perceptual is not None else None, "rfid": None, "kid": None,
           "num_images": n}
    if inception is not None and n >= 2:
        real, rec = torch.cat(real).numpy(), torch.cat(rec).numpy()
        out["rfid"] = fid_from_features(real, rec)
        out["kid"], _ = kernel_inception_distance(real, rec, 100, n, kid_seed)
    return out


def heldout_images(cfg: StudyConfig, image_size: int) -> tuple[list, torch.Tensor]:
    """The held-out files (the split training_vqgan.py holds out) and their centre crops (N, 3, S, S)."""
    root = Path(cfg.dataset_path).expanduser() if cfg.dataset_path else data.DEMO_DATA
    _, val = data.split_files(data.find_images(root), cfg.val_fraction, cfg.seed)
    if not val:
        raise UserError(f"--val-fraction {cfg.val_fraction} holds out no image of {root}; raise it")
    ds = data.ImageDataset(val, image_size, train=False)
    return val, torch.stack([ds[i][0] for i in range(len(ds))])


# ----------------------------------------------------------------------------- running recipes

def _base_flags(cfg: StudyConfig, run_dir: Path) -> list[str]:
    flags = ["--preset", cfg.preset, "--out-dir", str(run_dir), "--seed", str(cfg.seed),
             "--val-fraction", str(cfg.val_fraction), "--epochs", "0", "--max-steps", str(cfg.max_steps),
             "--max-seconds", str(cfg.max_seconds), "--num-workers", "0", "--device", cfg.device,
             "--sample-every", "100000000", "--log-every", "10"]
    if cfg.dataset_path:
        flags += ["--dataset-path", cfg.dataset_path]
    return flags + cfg.extra.split()


def train_recipe(cfg: StudyConfig, name: str, run_dir: Path) -> tuple[float, float]:
    """Train one recipe into run_dir; returns its wall and CPU (process) time in seconds, its own steps
    only. CPU time is what a one-thread run costs whatever else shares the machine."""
    import training_vqgan
    recipe = RECIPES[name]
    last = run_dir / "checkpoints" / "vqgan_last.pt"
    if last.exists() and not cfg.rerun and checkpoints.load_checkpoint(last)["step"] >= cfg.max_steps:
        print(f"{name}: reusing the finished run in {run_dir} (its training time is not known)")
        return None, None
    flags = _base_flags(cfg, run_dir) + list(recipe.flags)
    forks = [r.fork[1] for r in RECIPES.values() if r.fork and r.fork[0] == name]
    if forks:  # keep the checkpoints the recipes forking from this one start from
        flags += ["--save-every", str(math.gcd(*forks)), "--keep-checkpoints", "0"]
    if recipe.fork:
        parent, at = recipe.fork
        src = Path(cfg.out_dir) / parent / "checkpoints" / f"vqgan_step{at:07d}.pt"
        if not src.exists():
            run_study(cfg, [parent])
        if not src.exists():
            raise UserError(f"recipe {name} starts from {parent} at step {at}, but {src} was not written "
                            f"(did {parent} stop early? --max-seconds); rerun {parent} with --rerun")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "vqgan_last.pt").write_bytes(src.read_bytes())
        flags += ["--resume"]
    t0, c0 = time.perf_counter(), time.process_time()
    training_vqgan.main(flags)
    return time.perf_counter() - t0, time.process_time() - c0


def evaluate_recipe(cfg: StudyConfig, run_dir: Path, perceptual, inception) -> dict:
    """Held-out metrics of run_dir's checkpoint (its EMA weights when it kept them) and a grid."""
    from vqgan import load_vqgan
    device = devices.resolve_device(cfg.device)
    model = load_vqgan(run_dir / "checkpoints" / "vqgan_last.pt", device)
    _, x = heldout_images(cfg, model.config.image_size)
    recs, counts = [], torch.zeros(model.config.num_codebook_vectors, dtype=torch.long)
    with torch.no_grad():
        for xb in x.split(16):
            x_rec, idx, _ = model(xb.to(device))
            recs.append(x_rec.float().clamp(-1, 1).cpu())
            counts += torch.bincount(idx.flatten().cpu(), minlength=len(counts))
    x_rec = torch.cat(recs)
    loggers.save_grid([x[:8], x_rec[:8]], run_dir / "heldout.png")
    out = heldout_metrics(zip(x.split(16), x_rec.split(16)), perceptual, inception, cfg.seed)
    out["codebook_usage"] = (counts > 0).double().mean().item()
    return out


def run_dome272(cfg: StudyConfig, run_dir: Path) -> tuple:
    """Train dome272/VQGAN-pytorch's model with its loop on this study's batches (baseline_dome272.py,
    another process, so its modules don't meet ours); returns its held-out reconstructions' pairs."""
    if not cfg.dome272_path or not (Path(cfg.dome272_path).expanduser() / "vqgan.py").is_file():
        raise UserError("the 'dome272' recipe needs --dome272-path, a local clone of dome272/VQGAN-pytorch")
    import training_vqgan
    from lpips import resolve_vgg16_state_dict
    tcfg, _ = cli.parse_config(training_vqgan.TrainConfig, _base_flags(cfg, run_dir),
                                 training_vqgan.TRAIN_PRESETS)
    root = Path(cfg.dataset_path).expanduser() if cfg.dataset_path else data.DEMO_DATA
    train_files, _ = data.split_files(data.find_images(root), cfg.val_fraction, cfg.seed)
    train_set = data.ImageDataset(train_files, tcfg.image_size, train=True)
    # the very batches our runs see: same sampler, seeds and augmentation
    batches, epoch = [], 0
    while len(batches) < cfg.max_steps:
        loader = training_vqgan.make_loader(train_set, tcfg, epoch)
        batches += [x for x, _ in loader][: cfg.max_steps - len(batches)]
        epoch += 1
    _, heldout = heldout_images(cfg, tcfg.image_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        vgg, _ = resolve_vgg16_state_dict()
        torch.save(vgg, Path(tmp) / "vgg16_features.pt")
        torch.save({"batches": torch.stack(batches), "heldout": heldout}, Path(tmp) / "data.pt")
        cmd = [sys.executable, str(Path(__file__).with_name("baseline_dome272.py")),
               "--repo", str(Path(cfg.dome272_path).expanduser()), "--data", str(Path(tmp) / "data.pt"),
               "--vgg", str(Path(tmp) / "vgg16_features.pt"), "--out", str(run_dir / "heldout_rec.pt"),
               "--latent-dim", str(tcfg.latent_dim), "--num-codebook-vectors", str(tcfg.num_codebook_vectors),
               "--max-seconds", str(cfg.max_seconds), "--device", str(devices.resolve_device(cfg.device))]
        if subprocess.run(cmd).returncode != 0:
            raise UserError("baseline_dome272.py failed (its output is above)")
    res = torch.load(run_dir / "heldout_rec.pt", weights_only=True)
    loggers.save_grid([heldout[:8], res["rec"][:8]], run_dir / "heldout.png")
    pairs = zip(heldout.split(16), res["rec"].split(16))
    return (pairs, (res["train_seconds"], res.get("train_cpu_seconds")), res["steps"], res["indices"],
            tcfg.num_codebook_vectors)


def run_study(cfg: StudyConfig, names: list[str]) -> dict:
    """Train and evaluate each recipe not yet saved with the same flags and budget; return all results."""
    out = Path(cfg.out_dir)
    perceptual = inception = None
    results = {}
    for name in names:
        run_dir = out / name
        key = {"recipe": name, "flags": list(RECIPES[name].flags) if name in RECIPES else [],
               "fork": RECIPES[name].fork if name in RECIPES else None, "base": _base_flags(cfg, Path("."))}
        saved = run_dir / "study.json"
        if saved.exists() and not cfg.rerun:
            prev = json.loads(saved.read_text())
            if prev.get("key") == json.loads(json.dumps(key)):
                results[name] = prev
                continue
        if perceptual is None:
            perceptual, inception = _metric_nets(cfg)
        print(f"== recipe {name}", flush=True)
        if name == "dome272":
            pairs, seconds, steps, idx, k = run_dome272(cfg, run_dir)
            metrics = heldout_metrics(pairs, perceptual, inception, cfg.seed)
            metrics["codebook_usage"] = idx.unique().numel() / k
        else:
            seconds = train_recipe(cfg, name, run_dir)
            metrics = evaluate_recipe(cfg, run_dir, perceptual, inception)
            steps = checkpoints.load_checkpoint(run_dir / "checkpoints" / "vqgan_last.pt")["step"]
        results[name] = {"key": key, "steps": steps, "train_seconds": seconds[0], "train_cpu_seconds": seconds[1],
                         **metrics}
        cli.write_json(saved, results[name])
    return results


def _metric_nets(cfg: StudyConfig):
    from evaluate import load_inception
    from lpips import LPIPS, LPIPSWeightsError
    device = devices.resolve_device(cfg.device)
    try:
        perceptual = LPIPS().to(device)
    except LPIPSWeightsError as e:
        raise UserError(str(e)) from None
    inception, why = load_inception(cfg.fid, device)
    if inception is None:
        print(f"rFID/KID skipped: {why}", file=sys.stderr)
    return perceptual, inception


def format_table(results: dict, names: list[str], baseline: str) -> str:
    """Markdown table of the results, with PSNR and LPIPS deltas against `baseline`."""
    base = results.get(baseline, {})
    head = ("| recipe | change | steps | train s | CPU s | PSNR | ΔPSNR | SSIM | LPIPS | LPIPS ratio | rFID | KID×1000 "
            "| usage |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(v, fmt):
        return "n/a" if v is None else fmt.format(v)
    for name in names:
        r = results[name]
        d_psnr = r["psnr"] - base["psnr"] if base else None
        ratio = r["lpips"] / base["lpips"] if base and r.get("lpips") and base.get("lpips") else None
        change = RECIPES[name].change if name in RECIPES else "dome272/VQGAN-pytorch's model and loop"
        lines.append(f"| {name} | {change} | {r['steps']} | {f(r['train_seconds'], '{:.0f}')} | "
                     f"{f(r.get('train_cpu_seconds'), '{:.0f}')} | {r['psnr']:.2f} | "
                     f"{f(d_psnr, '{:+.2f}')} | {r['ssim']:.3f} | {f(r['lpips'], '{:.3f}')} | "
                     f"{f(ratio, '{:.2f}')} | {f(r['rfid'], '{:.1f}')} | "
                     f"{f(r['kid'] * 1000 if r['kid'] is not None else None, '{:.1f}')} | "
                     f"{100 * r['codebook_usage']:.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    cfg, _ = cli.parse_config(StudyConfig, argv, description=__doc__.split("\n")[0])
    if cfg.list:
        for name, r in RECIPES.items():
            fork = f" (from {r.fork[0]} at step {r.fork[1]})" if r.fork else ""
            print(f"{name:24s} {r.change}{fork}")
        print(f"{'dome272':24s} dome272/VQGAN-pytorch's model and loop (needs --dome272-path)")
        return None
    names = ([n.strip() for n in cfg.recipes.split(",") if n.strip()]
             or [n for n, r in RECIPES.items() if not r.fork or r.fork[1] < cfg.max_steps])
    for n in names:
        if n != "dome272":
            recipe_flags(n)
    if cfg.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {cfg.max_steps}")
    for n in names:
        if n in RECIPES and RECIPES[n].fork and RECIPES[n].fork[1] >= cfg.max_steps:
            raise UserError(f"recipe {n} starts from {RECIPES[n].fork[0]} at step {RECIPES[n].fork[1]}: "
                            f"give --max-steps above that (e.g. 450), or leave {n} out of --recipes")
    if "dome272" in names and not (Path(cfg.dome272_path).expanduser() / "vqgan.py").is_file():
        raise UserError("the 'dome272' recipe needs --dome272-path, a local clone of dome272/VQGAN-pytorch")
    owned = {"--seed", "--val-fraction", "--dataset-path", "--out-dir", "--max-steps", "--epochs", "--resume"}
    if clash := sorted(owned & {f.split("=")[0] for f in cfg.extra.split()}):
        raise UserError(f"--extra may not set {', '.join(clash)}: study.py sets them itself (use its own flags)")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    baseline = cfg.baseline or names[0]
    if baseline not in names:
        raise UserError(f"--baseline {baseline!r} is not among --recipes")
    results = run_study(cfg, names)
    table = format_table(results, names, baseline)
    print(table)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "study.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    cli.run_main(main)
