"""The encoder as an s3prl-style upstream (the `UpstreamExpert` contract of s3prl/upstream/interfaces.py).

    from wavenet_ae.upstream import Upstream
    up = Upstream("runs/demo")                       # a run dir, a model file or a wavenet_ae.Model
    out = up([wav1, wav2])                           # list of 1-D float tensors at 16 kHz
    out["hidden_states"]                             # list of (B, T', n_enc) tensors, the latents last
    out["last_hidden_state"]                         # (B, T', n_latent): the latents
    up.get_downsample_rates("hidden_states")         # 320 (the hop)

Hidden states are the encoder's layers that run at the latent rate (50 Hz), in order: the strided conv,
the middle conv, the residual block's sum, each FC layer's residual sum (the last of these is the
encoder output), then the bottleneck output (the latents: VQ-VAE quantised vectors, VAE means). The two
100 Hz layers before the stride are left out (they would need resampling, and the strided conv right
after them is their learned 50 Hz summary). s3prl's weighted-sum featurizer stacks the hidden states,
so they must share one width: the latents are zero-padded from n_latent to n_enc in `hidden_states`;
`last_hidden_state` holds them unpadded (s3prl's `-s last_hidden_state`), equal to `Model.encode`'s.

Frames: item b has M_b = ceil(len_b / 320) frames, frame m describing samples [320 m, 320 (m + 1)),
exactly as `wavenet-ae encode` / `Model.encode` (a batch computes each item as if alone; frames past
an item's M_b are zero). So T' = max M_b, within one frame of s3prl's round(len / 320).

The bottleneck always runs as at inference (VQ: nearest code and no codebook update, VAE: the mean),
also in train() mode, so s3prl's fine-tuning (`-f`) does not move the codebook; gradients reach the
encoder's weights (through the VQ's straight-through estimator), not the input wav (the MFCCs are
computed without autograd).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .encode import encode_padding
from .features import mfcc_features


class Upstream(nn.Module):
    def __init__(self, source, device: str | torch.device | None = None):
        """source: a run dir or model file path (loaded on `device`, default cuda when available), a
        `wavenet_ae.Model`, or a `run_dir.Run`."""
        super().__init__()
        if isinstance(source, (str, Path)):
            from .api import load
            source = load(source, device)
        # only what runs (the decoder stays out of parameters() and state_dict(): s3prl fine-tunes
        # and saves what the upstream holds)
        self.cfg = source.model.cfg
        self.encoder, self.bottleneck = source.model.encoder, source.model.bottleneck
        self.bottleneck.eval()
        self.hop, self.sample_rate = self.cfg.hop, self.cfg.sample_rate
        # the 50 Hz states are the *inputs* of these modules, then the encoder's output (forward
        # pre-hooks while `forward` runs: the encoder's own tensors, no copy of its code)
        self._taps = [self.encoder.conv_mid, self.encoder.conv_res2, *self.encoder.fcs]

    def train(self, mode: bool = True):
        super().train(mode)
        self.bottleneck.eval()                       # see the module docstring
        return self

    def get_downsample_rates(self, key: str) -> int:
        return self.hop

    def forward(self, wavs: list[torch.Tensor]) -> dict:
        if not len(wavs):
            raise ValueError("no wavs")
        dev = next(self.encoder.parameters()).device
        lens = [int(w.shape[-1]) for w in wavs]
        if any(w.dim() != 1 for w in wavs) or min(lens) == 0:
            raise ValueError(f"wavs must be non-empty 1-D tensors; got shapes {[tuple(w.shape) for w in wavs]}")
        pads = [encode_padding(self.cfg, n) for n in lens]           # (left, right, M) as encode pads alone
        M = [p[2] for p in pads]
        # each item zero-padded as encode_signal pads it alone, then right-padded to a common length
        width = max(n + left + right for n, (left, right, _) in zip(lens, pads))
        x = torch.stack([F.pad(w.to(dev, torch.float32), (left, width - left - n))
                         for w, n, (left, _, _) in zip(wavs, lens, pads)])
        feats = mfcc_features(x, self.cfg)                     # (B, n_in, F), no autograd
        states: list[torch.Tensor] = []
        hooks = [t.register_forward_pre_hook(lambda mod, args: states.append(args[0])) for t in self._taps]
        try:
            h = self.encoder(feats)                                  # (B, n_enc, >= max M)
        finally:
            for hk in hooks:
                hk.remove()
        z, terms = self.bottleneck(h)                                # (B, n_latent, same)
        codes = terms.get("codes")
        if codes is not None:
            # VQ: exactly the codebook rows, as `encode` gives them (the straight-through z_e + (e - z_e)
            # differs from e by rounding); the gradient still passes straight through to z_e
            z = F.embedding(codes, self.bottleneck.codebook.detach()).transpose(1, 2) + (z - z.detach())
        n = h.shape[-1]
        # valid convs with odd kernels: a deeper layer's frame j is centred on an earlier layer's
        # frame j + (its length - n) / 2, the encoder's own residual crop
        layers = [s[..., (s.shape[-1] - n) // 2:][..., :n] for s in states + [h]]
        mask = (torch.arange(max(M), device=dev)[None, :] < torch.tensor(M, device=dev)[:, None])[..., None]
        hidden = [(s[..., :max(M)].transpose(1, 2) * mask) for s in layers]          # (B, T', n_enc)
        last = z[..., :max(M)].transpose(1, 2) * mask                                  # (B, T', n_latent)
        pad = hidden[0].shape[-1] - last.shape[-1]
        hidden.append(F.pad(last, (0, pad)) if pad > 0 else last)
        return {"hidden_states": hidden, "last_hidden_state": last}
