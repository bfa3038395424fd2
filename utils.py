"""Shared plumbing: image folders, config flags from dataclasses, devices and precision, checkpoints,
RNG state, logging and image grids."""

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import random
import struct
import sys
import types
import typing
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.utils import save_image

REPO_ROOT = Path(__file__).resolve().parent
DEMO_DATA = REPO_ROOT / "data" / "demo"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SCAN_PROGRESS_MIN_FILES = 2000  # folders with more candidate files get a progress bar while scanned
# Pillow refuses images over Image.MAX_IMAGE_PIXELS (~89M pixels) as possible decompression bombs;
# VQGAN_MAX_IMAGE_PIXELS=N raises (or, with 0, removes) that limit for folders of trusted huge images.
if os.environ.get("VQGAN_MAX_IMAGE_PIXELS"):
    Image.MAX_IMAGE_PIXELS = int(os.environ["VQGAN_MAX_IMAGE_PIXELS"]) or None


class UserError(Exception):
    """A problem with the user's input; scripts print it on one line and exit with code 2."""


def run_main(main_fn, argv=None):
    """Call a script's main, turning UserError into a one-line message and exit code 2."""
    try:
        return main_fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        cleanup_distributed()  # a torchrun process that stops on an error still leaves its group cleanly


# ----------------------------------------------------------------------------- images

def find_images(root, check: bool = True, cache_file=None) -> list[Path]:
    """All usable image files below root (recursive, sorted, hidden files and folders skipped).

    With `check`, each file is vetted once by `check_image` (header plus a look at the file's end, see
    there), in a few threads and with a progress bar on large folders. Files that fail are left out
    with one summary warning on stderr; a folder with no usable image is a UserError.

    cache_file (a JSON path in the run folder, or None): the verdicts of an earlier scan of the same
    root, one per file keyed by its relative name, size, mtime and ctime (nanoseconds, from os.scandir);
    only files that are new or whose key changed are vetted again, removed files drop out, and the file
    is rewritten. So a second start or a resume on a large folder only lists and stats it."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"dataset folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise UserError(f"dataset path {str(root)!r} is not a folder")
    listed = _list_images(root)  # [(path, key)]
    files = [p for p, _ in listed]
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {str(root)!r}")
    if not check:
        return files
    known = _read_scan_cache(cache_file, root) if cache_file else {}
    rel = [p.relative_to(root).as_posix() for p in files]
    todo = [i for i, (r, (_, key)) in enumerate(zip(rel, listed)) if known.get(r, (None,))[0] != key]
    fresh = dict(zip(todo, _scan([files[i] for i in todo]))) if todo else {}
    reasons = [fresh[i] if i in fresh else known[r][1] for i, r in enumerate(rel)]
    if cache_file and (todo or len(known) != len(rel)):
        _write_scan_cache(cache_file, root, {r: [key, why] for r, (_, key), why in zip(rel, listed, reasons)})
    bad = [(p, r) for p, r in zip(files, reasons) if r is not None]
    good = [p for p, r in zip(files, reasons) if r is None]
    if not good:
        raise UserError(f"no usable image in {str(root)!r}: all {len(files)} image files were skipped, e.g. "
                        + "; ".join(f"{p} ({r})" for p, r in bad[:3]))
    if bad:
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:5])
        print(f"warning: skipped {len(bad)} of {len(files)} image files in {root}: {shown}"
              + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""), file=sys.stderr)
    return good


def _list_images(root: Path) -> list[tuple[Path, list[int]]]:
    """(path, [size, mtime_ns, ctime_ns]) of every candidate image below root, in os.walk's top-down
    order with names sorted; symlinked folders are followed. A file whose stat fails (a broken link)
    gets key [-1, 0, 0], so check_image reports it."""
    out, dirs = [], []
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            if e.is_dir():
                dirs.append(Path(e.path))
                continue
        except OSError:
            pass
        if Path(e.name).suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            st = e.stat()
            key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        except OSError:
            key = [-1, 0, 0]
        out.append((Path(e.path), key))
    for d in dirs:
        out += _list_images(d)
    return out


# Bump when check_image's verdicts change, so cached verdicts of the old version are not reused.
SCAN_CACHE_VERSION = 1


def _scan_cache_header(root: Path) -> dict:
    """What the cached verdicts also depend on besides the files: the checker and Pillow's size limit."""
    return {"version": SCAN_CACHE_VERSION, "root": str(root.resolve()), "max_image_pixels": Image.MAX_IMAGE_PIXELS}


