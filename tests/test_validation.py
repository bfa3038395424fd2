"""Every user mistake stops before any work, with one line and exit code 2 (issue 12): each script's
config validate(), the one shared check of sampling settings (mingpt.check_sampling, also raised as
ValueError by the library), and property tests over random flag values."""

import dataclasses
import math
import typing
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import benchmark
import cli
import evaluate
import lpips
import sample_transformer
import training_transformer as tt
import training_vqgan as tv
from data import DEMO_DATA
from discriminator import Discriminator
from mingpt import GPT, check_sampling, sample_next_token
from transformer import TransformerConfig, VQGANTransformer
from vqgan import VQGAN, config_from_preset

VQ = ["--preset", "tiny", "--perceptual-loss-factor", "0", "--num-workers", "0"]
GPT_ARGS = ["--preset", "tiny", "--num-augmentations", "2", "--batch-size", "8", "--num-grid-images", "0"]
IMAGE = str(sorted(DEMO_DATA.glob("*.jpg"))[0])


def fails(main, argv, capsys) -> str:
    """Run a script's main as its __main__ does; assert exit code 2 and one line; return that line."""
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """A 1-step tiny stage-one run without a validation split: its out dir."""
    out = tmp_path_factory.mktemp("stage_one")
    tv.main(VQ + ["--out-dir", str(out), "--max-steps", "1", "--val-fraction", "0", "--sample-every", "100"])
    return out


def few_images(folder, n):
    folder.mkdir(parents=True)
    for p in sorted(DEMO_DATA.glob("*.jpg"))[:n]:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


# ----------------------------------------------------------------------------- sampling settings

SAMPLING_CASES = [
    (["--top-k", "0"], "--top-k 0 is out of range"),
    (["--top-k", "-3"], "--top-k -3 is out of range"),
    (["--top-p", "0"], "--top-p 0.0 is out of range"),
    (["--top-p", "1.5"], "--top-p 1.5 is out of range"),
    (["--temperature", "-1"], "--temperature -1.0 is out of range"),
    (["--temperature", "nan"], "--temperature nan is out of range"),
    (["--complete", IMAGE, "--keep-fraction", "1.5"], "--keep-fraction 1.5 is out of range"),
    (["--cfg-scale", "3"], "--cfg-scale 3.0 needs --class-label"),
]


@pytest.mark.parametrize("args,match", SAMPLING_CASES)
def test_sampling_flags_stop_before_the_model_or_a_folder(tmp_path, capsys, args, match):
    out = tmp_path / "samples"
    # the checkpoint does not exist: a check after loading it would name the checkpoint instead
    err = fails(sample_transformer.main, args + ["--transformer-path", str(tmp_path / "none.pt"),
                                                "--out-dir", str(out)], capsys)
    assert match in err
    assert not out.exists()


