"""Image data: folders scanned and vetted, any image as RGB, the dataset of crops in [-1, 1], the
train/validation split, and the seeded per-epoch batch order that makes resumes exact."""

import json
import os
import random
import struct
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms

from cli import UserError

REPO_ROOT = Path(__file__).resolve().parent
DEMO_DATA = REPO_ROOT / "data" / "demo"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SCAN_PROGRESS_MIN_FILES = 2000  # folders with more candidate files get a progress bar while scanned
# Pillow refuses images over Image.MAX_IMAGE_PIXELS (~89M pixels) as possible decompression bombs;
# VQGAN_MAX_IMAGE_PIXELS=N raises (or, with 0, removes) that limit for folders of trusted huge images.
if os.environ.get("VQGAN_MAX_IMAGE_PIXELS"):
    Image.MAX_IMAGE_PIXELS = int(os.environ["VQGAN_MAX_IMAGE_PIXELS"]) or None


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
