"""Hugging Face Hub folders for our models: `config.json` + `model.safetensors`, on disk or in a Hub repo.

`VQGAN` and `VQGANTransformer` inherit huggingface_hub's `PyTorchModelHubMixin`, which gives them
`save_pretrained(dir)`, `from_pretrained(dir_or_repo_id)` and `push_to_hub(repo_id)`; their two hooks
`_save_pretrained` / `_from_pretrained` call the helpers here. The layout:

    <dir>/config.json          {"kind": "vqgan", <every VQGANConfig field>}
    <dir>/model.safetensors    the VQGAN's state dict (float32)
    <dir>/README.md            a model card (huggingface_hub's template)

    a VQGANTransformer folder:
    <dir>/config.json          {"kind": "transformer", <every TransformerConfig field>, "class_names": [...]}
    <dir>/model.safetensors    its own weights without the VQGAN's ("gpt.*")
    <dir>/vqgan/               its VQGAN, a VQGAN folder as above

Loading reads JSON and safetensors only, so nothing in the files can run code. A missing file, a
config.json of the other kind, or weights that don't fit the config (missing, unexpected or wrongly
shaped tensors) raise a one-line `UserError`; the scripts turn it into exit code 2. (The mixin's own
loading would load with strict=False and fall back to a pickled pytorch_model.bin; the hooks replace
it.) Config fields missing from a config.json take their defaults, as in our .pt checkpoints, so folders
written before a field existed still load.
"""

import json
import os
import re
from pathlib import Path

from cli import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PAPER_URL = "https://arxiv.org/abs/2012.09841"  # on the model card that save_pretrained writes (README.md)
# A Hub repo id is "owner/name" (huggingface_hub's validate_repo_id admits these characters).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHECKPOINT_SUFFIXES = {".pt", ".pth", ".ckpt", ".safetensors", ".bin"}
_HINT = "write one with save_pretrained or `convert_checkpoint.py CHECKPOINT --hf-dir DIR`"


def is_pretrained(source) -> bool:
    """True for a folder, or for an 'owner/name' string that is no local path and no checkpoint file name
    (a Hub repo id); False for files, so the .pt/.ckpt/.safetensors loaders take those."""
    path = Path(source).expanduser()
    if path.is_dir():
        return True
    if path.exists():
        return False
    return bool(_REPO_ID.match(str(source))) and path.suffix not in _CHECKPOINT_SUFFIXES


def resolve_file(source, filename: str, subfolder: str = "", **hub_kwargs) -> Path:
    """The local path of `subfolder/filename` in a model folder, or in a Hub repo (downloaded to the
    huggingface_hub cache; `hub_kwargs` are hf_hub_download's: revision, cache_dir, token, ...)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / subfolder / filename
        if not path.is_file():
            raise UserError(f"{folder} is not a complete model folder: {Path(subfolder) / filename} is missing; "
                            + _HINT)
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(source), filename, subfolder=subfolder or None, **hub_kwargs))
    except Exception as e:  # not found, offline (HF_HUB_OFFLINE), no network, invalid id, gated, ...
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        raise UserError(f"{str(source)!r} is no local file or folder, and {Path(subfolder) / filename} could not "
                        f"be fetched from the Hugging Face Hub repo of that name ({type(e).__name__}: {detail})"
                        ) from None


def read_config(source, kind: str, subfolder: str = "", **hub_kwargs) -> dict:
    """config.json of a model folder or repo as a dict, refused unless its "kind" is `kind`."""
    path = resolve_file(source, CONFIG_NAME, subfolder, **hub_kwargs)
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    found = config.get("kind") if isinstance(config, dict) else None
    if found != kind:
        loader = {"vqgan": "vqgan.load_vqgan", "transformer": "transformer.load_transformer"}.get(found)
        hint = f"load it with {loader}" if loader else _HINT
        if (found, kind) == ("transformer", "vqgan"):
            hint += ", or its VQGAN from the vqgan/ folder beside it"
        raise UserError(f"{path} describes a {found or 'unknown'!r} model, not a {kind!r} one; {hint}")
    return config


def read_weights(source, expected: dict, subfolder: str = "", **hub_kwargs) -> dict:
    """model.safetensors of a folder or repo, checked against `expected` (a state dict): exactly its
    keys with its shapes, floating tensors as float32 (what our models compute in)."""
    path = resolve_file(source, WEIGHTS_NAME, subfolder, **hub_kwargs)
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:  # SafetensorError on a truncated or foreign file
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = sorted(f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in set(sd) & set(expected)
                   if sd[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
                 if keys]
        raise UserError(f"{path} does not fit the config.json beside it: " + "; ".join(parts))
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def write_folder(directory, kind: str, config: dict, state_dict: dict):
    """Write config.json ({"kind": kind, **config}) and model.safetensors (state_dict) into directory,
    each through a temp file and os.replace, so an interrupted write never leaves a half file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    targets = {WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
               CONFIG_NAME: lambda p: p.write_text(json.dumps({"kind": kind, **config}, indent=2) + "\n")}
    for name, write in targets.items():
        path = directory / name
        tmp = path.with_name(f".{name}.tmp{os.getpid()}")
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def load_pretrained(cls, source, kind: str):
    """cls.from_pretrained(source) for vqgan.load_vqgan / transformer.load_transformer: the folder's kind
    checked first, download or parse failures as one-line UserErrors."""
    read_config(source, kind)
    folder = Path(source).expanduser()
    try:
        return cls.from_pretrained(str(folder) if folder.is_dir() else str(source))
    except (OSError, ValueError) as e:  # huggingface_hub's HTTP/offline errors, invalid ids
        raise UserError(f"could not load {str(source)!r}: {str(e).splitlines()[0]}") from None
