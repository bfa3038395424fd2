"""Write any supported VQGAN checkpoint as our own plain one, as .safetensors weights, or as a Hugging Face folder.

    python convert_checkpoint.py logs/vqgan_imagenet_f16_16384/checkpoints/last.ckpt --out vqgan_f16_16384.pt
    python convert_checkpoint.py model.ckpt --config config.yaml --out vq-f8.pt --safetensors vq-f8.safetensors
    python convert_checkpoint.py checkpoints/vqgan_last.pt --out vqgan_small.pt   # ours, without optimiser state
    python convert_checkpoint.py checkpoints/transformer_last.pt --hf-dir hf/transformer   # for push_to_hub

Sources: our stage-one checkpoints, taming-transformers / latent-diffusion VQGAN `.ckpt` files (YAML from
--config, else `../configs/*project.yaml` or `config.yaml` beside it, else inferred from the weights),
and the first stage of a taming Net2NetTransformer `.ckpt`. The .pt output is what training_vqgan.py
writes minus the optimiser, scaler and RNG state: {'kind': 'vqgan', 'model_config', 'model',
'discriminator' (when there is one), 'step', 'converted_from'}; it loads with weights_only=True.
The .safetensors output holds the model weights, with the model_config as JSON in its metadata.
--hf-dir writes the folder `save_pretrained` writes (config.json + model.safetensors, see hub.py) of the
model that vqgan.load_vqgan loads from the file, or, for a stage-two checkpoint (ours or a taming
Net2NetTransformer), of the model transformer.load_transformer loads, its VQGAN in vqgan/. EMA weights
are used when the checkpoint has them, as the loaders do. --out/--safetensors of a taming
Net2NetTransformer hold its first-stage VQGAN.
"""

import argparse
import json
import os
from pathlib import Path

import taming_compat
from checkpoints import load_checkpoint, save_checkpoint
from cli import UserError, config_dict, run_main
from transformer import load_transformer
from vqgan import load_vqgan, own_vqgan_config, vqgan_from_state_dict


def convert(src, config=None) -> dict:
    """Our plain checkpoint dict for any supported VQGAN checkpoint."""
    ckpt = load_checkpoint(src)
    fmt = taming_compat.checkpoint_format(ckpt)
    if fmt == "ours":
        if config is not None:
            raise UserError(f"{src} is one of our checkpoints and carries its own config; drop --config")
        cfg = own_vqgan_config(ckpt, src)
        out = {"kind": "vqgan", "model_config": config_dict(cfg), "model": ckpt["model"],
               "step": int(ckpt.get("step", 0)), "converted_from": str(src)}
        if ckpt.get("ema_model"):
            out["ema_model"] = ckpt["ema_model"]
        if ckpt.get("discriminator"):
            out["discriminator"] = ckpt["discriminator"]
        return out
    if fmt not in ("taming_vqgan", "taming_transformer"):
        raise UserError(f"{src} is neither one of our VQGAN checkpoints nor a taming-transformers/"
                        "latent-diffusion one")
    t = taming_compat.taming_vqgan(ckpt, src, config)
    cfg = vqgan_from_state_dict(t.config, t.state_dict).config  # the weights checked against the architecture
    out = {"kind": "vqgan", "model_config": config_dict(cfg), "model": t.state_dict,
           "step": t.global_step or 0, "converted_from": str(src)}
    if t.discriminator_state_dict is not None:
        out["discriminator"] = t.discriminator_state_dict
    return out


def save_safetensors(ckpt: dict, path):
    """The weights load_vqgan uses, with model_config in the metadata; written atomically."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("--safetensors needs the safetensors package: `pip install safetensors`") from None
    weights = ckpt.get("ema_model") or ckpt["model"]
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    meta = {"kind": "vqgan", "model_config": json.dumps(ckpt["model_config"]),
            "converted_from": ckpt["converted_from"]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_hf_folder(src, directory, config=None):
    """Write the Hugging Face folder of src's model (see the module docstring); returns the model."""
    ckpt = load_checkpoint(src)
    stage_two = taming_compat.checkpoint_format(ckpt) == "taming_transformer" or ckpt.get("kind") == "transformer"
    del ckpt
    try:
        model = load_transformer(src, config=config) if stage_two else load_vqgan(src, config=config)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    model.save_pretrained(directory)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("src", help="checkpoint to convert (ours, or a taming/latent-diffusion .ckpt)")
    parser.add_argument("--out", default=None, help="write our plain checkpoint here (.pt)")
    parser.add_argument("--safetensors", default=None, help="also write the weights here (.safetensors)")
    parser.add_argument("--hf-dir", default=None, help="also write a Hugging Face folder here (config.json + "
                        "model.safetensors; load with from_pretrained, share with push_to_hub)")
    parser.add_argument("--config", default=None,
                        help="taming YAML for a taming checkpoint (default: found beside it, else inferred)")
    args = parser.parse_args(argv)
    if args.out is None and args.safetensors is None and args.hf_dir is None:
        parser.error("give --out, --safetensors and/or --hf-dir")
    ckpt = None
    if args.out is not None or args.safetensors is not None:
        ckpt = convert(args.src, args.config)
        c = ckpt["model_config"]
        print(f"{args.src}: VQGAN ch {c['ch']} ch_mult {c['ch_mult']} z {c['z_channels']}, "
              f"{c['num_codebook_vectors']} codes of dim {c['latent_dim']}, legacy_beta {c['legacy_beta']}; "
              f"discriminator: {'yes' if 'discriminator' in ckpt else 'none'}")
    if args.out is not None:
        save_checkpoint(ckpt, args.out)
        print(f"wrote {args.out}")
    if args.safetensors is not None:
        save_safetensors(ckpt, args.safetensors)
        print(f"wrote {args.safetensors}")
    if args.hf_dir is not None:
        model = save_hf_folder(args.src, args.hf_dir, args.config)
        print(f"wrote {args.hf_dir} ({type(model).__name__})")
    return ckpt


if __name__ == "__main__":
    run_main(main)
