"""Vector quantiser: nearest-code lookup with the straight-through estimator.

Follows taming-transformers' `VectorQuantizer` (parameter `embedding.weight`, row-major (B, h, w) index
order) and adds options against codebook collapse:

- l2-normalised (cosine) codes, as in ViT-VQGAN (Yu et al., 2022) and LlamaGen;
- a low-dimensional lookup space (`codebook_dim`), ViT-VQGAN's factorised codes;
- dead-code restart from recent encoder outputs (Dhariwal et al., 2020, "Jukebox");
- EMA codebook updates (van den Oord et al., 2017, appendix; Razavi et al., 2019).

EMA updates and restarts change the codes in `step()`, which training calls once per optimiser step:
training forwards only add up code counts (and encoder outputs), so the micro-batches of an accumulated
step make one update, as one large batch would, and `dead_code_steps` counts optimiser steps.

Loss: ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2, with beta on the commitment term as in VQ-VAE.
`legacy_beta=True` reproduces taming's placement (beta on the codebook term), which its released
checkpoints were trained with.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def codebook_stats(indices: torch.Tensor, num_codes: int) -> tuple[float, float]:
    """Fraction of codes used and perplexity exp(H(p)) of the code histogram of `indices`."""
    return code_usage(torch.bincount(indices.flatten(), minlength=num_codes))


def code_usage(counts: torch.Tensor) -> tuple[float, float]:
    """counts: (K,) uses of each code -> (share of codes used at least once, perplexity exp(H(p)))."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    usage = (counts > 0).double().mean().item()
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum().item()
    return usage, math.exp(entropy)


