"""Checkpoint files: written atomically, read without ever running code from them.

`load_checkpoint` reads ours and the plain ones with `torch.load(weights_only=True)`; a Lightning
checkpoint (taming-transformers, latent-diffusion) that also pickles other objects (OmegaConf configs,
callback classes, `AttributeDict`) is read with a restricted unpickler that resolves only torch's
weights_only allowlist and turns every other global into an inert stand-in that records its arguments
and calls nothing. Nothing here knows the models: converting what was read is taming_compat's and the
loaders' (vqgan.load_vqgan, transformer.load_transformer) job.
"""

import errno
import json
import os
import pickle
import types
import zipfile
from pathlib import Path

import torch

from cli import UserError

# ============================================================================= safe reading

# Modules whose globals can run code, open files or import things. No model checkpoint needs any of
# them, so naming one is refused outright (the stand-ins below would make it inert anyway; refusing
# gives a clear message for a file that is very likely malicious).
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "sys", "subprocess", "_posixsubprocess", "shutil", "importlib", "runpy", "pty",
    "socket", "ctypes", "pickle", "_pickle", "marshal", "code", "codeop", "pdb", "bdb", "types",
    "functools", "operator", "multiprocessing", "threading", "_thread", "asyncio", "webbrowser", "signal",
    "tempfile", "io", "_io", "pathlib", "posixpath", "ntpath", "glob", "builtins", "__builtin__",
    "commands", "pip", "setuptools", "dill", "cloudpickle", "numpy.testing", "torch.hub", "torch.jit",
    "torch.ops", "torch._ops", "torch.package", "torch.serialization",
}
# Plain data constructors from builtins that pickles of ordinary containers use.
_SAFE_BUILTINS = {f"builtins.{t.__name__}": t for t in
                  (set, frozenset, bytearray, bytes, complex, slice, range, list, dict, tuple, int, float,
                   str, bool)}


class _InertMeta(type):
    """Metaclass of the stand-ins: a pickle can't patch attributes onto a stand-in class."""

    def __setattr__(cls, key, value):
        raise pickle.UnpicklingError(f"refusing to set {key!r} on the stand-in for {cls.global_name}")


class InertGlobal(metaclass=_InertMeta):
    """Stand-in for a global a checkpoint names but we don't trust (e.g. an OmegaConf DictConfig or a
    Lightning callback class). It records what the pickle passes it and never calls anything."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, list_items=[])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __setitem__(self, key, value):
        self.__dict__["items"][key] = value

    def append(self, value):
        self.__dict__["list_items"].append(value)

    def extend(self, values):
        self.__dict__["list_items"].extend(values)

    def __repr__(self):
        return f"<inert {self.global_name}>"


_INERT_CLASSES: dict[str, type] = {}


def _inert_class(full_name: str) -> type:
    """One stand-in class per global name, so distinct globals stay distinct (e.g. as dict keys)."""
    if full_name not in _INERT_CLASSES:
        _INERT_CLASSES[full_name] = _InertMeta(f"Inert[{full_name}]", (InertGlobal,), {"global_name": full_name})
    return _INERT_CLASSES[full_name]


def _torch_allowed_globals() -> dict:
    """torch's own weights_only allowlist (tensor rebuilders, storages, dtypes, OrderedDict, ...)."""
    from torch import _weights_only_unpickler
    return _weights_only_unpickler._get_allowed_globals()


def _is_dangerous(module: str, name: str) -> bool:
    full = f"{module}.{name}"
    if full in _SAFE_BUILTINS:
        return False
    parts = module.split(".")
    return any(".".join(parts[:i]) in _DANGEROUS_MODULES for i in range(1, len(parts) + 1))


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals only from torch's weights_only allowlist and a few builtin containers; every
    other global becomes an inert stand-in. `find_class` is the only way a pickle reaches code."""

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if _is_dangerous(module, name):
            raise pickle.UnpicklingError(
                f"the file names the global {full}, which can run code; no model checkpoint needs it, so "
                "the file may be malicious")
        allowed = _torch_allowed_globals()
        if full in allowed:
            return allowed[full]
        if full in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[full]
        return _inert_class(full)


# torch.load's `pickle_module` interface: torch subclasses `.Unpickler` (adding its storage handling)
# and calls `.load` for the small headers of the legacy format.
_restricted_pickle = types.SimpleNamespace(
    __name__="checkpoints._restricted_pickle", __version__="1",
    Unpickler=_RestrictedUnpickler, load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load())


def _torch_load_restricted(path: Path) -> dict:
    # weights_only=False is what lets torch use a custom pickle_module; the restricted unpickler
    # above, not torch's, is then what keeps code from running.
    return torch.load(path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)


def _needs_restricted(path: Path) -> bool:
    """True when a zip checkpoint names globals outside torch's allowlist (a static scan of data.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        return bool(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # an old torch without the scanner, or an odd archive: just try weights_only
        return False


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors import safe_open
    except ImportError:
        raise UserError(f"{path} is a .safetensors file; `pip install safetensors` to read it") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"could not read {str(path)!r} as safetensors: {str(e).splitlines()[0]}") from None
    if meta.get("kind") != "vqgan" or "model_config" not in meta:
        raise UserError(f"{path} has no VQGAN model_config in its metadata; only files written by "
                        "convert_checkpoint.py --safetensors can be loaded")
    return {"kind": "vqgan", "model_config": json.loads(meta["model_config"]), "model": tensors}


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read any supported checkpoint file as a dict without running code from it (the one reader).

    Ours and plain files load with `torch.load(weights_only=True)`. Lightning `.ckpt` files that also
    pickle other objects load through the restricted unpickler: tensors come back as tensors, every
    other object as an `InertGlobal` stand-in. `.safetensors` files written by convert_checkpoint.py
    come back as our checkpoint dict."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    ckpt, first_error = None, None
    if not _needs_restricted(path):
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            first_error = e  # e.g. a legacy-format Lightning file: try the restricted reader
        except Exception as e:  # truncated zip, not a torch file, ...
            raise UserError(f"could not load checkpoint {str(path)!r}: {str(e).splitlines()[0]}") from None
    if ckpt is None:
        try:
            ckpt = _torch_load_restricted(path)
        except pickle.UnpicklingError as e:
            raise UserError(f"refusing to load {str(path)!r}: {str(e).splitlines()[0]}") from None
        except Exception as e:
            detail = str(first_error or e).splitlines()[0]
            raise UserError(f"could not load checkpoint {str(path)!r} safely: {detail}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {str(path)!r} is not a dict checkpoint")
    return ckpt


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