def _read_scan_cache(path, root: Path) -> dict:
    """{relative name: (key, reason)} from a scan cache of this root, or {} when there is none or it
    belongs to another root, checker version or size limit, or is unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        if {k: data.get(k) for k in ("version", "root", "max_image_pixels")} != _scan_cache_header(root):
            return {}
        return {r: (key, why) for r, key, why in data["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_scan_cache(path, root: Path, entries: dict):
    """Write the verdicts atomically (temp file, then os.replace); a read-only run folder only warns."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**_scan_cache_header(root),
                                   "files": [[r, key, why] for r, (key, why) in entries.items()]}))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"warning: could not write the file scan cache {path} ({e.strerror}); the next start scans "
              "the folder again", file=sys.stderr)


def _scan(files: list[Path]) -> list[str | None]:
    """check_image over files, in threads (mostly waiting on the disk), with a bar on large folders."""
    from tqdm import tqdm

    Image.init()  # register Pillow's plugins once, before the threads
    bar = tqdm(total=len(files), desc="scanning images", unit="file", dynamic_ncols=True,
               disable=len(files) <= SCAN_PROGRESS_MIN_FILES)
    with warnings.catch_warnings():
        # check_image reports images over the decompression-bomb limit itself, naming the file
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            reasons = []
            for r in pool.map(check_image, files, chunksize=64):
                reasons.append(r)
                bar.update(1)
    bar.close()
    return reasons


def _tail_looks_truncated(path: Path, fmt: str, size: int) -> bool:
    """True when the file does not end the way its format must: JPEG with its EOI marker, PNG with
    IEND, GIF with its trailer; WebP and BMP shorter than their headers' declared sizes. Reads at
    most 64 bytes from each end. Other formats (TIFF) are not checked here."""
    with open(path, "rb") as f:
        head = f.read(64)
        f.seek(max(0, size - 64))
        tail = f.read()
    end = tail.rstrip(b"\0\r\n ")  # some writers pad files after the last marker
    if fmt == "JPEG":
        return not end.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" not in tail
    if fmt == "GIF":
        return not end.endswith(b";")
    if fmt == "WEBP" and len(head) >= 8:
        return struct.unpack("<I", head[4:8])[0] + 8 > size
    if fmt == "BMP" and len(head) >= 6:
        return struct.unpack("<I", head[2:6])[0] > size
    return False


