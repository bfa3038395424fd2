"""Stage-two scripts end to end on a tiny stage-one run: training, code cache, resume, sampling, errors."""

import json
import math

import pytest
import torch

import cli
import sample_transformer
import training_transformer
import training_vqgan
from data import DEMO_DATA, ImageDataset
from transformer import VQGANTransformer, load_transformer, weights_digest
from vqgan import VQGAN, load_vqgan

TINY = ["--preset", "tiny", "--num-augmentations", "2", "--batch-size", "8", "--log-every", "1"]



@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """A tiny stage-one run (2 steps): its out dir holds checkpoints/vqgan_last.pt."""
    out = tmp_path_factory.mktemp("stage_one")
    training_vqgan.main(["--preset", "tiny", "--out-dir", str(out), "--max-steps", "2",
                         "--perceptual-loss-factor", "0"])
    return out


@pytest.fixture(scope="module")
def trained(stage_one):
    """Stage two run with no --vqgan-path in the stage-one folder: the scripts chain by default."""
    training_transformer.main(TINY + ["--out-dir", str(stage_one), "--max-steps", "4"])
    return stage_one


def records(out, **match):
    lines = (out / "results" / "metrics.jsonl").read_text().splitlines()
    rs = [json.loads(line) for line in lines]
    return [r for r in rs if all(r.get(k) == v for k, v in match.items())]


