"""Messy image folders: every mode converted right, every bad file skipped with one warning, files that
turn bad after the scan replaced, an unusable folder a one-line error."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import training_vqgan


def save(img, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def jpeg_bytes(size=(64, 48), seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def good_files(root):
    """One file per accepted kind, with the RGB colour load_image must give at pixel (0, 0) (None: any)."""
    red, blue = (255, 0, 0), (0, 0, 255)
    out = {}
    out[save(Image.new("L", (40, 40), 128), root / "gray.jpg", quality=100)] = (128, 128, 128)
    p = Image.new("P", (40, 40), 0)
    p.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    p.info["transparency"] = 0  # palette entry 0 (red) is transparent -> white
    out[save(p, root / "palette.png")] = (255, 255, 255)
    out[save(Image.new("RGBA", (40, 40), (255, 0, 0, 0)), root / "rgba.png")] = (255, 255, 255)
    out[save(Image.new("LA", (40, 40), (0, 0)), root / "sub" / "la.png")] = (255, 255, 255)
    out[save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), root / "cmyk.jpg", quality=100)] = red
    sixteen = Image.fromarray(np.full((40, 40), 100 * 257, dtype=np.uint16))
    assert sixteen.mode == "I;16"
    out[save(sixteen, root / "gray16.png")] = (100, 100, 100)  # a fixed 65535 -> 255 scale, no stretch
    # EXIF orientation 6 (stored rotated 90 degrees clockwise): 60x30 stored, 30x60 shown; the stored
    # left half is red, so after the rotation the top half is red
    rot = Image.new("RGB", (60, 30), blue)
    rot.paste(red, (0, 0, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    out[save(rot, root / "exif_rotated.jpg", exif=exif, quality=100)] = "rotated"
    frames = [Image.new("RGB", (40, 40), c) for c in (red, (0, 255, 0))]
    out[save(frames[0], root / "anim.gif", save_all=True, append_images=frames[1:])] = red
    out[save(frames[0], root / "pages.tiff", save_all=True, append_images=frames[1:])] = red
    out[save(Image.new("RGB", (8, 6), blue), root / "small.png")] = blue  # smaller than the crop
    out[save(Image.new("RGB", (40, 40), blue), root / "photo.webp", lossless=True)] = blue
    out[save(Image.new("RGB", (40, 40), blue), root / "bitmap.bmp")] = blue
    return out


def bad_files(root):
    """One file per kind the scan must skip, with a word its reason must contain."""
    bad = {}
    (root / "empty.jpg").write_bytes(b"")
    bad[root / "empty.jpg"] = "empty"
    (root / "notes.png").write_text("not an image at all\n")
    bad[root / "notes.png"] = "not an image"
    raw = jpeg_bytes()
    (root / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    bad[root / "cut.jpg"] = "truncated"
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    (root / "sub" / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    bad[root / "sub" / "cut.png"] = "truncated"
    gif = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64), dtype=np.uint8)).save(gif, "GIF")
    (root / "cut.gif").write_bytes(gif.getvalue()[: len(gif.getvalue()) // 2])
    bad[root / "cut.gif"] = "truncated"
    # unreadable: tests run as root, where chmod 000 still reads, so a dangling link stands in for it
    (root / "gone.jpg").symlink_to(root / "deleted-long-ago.jpg")
    bad[root / "gone.jpg"] = "unreadable"
    save(Image.new("RGB", (300, 300)), root / "huge.png")
    bad[root / "huge.png"] = "MAX_IMAGE_PIXELS"
    return bad


@pytest.fixture
def messy(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200)  # so huge.png needs no real 90M pixels
    root = tmp_path / "messy"
    good = good_files(root)
    bad = bad_files(root)
    save(Image.new("RGB", (40, 40)), root / ".hidden.jpg")
    save(Image.new("RGB", (40, 40)), root / ".thumbnails" / "a.jpg")
    (root / "readme.txt").write_text("not an image extension, not even looked at")
    return root, good, bad


def test_scan_keeps_every_usable_kind_and_skips_bad_files_with_one_warning(messy, capsys):
    root, good, bad = messy
    files = data.find_images(root)
    assert sorted(files) == sorted(good)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"skipped {len(bad)} of {len(good) + len(bad)}" in err[0]
    assert "and 2 more" in err[0]  # the first five are named
    for p, why in bad.items():
        reason = data.check_image(p)
        assert reason is not None and why in reason, (p, reason)
    assert "VQGAN_MAX_IMAGE_PIXELS" in data.check_image(root / "huge.png")  # names the way out


def test_every_mode_is_converted_right(messy):
    _, good, _ = messy
    for path, colour in good.items():
        img = data.load_image(path)
        assert img.mode == "RGB", path
        px = np.asarray(img).astype(int)
        if colour == "rotated":
            assert img.size == (30, 60)
            assert px[5, 15, 0] > 200 and px[5, 15, 2] < 50  # top: red
            assert px[55, 15, 2] > 200 and px[55, 15, 0] < 50  # bottom: blue
            continue
        assert np.abs(px[0, 0] - np.array(colour)).max() <= 3, (path.name, px[0, 0], colour)


@pytest.mark.parametrize("mode,value,rgb", [
    ("I;16B", 65535, (255, 255, 255)),
    ("I", 257 * 10, (10, 10, 10)),
    ("La", (0, 0), (255, 255, 255)),
    ("PA", (0, 0), (255, 255, 255)),
    ("RGBa", (0, 0, 0, 0), (255, 255, 255)),
    ("1", 1, (255, 255, 255)),
    ("YCbCr", (255, 128, 128), (255, 255, 255)),
])
def test_to_rgb_modes(mode, value, rgb):
    out = data.to_rgb(Image.new(mode, (4, 4), value))
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out)[0, 0].astype(int) - np.array(rgb)).max() <= 2


def test_dataset_upscales_small_images_and_replaces_files_that_turn_bad(messy, capsys):
    root, good, _ = messy
    files = data.find_images(root)
    capsys.readouterr()
    ds = data.ImageDataset(files, 32, train=True)
    for i in range(len(ds)):
        x, _ = ds[(i, i)]
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all() and -1 <= x.min() and x.max() <= 1
    assert ds.num_failed == 0
    # two files go bad after the scan: one truncated, one deleted
    i_small = files.index(root / "small.png")
    raw = (root / "small.png").read_bytes()
    (root / "small.png").write_bytes(raw[:20])
    i_gif = files.index(root / "anim.gif")
    (root / "anim.gif").unlink()
    x, _ = ds[(i_small, 0)]
    assert x.shape == (3, 32, 32)
    assert ds[i_gif][0].shape == (3, 32, 32)
    assert ds[i_gif][0].shape == (3, 32, 32)  # the same bad file again: counted again, warned once
    assert ds.num_failed == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "small.png" in err[0] and "anim.gif" in err[1]
    assert "using" in err[0] and "(1 failed loads in process" in err[0] and "(2 failed loads" in err[1]
    # the replacement is the next file, so the sample is that file's
    nxt = data.ImageDataset([files[i_small + 1]], 32, train=True)[(0, 0)][0]
    assert torch.equal(x, nxt)


def test_progress_bar_on_large_folders(tmp_path, monkeypatch, capsys):
    for i in range(5):
        save(Image.new("RGB", (8, 8)), tmp_path / f"{i}.png")
    monkeypatch.setattr(data, "SCAN_PROGRESS_MIN_FILES", 4)
    assert len(data.find_images(tmp_path)) == 5
    assert "scanning images" in capsys.readouterr().err
    monkeypatch.setattr(data, "SCAN_PROGRESS_MIN_FILES", 5)
    data.find_images(tmp_path)
    assert "scanning images" not in capsys.readouterr().err


def test_folder_without_a_usable_image_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_text("hello")
    raw = jpeg_bytes()
    (tmp_path / "c.jpg").write_bytes(raw[:100])
    with pytest.raises(SystemExit) as e:
        cli.run_main(training_vqgan.main, ["--preset", "tiny", "--perceptual-loss-factor", "0",
                                             "--dataset-path", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no usable image" in err and "empty file" in err
    assert "Traceback" not in err


def counting_checker(monkeypatch):
    """Wrap data.check_image so a test can see which files were vetted."""
    seen, real = [], data.check_image
    monkeypatch.setattr(data, "check_image", lambda p: seen.append(p.name) or real(p))
    return seen


def test_scan_cache_reuses_verdicts_and_follows_added_removed_and_changed_files(messy, monkeypatch, capsys):
    root, good, bad = messy
    cache = root.parent / "run" / "cache" / "file_scan.json"
    seen = counting_checker(monkeypatch)
    first = data.find_images(root, cache_file=cache)
    assert sorted(first) == sorted(good) and len(seen) == len(good) + len(bad) and cache.exists()
    warning = capsys.readouterr().err
    # nothing changed: the same list and the same warning, and no file is opened
    seen.clear()
    assert data.find_images(root, cache_file=cache) == first and seen == []
    assert capsys.readouterr().err == warning
    # added (good and bad), removed, and changed: truncated with its mtime restored (the size tells),
    # overwritten with as many zero bytes and its mtime restored (the ctime tells), and an empty file
    # replaced by a good image -> only those are vetted again
    save(Image.new("RGB", (20, 20)), root / "sub" / "new.png")
    (root / "new_bad.jpg").write_bytes(b"junk")
    (root / "gray.jpg").unlink()
    for name, damage in (("rgba.png", lambda d: d[:30]), ("palette.png", lambda d: bytes(len(d)))):
        st = (root / name).stat()
        (root / name).write_bytes(damage((root / name).read_bytes()))
        os.utime(root / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    save(Image.new("RGB", (20, 20)), root / "empty.jpg")
    seen.clear()
    files = data.find_images(root, cache_file=cache)
    assert sorted(seen) == ["empty.jpg", "new.png", "new_bad.jpg", "palette.png", "rgba.png"]
    expected = set(good) - {root / "gray.jpg", root / "rgba.png", root / "palette.png"}
    assert sorted(files) == sorted(expected | {root / "sub" / "new.png", root / "empty.jpg"})
    # the cache matches a full scan without it
    seen.clear()
    assert data.find_images(root) == files and len(seen) > 0


def test_scan_cache_ignores_another_root_a_new_size_limit_and_a_broken_file(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        save(Image.new("RGB", (8, 8)), root / "x.png")
    cache = tmp_path / "file_scan.json"
    seen = counting_checker(monkeypatch)
    data.find_images(a, cache_file=cache)
    data.find_images(b, cache_file=cache)  # same names, another folder: vetted again
    assert seen == ["x.png", "x.png"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # verdicts depend on Pillow's limit
    with pytest.raises(cli.UserError, match="decompression-bomb"):
        data.find_images(b, cache_file=cache)
    cache.write_text("{not json")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    seen.clear()
    assert data.find_images(b, cache_file=cache) == [b / "x.png"] and seen == ["x.png"]
    seen.clear()
    data.find_images(b, cache_file=cache)
    assert seen == []