class Codebook(nn.Module):
    """z: (B, D, h, w) -> (z_q, indices (B, h, w), loss)."""

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, legacy_beta: bool = False,
                 codebook_dim: int | None = None, l2_normalize: bool = False, use_ema: bool = False,
                 ema_decay: float = 0.99, restart_dead_codes: bool = False, dead_code_steps: int = 100):
        super().__init__()
        self.num_codes, self.dim, self.beta, self.legacy_beta = num_codes, dim, beta, legacy_beta
        self.codebook_dim = codebook_dim or dim
        self.l2_normalize, self.use_ema, self.ema_decay = l2_normalize, use_ema, ema_decay
        self.restart_dead_codes, self.dead_code_steps = restart_dead_codes, dead_code_steps

        if codebook_dim is not None and codebook_dim != dim:
            self.in_proj = nn.Linear(dim, codebook_dim)
            self.out_proj = nn.Linear(codebook_dim, dim)
        else:
            self.in_proj = self.out_proj = None
        self.embedding = nn.Embedding(num_codes, self.codebook_dim)
        if use_ema:
            # EMA replaces the gradient update of the codes (VQ-VAE appendix A.1)
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(num_codes))
            self.register_buffer("ema_embed_sum", torch.zeros(num_codes, self.codebook_dim))
        if restart_dead_codes:
            self.register_buffer("steps_since_used", torch.zeros(num_codes, dtype=torch.long))
        self._init_weights()
        self._reset_pending()

    def _reset_pending(self):
        # What the training forwards since the last step() saw: code counts (K,), encoder outputs summed
        # per code (K, d) for the EMA, the latest encoder outputs (N, d) for restarts, and whether all
        # were finite. Plain attributes: they never outlive a step, so they are not state.
        self._counts = self._embed_sum = self._recent = self._finite = None

    def _init_weights(self):
        if self.l2_normalize:
            # only directions matter; a unit-variance normal spreads them evenly on the sphere
            nn.init.normal_(self.embedding.weight)
        else:
            # taming's init: U(-1/K, 1/K)
            nn.init.uniform_(self.embedding.weight, -1.0 / self.num_codes, 1.0 / self.num_codes)
        if self.use_ema:
            self.ema_embed_sum.copy_(self.embedding.weight.detach())
            self.ema_cluster_size.fill_(1.0)

    def codes(self) -> torch.Tensor:
        """The code vectors in lookup space, (K, codebook_dim), l2-normalised when enabled."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    def _project_in(self, z_flat: torch.Tensor) -> torch.Tensor:
        z_e = self.in_proj(z_flat) if self.in_proj is not None else z_flat
        return F.normalize(z_e, dim=-1) if self.l2_normalize else z_e

    def _project_out(self, z_q_e: torch.Tensor) -> torch.Tensor:
        return self.out_proj(z_q_e) if self.out_proj is not None else z_q_e

    def forward(self, z: torch.Tensor):
        """z: (B, D, h, w) -> z_q (B, D, h, w), indices (B, h, w) int64, loss (scalar)."""
        B, D, h, w = z.shape
        # The distances and losses run in fp32 even under autocast: argmin over bf16 distances flips codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, D)  # (N, D), N = B*h*w
            z_e = self._project_in(z_flat)  # (N, d)
            codes = self.codes().float()  # (K, d); rewritten in place only by step(), after backward
            dist2 = (z_e.pow(2).sum(1, keepdim=True) - 2 * z_e @ codes.t()
                     + codes.pow(2).sum(1)[None, :])  # (N, K)
            indices = dist2.argmin(dim=1)  # (N,)
            e = F.embedding(indices, codes)  # (N, d)

            commitment = F.mse_loss(z_e, e.detach())
            if self.use_ema:
                loss = self.beta * commitment  # the codes get no gradient
            else:
                codebook = F.mse_loss(e, z_e.detach())
                loss = (commitment + self.beta * codebook) if self.legacy_beta else (codebook + self.beta * commitment)

            if self.training:
                self._accumulate(z_e.detach(), indices)

            # straight-through: forward uses e, backward copies the gradient to z_e
            z_q_e = z_e + (e - z_e).detach()
            z_q = self._project_out(z_q_e)  # (N, D)
        z_q = z_q.reshape(B, h, w, D).permute(0, 3, 1, 2).to(z.dtype)  # (B, D, h, w)
        return z_q, indices.reshape(B, h, w), loss

    # Not traced by torch.compile (training --compile): bookkeeping that keeps tensors on the module
    # between forwards; traced, it would be a graph break or a stale capture.
    @torch.compiler.disable
    @torch.no_grad()
    def _accumulate(self, z_e: torch.Tensor, indices: torch.Tensor):
        """Add one training forward's codes to the pending step: z_e (N, d), indices (N,)."""
        if not (self.use_ema or self.restart_dead_codes):
            return
        counts = torch.bincount(indices, minlength=self.num_codes).float()  # (K,)
        finite = torch.isfinite(z_e).all()
        if self._counts is None:
            self._counts, self._finite = counts, finite
        else:
            self._counts, self._finite = self._counts + counts, self._finite & finite
        if self.use_ema:
            embed_sum = z_e.new_zeros(self.num_codes, z_e.shape[1]).index_add_(0, indices, z_e)
            self._embed_sum = embed_sum if self._embed_sum is None else self._embed_sum + embed_sum  # (K, d)
        self._recent = z_e  # restarts draw from the step's last micro-batch

    @torch.no_grad()
    def step(self, apply: bool = True):
        """End of one optimiser step: the EMA code update and dead-code restarts, from every training
        forward since the last call (so an accumulated step counts as one step of its whole batch).

        Call it on every rank after each optimiser step (under DDP it all-reduces; every rank ends
        with the same codebook). apply=False, for a skipped step, drops what the forwards saw; so does
        a non-finite encoder output in any of them, on any rank. Nothing to do without EMA or restarts.
        """
        counts, embed_sum, z_e, finite = self._counts, self._embed_sum, self._recent, self._finite
        self._reset_pending()
        if counts is None:
            return
        # A non-finite batch (the training step skips its update) must not write NaN into the codes
        # through the EMA or a restart; all ranks skip together.
        ok = (finite & apply).float()
        if _distributed():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() == 0:
            return
        if _distributed():
            dist.all_reduce(counts)
        if self.use_ema:
            if _distributed():
                dist.all_reduce(embed_sum)
            self.ema_cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_embed_sum.mul_(self.ema_decay).add_(embed_sum, alpha=1 - self.ema_decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0
            n = self.ema_cluster_size.sum()
            size = (self.ema_cluster_size + 1e-5) / (n + self.num_codes * 1e-5) * n
            self.embedding.weight.copy_(self.ema_embed_sum / size[:, None])

        if self.restart_dead_codes:
            self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
            dead = (self.steps_since_used >= self.dead_code_steps).nonzero().squeeze(1)
            if dead.numel() == 0:
                return
            # Restart each dead code at a random recent encoder output; rank 0's choice is broadcast.
            pick = torch.randint(0, z_e.shape[0], (dead.numel(),), device=z_e.device)
            new = z_e[pick].clone()
            if _distributed():
                dist.broadcast(new, src=0)
            self.embedding.weight[dead] = new.to(self.embedding.weight.dtype)
            self.steps_since_used[dead] = 0
            if self.use_ema:
                self.ema_embed_sum[dead] = new
                self.ema_cluster_size[dead] = 1.0

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: (B, h, w) int64 -> z_q: (B, D, h, w), equal to forward's z_q for those codes."""
        B, h, w = indices.shape
        z_q = self._project_out(F.embedding(indices.reshape(-1), self.codes()))  # (N, D)
        return z_q.reshape(B, h, w, self.dim).permute(0, 3, 1, 2)