def test_main_writes_checkpoint_grid_metrics_and_cache(trained):
    ckpt = torch.load(trained / "checkpoints" / "transformer_last.pt", weights_only=True)
    assert ckpt["kind"] == "transformer" and ckpt["step"] == 4
    assert {"model", "optimizer", "scaler", "rng", "config", "vqgan_config", "transformer_config"} <= set(ckpt)
    assert (trained / "results" / "transformer_final.png").is_file()
    assert len(list((trained / "cache").glob("codes_*.pt"))) == 1
    train = [r for r in records(trained, stage="transformer") if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_sec"] > 0 for r in train)
    val = records(trained, stage="transformer", step=4)[-1]
    assert 0 < val["val_bits_per_token"] < 8  # 64 codes: log2(64) = 6 bits at chance
    assert records(trained, stage="vqgan")  # the metrics file is shared with stage one
    config = json.loads((trained / "config.json").read_text())
    assert config["vqgan_path"].endswith("vqgan_last.pt")


def test_loaded_model_matches_the_stage_one_vqgan(trained):
    model = load_transformer(trained / "checkpoints" / "transformer_last.pt")
    assert isinstance(model, VQGANTransformer) and model.latent_hw == (16, 16)
    assert model.sos_token == 64 and model.vocab_size == 65
    vq = load_vqgan(trained / "checkpoints" / "vqgan_last.pt")
    assert weights_digest(model.vqgan) == weights_digest(vq)


def test_code_cache_is_reused_without_the_encoder(stage_one, tmp_path, monkeypatch):
    args = TINY + ["--out-dir", str(tmp_path), "--max-steps", "1", "--num-grid-images", "0",
                   "--vqgan-path", str(stage_one / "checkpoints" / "vqgan_last.pt")]
    training_transformer.main(args)
    assert "cached codes to" in (tmp_path / "log.txt").read_text()

    def no_encoder(*args, **kwargs):
        raise AssertionError("the VQGAN encoder ran although the codes were cached")

    monkeypatch.setattr(VQGAN, "encode", no_encoder)
    monkeypatch.setattr(VQGANTransformer, "encode_to_indices", no_encoder)
    training_transformer.main(args)
    assert "reusing cached codes" in (tmp_path / "log.txt").read_text()
    # a different number of views is a different cache
    with pytest.raises(AssertionError, match="encoder ran"):
        training_transformer.main(args + ["--num-augmentations", "3"])
    # ...and so is another precision of the encoding pass (bf16 changes a few % of the codes)
    with pytest.raises(AssertionError, match="encoder ran"):
        training_transformer.main(args + ["--precision", "bf16"])

    # ...and other augmentation code (its source is hashed, no version to bump by hand)
    class OtherCrops(ImageDataset):
        def _augment(self, img, seed):
            return super()._augment(img.transpose(0), seed)  # mirrored before the crop

    monkeypatch.setattr("data.ImageDataset", OtherCrops)
    with pytest.raises(AssertionError, match="encoder ran"):
        training_transformer.main(args)


def test_exact_resume(stage_one, tmp_path):
    vq = ["--vqgan-path", str(stage_one / "checkpoints" / "vqgan_last.pt"), "--num-grid-images", "0"]
    a, b = tmp_path / "a", tmp_path / "b"
    training_transformer.main(TINY + vq + ["--out-dir", str(a), "--max-steps", "5"])
    training_transformer.main(TINY + vq + ["--out-dir", str(b), "--max-steps", "3"])
    training_transformer.main(TINY + vq + ["--out-dir", str(b), "--max-steps", "5", "--resume"])
    loss = lambda out: [(r["step"], r["loss"]) for r in records(out, stage="transformer") if "loss" in r]
    assert loss(a) == loss(b)  # steps 4 and 5 after the resume equal the unbroken run
    sa = torch.load(a / "checkpoints" / "transformer_last.pt", weights_only=True)["model"]
    sb = torch.load(b / "checkpoints" / "transformer_last.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sample_script_writes_pngs_grid_and_completions(trained, tmp_path):
    ckpt = str(trained / "checkpoints" / "transformer_last.pt")
    out = tmp_path / "samples"
    sample_transformer.main(["--transformer-path", ckpt, "--num-samples", "3", "--out-dir", str(out),
                             "--top-k", "20", "--batch-size", "2"])
    assert sorted(p.name for p in out.glob("sample_*.png")) == [f"sample_{i:04d}.png" for i in range(3)]
    assert (out / "grid.png").is_file()
    image = next(DEMO_DATA.glob("*.jpg"))
    out_c = tmp_path / "completions"
    sample_transformer.main(["--transformer-path", ckpt, "--num-samples", "2", "--out-dir", str(out_c),
                             "--complete", str(image)])
    assert len(list(out_c.glob("completion_*.png"))) == 2 and (out_c / "completions.png").is_file()


@pytest.mark.slow
def test_compiled_training_and_sampling_match_eager(stage_one, tmp_path):
    """--compile in training_transformer (same losses, same checkpoint keys) and in sample_transformer
    (the compiled decode step draws the same codes, so the same PNG bytes)."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        training_transformer.main(TINY + ["--vqgan-path", str(stage_one / "checkpoints" / "vqgan_last.pt"),
                                          "--out-dir", str(out), "--max-steps", "2", "--num-grid-images", "0"]
                                  + extra)
        ckpt = torch.load(out / "checkpoints" / "transformer_last.pt", weights_only=True)
        runs[name] = ([r["loss"] for r in records(out) if "loss" in r], ckpt["model"])
    (loss_e, sd_e), (loss_c, sd_c) = runs["eager"], runs["compiled"]
    assert len(loss_e) == 2 and loss_c == pytest.approx(loss_e, rel=1e-4)
    assert sd_c.keys() == sd_e.keys()
    ckpt = str(tmp_path / "eager" / "checkpoints" / "transformer_last.pt")
    pngs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        sample_transformer.main(["--transformer-path", ckpt, "--num-samples", "2", "--out-dir",
                                 str(tmp_path / f"s_{name}"), "--top-k", "20"] + extra)
        pngs[name] = [p.read_bytes() for p in sorted((tmp_path / f"s_{name}").glob("sample_*.png"))]
    assert len(pngs["eager"]) == 2 and pngs["compiled"] == pngs["eager"]


def test_conditional_training_and_guided_sampling(stage_one, tmp_path):
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
    for i, p in enumerate(sorted(DEMO_DATA.glob("*.jpg"))[:12]):
        (data / ("a" if i % 2 else "b") / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "cond"
    training_transformer.main(TINY + ["--out-dir", str(out), "--max-steps", "2", "--conditional",
                                      "--dataset-path", str(data), "--cfg-scale", "2", "--batch-size", "4",
                                      "--vqgan-path", str(stage_one / "checkpoints" / "vqgan_last.pt")])
    ckpt = out / "checkpoints" / "transformer_last.pt"
    model = load_transformer(ckpt)
    assert model.class_names == ["a", "b"] and model.vocab_size == 64 + 1 + 2
    samples = tmp_path / "s"
    sample_transformer.main(["--transformer-path", str(ckpt), "--num-samples", "2", "--out-dir", str(samples),
                             "--class-label", "b", "--cfg-scale", "3"])
    assert len(list(samples.glob("sample_*.png"))) == 2
    with pytest.raises(SystemExit) as e:
        cli.run_main(sample_transformer.main, ["--transformer-path", str(ckpt), "--class-label", "zebra"])
    assert e.value.code == 2


def test_checkpoint_path_is_an_alias_of_vqgan_path():
    """The reference names the stage-one checkpoint --checkpoint-path; both flags set vqgan_path."""
    for flag in ("--vqgan-path", "--checkpoint-path"):
        cfg, given = cli.parse_config(training_transformer.TrainConfig, [flag, "run/vqgan.pt"])
        assert cfg.vqgan_path == "run/vqgan.pt" and given == {"vqgan_path"}


def test_missing_stage_one_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_main(training_transformer.main, ["--preset", "tiny", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no stage-one VQGAN checkpoint" in err and "training_vqgan.py" in err
    with pytest.raises(SystemExit) as e:
        cli.run_main(training_transformer.main, ["--preset", "tiny", "--out-dir", str(tmp_path),
                                                   "--vqgan-path", str(tmp_path / "missing.pt")])
    assert e.value.code == 2 and "--vqgan-path" in capsys.readouterr().err


def test_incompatible_stage_one_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    # a stage-two checkpoint passed where the stage-one one belongs
    with pytest.raises(SystemExit) as e:
        cli.run_main(training_transformer.main, ["--preset", "tiny", "--out-dir", str(tmp_path), "--vqgan-path",
                                                   str(trained / "checkpoints" / "transformer_last.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--vqgan-path" in err


def test_missing_transformer_checkpoint_in_sample_script(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_main(sample_transformer.main, ["--transformer-path", str(tmp_path / "none.pt")])
    assert e.value.code == 2
    assert "training_transformer.py" in capsys.readouterr().err
