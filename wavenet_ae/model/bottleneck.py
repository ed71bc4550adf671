"""Bottlenecks: plain AE, VAE (KL to N(0, I)) and VQ-VAE (EMA codebook, straight-through).

Each maps encoder output (B, n_enc, M) to latents (B, n_latent, M) and returns a dict of loss
terms (already weighted, in nats per wav sample where that is meaningful) and statistics.

VQ-VAE uses exponential-moving-average codebook updates (van den Oord et al. 2017, appendix) rather
than a codebook loss: the codebook then tracks the encoder outputs directly, which trains stably
and leaves fewer dead codes; dead codes (EMA usage below `dead_threshold`) are restarted from
random encoder outputs of the current batch. A training forward reports `dead_codes`, the number of
dead codes after this batch's EMA update and *before* the restart, and `codes_restarted`, the number
restarted in that step. With `vq_ema_decay = 0` the codebook is learnt by gradient instead (codebook
loss + commitment loss; there are no EMA counts, so no dead-code restarts: `ModelConfig.validate`
refuses `vq_dead_restart` with it).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.distributed as dist
import torch.nn.functional as F

from .. import checkpoint
from ..config import ModelConfig


class AEBottleneck(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.proj = nn.Conv1d(m.n_enc, m.n_latent, 1, bias=m.bias)

    def forward(self, h: torch.Tensor):
        z = self.proj(h)
        return z, {"latent_norm": z.detach().norm(dim=1).mean()}


class VAEBottleneck(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.proj = nn.Conv1d(m.n_enc, 2 * m.n_latent, 1, bias=m.bias)
        self.kl_weight, self.free_bits = m.vae_kl_weight, m.vae_free_bits
        self.hop = m.hop

    def forward(self, h: torch.Tensor):
        mu, logvar = self.proj(h).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        kl_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)      # (B, C, M) nats
        kl_per_dim = kl_dim.mean(dim=(0, 2))                            # nats per frame
        # nats per latent frame / samples per frame = nats per wav sample, comparable to the CE
        kl = kl_per_dim.sum() / self.hop
        penalised = kl_per_dim.clamp(min=self.free_bits).sum() / self.hop if self.free_bits > 0 else kl
        kl_per_dim = kl_per_dim.detach()
        return z, {"loss_kl": self.kl_weight * penalised, "kl_per_sample": kl.detach(),
                   "kl_per_dim": kl_per_dim, "active_dims": (kl_per_dim > 0.01).sum(),
                   "latent_norm": z.detach().norm(dim=1).mean()}


class VQBottleneck(nn.Module):
    def __init__(self, m: ModelConfig, dead_threshold: float = 0.03):
        super().__init__()
        self.proj = nn.Conv1d(m.n_enc, m.n_latent, 1, bias=m.bias)
        self.beta, self.decay, self.restart = m.vq_commitment, m.vq_ema_decay, m.vq_dead_restart
        self.dead_threshold, self.eps = dead_threshold, 1e-5
        embed = torch.randn(m.n_codes, m.n_latent) * 0.1
        self.register_buffer("initialized", torch.tensor(False))
        # training forwards so far (a buffer: checkpoints carry it); mirrored in a Python int so that
        # the warm-up test costs no device sync per step
        self.warmup = m.vq_warmup_steps
        self.register_buffer("steps_seen", torch.tensor(0, dtype=torch.long))
        self._steps: int | None = None
        if self.decay > 0:
            self.register_buffer("codebook", embed)
            self.register_buffer("ema_count", torch.ones(m.n_codes))
            self.register_buffer("ema_sum", embed.clone())
        else:
            self.codebook = nn.Parameter(embed)

    def quantize(self, z_e: torch.Tensor) -> torch.Tensor:
        """z_e (B, C, M) -> code indices (B, M)."""
        flat = z_e.transpose(1, 2).reshape(-1, z_e.shape[1])
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)
        return d.argmin(dim=1).view(z_e.shape[0], z_e.shape[2])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        checkpoint.add_vq_step_count(state_dict, prefix)   # a pre-warm-up state loaded without `upgrade`
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._steps = None

    def in_warmup(self, training: bool = False) -> bool:
        """Whether a forward now leaves the latents unquantised: the first `warmup` training forwards,
        and evaluation until the training forward after them has initialised the codebook."""
        if self._steps is None:
            self._steps = int(self.steps_seen)
        return self._steps < self.warmup if training else (self.warmup > 0 and self._steps <= self.warmup)

    def forward(self, h: torch.Tensor):
        z_e = self.proj(h)
        warm = self.in_warmup(self.training)
        if self.training:
            self._steps += 1
            self.steps_seen.add_(1)
        if warm:
            # a plain autoencoder first: the decoder learns to rely on the latents before they are
            # quantised (from then on the codebook starts from encoder outputs that carry content)
            return z_e, {"loss_commit": z_e.new_zeros(()), "latent_norm": z_e.detach().norm(dim=1).mean()}
        if self.training and not self.initialized:
            self._init_from(z_e.detach())
        codes = self.quantize(z_e.detach())
        e = F.embedding(codes, self.codebook).transpose(1, 2)          # (B, C, M)
        terms = {"loss_commit": self.beta * F.mse_loss(z_e, e.detach())}
        if self.decay == 0:
            terms["loss_codebook"] = F.mse_loss(e, z_e.detach())
        elif self.training:
            terms["dead_codes"], terms["codes_restarted"] = self._ema_update(z_e.detach(), codes)
        else:
            terms["dead_codes"] = (self.ema_count < self.dead_threshold).sum()
            terms["codes_restarted"] = torch.zeros((), dtype=torch.long, device=z_e.device)
        z_q = z_e + (e - z_e).detach()                                  # straight-through
        counts = torch.bincount(codes.flatten(), minlength=self.codebook.shape[0]).float()
        p = counts / counts.sum()
        terms["perplexity"] = torch.exp(-(p * (p + 1e-10).log()).sum())
        terms["codes_used"] = (counts > 0).sum()
        terms["latent_norm"] = z_e.detach().norm(dim=1).mean()
        terms["codes"] = codes
        return z_q, terms

    @torch.no_grad()
    def _init_from(self, z_e: torch.Tensor) -> None:
        """Codebook := random encoder outputs of the first training batch, so that no code starts
        out of reach of the data (a random init far from it collapses onto one code)."""
        flat = z_e.transpose(1, 2).reshape(-1, z_e.shape[1])
        n = self.codebook.shape[0]
        pick = torch.randperm(flat.shape[0], device=flat.device)[:n]
        if len(pick) < n:
            pick = torch.cat([pick, torch.randint(0, flat.shape[0], (n - len(pick),), device=flat.device)])
        fresh = flat[pick] + 0.01 * flat.std() * torch.randn(n, flat.shape[1], device=flat.device)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(fresh, 0)
        self.codebook.data.copy_(fresh)
        if self.decay > 0:
            self.ema_sum.copy_(fresh)
            self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, z_e: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One EMA step of counts, sums and codebook, then the dead-code restart. Returns (dead codes
        after the EMA step, before the restart; codes restarted), 0-dim tensors."""
        flat = z_e.transpose(1, 2).reshape(-1, z_e.shape[1])
        onehot = F.one_hot(codes.flatten(), self.codebook.shape[0]).type_as(flat)
        count, total = onehot.sum(0), onehot.t() @ flat
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(count)
            dist.all_reduce(total)
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.codebook.shape[0] * self.eps) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        dead = self.ema_count < self.dead_threshold
        n_dead = dead.sum()
        if not self.restart:
            return n_dead, torch.zeros_like(n_dead)
        # a candidate for every code, taken where the code is dead: no `dead.any()` / count on the host,
        # which would stop the host from queueing the next step's work behind this one
        pick = torch.randint(0, flat.shape[0], (self.codebook.shape[0],), device=flat.device)
        fresh = flat[pick]
        if distributed:
            dist.broadcast(fresh, 0)
        self.codebook.copy_(torch.where(dead[:, None], fresh, self.codebook))
        self.ema_sum.copy_(torch.where(dead[:, None], fresh, self.ema_sum))
        self.ema_count.masked_fill_(dead, 1.0)
        return n_dead, n_dead.clone()             # every dead code was restarted


def make_bottleneck(m: ModelConfig) -> nn.Module:
    return {"ae": AEBottleneck, "vae": VAEBottleneck, "vqvae": VQBottleneck}[m.bottleneck](m)
