"""Run dome272/VQGAN-pytorch's own model and training loop on given batches (a baseline for study.py).

    python baseline_dome272.py --repo ~/src/VQGAN-pytorch --data data.pt --vgg vgg16_features.pt --out rec.pt

Nothing of that project is part of this one: its modules are imported from the local clone `--repo`
(this script imports none of ours, whose module names are the same). Its loop body is restated
step by step from its `training_vqgan.py` (`TrainVQGAN.train`), with its defaults (Adam lr 2.25e-5,
betas (0.5, 0.9), disc_start 10000, factors 1), minus only the file output (grids, checkpoints).
Two offline substitutions, both behaviour-preserving: its LPIPS's VGG16 gets the ImageNet weights
from `--vgg` instead of torchvision's download, and its LPIPS head file comes from the `lpips`
package instead of a download (it loads that file with strict=False under other key names, so its
heads stay at their initialisation either way, as in the original).

--data: a torch file {"batches": (steps, B, 3, S, S), "heldout": (N, 3, S, S)}, images in [-1, 1].
--out: a torch file {"rec": (N, 3, S, S) held-out reconstructions in [-1, 1], "indices": their codes,
"train_seconds"/"train_cpu_seconds": training wall/CPU time, "steps": steps run}.
"""

import argparse
import importlib.metadata
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--vgg", required=True, help="torchvision VGG16 `features` state dict")
    p.add_argument("--out", required=True)
    p.add_argument("--latent-dim", type=int, default=256)
    p.add_argument("--num-codebook-vectors", type=int, default=1024)
    p.add_argument("--learning-rate", type=float, default=2.25e-05)
    p.add_argument("--disc-start", type=int, default=10000)
    p.add_argument("--max-seconds", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    head_file = _pip_lpips_vgg_head()
    sys.path.insert(0, str(Path(args.repo).expanduser()))
    import torchvision.models

    # its utils.py imports albumentations for its data loader, which is not used here
    sys.modules.setdefault("albumentations", types.ModuleType("albumentations"))
    import lpips as their_lpips  # the clone's lpips.py, first on sys.path
    from discriminator import Discriminator
    from utils import weights_init
    from vqgan import VQGAN

    vgg_features = torch.load(args.vgg, weights_only=True)

    def vgg16(pretrained=True):
        net = torchvision.models.vgg16(weights=None)
        net.features.load_state_dict(vgg_features)
        return net
    their_lpips.vgg16 = vgg16
    their_lpips.get_ckpt_path = lambda name, root: str(head_file)

    hp = argparse.Namespace(latent_dim=args.latent_dim, image_size=0, num_codebook_vectors=args.num_codebook_vectors,
                            beta=0.25, image_channels=3, device=args.device, learning_rate=args.learning_rate,
                            beta1=0.5, beta2=0.9, disc_start=args.disc_start, disc_factor=1.0,
                            rec_loss_factor=1.0, perceptual_loss_factor=1.0)
    data = torch.load(args.data, weights_only=True)
    batches, heldout = data["batches"], data["heldout"]
    hp.image_size = batches.shape[-1]
    torch.manual_seed(args.seed)

    vqgan = VQGAN(hp).to(hp.device)
    discriminator = Discriminator(hp).to(hp.device)
    discriminator.apply(weights_init)
    perceptual_loss = their_lpips.LPIPS().eval().to(hp.device)
    params = (list(vqgan.encoder.parameters()) + list(vqgan.decoder.parameters())
              + list(vqgan.codebook.parameters()) + list(vqgan.quant_conv.parameters())
              + list(vqgan.post_quant_conv.parameters()))
    opt_vq = torch.optim.Adam(params, lr=hp.learning_rate, eps=1e-08, betas=(hp.beta1, hp.beta2))
    opt_disc = torch.optim.Adam(discriminator.parameters(), lr=hp.learning_rate, eps=1e-08, betas=(hp.beta1, hp.beta2))

    t0, c0 = time.perf_counter(), time.process_time()
    steps = 0
    for step, imgs in enumerate(batches):
        imgs = imgs.to(hp.device)
        decoded_images, _, q_loss = vqgan(imgs)
        disc_real = discriminator(imgs)
        disc_fake = discriminator(decoded_images)
        disc_factor = vqgan.adopt_weight(hp.disc_factor, step, threshold=hp.disc_start)
        perceptual = perceptual_loss(imgs, decoded_images)
        rec_loss = torch.abs(imgs - decoded_images)
        perceptual_rec_loss = (hp.perceptual_loss_factor * perceptual + hp.rec_loss_factor * rec_loss).mean()
        g_loss = -torch.mean(disc_fake)
        lam = vqgan.calculate_lambda(perceptual_rec_loss, g_loss)
        vq_loss = perceptual_rec_loss + q_loss + disc_factor * lam * g_loss
        d_loss_real = torch.mean(F.relu(1. - disc_real))
        d_loss_fake = torch.mean(F.relu(1. + disc_fake))
        gan_loss = disc_factor * 0.5 * (d_loss_real + d_loss_fake)
        opt_vq.zero_grad()
        vq_loss.backward(retain_graph=True)
        opt_disc.zero_grad()
        gan_loss.backward()
        opt_vq.step()
        opt_disc.step()
        steps += 1
        if args.max_seconds > 0 and time.perf_counter() - t0 >= args.max_seconds:
            break
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    print(f"dome272 loop: {steps} steps in {seconds:.1f} s ({seconds / steps:.2f} s/step)", flush=True)

    vqgan.eval()
    recs, indices = [], []
    with torch.no_grad():
        for x in heldout.split(16):
            x_rec, idx, _ = vqgan(x.to(hp.device))
            recs.append(x_rec.float().clamp(-1, 1).cpu())
            indices.append(idx.flatten().cpu())
    torch.save({"rec": torch.cat(recs), "indices": torch.cat(indices), "train_seconds": seconds,
                "train_cpu_seconds": cpu_seconds, "steps": steps}, args.out)


def _pip_lpips_vgg_head() -> Path:
    """The `lpips` package's vgg.pth (its LPIPS heads), from its install record: neither the clone's
    lpips.py nor ours is imported."""
    path = Path(importlib.metadata.distribution("lpips").locate_file("lpips/weights/v0.1/vgg.pth"))
    if not path.exists():
        raise SystemExit("the lpips package's weights/v0.1/vgg.pth was not found (pip install lpips)")
    return path


if __name__ == "__main__":
    main()
