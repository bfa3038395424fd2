"""Hugging Face Hub folders: save_pretrained -> from_pretrained round trips for both models, taming and our
checkpoints converted to folders, repo ids served from the local Hub cache, push_to_hub against a stand-in
API, one-line errors for bad folders, and no network access at any point."""

import copy
import json
import shutil
import socket
import types
from pathlib import Path

import pytest
import torch

import checkpoints
import cli
import convert_checkpoint
import sample_transformer
import training_vqgan
from cli import UserError
from test_taming_compat import PlantMarker, tiny_taming_sd, vq_yaml, write_run
from test_taming_transformer import make_run
from transformer import TransformerConfig, VQGANTransformer, load_transformer, model_dict
from vqgan import VQGAN, config_from_preset, load_vqgan

huggingface_hub = pytest.importorskip("huggingface_hub")

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, 3, 32, 32) in [-1, 1]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt is refused and fails the test, even where the code under test catches the
    error (HF_HUB_OFFLINE is set in conftest as well)."""
    attempts = []

    def refuse(*args):
        attempts.append(args[-1])
        raise OSError(f"a test tried to reach the network: {args[-1]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kw: refuse(host))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield
    assert not attempts, f"network access attempted: {attempts}"


def tiny_vqgan(**options) -> VQGAN:
    torch.manual_seed(0)
    model = VQGAN(config_from_preset("tiny", **options))
    for b in model.buffers():  # buffers away from their initial values, so a lost buffer shows
        if b.is_floating_point():
            b.uniform_()
        else:
            b.random_(0, 7)
    return model.eval()


def tiny_transformer() -> VQGANTransformer:
    torch.manual_seed(0)
    config = TransformerConfig(n_layer=1, n_head=2, n_embd=16, num_classes=2, pkeep=0.9, cfg_dropout=0.2)
    return VQGANTransformer(tiny_vqgan(), config, ["cats", "dogs"]).eval()


def files(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def samples(model, seed=3):
    return model.generate(2, seed=seed, labels=[0, 1] if model.num_classes else None, top_k=8)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("options", [{}, dict(ema_codebook=True, codebook_dim=8, legacy_beta=True,
                                              restart_dead_codes=True, l2_normalize_codes=True)])
def test_vqgan_round_trip(tmp_path, options):
    model = tiny_vqgan(**options)
    model.save_pretrained(tmp_path / "vq")
    assert files(tmp_path / "vq") == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "vq" / "config.json").read_text())["kind"] == "vqgan"
    again = VQGAN.from_pretrained(tmp_path / "vq")
    assert again.config == model.config and not again.training
    assert_same_state(model, again)
    with torch.no_grad():
        for a, b in zip(model(X), again(X)):
            assert torch.equal(a, b)
    loaded = load_vqgan(tmp_path / "vq")  # the scripts' loader: frozen, eval mode
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert_same_state(model, loaded)


def test_transformer_round_trip_holds_its_vqgan(tmp_path):
    model = tiny_transformer()
    model.save_pretrained(tmp_path / "t")
    assert files(tmp_path / "t") == ["README.md", "config.json", "model.safetensors", "vqgan/config.json",
                                     "vqgan/model.safetensors"]
    from safetensors.torch import load_file
    assert all(k.startswith("gpt.") for k in load_file(tmp_path / "t" / "model.safetensors"))  # VQGAN once only
    for again in (VQGANTransformer.from_pretrained(tmp_path / "t"), load_transformer(tmp_path / "t")):
        assert again.config == model.config and again.class_names == ["cats", "dogs"] and not again.training
        assert_same_state(model, again)
        codes = torch.randint(0, model.num_codes, (2, model.num_tokens), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(model(codes, torch.tensor([0, 1]))[0], again(codes, torch.tensor([0, 1]))[0])
        assert torch.equal(samples(model), samples(again))
    # its vqgan/ folder is a VQGAN folder of its own
    assert_same_state(model.vqgan, load_vqgan(tmp_path / "t" / "vqgan"))


# ----------------------------------------------------------------------------- convert_checkpoint --hf-dir

def test_taming_vqgan_checkpoint_converted_to_a_folder(tmp_path):
    src = write_run(tmp_path / "run", tiny_taming_sd(), vq_yaml())
    convert_checkpoint.main([str(src), "--out", str(tmp_path / "ours.pt"), "--hf-dir", str(tmp_path / "hf")])
    ref, got = load_vqgan(src), load_vqgan(tmp_path / "hf")
    assert got.config == ref.config and got.config.legacy_beta  # taming's beta placement survives
    x = X[:, :, :16, :16]  # the tiny taming model is 16 px
    with torch.no_grad():
        for a, b in zip(ref(x), got(x)):
            assert torch.equal(a, b)
    assert_same_state(ref, load_vqgan(tmp_path / "ours.pt"))


@pytest.mark.parametrize("cond, extra", [("__is_unconditional__", dict(sos_token=3, unconditional=True)),
                                         ({"target": "taming.modules.util.Labelator", "params": {"n_classes": 4}}, {})])
def test_taming_transformer_checkpoint_converted_to_a_folder(tmp_path, cond, extra):
    src, _ = make_run(tmp_path / "run", cond, **extra)
    convert_checkpoint.main([str(src), "--hf-dir", str(tmp_path / "hf")])
    ref, got = load_transformer(src), load_transformer(tmp_path / "hf")
    assert got.taming and got.config == ref.config and (got.sos_token, got.num_classes) == (ref.sos_token, ref.num_classes)
    assert_same_state(ref, got)
    assert torch.equal(samples(ref), samples(got))


def test_our_checkpoint_converted_with_its_ema_weights(tmp_path):
    model = tiny_transformer()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        ema.gpt.head.weight.add_(1.0)
    checkpoints.save_checkpoint({**model_dict(model), "ema_model": ema.state_dict()}, tmp_path / "t.pt")
    convert_checkpoint.main([str(tmp_path / "t.pt"), "--hf-dir", str(tmp_path / "hf")])
    assert_same_state(ema, load_transformer(tmp_path / "hf"))  # what load_transformer(t.pt) gives too


# ----------------------------------------------------------------------------- the Hub

def put_in_hub_cache(cache: Path, repo_id: str, folder: Path):
    """The layout huggingface_hub's cache has after downloading repo_id at its main branch."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_repo_ids_load_offline_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    model = tiny_transformer()
    model.save_pretrained(tmp_path / "t")
    put_in_hub_cache(tmp_path / "cache", "someone/tiny-transformer", tmp_path / "t")
    put_in_hub_cache(tmp_path / "cache", "someone/tiny-vqgan", tmp_path / "t" / "vqgan")
    got = load_transformer("someone/tiny-transformer")
    assert_same_state(model, got)
    assert torch.equal(samples(model), samples(got))
    assert_same_state(model.vqgan, load_vqgan("someone/tiny-vqgan"))
    with pytest.raises(UserError, match="could not be fetched from the Hugging Face Hub") as e:
        load_vqgan("someone/not-there")
    assert "\n" not in str(e.value)


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    """push_to_hub against a stand-in HfApi: the folder it uploads is what from_pretrained reads."""
    model, uploaded = tiny_transformer(), {}

    class StandInApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return types.SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update(repo_id=repo_id, files=files(folder_path), model=load_transformer(folder_path))
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", StandInApi)
    model.push_to_hub("someone/tiny-transformer")
    assert uploaded["repo_id"] == "someone/tiny-transformer"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors", "vqgan/config.json",
                                 "vqgan/model.safetensors"]
    assert_same_state(model, uploaded["model"])


