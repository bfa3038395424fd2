"""Sample new images, or complete the bottom half of an image, with a trained stage-two model.

    python sample_transformer.py                                   # 16 new images into samples/
    python sample_transformer.py --num-samples 8 --top-k 100 --temperature 0.9
    python sample_transformer.py --complete photo.jpg --num-samples 4   # original | 4 completions
    python sample_transformer.py --class-label cats --cfg-scale 3       # conditional models

Writes sample_NNNN.png files plus grid.png (or completion_NNNN.png plus completions.png) to --out-dir.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.utils import save_image

import utils
from mingpt import compile_decode_step
from transformer import load_transformer
from utils import UserError, field


@dataclass
class SampleConfig:
    transformer_path: str = field("checkpoints/transformer_last.pt", "checkpoint written by training_transformer.py, or a taming-transformers Net2NetTransformer .ckpt (YAML in ../configs/)")
    num_samples: int = field(16, "images to sample (with --complete: completions of that image)")
    out_dir: str = field("samples", "where the PNGs and the grid go")
    complete: str = field("", "an image file: keep the top half of its codes and sample the bottom half")
    keep_fraction: float = field(0.5, "with --complete: share of code rows kept from the image")
    class_label: str = field("", "class name or index for conditional models (empty: unconditional)")
    cfg_scale: float = field(1.0, "classifier-free guidance scale with --class-label (1: none)")
    temperature: float = field(1.0, "sampling temperature (0: greedy)")
    top_k: int | None = field(None, "sample from the k most likely codes only (none: all)")
    top_p: float | None = field(None, "nucleus sampling mass (none: off)")
    batch_size: int = field(16, "images sampled at once")
    seed: int = field(0, "random seed")
    device: str = field("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: bool = field(False, "torch.compile the GPT's one-token decode step (CUDA graphs on CUDA; frozen "
                                 "weights and oneDNN matmuls on the CPU): same tokens, the first batch "
                                 "pays the compile (tens of seconds); see README, Speed")


def parse_label(model, label: str):
    """A class name or index -> label id, or None for unconditional sampling."""
    if label == "":
        return None
    if model.num_classes == 0:
        raise UserError("--class-label given, but this model is unconditional (trained without --conditional)")
    if label in model.class_names:
        return model.class_names.index(label)
    if label.lstrip("-").isdigit() and 0 <= int(label) < model.num_classes:
        return int(label)
    names = ", ".join(repr(c) for c in model.class_names) or f"0..{model.num_classes - 1}"
    raise UserError(f"unknown --class-label {label!r}; choose from {names}")


def main(argv=None):
    cfg, _ = utils.parse_config(SampleConfig, argv, description=__doc__.split("\n")[0])
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise UserError("--num-samples and --batch-size must be at least 1")
    device = utils.resolve_device(cfg.device)
    path = Path(cfg.transformer_path).expanduser()
    if not path.is_file():
        raise UserError(f"no stage-two checkpoint at {path}; train one with `python training_transformer.py` "
                        "or pass --transformer-path")
    try:
        model = load_transformer(path, device)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    label = parse_label(model, cfg.class_label)
    if getattr(model, "taming", False) and model.num_classes and label is None:
        raise UserError("this taming-transformers model is class-conditional: pass --class-label "
                        f"(a class id in 0..{model.num_classes - 1})")
    if getattr(model, "taming", False) and cfg.cfg_scale != 1.0:
        raise UserError("--cfg-scale needs a model trained with class dropout; taming's models have none")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    kw = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=g, cfg_scale=cfg.cfg_scale)
    if cfg.compile:
        kw["decode_step"] = compile_decode_step(model.gpt)  # the weights no longer change here

    size = model.vqgan.config.image_size
    original = None
    if cfg.complete:
        image_path = Path(cfg.complete).expanduser()
        if not image_path.is_file():
            raise UserError(f"--complete: no image file {str(image_path)!r}")
        original = utils.ImageDataset([image_path], size, train=False)[0][0][None].to(device)  # (1, 3, S, S)
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

    stem = "completion" if original is not None else "sample"
    for i, img in enumerate(images):
        save_image(img, out / f"{stem}_{i:04d}.png", normalize=True, value_range=(-1, 1))
    if original is not None:
        # original | its reconstruction | completions
        rec = model.indices_to_image(codes).cpu()
        grid_path = out / "completions.png"
        utils.save_grid([torch.cat([original.cpu(), rec, images])], grid_path, nrow=min(len(images) + 2, 10))
    else:
        grid_path = out / "grid.png"
        utils.save_grid([images], grid_path, nrow=min(len(images), 8))
    print(json.dumps({"images": len(images), "out_dir": str(out), "grid": str(grid_path)}))
    return {"images": [str(out / f"{stem}_{i:04d}.png") for i in range(len(images))], "grid": str(grid_path)}


if __name__ == "__main__":
    utils.run_main(main)
