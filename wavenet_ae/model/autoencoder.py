"""The WaveNet autoencoder: features -> encoder -> bottleneck -> conditioning -> WaveNet."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..rfield import WindowPlan, conditioning_layers, plan
from .adversary import SpeakerAdversary
from .bottleneck import make_bottleneck
from .decoder import Conditioning, WaveNet, corrupt_inputs
from .encoder import Encoder


class WaveNetAE(nn.Module):
    """Shapes follow `rfield.plan(cfg, N)`: given features (B, n_in, n_frames), decoder windows of
    mu-law classes (B, N + R) and speaker ids (B,), predicts the last N classes of each window."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        m.validate()
        self.cfg = m
        self.encoder = Encoder(m)
        self.bottleneck = make_bottleneck(m)
        self.conditioning = Conditioning(m)
        self.speaker = nn.Embedding(m.n_speakers, m.n_global_embed)
        self.decoder = WaveNet(m)
        # training-only head (adv_weight > 0); absent otherwise, so older runs' state dicts are unchanged
        self.adversary = SpeakerAdversary(m) if m.adv_weight > 0 else None
        self._plans: dict[int, WindowPlan] = {}

    @property
    def receptive_field(self) -> int:
        return self.decoder.receptive_field

    def plan(self, n_win: int) -> WindowPlan:
        if n_win not in self._plans:
            self._plans[n_win] = plan(self.cfg, n_win)
        return self._plans[n_win]

    def encode(self, feats: torch.Tensor):
        """features (B, n_in, F) -> latents (B, n_latent, M), bottleneck terms."""
        return self.bottleneck(self.encoder(feats))

    def local_conditioning(self, z: torch.Tensor, p: WindowPlan, g: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, n_latent, p.n_latents), speaker embedding g (B, n_global_embed) ->
        conditioning (B, n_lc_out, p.lc_len)."""
        return self.conditioning(z, g)[..., p.lc_crop: p.lc_crop + p.lc_len]

    def forward(self, feats: torch.Tensor, dec_q: torch.Tensor, speaker: torch.Tensor,
                z_override: torch.Tensor | None = None, head: bool = True):
        """Returns logits (B, n_quant, N) for targets dec_q[:, R:], and the bottleneck terms.
        `z_override` replaces the latents (e.g. shuffled across utterances for diagnostics).
        head=False returns the decoder's output-layer input (B, n_post, N) instead, for loss_from."""
        p = self.plan(dec_q.shape[-1] - self.receptive_field)
        if feats.shape[-1] != p.n_frames:
            raise ValueError(f"features have {feats.shape[-1]} frames; a window of N={p.n_win} "
                             f"needs {p.n_frames} (see python -m wavenet_ae.rfield)")
        z, terms = self.encode(feats)
        if self.adversary is not None and self.training:
            terms.update(self.adversary(z, speaker))
        if z_override is not None:
            z = z_override
        g = self.speaker(speaker)
        lc = self.local_conditioning(z, p, g)
        x_q = dec_q[:, :-1]
        if self.training and self.cfg.dec_input_noise > 0:
            x_q = corrupt_inputs(x_q, self.cfg.dec_input_noise, self.cfg.n_quant)
        out = self.decoder(x_q, lc, g, head)
        return out, terms

    def loss(self, feats, dec_q, speaker):
        """Total loss and its terms: cross-entropy in nats per sample + weighted bottleneck terms."""
        h, terms = self(feats, dec_q, speaker, head=False)
        return self.loss_from(h, terms, dec_q)

    def loss_from(self, h, terms, dec_q):
        """The loss given forward(..., head=False)'s outputs (lets a DistributedDataParallel wrapper run
        forward); the output layer and cross-entropy run fused (decoder.linear_cross_entropy)."""
        ce = self.decoder.linear_cross_entropy(h, dec_q[:, self.receptive_field:])
        total = ce + sum(v for k, v in terms.items() if k.startswith("loss_"))
        terms["ce"] = ce.detach()
        return total, terms

    # --- whole signals (generation, encoding) ---------------------------------------------------
    def signal_padding(self, n_samples: int) -> tuple[int, int]:
        """Zero padding (left, right) of a signal so that latents exist for all of it and the
        conditioning covers wav times [-R, n_samples) with fully-overlapped upsampling."""
        p, m = self.plan(self.cfg.hop), self.cfg
        up = [layer for layer in conditioning_layers(m) if layer.transposed]
        K = 1 + sum((u.span - 1) * math.prod(v.stride for v in up[i + 1:]) for i, u in enumerate(up))
        left = self.receptive_field + p.lc_time_offset + K - m.hop   # conditioning index K - hop at -R
        # latents needed up to time n_samples, plus the encoder's own look-ahead
        right = max(0, -(left + n_samples) % m.hop) + 2 * p.enc_len
        return left, right

    @torch.no_grad()
    def signal_conditioning(self, wav, speaker: torch.Tensor):
        """wav (T,) numpy float -> (lc (1, n_lc_out, R + T) for wav times [-R, T), latents,
        speaker embedding (1, n_global_embed)). Evaluation mode: no jitter, VAE mean."""
        import numpy as np
        from ..features import mfcc_features
        T = len(wav)
        left, right = self.signal_padding(T)
        padded = np.concatenate([np.zeros(left, np.float32), np.asarray(wav, np.float32),
                                 np.zeros(right, np.float32)])
        dev = next(self.parameters()).device
        feats = mfcc_features(torch.from_numpy(padded).to(dev), self.cfg)[None]      # on the model's device
        z, _ = self.encode(feats)
        g = self.speaker(speaker.to(dev).view(1))
        up = self.conditioning(z, g)
        p = self.plan(self.cfg.hop)
        first = -self.receptive_field + left - p.lc_time_offset    # index of time -R (e0 = -left)
        lc = up[..., first: first + self.receptive_field + T]
        if lc.shape[-1] != self.receptive_field + T:
            raise RuntimeError("internal: conditioning shorter than the signal")
        return lc, z, g