@pytest.mark.parametrize("kw,arg,flag", [
    (dict(top_k=0), "top_k", "--top-k"), (dict(top_p=1.5), "top_p", "--top-p"),
    (dict(temperature=float("nan")), "temperature", "--temperature"),
    (dict(cfg_scale=3.0), "cfg_scale", "--cfg-scale"),
])
def test_library_raises_value_error_with_the_scripts_wording(tmp_path, capsys, kw, arg, flag):
    torch.manual_seed(0)
    model = VQGANTransformer(VQGAN(config_from_preset("tiny", image_size=8)),
                             TransformerConfig(n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError) as lib:
        model.generate(1, **kw)  # cfg_scale without labels: refused like --cfg-scale without --class-label
    script_args = [flag, str(next(iter(kw.values())))]
    err = fails(sample_transformer.main, script_args + ["--out-dir", str(tmp_path)], capsys)
    assert err == "error: " + str(lib.value).replace(arg, flag).replace("needs labels", "needs --class-label") \
        .replace("give labels", "give --class-label")
    if arg != "cfg_scale":
        gpt = GPT(10, 4, n_layer=1, n_head=1, n_embd=8)
        with pytest.raises(ValueError, match=f"^{arg} .* is out of range"):
            gpt.generate(torch.zeros(1, 1, dtype=torch.long), 2, **kw)


def test_training_transformer_refuses_grid_settings_before_training(tmp_path, capsys):
    # before this check, --top-k 0 trained a whole epoch and crashed at the epoch's grid
    out = tmp_path / "run"
    err = fails(tt.main, GPT_ARGS + ["--top-k", "0", "--out-dir", str(out),
                                     "--vqgan-path", str(tmp_path / "none.pt")], capsys)
    assert "--top-k 0 is out of range" in err
    assert not out.exists()
    err = fails(tt.main, GPT_ARGS + ["--cfg-scale", "3", "--out-dir", str(out)], capsys)
    assert "--cfg-scale 3.0 needs --conditional" in err
    err = fails(tt.main, GPT_ARGS + ["--cfg-scale", "3", "--conditional", "--cfg-dropout", "0",
                                     "--out-dir", str(out)], capsys)
    assert "--cfg-dropout 0" in err and "never trains" in err
    assert not out.exists()


def test_complete_with_a_corrupt_image_names_that_image(tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_text("x\n")
    err = fails(sample_transformer.main, ["--complete", str(broken), "--transformer-path",
                                          str(tmp_path / "none.pt"), "--out-dir", str(tmp_path / "o")], capsys)
    assert f"--complete: cannot read {broken} as an image (not an image)" in err
    assert "data set" not in err and "instead" not in err


# ----------------------------------------------------------------------------- stage one

@pytest.mark.parametrize("args,match", [
    (["--image-size", "0"], "--image-size 0 is out of range: it must be a positive multiple of the downsampling "
                            "factor 2 (2**(len(ch_mult)-1)); try 24"),
    (["--num-codebook-vectors", "0"], "--num-codebook-vectors 0 is out of range: it must be at least 1"),
    (["--ch-mult"], "--ch-mult (no values): give one channel multiplier >= 1 per level"),
    (["--val-fraction", "1.0"], "--val-fraction 1.0 would hold out every image"),
    (["--attn-resolutions", "8"], "--attn-resolutions 8: no level has that side at --image-size 32 (levels: 32, 16)"),
    (["--num-groups", "12"], "--num-groups 12 does not divide every level's channels (--ch x --ch-mult: 32, 64); "
                             "try --num-groups 8"),
    (["--image-size", "16", "--attn-resolutions", "8"], "too small for the discriminator with --disc-layers 3, "
                                                        "which needs at least 24 px"),
    (["--image-size", "8", "--attn-resolutions", "--disc-factor", "0", "--perceptual-loss-factor", "1"],
     "--image-size 8 is below LPIPS's minimum of 16 px"),
    (["--epochs", "0"], "--epochs 0 and --max-steps 0 leave nothing to train"),
    (["--log-every", "0"], "--log-every 0 is out of range: it must be at least 1 (steps between metrics"),
    (["--learning-rate=-inf"], "--learning-rate -inf is out of range: it must be at least 0"),
    (["--in-channels", "1"], "--in-channels 1: images are loaded as RGB"),
])
def test_stage_one_flags_stop_before_any_folder(tmp_path, capsys, args, match):
    out = tmp_path / "run"
    err = fails(tv.main, VQ + args + ["--out-dir", str(out)], capsys)
    assert match in err
    assert not out.exists()


def test_attention_levels_are_not_refused_when_a_checkpoint_fixes_them():
    cfg = tv.TrainConfig(**{**tv.TRAIN_PRESETS["tiny"], "attn_resolutions": (8,)})  # levels 32, 16
    with pytest.raises(cli.UserError, match="--attn-resolutions 8"):
        cfg.validate()
    cfg.validate(architecture_from_checkpoint=True)  # --resume, --checkpoint-path: the flags can't change it


def test_validation_split_that_takes_every_image(tmp_path, capsys):
    data = few_images(tmp_path / "three", 3)
    err = fails(tv.main, VQ + ["--dataset-path", str(data), "--val-fraction", "0.9", "--out-dir",
                               str(tmp_path / "o")], capsys)
    assert "--val-fraction 0.9 holds out all 3 images" in err and "--batch-size" not in err
    err = fails(tt.main, GPT_ARGS + ["--dataset-path", str(data), "--val-fraction", "0.9", "--out-dir",
                                     str(tmp_path / "o"), "--vqgan-path", str(tmp_path / "none.pt")], capsys)
    assert "--val-fraction 0.9 holds out all 3 images" in err


def test_no_validation_split_is_said_once(stage_one, tmp_path):
    log = (stage_one / "log.txt").read_text()
    assert log.count("note: no validation split") == 1 and "val_* metrics and grids use training images" in log
    out = tmp_path / "gpt"
    tt.main(GPT_ARGS + ["--out-dir", str(out), "--max-steps", "1", "--val-fraction", "0",
                        "--vqgan-path", str(stage_one / "checkpoints" / "vqgan_last.pt")])
    log = (out / "log.txt").read_text()
    assert log.count("note: no validation split") == 1 and "val_bits_per_token" in log


# ----------------------------------------------------------------------------- class labels, evaluate

def test_class_label_rule_names_first_and_ambiguous_numbers_refused():
    numbered = SimpleNamespace(num_classes=2, class_names=["3", "7"])
    with pytest.raises(cli.UserError, match=r"--class-label 1 is ambiguous.*'3', '7'.*pass a class name"):
        sample_transformer.parse_label(numbered, "1")
    assert sample_transformer.parse_label(numbered, "7") == 1  # a name is that class
    named = SimpleNamespace(num_classes=2, class_names=["cats", "dogs"])
    assert sample_transformer.parse_label(named, "dogs") == sample_transformer.parse_label(named, "1") == 1
    with pytest.raises(cli.UserError, match="unknown --class-label '2'"):
        sample_transformer.parse_label(named, "2")
    taming = SimpleNamespace(num_classes=1000, class_names=[])  # class ids only
    assert sample_transformer.parse_label(taming, "3") == 3


def test_evaluate_warns_what_a_much_larger_image_size_costs(stage_one, tmp_path, capsys):
    data = few_images(tmp_path / "two", 2)
    evaluate.main(["--checkpoint-path", str(stage_one / "checkpoints" / "vqgan_last.pt"), "--dataset-path",
                   str(data), "--image-size", "64", "--fid", "off", "--no-lpips", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert ("warning: --image-size 64 is 2x the checkpoint's 32 px training size: about 4x the pixels and 16x "
            "the attention work per image") in err


def test_evaluate_refuses_gfid_settings_before_the_reconstruction_pass(tmp_path, capsys):
    err = fails(evaluate.main, ["--checkpoint-path", str(tmp_path / "none.pt"), "--temperature", "-1"], capsys)
    assert "--temperature -1.0 is out of range" in err


# ----------------------------------------------------------------------------- properties

def _flag_strategy(cls, name: str):
    """A strategy for the command-line words of one field of a config dataclass, from its type."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    tp = typing.get_type_hints(cls)[name]
    optional = type(None) in typing.get_args(tp)
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    flag = cli.flag(name)
    if "choices" in f.metadata:
        values = st.sampled_from(f.metadata["choices"]).map(lambda v: [f"{flag}={v}"])
    elif tp is bool:
        values = st.booleans().map(lambda v: [flag if v else "--no-" + flag[2:]])
    elif typing.get_origin(tp) is tuple:
        values = st.lists(st.integers(-2, 70), max_size=5).map(lambda v: [flag, *map(str, v)])
    elif tp is int:
        ints = st.one_of(st.integers(-3, 70), st.integers(-10 ** 6, 10 ** 6),
                         st.sampled_from([2 ** 32, 2 ** 63, 10 ** 30]))
        values = ints.map(lambda v: [f"{flag}={v}"])
    elif tp is float:
        # no subnormals: torch.set_flush_denormal (conftest, training_vqgan) makes them unrepresentable
        floats = st.one_of(st.floats(-2, 2, allow_subnormal=False),
                           st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),
                           st.sampled_from([0.0, 0.5, 1.0, 1e-300]))
        values = floats.map(lambda v: [f"{flag}={v!r}"])
    else:
        return None  # paths, devices: checked where they are used
    if optional:
        values = st.one_of(values, st.just([f"{flag}=none"]))
    return values


SCRIPTS = {
    "training_vqgan": (tv.TrainConfig, tv.TRAIN_PRESETS, []),
    "training_transformer": (tt.TrainConfig, tt.TRAIN_PRESETS, []),
    "sample_transformer": (sample_transformer.SampleConfig, None, []),
    "evaluate": (evaluate.EvalConfig, None, ["--checkpoint-path", "vqgan_last.pt"]),
    "benchmark": (benchmark.BenchConfig, None, []),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_flags_validate_or_fail_with_one_line(script, data):
    """Parse and validate only (nothing trains): random values for a few flags either give a config
    that validates, or a UserError with one line that names a flag. Never anything else."""
    cls, presets, base = SCRIPTS[script]
    names = [f.name for f in dataclasses.fields(cls) if _flag_strategy(cls, f.name) is not None]
    if script == "sample_transformer":
        names.append("class_label")
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=5, unique=True))
    argv = list(base)
    for name in chosen:
        if name == "class_label":
            argv += [data.draw(st.sampled_from(["--class-label=", "--class-label=cats", "--class-label=3"]))]
        else:
            argv += data.draw(_flag_strategy(cls, name))
    cfg, _ = cli.parse_config(cls, argv, presets)
    try:
        cfg.validate()
    except cli.UserError as e:
        msg = str(e)
        assert msg and len(msg.splitlines()) == 1 and "--" in msg, (argv, msg)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_stage_one_config_that_validates_runs_in_every_part(data):
    """The converse: whatever validate() accepts, every part the run uses takes (VQGAN forward and
    backward in training mode, the discriminator, LPIPS's VGG16 trunk) at batch size 1. The draws lean
    towards valid settings (sizes that are multiples of the downsampling factor, attention at existing
    levels, group counts dividing the channels), so that many examples get past validation."""
    ch_mult = data.draw(st.lists(st.sampled_from([1, 1, 2, 3, 0]), max_size=4), label="ch_mult")
    f = 2 ** max(len(ch_mult) - 1, 0)
    image_size = data.draw(st.integers(0, 80 // f).map(lambda k: k * f) | st.integers(0, 80), label="image_size")
    levels = [image_size // 2 ** i for i in range(len(ch_mult))]
    attn = data.draw(st.lists(st.sampled_from(levels or [0]) | st.integers(0, 64), max_size=2), label="attn")
    ch = data.draw(st.sampled_from([4, 8]) | st.integers(1, 8), label="ch")
    cfg = tv.TrainConfig(**{**tv.TRAIN_PRESETS["tiny"], "image_size": image_size, "ch": ch, "ch_mult": ch_mult,
                            "attn_resolutions": attn, "num_groups": data.draw(st.sampled_from([1, 2, 4]) |
                                                                             st.integers(1, 8), label="groups"),
                            "num_res_blocks": data.draw(st.sampled_from([1, 1, 2, 0]), label="res_blocks"),
                            "z_channels": 4, "latent_dim": 4, "disc_ndf": 4,
                            "num_codebook_vectors": data.draw(st.sampled_from([1, 4, 8, 0]), label="codes"),
                            "disc_layers": data.draw(st.sampled_from([1, 2, 3, 4, 0]), label="disc_layers"),
                            "disc_factor": data.draw(st.sampled_from([0.0, 1.0]), label="disc_factor"),
                            "perceptual_loss_factor": data.draw(st.sampled_from([0.0, 1.0]), label="lpips")})
    try:
        cfg.validate()
    except cli.UserError:
        return
    torch.manual_seed(0)
    x = torch.rand(1, 3, image_size, image_size) * 2 - 1
    x_rec, _, q_loss = VQGAN(tv.model_config(cfg)).train()(x)
    (x_rec.mean() + q_loss).backward()
    assert x_rec.shape == x.shape
    if cfg.disc_factor > 0:
        assert Discriminator(3, cfg.disc_ndf, cfg.disc_layers).train()(x_rec.detach()).numel() >= 1
    if cfg.perceptual_loss_factor > 0:
        assert lpips._vgg16_features()(x).numel() >= 1


@settings(max_examples=60, deadline=None)
@given(temperature=st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),
                             st.sampled_from([0.0, 1e-300, 1e300])),
       top_k=st.one_of(st.none(), st.integers(-2, 20)),
       top_p=st.one_of(st.none(), st.floats(-1, 2, allow_subnormal=False)),
       overflow=st.booleans())
def test_sampling_settings_that_pass_the_check_always_sample(temperature, top_k, top_p, overflow):
    """check_sampling accepts exactly what sample_next_token can sample with, even at extreme
    temperatures, or with logits a huge guidance scale overflowed to +-inf."""
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    if overflow:
        logits[0, 3], logits[1, 5], logits[2, 7] = math.inf, -math.inf, -math.inf
    try:
        check_sampling(temperature, top_k, top_p)
    except ValueError as e:
        assert len(str(e).splitlines()) == 1
        with pytest.raises(ValueError):
            sample_next_token(logits, temperature, top_k, top_p)
        return
    tokens = sample_next_token(logits, temperature, top_k, top_p, generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (3, 1) and 0 <= tokens.min() and tokens.max() < 10
    if temperature == 0 or (top_k == 1):
        assert torch.equal(tokens[:, 0], logits.argmax(-1))
