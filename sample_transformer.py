"""Sample new images, or complete the bottom half of an image, with a trained stage-two model.

    python sample_transformer.py                                   # 16 new images into samples/
    python sample_transformer.py --num-samples 8 --top-k 100 --temperature 0.9
    python sample_transformer.py --complete photo.jpg --num-samples 4   # original | 4 completions
    python sample_transformer.py --class-label cats --cfg-scale 3       # conditional models
    python sample_transformer.py --samples-per-class 8 --cfg-scale 3   # one grid row per class

Writes sample_NNNN.png files plus grid.png (or completion_NNNN.png plus completions.png) to --out-dir;
with --samples-per-class, <class>/sample_NNNN.png (a class-folder tree, as the training data) plus
class_grid.png with one row per class, in class order.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.utils import save_image

import hub
import cli
import data
import devices
import loggers
from mingpt import check_sampling, compile_decode_step
from transformer import load_transformer
from cli import UserError, field


@dataclass
class SampleConfig:
    transformer_path: str = field("checkpoints/transformer_last.pt",
                                  "checkpoint written by training_transformer.py, a taming-transformers "
                                  "Net2NetTransformer .ckpt (YAML in ../configs/), a save_pretrained folder or a "
                                  "Hugging Face Hub repo id")
    num_samples: int = field(16, "images to sample (with --complete: completions of that image)")
    out_dir: str = field("samples", "where the PNGs and the grid go")
    complete: str = field("", "an image file: keep the top half of its codes and sample the bottom half")
    keep_fraction: float = field(0.5, "with --complete: share of code rows kept from the image")
    class_label: str = field("", "class of a conditional model: its folder name, or else its index in the sorted "
                                 "names (refused when the names are numbers too); empty: unconditional")
    samples_per_class: int = field(0, "conditional models: this many samples of every class, one grid row "
                                   "per class (replaces --num-samples and --class-label; 0: off)")
    cfg_scale: float = field(1.0, "classifier-free guidance scale with --class-label or --samples-per-class "
                             "(1: none)")
    temperature: float = field(1.0, "sampling temperature (0: greedy)")
    top_k: int | None = field(None, "sample from the k most likely codes only (none: all)")
    top_p: float | None = field(None, "nucleus sampling mass (none: off)")
    batch_size: int = field(16, "images sampled at once")
    seed: int = field(0, "random seed")
    device: str = field("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: bool = field(False, "torch.compile the GPT's one-token decode step (CUDA graphs on CUDA; frozen "
                                 "weights and oneDNN matmuls on the CPU): same tokens, the first batch "
                                 "pays the compile (tens of seconds); see README, Speed")

    def validate(self):
        """Raise UserError (one line: the flag, its range, what to do) for any setting this run would
        fail on: counts, the sampling settings (mingpt.check_sampling; --cfg-scale needs --class-label)
        and a --complete file that is no readable image. Runs before the model loads or a folder is made."""
        cli.check_ranges(self, {"num_samples": ">= 1", "batch_size": ">= 1", "seed": cli.SEED_RANGE,
                                  "samples_per_class": ">= 0"})
        if self.samples_per_class and (self.class_label or self.complete):
            raise UserError("--samples-per-class samples every class; drop --class-label and --complete")
        with cli.as_user_error():
            check_sampling(self.temperature, self.top_k, self.top_p, self.cfg_scale, self.keep_fraction,
                           labels_given=self.class_label != "" or self.samples_per_class > 0, flags=True,
                           labels_name="--class-label")
        if self.complete:
            path = Path(self.complete).expanduser()
            if not path.is_file():
                raise UserError(f"--complete: no image file {str(path)!r}")
            if (why := data.check_image(path)) is not None:
                raise UserError(f"--complete: cannot read {path} as an image ({why}); pass a "
                                f"{', '.join(sorted(data.IMAGE_EXTENSIONS))} file")


def parse_label(model, label: str):
    """A class name or index -> label id, or None for unconditional sampling.

    The rule: a label equal to a class name (a first-level folder of the training data) is that class;
    otherwise a whole number is an index into the sorted names (or the class id of a model without
    names, such as taming's). An index that is not a name, while some names are numbers themselves
    (folders `3/` and `7/`), is ambiguous and refused."""
    if label == "":
        return None
    if model.num_classes == 0:
        raise UserError("--class-label given, but this model is unconditional (trained without --conditional)")
    if label in model.class_names:
        return model.class_names.index(label)
    names = ", ".join(repr(c) for c in model.class_names) or f"0..{model.num_classes - 1}"
    if label.lstrip("-").isdigit() and any(c.isdigit() for c in model.class_names):
        raise UserError(f"--class-label {label} is ambiguous: it is no class name, and the class names are "
                        f"numbers too ({names}), so an index could be misread; pass a class name")
    if label.lstrip("-").isdigit() and 0 <= int(label) < model.num_classes:
        return int(label)
    raise UserError(f"unknown --class-label {label!r}; choose from {names}")


@torch.no_grad()
def sample_classes(model, cfg, out: Path, kw: dict) -> dict:
    """cfg.samples_per_class samples of every class -> out/<class>/sample_NNNN.png, and class_grid.png
    with one row per class (class order, the model's class ids)."""
    device = model.gpt.head.weight.device
    n = cfg.samples_per_class
    labels = torch.arange(model.num_classes, device=device).repeat_interleave(n)  # (C*n,): 0,0,..,1,1,..
    images = []
    for start in range(0, len(labels), cfg.batch_size):
        y = labels[start : start + cfg.batch_size]
        images.append(model.indices_to_image(model.generate(len(y), labels=y, **kw)).cpu())
    images = torch.cat(images)  # (C*n, 3, S, S) in [-1, 1], class by class
    names = list(model.class_names) or [str(c) for c in range(model.num_classes)]
    paths = []
    for i, img in enumerate(images):
        folder = out / names[i // n]
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"sample_{i % n:04d}.png")
        save_image(img, paths[-1], normalize=True, value_range=(-1, 1))
    grid_path = out / "class_grid.png"
    loggers.save_grid([images], grid_path, nrow=n)  # n per row: row c is class c
    print(json.dumps({"images": len(images), "classes": len(names), "out_dir": str(out), "grid": str(grid_path)}))
    return {"images": [str(p) for p in paths], "labels": labels.tolist(), "grid": str(grid_path)}


def main(argv=None):
    cfg, _ = cli.parse_config(SampleConfig, argv, description=__doc__.split("\n")[0])
    cfg.validate()  # every setting, before the model loads or --out-dir is made
    device = devices.resolve_device(cfg.device)
    path = Path(cfg.transformer_path).expanduser()
    if not path.is_file() and not hub.is_pretrained(path):
        raise UserError(f"no stage-two checkpoint at {path}; train one with `python training_transformer.py` "
                        "or pass --transformer-path")
    try:
        model = load_transformer(path, device)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    if cfg.samples_per_class and model.num_classes == 0:
        raise UserError("--samples-per-class needs a class-conditional model (trained with --conditional); "
                        "this one is unconditional")
    label = parse_label(model, cfg.class_label)
    if getattr(model, "taming", False) and model.num_classes and label is None and not cfg.samples_per_class:
        raise UserError("this taming-transformers model is class-conditional: pass --class-label "
                        f"(a class id in 0..{model.num_classes - 1})")
    if getattr(model, "taming", False) and cfg.cfg_scale != 1.0:
        raise UserError("--cfg-scale needs a model trained with class dropout; taming's models have none")
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    kw = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=g, cfg_scale=cfg.cfg_scale)
    if cfg.compile:
        kw["decode_step"] = compile_decode_step(model.gpt)  # the weights no longer change here
    if cfg.samples_per_class:
        return sample_classes(model, cfg, Path(cfg.out_dir), kw)

    size = model.vqgan.config.image_size
    original = None
    if cfg.complete:
        image_path = Path(cfg.complete).expanduser()
        try:  # damage in the middle of a file passes check_image; say so for this one file
            data.load_image(image_path)
        except Exception as e:  # Pillow raises OSError, SyntaxError, struct.error... on damaged files
            raise UserError(f"--complete: cannot read {image_path} as an image ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); pass an undamaged image file") from None
        original = data.ImageDataset([image_path], size, train=False)[0][0][None].to(device)  # (1, 3, S, S)
        codes = model.encode_to_indices(original)  # (1, h*w)

    images = []
    for start in range(0, cfg.num_samples, cfg.batch_size):
        n = min(cfg.batch_size, cfg.num_samples - start)
        labels = torch.full((n,), label, dtype=torch.long, device=device) if label is not None else None
        if original is not None:
            idx = model.complete_indices(codes.expand(n, -1), cfg.keep_fraction, labels=labels, **kw)
        else:
            idx = model.generate(n, labels=labels, **kw)
        images.append(model.indices_to_image(idx).cpu())
    images = torch.cat(images)  # (N, 3, S, S) in [-1, 1]

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "completion" if original is not None else "sample"
    for i, img in enumerate(images):
        save_image(img, out / f"{stem}_{i:04d}.png", normalize=True, value_range=(-1, 1))
    if original is not None:
        # original | its reconstruction | completions
        rec = model.indices_to_image(codes).cpu()
        grid_path = out / "completions.png"
        loggers.save_grid([torch.cat([original.cpu(), rec, images])], grid_path, nrow=min(len(images) + 2, 10))
    else:
        grid_path = out / "grid.png"
        loggers.save_grid([images], grid_path, nrow=min(len(images), 8))
    print(json.dumps({"images": len(images), "out_dir": str(out), "grid": str(grid_path)}))
    return {"images": [str(out / f"{stem}_{i:04d}.png") for i in range(len(images))], "grid": str(grid_path)}


if __name__ == "__main__":
    cli.run_main(main)