def check_image(path) -> str | None:
    """Why a file is not a usable image ('empty file', 'not an image', 'truncated or corrupt: ...',
    'unreadable: ...', over the decompression-bomb limit), or None when it looks fine.

    Cheap by design, as it runs on every file of a folder: it reads the header (Image.open decodes
    no pixels) and the file's last bytes. Only a file whose end looks cut off (see
    _tail_looks_truncated) is decoded to confirm, JPEGs at 1/8 scale. Damage in the middle of a file
    with an intact end passes here and is caught when the image is loaded (ImageDataset replaces it)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and w * h > limit:
                return _bomb_message(f"{w}x{h} = {w * h} pixels")
            if _tail_looks_truncated(path, img.format, size):
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                img.load()  # raises on a truncated file
    except Image.DecompressionBombError as e:
        return _bomb_message(str(e).split(" exceeds")[0].replace("Image size ", ""))
    except FileNotFoundError:
        return "unreadable: missing (a broken link?)"
    except PermissionError as e:
        return f"unreadable: {e.strerror}"
    except Image.UnidentifiedImageError:
        return "not an image"
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad data
        return f"truncated or corrupt: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def _bomb_message(what: str) -> str:
    return (f"{what} is over Pillow's decompression-bomb limit Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS}; downscale it, or set VQGAN_MAX_IMAGE_PIXELS to a larger number "
            "(0: no limit) if you trust the file")


def class_names(root, files: list[Path]) -> list[str]:
    """Per file, its first-level subfolder under root ('' for images directly in root)."""
    root = Path(root).expanduser()
    return [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]


def load_image(path) -> Image.Image:
    """Open any image as RGB: first frame, EXIF orientation applied, then converted by to_rgb."""
    with Image.open(path) as img:
        img.seek(0)
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # a malformed EXIF block: the pixels are fine, keep them unrotated
            img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB. 16- and 32-bit greyscale ('I;16*', 'I') map 0..65535 to 0..255
    with a fixed scale (a dark image stays dark); transparency (alpha, or a palette/colour-key
    'transparency') is composited on white; CMYK, YCbCr, 1-bit and the rest via Pillow's convert."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)  # (H, W); 'I' is taken to hold 16-bit data, as PNG/TIFF give
        img = Image.fromarray(np.clip(arr / 257.0, 0, 255).round().astype(np.uint8), "L")
    if img.mode == "La":  # premultiplied alpha; Pillow converts it only to LA
        img = img.convert("LA")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


class ImageDataset(Dataset):
    """Images as (3, S, S) tensors in [-1, 1], with an integer label per file.

    Shorter side scaled to S, then a random crop + horizontal flip (train) or a centre crop (eval).
    Items may be requested as `index` or `(index, seed)`: with a seed the crop and flip are drawn from
    it, so augmentation does not depend on which worker loads the image (exact resume).
    A file that fails to load (it turned bad after find_images vetted it, or is damaged in a way the
    cheap scan can't see) is replaced by the next one and counted in `num_failed`. DataLoader workers
    each count in their own copy, so every failure is also printed as a warning (once per file and
    process), naming the file, its replacement and the count so far.
    """

    def __init__(self, files, image_size: int, train: bool, labels: list[int] | None = None):
        self.files = list(files)
        self.labels = list(labels) if labels is not None else [0] * len(self.files)
        self.image_size, self.train = image_size, train
        self.num_failed = 0
        self._warned: set[int] = set()
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
            except Exception as e:  # Pillow raises OSError, SyntaxError, struct.error... on damaged files
                self.num_failed += 1
                if j not in self._warned:
                    self._warned.add(j)
                    nxt = self.files[(j + 1) % len(self.files)]
                    print(f"warning: could not load {self.files[j]} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); using {nxt} instead "
                          f"({self.num_failed} failed loads in process {os.getpid()})", file=sys.stderr)
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
        if "(default" not in helptext and "(required)" not in helptext:  # help that explains its default keeps it
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


def resumed_config(cfg, given: set, saved: dict, fixed: tuple, what: str):
    """The saved run's config (a dict), updated with the flags given now; a given flag that changes
    one of `fixed` (the architecture, the data) is refused with a message naming each difference."""
    now = config_dict(cfg)
    changed = [k for k in given if k in fixed and k in saved and now[k] != saved[k]]
    if changed:
        diffs = ", ".join(f"{k}: checkpoint {saved[k]!r} vs flag {now[k]!r}" for k in changed)
        raise UserError(f"--resume with a different {what} ({diffs}); drop those flags or use a new --out-dir")
    fields = {f.name for f in dataclasses.fields(cfg)}
    values = {k: v for k, v in saved.items() if k in fields}
    values.update({k: getattr(cfg, k) for k in given})
    return type(cfg)(**values)


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


def setup_cuda_math(device: torch.device, tf32: bool, cudnn_benchmark: bool = False):
    """On CUDA: TF32 tensor cores for fp32 matmuls and convolutions (inputs rounded to 10 mantissa bits,
    fp32 accumulation: NVIDIA's default for cuDNN convolutions, and PyTorch's for matmuls before 1.12)
    or full IEEE fp32; and whether cuDNN times its convolution algorithms once per input shape.
    Process-wide settings; nothing happens on other devices."""
    if device.type != "cuda":
        return
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
    torch.backends.cudnn.benchmark = cudnn_benchmark


def compile_module(module: torch.nn.Module):
    """torch.compile(module) for a training step: a wrapper sharing the module's parameters (save from the
    module itself: its state-dict keys have no "_orig_mod." prefix). fallback_random: random ops
    (dropout, stage two's pkeep noise) draw from the global RNG exactly as in eager mode, so compiled and
    eager runs see the same random numbers and a run resumes the same with or without --compile."""
    return torch.compile(module, options={"fallback_random": True})


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


def restore_progress(ckpt: dict, rank: int, world: int, seed: int) -> tuple[int, int, int, int]:
    """Step, epoch, samples seen in the epoch and the saved global batch of a training checkpoint, with
    this rank's RNG restored (a fresh per-rank stream when it was saved on another process count)."""
    step, epoch = ckpt["step"], ckpt["epoch"]
    saved_batch = ckpt.get("global_batch", ckpt["config"]["batch_size"])  # older files: one process
    samples_in_epoch = ckpt.get("samples_in_epoch", ckpt.get("batch_in_epoch", 0) * saved_batch)
    rng_ranks = ckpt.get("rng_ranks", [])
    if rank == 0:
        set_rng_state(ckpt["rng"])
    elif len(rng_ranks) == world - 1:
        set_rng_state(rng_ranks[rank - 1])
    else:
        seed_everything(seed + rank + 1_000_003 * step)
    return step, epoch, samples_in_epoch, saved_batch


def write_json(path, obj):
    """Write obj as indented JSON, creating the folder; used for --json outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def save_checkpoint(obj: dict, path):
    """Write atomically: a temp file beside the target, flushed to disk, then os.replace.

    A crash at any moment (kill -9 included) leaves either the old or the new file, never a partial
    one; temp files left by dead processes are removed at the next save. A full disk (ENOSPC/EDQUOT)
    removes the partial temp file and raises a UserError saying the previous checkpoint is intact:
    training stops there rather than running on with nowhere to save its progress."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = (f"the previous checkpoint {path} is intact" if path.exists()
                    else f"there is no earlier checkpoint at {path}")
            raise UserError(f"disk full while saving {path} ({e.strerror}); removed the partial file, {kept}. "
                            "Free some space, then run again (training: add --resume)") from None
        raise
    _remove_stale_temps(path)


