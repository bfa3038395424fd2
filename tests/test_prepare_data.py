"""prepare_data.py on a tiny fake Fashion-MNIST: the class-folder tree, its use by both training scripts
and sample_transformer's per-class grid, and bad raw files as one-line errors.

The fake raw files are written here in the IDX format (big-endian magic, sizes, then uint8 data) so the
test never needs the 30 MB originals or a network; prepare_data itself reads them with torchvision."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import prepare_data
import sample_transformer
import training_transformer
import training_vqgan
from data import find_images
from transformer import load_transformer

CLASS_DIRS = ["0_t_shirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt",
              "7_sneaker", "8_bag", "9_ankle_boot"]


def idx_bytes(array: np.ndarray) -> bytes:
    """uint8 array -> IDX: 0x00 0x00, type 0x08 (uint8), the number of dimensions, sizes (big-endian)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (n, 28, 28) whose value encodes their label (label * 20 + 10), labels cycling 0..9."""
    labels = np.arange(n, dtype=np.uint8) % 10
    rng = np.random.default_rng(seed)
    images = (labels[:, None, None] * 20 + 10 + rng.integers(0, 5, (n, 28, 28))).astype(np.uint8)
    return images, labels


def write_raw(folder, n_train: int = 30, n_test: int = 20, gz: bool = True, sub: str = "") -> dict:
    """The four files as Debian ships them (gzipped, flat) or as torchvision keeps them (plain)."""
    root = folder / sub if sub else folder
    root.mkdir(parents=True, exist_ok=True)
    data = {"train": fake_split(n_train, 0), "t10k": fake_split(n_test, 1)}
    for split, (images, labels) in data.items():
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            raw = idx_bytes(array)
            name = f"{split}-{kind}-ubyte"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (root / name).write_bytes(raw)
    return data


def run(argv):
    return prepare_data.main(["fashion-mnist"] + argv)


def test_builds_the_class_folder_tree(tmp_path):
    raw = tmp_path / "raw"
    data = write_raw(raw)
    out = tmp_path / "fm"
    info = run(["--out", str(out), "--raw-dir", str(raw)])
    for split, n in (("train", 30), ("test", 20)):
        assert sorted(p.name for p in (out / split).iterdir()) == CLASS_DIRS
        files = find_images(out / split)
        assert len(files) == n
        # every image sits in the folder of its label, with its pixels unchanged
        images, labels = data["train" if split == "train" else "t10k"]
        for p in files:
            i = int(p.stem)
            assert p.parent.name == CLASS_DIRS[labels[i]]
            assert np.array_equal(np.asarray(Image.open(p)), images[i])
    assert info["images"] == {"train": 30, "test": 20}
    assert json.loads((out / "info.json").read_text())["classes"] == CLASS_DIRS


def test_max_per_class_and_torchvision_layout(tmp_path):
    raw = tmp_path / "tv"
    write_raw(raw, gz=False, sub="FashionMNIST/raw")  # torchvision's own root: plain files in FashionMNIST/raw
    out = tmp_path / "fm"
    info = run(["--out", str(out), "--raw-dir", str(raw), "--max-per-class", "2", "--max-test-per-class", "1"])
    assert set(info["per_class"]["train"].values()) == {2} and set(info["per_class"]["test"].values()) == {1}
    assert len(find_images(out / "train")) == 20 and len(find_images(out / "test")) == 10
    # the first images of each class in file order: train indices 0..19 (labels cycle 0..9)
    assert sorted(int(p.stem) for p in find_images(out / "train")) == list(range(20))


def test_the_tree_trains_both_stages_and_samples_one_row_per_class(tmp_path):
    """--dataset-path <out>/train as is: stage one, stage two --conditional with the 10 folders as classes
    in label order, and sample_transformer --samples-per-class writing class folders and a class grid."""
    raw = tmp_path / "raw"
    write_raw(raw, n_train=40)
    out = tmp_path / "fm"
    run(["--out", str(out), "--raw-dir", str(raw)])
    run_dir = tmp_path / "run"
    training_vqgan.main(["--preset", "tiny", "--out-dir", str(run_dir), "--dataset-path", str(out / "train"),
                         "--max-steps", "1", "--perceptual-loss-factor", "0"])
    training_transformer.main(["--preset", "tiny", "--out-dir", str(run_dir), "--dataset-path", str(out / "train"),
                               "--conditional", "--max-steps", "1", "--num-augmentations", "1",
                               "--val-fraction", "0.25"])
    ckpt = run_dir / "checkpoints" / "transformer_last.pt"
    assert load_transformer(ckpt).class_names == CLASS_DIRS
    samples = tmp_path / "samples"
    result = sample_transformer.main(["--transformer-path", str(ckpt), "--samples-per-class", "2",
                                      "--cfg-scale", "2", "--batch-size", "3", "--out-dir", str(samples)])
    assert result["labels"] == [c for c in range(10) for _ in range(2)]
    assert sorted(p.name for p in samples.iterdir() if p.is_dir()) == CLASS_DIRS
    assert all(len(list((samples / d).glob("sample_*.png"))) == 2 for d in CLASS_DIRS)
    grid = Image.open(samples / "class_grid.png")
    assert grid.size == (2 + 2 * (32 + 2), 2 + 10 * (32 + 2))  # 2 columns, one row per class (2 px padding)


def test_samples_per_class_needs_a_conditional_model(tmp_path, capsys):
    run_dir = tmp_path / "run"
    training_vqgan.main(["--preset", "tiny", "--out-dir", str(run_dir), "--max-steps", "1",
                         "--perceptual-loss-factor", "0"])
    training_transformer.main(["--preset", "tiny", "--out-dir", str(run_dir), "--max-steps", "1"])
    with pytest.raises(SystemExit) as e:
        cli.run_main(sample_transformer.main, ["--transformer-path", str(run_dir / "checkpoints" /
                                                 "transformer_last.pt"), "--samples-per-class", "2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "class-conditional" in err and "\n" not in err


def corrupt(raw, how: str):
    if how == "missing":
        (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    elif how == "not gzip":
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"this is not a gzip file")
    elif how == "cut gzip":
        p = raw / "train-images-idx3-ubyte.gz"
        p.write_bytes(p.read_bytes()[:100])
    elif how == "bad magic":
        (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\xff" * 64))
    elif how == "short data":  # header promises 30 images, the file holds 3
        p = raw / "train-images-idx3-ubyte.gz"
        p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[: 16 + 3 * 784]))
    elif how == "label count":
        (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(7, np.uint8))))
    elif how == "label range":
        (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(20, 12, np.uint8))))


@pytest.mark.parametrize("how,match", [
    ("missing", "lacks t10k-labels-idx1-ubyte"),
    ("not gzip", "not a readable gzip file"),
    ("cut gzip", "not a readable gzip file"),
    ("bad magic", "not valid Fashion-MNIST IDX"),
    ("short data", "not valid Fashion-MNIST IDX"),
    ("label count", "disagree"),
    ("label range", "outside 0..9"),
])
def test_bad_raw_files_are_one_line_errors(tmp_path, capsys, how, match):
    raw = tmp_path / "raw"
    write_raw(raw)
    corrupt(raw, how)
    out = tmp_path / "fm"
    with pytest.raises(SystemExit) as e:
        cli.run_main(prepare_data.main, ["fashion-mnist", "--out", str(out), "--raw-dir", str(raw)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and match in err and "\n" not in err
    assert not (out / "train").exists()  # nothing half-written


@pytest.mark.parametrize("args,match", [
    (["--raw-dir", "RAW"], "--out is required"),
    (["--out", "OUT", "--raw-dir", "/nonexistent/fashion"], "is not a folder"),
    (["--out", "OUT", "--raw-dir", "RAW", "--max-per-class", "-1"], "at least 0"),
    (["--out", "EXISTING", "--raw-dir", "RAW"], "--overwrite"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, args, match):
    raw = tmp_path / "raw"
    write_raw(raw)
    existing = tmp_path / "existing"
    (existing / "train").mkdir(parents=True)
    subst = {"RAW": str(raw), "OUT": str(tmp_path / "fm"), "EXISTING": str(existing)}
    with pytest.raises(SystemExit) as e:
        cli.run_main(prepare_data.main, ["fashion-mnist"] + [subst.get(a, a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and match in err and "\n" not in err


def test_overwrite_replaces_the_tree(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw)
    out = tmp_path / "fm"
    run(["--out", str(out), "--raw-dir", str(raw)])
    run(["--out", str(out), "--raw-dir", str(raw), "--overwrite", "--max-per-class", "1"])
    assert len(find_images(out / "train")) == 10  # no files left over from the first run
    assert torch.tensor([len(list((out / "test" / d).iterdir())) for d in CLASS_DIRS]).eq(1).all()
