"""--logger: TensorBoard event files and W&B offline runs from tiny training runs, resume included."""

import json
import shutil

import pytest

import cli
import convert_checkpoint
import loggers
import training_transformer
import training_vqgan
from cli import UserError

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData  # noqa: E402

VQ = ["--preset", "tiny", "--perceptual-loss-factor", "0"]  # logs and saves every step or two


def events(folder) -> EventAccumulator:
    """Everything TensorBoard shows for one run folder (orphaned events of a restarted run purged)."""
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def metrics(out, stage):
    rows = [json.loads(line) for line in (out / "results" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage]


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """4 tiny stage-one steps with TensorBoard, then a resume from the step-2 checkpoint, as after a crash
    that lost steps 3 and 4 (their events are on disk, the checkpoint is not)."""
    out = tmp_path_factory.mktemp("tb")
    training_vqgan.main(VQ + ["--out-dir", str(out), "--max-steps", "4", "--logger", "tensorboard"])
    first = events(out / "tensorboard" / "vqgan").Scalars("vqgan/loss")
    shutil.copy(out / "checkpoints" / "vqgan_step0000002.pt", out / "checkpoints" / "vqgan_last.pt")
    training_vqgan.main(["--out-dir", str(out), "--resume", "--max-steps", "5"])  # --logger from config.json
    return out, first


def test_tensorboard_scalars_images_and_hparams(stage_one):
    out, first = stage_one
    assert [e.step for e in first] == [1, 2, 3, 4]
    ea = events(out / "tensorboard" / "vqgan")
    tags = ea.Tags()
    train = [r for r in metrics(out, "vqgan") if "loss" in r]
    # every number of every metrics.jsonl record is a scalar
    assert {f"vqgan/{k}" for r in train for k in r if k not in ("stage", "step")} <= set(tags["scalars"])
    assert {"vqgan/lambda", "vqgan/codebook_usage", "vqgan/perplexity", "vqgan/images_per_sec",
            "vqgan/lr", "vqgan/d_loss"} <= set(tags["scalars"])
    assert {"vqgan/rec_step", "vqgan/rec_final"} <= set(tags["images"])
    rec = ea.Images("vqgan/rec_step")
    assert [e.step for e in rec] == [2, 4] and rec[0].width > rec[0].height > 0  # inputs over reconstructions
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["num_codebook_vectors"].number_value == 64 and hparams["preset"].string_value == "tiny"


def test_tensorboard_resume_continues_without_duplicate_or_missing_steps(stage_one):
    out, _ = stage_one
    ea = events(out / "tensorboard" / "vqgan")
    assert len(list((out / "tensorboard" / "vqgan").glob("events.out.tfevents.*"))) == 2  # the same folder
    train = [r for r in metrics(out, "vqgan") if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    for key in ("loss", "rec_loss", "codebook_usage"):
        scalars = ea.Scalars(f"vqgan/{key}")
        # steps 3 and 4 of the lost attempt are purged; the resumed run's values are what metrics.jsonl holds
        assert [e.step for e in scalars] == [1, 2, 3, 4, 5], key
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in train], rel=1e-6), key
    assert [e.step for e in ea.Images("vqgan/rec_step")] == [2, 4]
    assert [e.step for e in ea.Images("vqgan/rec_final")] == [5]


def test_transformer_logs_to_its_own_tensorboard_folder(stage_one, tmp_path):
    vq_out, _ = stage_one
    out = tmp_path / "gpt"
    # stage one as a Hugging Face folder, as a downloaded tokenizer would be
    convert_checkpoint.main([str(vq_out / "checkpoints" / "vqgan_last.pt"), "--hf-dir", str(tmp_path / "vq")])
    training_transformer.main(["--preset", "tiny", "--num-augmentations", "2", "--batch-size", "8",
                               "--vqgan-path", str(tmp_path / "vq"), "--out-dir", str(out), "--max-steps", "3",
                               "--logger", "none,tensorboard"])
    ea = events(out / "tensorboard" / "transformer")
    assert {"transformer/loss", "transformer/bits_per_token", "transformer/lr", "transformer/tokens_per_sec",
            "transformer/val_bits_per_token"} <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Scalars("transformer/loss")] == [1, 2, 3]
    assert [e.step for e in ea.Scalars("transformer/val_bits_per_token")] == [3]
    assert [e.step for e in ea.Images("transformer/transformer_final")] == [3]
    assert not (out / "tensorboard" / "vqgan").exists()


def test_logger_flag_is_repeatable_and_takes_comma_lists():
    cfg, _ = cli.parse_config(training_vqgan.TrainConfig, ["--logger", "tensorboard", "--logger", "wandb,none"],
                                training_vqgan.TRAIN_PRESETS)
    assert list(cfg.logger) == ["tensorboard", "wandb,none"]
    assert loggers.parse_names(["tensorboard", "none"]) == ["tensorboard"]
    assert loggers.parse_names("TensorBoard, tensorboard") == ["tensorboard"]
    assert loggers.parse_names(()) == [] and loggers.parse_names(["none"]) == []
    default, _ = cli.parse_config(training_transformer.TrainConfig, [], training_transformer.TRAIN_PRESETS)
    assert loggers.parse_names(default.logger) == []


def test_bad_logger_is_a_one_line_error_before_any_work(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.run_main(training_vqgan.main, VQ + ["--out-dir", str(tmp_path), "--logger", "mlflow"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--logger 'mlflow'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()  # refused before the run folder was touched
    # wandb asked for but not installed
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(UserError, match="pip install wandb"):
        loggers.parse_names(["tensorboard,wandb"])
    with pytest.raises(SystemExit) as e:
        cli.run_main(training_transformer.main, ["--out-dir", str(tmp_path), "--logger", "wandb"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pip install wandb" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_wandb_offline_run_is_resumed_with_the_same_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    out = tmp_path / "run"
    training_vqgan.main(VQ + ["--out-dir", str(out), "--max-steps", "2", "--logger", "wandb"])
    run_id = (out / "wandb" / "vqgan_run_id.txt").read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    media = {p.name.rsplit("_", 1)[0] for p in (runs[0] / "files" / "media" / "images" / "vqgan").glob("*.png")}
    assert media == {"rec_step_2", "rec_final_2"}  # the grids, at their steps
    training_vqgan.main(["--out-dir", str(out), "--resume", "--max-steps", "3"])
    assert (out / "wandb" / "vqgan_run_id.txt").read_text().strip() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # the same run id, continued
