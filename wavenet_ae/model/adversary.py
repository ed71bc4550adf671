"""Speaker-adversarial head on the latents: gradient reversal into the encoder (Ganin & Lempitsky
2015) and a small per-frame speaker classifier. Training only: inference loads its weights with the
model's and never calls it."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..config import ModelConfig


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back through it is multiplied by -scale."""
    return _GradReverse.apply(x, scale)


class SpeakerAdversary(nn.Module):
    """latents (B, n_latent, M), speaker ids (B,) -> loss terms. The classifier minimises its
    cross-entropy; the encoder, behind the reversal, receives -adv_weight times that gradient."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.weight = m.adv_weight
        self.net = nn.Sequential(nn.Conv1d(m.n_latent, m.adv_hidden, 1), nn.ReLU(),
                                 nn.Conv1d(m.adv_hidden, m.n_speakers, 1))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, n_speakers, M) speaker logits of each latent frame (no reversal). The classifier reads
        each frame normalised (zero mean, unit variance over its n_latent values): without it the
        encoder defeated the classifier by scaling unquantised latents up (tiny preset, adv_weight 0.1:
        latent norm 0.5 -> 1.3e5 and the conditioning gain 0 by step 400)."""
        return self.net(F.layer_norm(z.transpose(1, 2), z.shape[1:2]).transpose(1, 2))

    def forward(self, z: torch.Tensor, speaker: torch.Tensor) -> dict:
        logits = self.logits(grad_reverse(z, self.weight))
        target = speaker[:, None].expand(-1, z.shape[-1])
        ce = F.cross_entropy(logits, target)
        return {"loss_adv": ce, "adv_ce": ce.detach(),
                "adv_accuracy": (logits.detach().argmax(1) == target).float().mean()}
