"""Decoder: local conditioning (jitter, conv at 50 Hz, transposed-conv upsampling), speaker
embedding, and the WaveNet stack of gated dilated causal residual layers.

Everything is a valid (unpadded) convolution: a decoder input of length N + R - 1 yields N
predictions, and each layer crops the conditioning to its own output length from the right, so the
model's dependencies are exactly those of `rfield.output_field`.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .. import ops
from ..config import ModelConfig


def corrupt_inputs(x_q: torch.Tensor, p: float, n_quant: int) -> torch.Tensor:
    """Each class of x_q replaced, with probability p, by a uniformly random class (dec_input_noise)."""
    noise = torch.randint(0, n_quant, x_q.shape, device=x_q.device, dtype=x_q.dtype)
    return torch.where(torch.rand(x_q.shape, device=x_q.device) < p, noise, x_q)


def jitter(z: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """(B, C, M) -> (B, C, M - 2). In training each vector is replaced by its left or right
    neighbour with probability p (each side p / 2); otherwise the centre crop."""
    if not training or p == 0:
        return z[..., 1:-1]
    B, C, M = z.shape
    r = torch.rand(B, M - 2, device=z.device)
    shift = torch.where(r < p / 2, -1, torch.where(r < p, 1, 0))
    idx = torch.arange(1, M - 1, device=z.device) + shift                 # (B, M - 2)
    return z.gather(2, idx[:, None, :].expand(B, C, M - 2))


class Conditioning(nn.Module):
    """latents (B, n_latent, M) -> local conditioning (B, n_lc_out, T) at the wav rate. Jitter keeps
    M - 2 frames, the conv at 50 Hz M - 2 - (n_lc_kern - 1) = M', and each transposed conv maps length n
    to (n - 1) * stride + kernel, so T = hop * (M' - 1) + K with K the upsampling stack's span;
    `rfield.conditioning_layers` gives the same lengths and `WaveNetAE.local_conditioning` the crop."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.jitter_prob = m.jitter_prob
        self.speaker_in_lc = m.speaker_in_lc
        n_in = m.n_latent + (m.n_global_embed if m.speaker_in_lc else 0)
        self.conv = nn.Conv1d(n_in, m.n_lc_out, m.n_lc_kern, bias=m.bias)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(m.n_lc_out, m.n_lc_out, k, stride=s, bias=m.bias)
            for s, k in zip(m.lc_upsample_strides, m.lc_upsample_kern_sizes))

    def forward(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """g (B, n_global_embed): the speaker embedding, read when `speaker_in_lc` (appended to every
        latent frame)."""
        if self.jitter_prob > 0:
            z = jitter(z, self.jitter_prob, self.training)
        if self.speaker_in_lc:
            if g is None:
                raise ValueError("speaker_in_lc: the conditioning needs the speaker embedding")
            z = torch.cat([z, g[:, :, None].expand(-1, -1, z.shape[-1])], dim=1)
        h = self.conv(z)
        for up in self.ups:
            h = up(F.relu(h))
        return h


class ResidualLayer(nn.Module):
    """Gated dilated causal layer: h = W * x (dilated) + V lc + U g; gate = tanh(h_a) sigmoid(h_b);
    x' = x + res(gate); skip = skip(gate)."""

    def __init__(self, m: ModelConfig, dilation: int, last: bool = False):
        super().__init__()
        self.n_dil, self.dilation = m.n_dil, dilation
        self.dil_conv = nn.Conv1d(m.n_res, 2 * m.n_dil, m.n_kern, dilation=dilation, bias=m.bias)
        self.lc_proj = nn.Conv1d(m.n_lc_out, 2 * m.n_dil, 1, bias=False)
        self.gc_proj = nn.Linear(m.n_global_embed, 2 * m.n_dil, bias=False)
        # the last layer's residual output would feed nothing
        self.res = None if last else nn.Conv1d(m.n_dil, m.n_res, 1, bias=m.bias)
        self.skip = nn.Conv1d(m.n_dil, m.n_skp, 1, bias=m.bias)

    def forward(self, x, lc, g, n_out: int):
        """x (B, n_res, L), lc (B, n_lc_out, >= L'), g (B, n_global_embed) -> x' (B, n_res, L'),
        skip (B, n_skp, n_out) for the last n_out positions; L' = L - (n_kern - 1) * dilation."""
        # ops.residual_layer_ref is this math in plain PyTorch; the fused kernel runs where available
        # (ops.USE_FUSED_RESIDUAL_LAYER = False forces the reference).
        return ops.residual_layer(x, lc, g, self.weights(), self.dilation, n_out)

    def weights(self) -> ops.ResidualWeights:
        res = self.res
        return ops.ResidualWeights(self.dil_conv.weight, self.dil_conv.bias, self.lc_proj.weight,
                                   self.gc_proj.weight, None if res is None else res.weight,
                                   None if res is None else res.bias, self.skip.weight, self.skip.bias)


class WaveNet(nn.Module):
    """mu-law classes (B, N + R - 1) + conditioning -> logits (B, n_quant, N)."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(m.n_quant, m.n_res)
        dils = m.dilations
        self.layers = nn.ModuleList(ResidualLayer(m, d, i == len(dils) - 1) for i, d in enumerate(dils))
        self.post1 = nn.Conv1d(m.n_skp, m.n_post, 1, bias=m.bias)
        self.post2 = nn.Conv1d(m.n_post, m.n_quant, 1, bias=m.bias)
        self.receptive_field = 1 + (m.n_kern - 1) * sum(m.dilations)

    def forward(self, x_q: torch.Tensor, lc: torch.Tensor, g: torch.Tensor, head: bool = True) -> torch.Tensor:
        return self.forward_embedded(self.embed(x_q).transpose(1, 2), lc, g, head)

    def forward_embedded(self, x: torch.Tensor, lc: torch.Tensor, g: torch.Tensor,
                         head: bool = True) -> torch.Tensor:
        """Logits (B, n_quant, N); with head=False the input of the output layer (B, n_post, N),
        for linear_cross_entropy."""
        n_out = x.shape[-1] - self.receptive_field + 1
        if n_out <= 0:
            raise ValueError(f"decoder input of {x.shape[-1]} samples is shorter than the receptive "
                             f"field {self.receptive_field}")
        skips = 0
        for layer in self.layers:
            x, s = layer(x, lc, g, n_out)
            skips = skips + s
        h = F.relu(self.post1(F.relu(skips)))
        return self.post2(h) if head else h

    def linear_cross_entropy(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the logits of h (forward(..., head=False)) against target (B, N):
        ops.linear_cross_entropy, fused on the CPU (the logits are never stored)."""
        return ops.linear_cross_entropy(h, self.post2.weight.squeeze(-1), self.post2.bias, target)
