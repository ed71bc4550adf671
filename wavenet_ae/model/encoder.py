"""MFCC encoder of Chorowski et al. 2019 (Figure 1), with valid convolutions so that its
receptive field is exactly `rfield.encoder_layers` (residual branches are centre-cropped)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..config import ModelConfig


# variance floor of the sliding CMVN, in units of the corpus-wide standardised features: a window of
# near-constant frames (silence) is not blown up to unit variance (its std is floored at 0.1)
CMVN_VAR_FLOOR = 1e-2


def sliding_cmvn(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, C, F) -> (B, C, F - width + 1): each frame minus the mean, over the std, of the `width`
    frames centred on it (a valid layer: see ModelConfig.cmvn_frames)."""
    mean = F.avg_pool1d(x, width, stride=1)
    var = (F.avg_pool1d(x * x, width, stride=1) - mean * mean).clamp_min(0)
    return (_crop(x, mean.shape[-1]) - mean) / (var + CMVN_VAR_FLOOR).sqrt()


def _crop(x: torch.Tensor, n: int) -> torch.Tensor:
    """Centre-crop the time axis to length n."""
    lo = (x.shape[-1] - n) // 2
    return x[..., lo: lo + n]


class Encoder(nn.Module):
    """features (B, n_in, F) -> hidden (B, n_enc, M) at 1 / (mfcc_hop * enc_stride) of the rate."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        c, k = m.n_enc, m.enc_kern
        self.cmvn = m.cmvn_frames
        self.register_buffer("feat_mean", torch.zeros(m.n_in))
        self.register_buffer("feat_std", torch.ones(m.n_in))
        self.conv_in = nn.Conv1d(m.n_in, c, k, bias=m.bias)
        self.conv_res = nn.Conv1d(c, c, k, bias=m.bias)
        self.conv_stride = nn.Conv1d(c, c, m.enc_stride_kern, stride=m.enc_stride, bias=m.bias)
        self.conv_mid = nn.Conv1d(c, c, k, bias=m.bias)
        self.conv_res2 = nn.Conv1d(c, c, k, bias=m.bias)
        self.fcs = nn.ModuleList(nn.Conv1d(c, c, 1, bias=m.bias) for _ in range(m.n_enc_fc))

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-coefficient normalisation computed once over the training corpus."""
        self.feat_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feat_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-5))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = (feats - self.feat_mean[:, None]) / self.feat_std[:, None]
        if self.cmvn:
            x = sliding_cmvn(x, self.cmvn)
        h = F.relu(self.conv_in(x))
        r = F.relu(self.conv_res(h))
        h = r + _crop(h, r.shape[-1])
        h = F.relu(self.conv_stride(h))
        h = F.relu(self.conv_mid(h))
        r = F.relu(self.conv_res2(h))
        h = r + _crop(h, r.shape[-1])
        for fc in self.fcs:
            h = h + F.relu(fc(h))
        return h
