"""mu-law companding of audio into n_quant classes and back (``torch.ops.wavenet_ae.mu_law_encode`` /
``mu_law_decode``; kernels csrc/cpu/mu_law.cpp, csrc/cuda/mu_law.cu, shared math csrc/mu_law.h)."""
from __future__ import annotations

import math

import torch

from ._ext import has_kernel, no_autocast, use_kernel


def _check_n_quant(n_quant: int) -> None:
    if not 2 <= n_quant <= 65536:
        raise ValueError(f"n_quant must be in [2, 65536], got {n_quant}")


# ---------------------------------------------------------------------------------------------------
# mu-law companding
# ---------------------------------------------------------------------------------------------------


def mu_law_encode_ref(x: torch.Tensor, n_quant: int = 256) -> torch.Tensor:
    """Reference mu-law encoder.

    x: (*) floating-point audio, nominally in [-1, 1]; values outside are clamped, NaN counts as 0.
    returns: (*) int64 classes in [0, n_quant - 1], same device.

    mu = n_quant - 1;  y = sign(x) * log1p(mu |x|) / log1p(mu);  q = floor((y + 1) / 2 * mu + 0.5).
    Computed in float64, in the same operation order as the kernels, so classes match them exactly.
    """
    _check_n_quant(n_quant)
    if not x.is_floating_point():
        raise TypeError(f"mu_law_encode: x must be a floating-point tensor, got {x.dtype}")
    mu = n_quant - 1
    x = torch.nan_to_num(x.to(torch.float64), nan=0.0).clamp(-1.0, 1.0)
    y = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    q = torch.floor((y + 1) / 2 * mu + 0.5)
    return q.clamp(0, mu).to(torch.int64)


def mu_law_decode_ref(q: torch.Tensor, n_quant: int = 256) -> torch.Tensor:
    """Reference mu-law decoder.

    q: (*) integer classes in [0, n_quant - 1] (values outside are clamped).
    returns: (*) float32 audio in [-1, 1], same device.

    mu = n_quant - 1;  y = 2 q / mu - 1;  x = sign(y) * ((1 + mu)^|y| - 1) / mu   (float64, then float32).
    """
    _check_n_quant(n_quant)
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"mu_law_decode: q must be an integer tensor, got {q.dtype}")
    mu = n_quant - 1
    y = 2 * q.to(torch.float64).clamp(0, mu) / mu - 1
    x = torch.sign(y) * (torch.pow(1.0 + mu, y.abs()) - 1) / mu
    return x.to(torch.float32)


def mu_law_encode(x: torch.Tensor, n_quant: int = 256) -> torch.Tensor:
    """Mu-law encode float audio ``x`` (*) in [-1, 1] into int64 classes (*) in [0, n_quant - 1]."""
    if use_kernel("mu_law_encode", x):
        with no_autocast(x):
            return torch.ops.wavenet_ae.mu_law_encode(x, n_quant)
    return mu_law_encode_ref(x, n_quant)


def mu_law_decode(q: torch.Tensor, n_quant: int = 256) -> torch.Tensor:
    """Mu-law decode integer classes ``q`` (*) into float32 audio (*) in [-1, 1]."""
    if use_kernel("mu_law_decode", q):
        with no_autocast(q):
            return torch.ops.wavenet_ae.mu_law_decode(q, n_quant)
    return mu_law_decode_ref(q, n_quant)


# Shape functions, so the ops work with FakeTensor / torch.compile / meta tensors.
if has_kernel("mu_law_encode", "cpu"):

    @torch.library.register_fake("wavenet_ae::mu_law_encode")
    def _mu_law_encode_fake(x, n_quant):
        return torch.empty(x.shape, dtype=torch.int64, device=x.device)

    @torch.library.register_fake("wavenet_ae::mu_law_decode")
    def _mu_law_decode_fake(q, n_quant):
        return torch.empty(q.shape, dtype=torch.float32, device=q.device)