def _remove_stale_temps(path: Path):
    """Delete `.<name>.tmp<pid>` files beside path whose writing process no longer runs (killed mid-save)."""
    if os.name != "posix":
        return
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # alive, but another user's
            pass


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


# ----------------------------------------------------------------------------- distributed (torchrun)

@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job; rank 0 of 1 for a plain `python script.py`."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owner: bool = False  # True when setup_distributed started the process group (and cleanup ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK, or stay one process.

    Without RANK in the environment nothing happens. Under torchrun a CUDA run uses NCCL on
    cuda:LOCAL_RANK; everything else uses gloo. A process group already started by the caller (a test
    harness) is used as it is and left to the caller to end."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
            torch.cuda.set_device(device)
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()), device
    if "RANK" not in os.environ:
        return DistInfo(), device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    global _OWNS_GROUP
    _OWNS_GROUP = True
    return DistInfo(rank, local_rank, world_size, owner=True), device


_OWNS_GROUP = False  # setup_distributed started the process group, so cleanup_distributed ends it


def cleanup_distributed():
    """End the process group that setup_distributed started (no-op otherwise, e.g. a test's own group)."""
    import torch.distributed as dist

    global _OWNS_GROUP
    if _OWNS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_GROUP = False


def _dist():
    """torch.distributed when a process group is running, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _comm_device(like: torch.device) -> torch.device:
    """NCCL only moves CUDA tensors; gloo only CPU ones."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier():
    """Wait for every rank (no-op in one process)."""
    if (dist := _dist()) is not None:
        dist.barrier()


def all_reduce_(t: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Sum (or average) t over ranks, in place; t unchanged in one process."""
    if (dist := _dist()) is None:
        return t
    x = t.to(_comm_device(t.device))
    dist.all_reduce(x)
    if mean:
        x = x / dist.get_world_size()
    t.copy_(x)
    return t


def all_reduce_mean(values: dict) -> dict:
    """{name: float or scalar tensor} -> {name: float}, averaged over ranks in one all-reduce."""
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if (dist := _dist()) is not None:
        t = t.to(_comm_device(t.device))
        dist.all_reduce(t)
        t = t.cpu() / dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a stop request, a non-finite step)."""
    if (dist := _dist()) is None:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=_comm_device(torch.device("cpu")))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's t along dim 0 in rank order (first dims may differ); t itself in one process."""
    if (dist := _dist()) is None:
        return t
    dev, dtype = t.device, t.dtype
    x = t.to(_comm_device(dev))
    if dtype == torch.int16:
        x = x.int()  # neither NCCL nor gloo reduces or gathers 16-bit integers everywhere
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    n_max = int(max(s.item() for s in sizes))
    padded = torch.zeros((n_max, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(dev, dtype)


def all_gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] (a one-element list in one process)."""
    if (dist := _dist()) is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module_state(module: torch.nn.Module):
    """Copy rank 0's parameters and buffers into every rank's module, in place.

    DDP broadcasts the parameters when it wraps a module, but buffers only with broadcast_buffers=True,
    and not at all for modules it never wraps (an EMA copy); this makes every rank start identical."""
    if (dist := _dist()) is None:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            x = t.detach().to(_comm_device(t.device))
            dist.broadcast(x, src=0)
            if x is not t:
                t.copy_(x)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def no_sync(model: torch.nn.Module, sync: bool):
    """DDP's no_sync() for a gradient-accumulation micro-step that must not all-reduce yet; a no-op when
    `sync` or when the model is not wrapped."""
    if sync or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    """ema <- decay * ema + (1 - decay) * model over every floating-point parameter (frozen ones too:
    an EMA codebook's vectors are parameters without gradients); buffers are copied as they are."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


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