# ----------------------------------------------------------------------------- bad folders

def edit_json(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


BAD_FOLDERS = {
    "no config": (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    "no vqgan": (lambda d: shutil.rmtree(d / "vqgan"), "vqgan/config.json is missing"),
    "bad json": (lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
    "not safetensors": (lambda d: (d / "vqgan" / "model.safetensors").write_bytes(b"\x00" * 64),
                        "not a readable safetensors file"),
    "wider gpt": (lambda d: edit_json(d / "config.json", n_embd=32), "does not fit the config.json"),
    "other codebook": (lambda d: edit_json(d / "vqgan" / "config.json", num_codebook_vectors=32),
                       "does not fit the config.json"),
    "vqgan weights": (lambda d: shutil.copy(d / "vqgan" / "model.safetensors", d / "model.safetensors"),
                      r"missing \(\d+\): gpt\."),
    "wrong kind": (lambda d: edit_json(d / "config.json", kind="vqgan"), "describes a 'vqgan' model"),
}


@pytest.mark.parametrize("name", list(BAD_FOLDERS))
def test_bad_folders_give_one_line_errors(tmp_path, name):
    damage, match = BAD_FOLDERS[name]
    tiny_transformer().save_pretrained(tmp_path / "t")
    damage(tmp_path / "t")
    with pytest.raises(UserError, match=match) as e:
        load_transformer(tmp_path / "t")
    assert "\n" not in str(e.value)


def test_wrong_model_kind_names_the_right_loader(tmp_path):
    tiny_transformer().save_pretrained(tmp_path / "t")
    with pytest.raises(UserError, match="load it with transformer.load_transformer.*vqgan/ folder"):
        load_vqgan(tmp_path / "t")
    with pytest.raises(UserError, match="load it with vqgan.load_vqgan"):
        load_transformer(tmp_path / "t" / "vqgan")


def test_scripts_exit_2_on_a_bad_folder(tmp_path, capsys):
    tiny_transformer().save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "model.safetensors").unlink()
    with pytest.raises(SystemExit) as e:
        cli.run_main(sample_transformer.main, ["--transformer-path", str(tmp_path / "t"), "--out-dir",
                                                 str(tmp_path / "samples")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "model.safetensors is missing" in err and len(err.strip().splitlines()) == 1


def test_loading_never_unpickles(tmp_path):
    """A folder with a pickled pytorch_model.bin and no model.safetensors is refused; the pickle never runs
    (huggingface_hub's own loader would fall back to it)."""
    tiny_vqgan().save_pretrained(tmp_path / "vq")
    (tmp_path / "vq" / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    torch.save({"weights": PlantMarker(str(marker))}, tmp_path / "vq" / "pytorch_model.bin")
    with pytest.raises(UserError, match="model.safetensors is missing"):
        load_vqgan(tmp_path / "vq")
    with pytest.raises(UserError, match="model.safetensors is missing"):
        VQGAN.from_pretrained(tmp_path / "vq")
    assert not marker.exists()


def test_finetune_from_a_folder(tmp_path):
    source = tiny_vqgan()
    source.save_pretrained(tmp_path / "vq")
    out = tmp_path / "ft"
    training_vqgan.main(["--checkpoint-path", str(tmp_path / "vq"), "--out-dir", str(out), "--max-steps", "1",
                         "--learning-rate", "0", "--disc-start", "100", "--perceptual-loss-factor", "0",
                         "--num-workers", "0", "--batch-size", "4"])
    tuned = load_vqgan(out / "checkpoints" / "vqgan_last.pt")
    assert tuned.config.ch == 32 and tuned.config.image_size == 32  # the folder's architecture
    for k, v in tuned.state_dict().items():
        if not k.endswith("steps_since_used"):  # restart bookkeeping moves with the step
            assert torch.equal(v, source.state_dict()[k]), k
