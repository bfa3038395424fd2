"""Write a labelled public data set as class folders that both training scripts read as they are.

    python prepare_data.py fashion-mnist --out data/fashion-mnist                      # Debian's files
    python prepare_data.py fashion-mnist --out data/fashion-mnist --raw-dir ~/FashionMNIST/raw
    python prepare_data.py fashion-mnist --out data/fashion-mnist --download           # online
    python prepare_data.py fashion-mnist --out data/fashion-mnist --max-per-class 500 --max-test-per-class 50

Writes <out>/train/<class>/<index>.png and <out>/test/<class>/<index>.png (28x28 greyscale, <index> is
the image's position in its split) and <out>/info.json. The class folders are named `<id>_<name>`
(e.g. `0_t_shirt_top`), so sorting them gives the data set's label order, which is how
training_transformer.py --conditional numbers the first-level subfolders of --dataset-path: pass
<out>/train there, not <out>.

Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, MIT licence) is read with torchvision.datasets.FashionMNIST.
Offline, Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`) installs the
four gzipped IDX files in /usr/share/datasets/fashion-mnist, the default --raw-dir.
"""

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets import FashionMNIST
from torchvision.datasets.utils import extract_archive
from tqdm import tqdm

import cli
from cli import UserError, field

DATASETS = ("fashion-mnist",)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# the files torchvision's FashionMNIST reads from <root>/FashionMNIST/raw (without .gz)
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


@dataclass
class PrepareConfig:
    """Where the raw files come from, where the class folders go, and how many images."""
    out: str = field("", "output folder; train/ and test/ go in it (required)")
    raw_dir: str = field(DEBIAN_FASHION_MNIST, "folder with the four IDX files, gzipped or not, as Debian's "
                         "dataset-fashion-mnist package or torchvision's FashionMNIST/raw hold them")
    download: bool = field(False, "download the files with torchvision into <out>/raw instead of --raw-dir")
    max_per_class: int = field(0, "images per class in each split, the first ones in file order (0: all)")
    max_test_per_class: int | None = field(None, "images per class in the test split (none: as --max-per-class)")
    overwrite: bool = field(False, "replace existing <out>/train and <out>/test")


def folder_name(label: int, name: str) -> str:
    """'T-shirt/top', 0 -> '0_t_shirt_top': the label first, so sorted folders give label order."""
    return f"{label}_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}"


