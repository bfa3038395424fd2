"""Shared plumbing: image folders, config flags from dataclasses, devices and precision, checkpoints,
RNG state, logging and image grids."""

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.utils import save_image

REPO_ROOT = Path(__file__).resolve().parent
DEMO_DATA = REPO_ROOT / "data" / "demo"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class UserError(Exception):
    """A problem with the user's input; scripts print it on one line and exit with code 2."""


def run_main(main_fn, argv=None):
    """Call a script's main, turning UserError into a one-line message and exit code 2."""
    try:
        return main_fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- images

def find_images(root) -> list[Path]:
    """All image files below root (recursive, sorted, hidden files and folders skipped)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"dataset folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise UserError(f"dataset path {str(root)!r} is not a folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {str(root)!r}")
    return files


def class_names(root, files: list[Path]) -> list[str]:
    """Per file, its first-level subfolder under root ('' for images directly in root)."""
    root = Path(root).expanduser()
    return [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]


def load_image(path) -> Image.Image:
    """Open any image as RGB: EXIF orientation applied, first frame, transparency composited on white."""
    with Image.open(path) as img:
        img.seek(0)
        img = ImageOps.exif_transpose(img)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale: rescale to 8 bits rather than clipping at 255
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray((arr / max(arr.max(), 1.0) * 255.0).round().astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        return img.convert("RGB")


class ImageDataset(Dataset):
    """Images as (3, S, S) tensors in [-1, 1], with an integer label per file.

    Shorter side scaled to S, then a random crop + horizontal flip (train) or a centre crop (eval).
    Items may be requested as `index` or `(index, seed)`: with a seed the crop and flip are drawn from
    it, so augmentation does not depend on which worker loads the image (exact resume).
    A file that fails to load is replaced by the next one and counted in `num_failed`.
    """

    def __init__(self, files, image_size: int, train: bool, labels: list[int] | None = None):
        self.files = list(files)
        self.labels = list(labels) if labels is not None else [0] * len(self.files)
        self.image_size, self.train = image_size, train
        self.num_failed = 0
        self.resize = transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC,
                                        antialias=True)
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def __len__(self) -> int:
        return len(self.files)

    def _augment(self, img: Image.Image, seed: int | None) -> torch.Tensor:
        img = self.resize(img)
        w, h = img.size
        s = self.image_size
        if self.train:
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            top = int(torch.randint(0, h - s + 1, (1,), generator=g))
            left = int(torch.randint(0, w - s + 1, (1,), generator=g))
            flip = bool(torch.rand(1, generator=g) < 0.5)
        else:
            top, left, flip = (h - s) // 2, (w - s) // 2, False
        img = img.crop((left, top, left + s, top + s))
        if flip:
            img = ImageOps.mirror(img)
        return self.to_tensor(img).clamp_(-1, 1)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        for attempt in range(len(self.files)):
            j = (i + attempt) % len(self.files)
            try:
                img = load_image(self.files[j])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                self.num_failed += 1
                if self.num_failed <= 5:
                    print(f"warning: skipping unreadable image {self.files[j]}: {e}", file=sys.stderr)
                continue
            return self._augment(img, seed), self.labels[j]
        raise UserError("no image in the data set could be loaded")


def split_files(files: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/validation split; at least one validation image when there are two or more."""
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(files) * val_fraction)) if len(files) > 1 else 0
    if val_fraction > 0 and len(files) > 1:
        n_val = max(n_val, 1)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [files[i] for i in train], [files[i] for i in val]


def seed_worker(worker_id: int):
    """DataLoader worker init: seed numpy/random from the worker's torch seed."""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


# ----------------------------------------------------------------------------- config flags

def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    """Flags `--field-name` for every field of a dataclass. Flags not given are absent from the
    namespace, so presets can fill them in."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f"{helptext} (default: {default})" if helptext else f"(default: {default})"
        helptext = helptext.replace("%", "%%")
        kw = dict(help=helptext, dest=f.name)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is tuple:
            elem = typing.get_args(tp)[0]
            parser.add_argument(flag, nargs="*", type=elem, metavar=elem.__name__.upper(), **kw)
        else:
            def conv(s, tp=tp, optional=optional):
                if optional and s.lower() in ("none", "null", ""):
                    return None
                return tp(s)
            conv.__name__ = tp.__name__
            parser.add_argument(flag, type=conv, metavar=tp.__name__.upper(), **kw)
    return parser


def parse_config(cls, argv, presets: dict[str, dict] | None = None, description: str = ""):
    """Build a config dataclass from command-line flags: defaults < preset < explicit flags.

    Unknown flags are rejected by argparse (exit code 2)."""
    parser = build_parser(cls, description)
    given = vars(parser.parse_args(argv))
    values = {}
    if presets is not None:
        default_preset = next(f.default for f in dataclasses.fields(cls) if f.name == "preset")
        name = given.get("preset", default_preset)
        if name not in presets:
            parser.error(f"unknown preset {name!r}; choose from {', '.join(presets)}")
        values.update(presets[name])
    values.update(given)
    return cls(**values), set(given)


def field(default, help: str = "", **metadata):
    """A dataclass field with help text for its flag."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def config_dict(config) -> dict:
    """A dataclass as a dict of builtins (tuples become lists): JSON- and weights_only-safe."""
    out = {}
    for k, v in dataclasses.asdict(config).items():
        out[k] = list(v) if isinstance(v, tuple) else (str(v) if isinstance(v, Path) else v)
    return out


# ----------------------------------------------------------------------------- devices, precision

def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"invalid --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} asked for MPS, but it is not available; use --device auto or cpu")
    return device


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on CUDA (when supported) and fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """The one autocast context of a training step (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- RNG and checkpoints

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG a training step draws from, as tensors and builtins (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(obj: dict, path):
    """Write atomically: a temp file beside the target, flushed to disk, then os.replace.

    A crash at any moment leaves either the old or the new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load with weights_only=True: a checkpoint can never run code on load."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError for truncated zips, ...
        raise UserError(f"could not load checkpoint {str(path)!r} safely (weights_only=True): "
                        f"{str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {str(path)!r} is not a dict checkpoint")
    return ckpt


# ----------------------------------------------------------------------------- logging and grids

class RunLogger:
    """Rank-0 logging: messages to stdout and <out>/log.txt, metrics to <out>/results/metrics.jsonl."""

    def __init__(self, out_dir, stage: str, enabled: bool = True):
        self.out_dir, self.stage, self.enabled = Path(out_dir), stage, enabled
        self.results = self.out_dir / "results"
        self.metrics_path = self.results / "metrics.jsonl"
        if enabled:
            self.results.mkdir(parents=True, exist_ok=True)

    def log(self, msg: str):
        if not self.enabled:
            return
        from tqdm import tqdm
        tqdm.write(msg)
        with open(self.out_dir / "log.txt", "a") as f:
            f.write(msg + "\n")

    def metrics(self, record: dict):
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"stage": self.stage, **record}) + "\n")

    def truncate_after(self, step: int):
        """On resume, drop this stage's records past the resumed step so the file reads as one run."""
        if not self.enabled or not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not (r.get("stage") == self.stage and r.get("step", 0) > step):
                keep.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in keep))


def save_grid(rows: list[torch.Tensor], path, nrow: int | None = None):
    """Stack equal-sized image batches (each (B, 3, H, W) in [-1, 1]) as grid rows, mapped to [0, 1]."""
    images = torch.cat([r.detach().float().cpu() for r in rows])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow or rows[0].shape[0], normalize=True, value_range=(-1, 1), padding=2)