def find_raw_file(raw_dir: Path, name: str) -> Path | None:
    """raw_dir/name or raw_dir/name.gz, also under raw_dir/FashionMNIST/raw (torchvision's layout)."""
    for folder in (raw_dir, raw_dir / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def stage_raw_files(raw_dir: Path, root: Path) -> None:
    """Lay the four files out as torchvision expects: <root>/FashionMNIST/raw/<name>, uncompressed
    (torchvision checks for and reads the uncompressed names). Plain files are linked, .gz ones
    decompressed with torchvision's own extract_archive."""
    if not raw_dir.is_dir():
        raise UserError(f"--raw-dir {str(raw_dir)!r} is not a folder; install Debian's dataset-fashion-mnist "
                        f"package (files in {DEBIAN_FASHION_MNIST}), pass the folder holding the four "
                        "*-ubyte(.gz) files, or use --download")
    found = {name: find_raw_file(raw_dir, name) for name in RAW_FILES}
    missing = [f"{n}(.gz)" for n, p in found.items() if p is None]
    if missing:
        raise UserError(f"--raw-dir {str(raw_dir)!r} lacks {', '.join(missing)}; pass the folder holding "
                        "the four Fashion-MNIST IDX files, or use --download")
    dest = root / "FashionMNIST" / "raw"
    dest.mkdir(parents=True)
    for name, path in found.items():
        if path.suffix == ".gz":
            try:
                extract_archive(str(path), str(dest))  # -> dest/<name>
            except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut-off file an EOFError
                raise UserError(f"{path} is not a readable gzip file ({type(e).__name__}: {e}); "
                                "replace it with an intact copy") from None
        else:
            (dest / name).symlink_to(path.resolve())


def load_split(root: Path, train: bool, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split through torchvision -> images (N, 28, 28) uint8 and labels (N,) int64 in [0, 10)."""
    split = "train" if train else "t10k"
    try:
        ds = FashionMNIST(str(root), train=train, download=False)
    except (AssertionError, RuntimeError, ValueError, TypeError, KeyError, IndexError, OSError) as e:
        # torchvision asserts on a bad IDX magic number and fails in a view() on a short file
        why = str(e).splitlines()[0] if str(e) else "bad IDX header"
        raise UserError(f"the {split} files in {source} are not valid Fashion-MNIST IDX files ({type(e).__name__}: "
                        f"{why}); replace them with intact copies") from None
    images, labels = ds.data, ds.targets
    if images.dim() != 3 or len(images) != len(labels) or len(images) == 0:
        raise UserError(f"the {split} files in {source} disagree: {tuple(images.shape)} images for "
                        f"{len(labels)} labels; replace them with intact copies")
    if labels.min() < 0 or labels.max() >= len(FashionMNIST.classes):
        raise UserError(f"the {split} labels in {source} are outside 0..{len(FashionMNIST.classes) - 1}; "
                        "replace the label file with an intact copy")
    return images, labels


def write_split(images: torch.Tensor, labels: torch.Tensor, out: Path, max_per_class: int,
                class_dirs: list[str]) -> dict[str, int]:
    """images (N, H, W) uint8 -> out/<class>/<index>.png, the first max_per_class of each class
    (0: all). Returns the count per class folder."""
    from PIL import Image

    counts = {d: 0 for d in class_dirs}
    for d in class_dirs:
        (out / d).mkdir(parents=True)
    width = len(str(len(images) - 1))
    for i in tqdm(range(len(images)), desc=out.name, unit="img", dynamic_ncols=True, disable=None):
        d = class_dirs[int(labels[i])]
        if max_per_class and counts[d] >= max_per_class:
            continue
        Image.fromarray(images[i].numpy(), mode="L").save(out / d / f"{i:0{width}d}.png")
        counts[d] += 1
    return counts


def prepare_fashion_mnist(cfg: PrepareConfig) -> dict:
    """The Fashion-MNIST class-folder tree in cfg.out -> a summary (also written to <out>/info.json)."""
    out = Path(cfg.out).expanduser()
    max_test = cfg.max_per_class if cfg.max_test_per_class is None else cfg.max_test_per_class
    if cfg.max_per_class < 0 or max_test < 0:
        raise UserError("--max-per-class and --max-test-per-class must be at least 0 (0: all images)")
    splits = {"train": out / "train", "test": out / "test"}
    existing = [p for p in splits.values() if p.exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace train/ and test/, "
                        "or choose another --out")
    if cfg.download:
        root, source = out / "raw", "the downloaded files"
        try:
            FashionMNIST(str(root), train=True, download=True)  # fetches all four files (both splits)
        except Exception as e:  # urllib, http and md5 failures all end up here
            raise UserError(f"--download failed ({type(e).__name__}: {str(e).splitlines()[0]}); check the "
                            "network, or install Debian's dataset-fashion-mnist and use --raw-dir") from None
        data = {s: load_split(root, s == "train", source) for s in splits}
    else:
        raw_dir = Path(cfg.raw_dir).expanduser()
        with tempfile.TemporaryDirectory(prefix="fashion-mnist-") as tmp:
            stage_raw_files(raw_dir, Path(tmp))
            data = {s: load_split(Path(tmp), s == "train", str(raw_dir)) for s in splits}

    for p in existing:
        shutil.rmtree(p)
    class_dirs = [folder_name(i, n) for i, n in enumerate(FashionMNIST.classes)]
    counts = {}
    for split, path in splits.items():
        images, labels = data[split]
        counts[split] = write_split(images, labels, path, cfg.max_per_class if split == "train" else max_test,
                                    class_dirs)
    info = {"dataset": "fashion-mnist", "source": "torchvision download" if cfg.download else str(cfg.raw_dir),
            "classes": class_dirs, "class_names": list(FashionMNIST.classes),
            "images": {s: sum(c.values()) for s, c in counts.items()}, "per_class": counts,
            "max_per_class": cfg.max_per_class, "max_test_per_class": max_test}
    cli.write_json(out / "info.json", info)
    return info


def main(argv=None):
    parser = cli.build_parser(PrepareConfig, __doc__.split("\n")[0])
    parser.add_argument("dataset", choices=DATASETS, help="which data set to prepare")
    given = vars(parser.parse_args(argv))
    given.pop("dataset")  # one data set so far
    cfg = PrepareConfig(**given)
    if not cfg.out:
        raise UserError("--out is required: the folder that train/ and test/ go into")
    info = prepare_fashion_mnist(cfg)
    out = Path(cfg.out)
    print(f"wrote {info['images']['train']} train and {info['images']['test']} test images in "
          f"{len(info['classes'])} class folders to {out / 'train'} and {out / 'test'}")
    print(f"next: python training_vqgan.py --dataset-path {out / 'train'} --image-size 32 ...; "
          f"python training_transformer.py --conditional --dataset-path {out / 'train'} ...")
    return info


if __name__ == "__main__":
    cli.run_main(main)
