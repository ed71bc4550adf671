"""The gated dilated causal residual layer of the WaveNet decoder, fused for training: forward and
backward (``torch.ops.wavenet_ae.residual_layer_fwd`` / ``_bwd``; kernels csrc/cpu/residual_layer.cpp,
csrc/cuda/residual_layer_fwd.cu and residual_layer_bwd.cu, shared checks csrc/residual_layer.h)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

from ._ext import REBUILD_CMD, has_kernel, no_autocast, require_ext, use_kernel

_RESIDUAL_DTYPES = {"cpu": (torch.float32, torch.float64),
                    "cuda": (torch.float32, torch.bfloat16, torch.float16)}


class ResidualWeights(NamedTuple):
    """A residual layer's weights as its modules hold them (``decoder.ResidualLayer.weights()``)."""
    w_dil: torch.Tensor            # (2 n_dil, n_res, K) dilated causal conv
    b_dil: torch.Tensor | None     # (2 n_dil)
    w_lc: torch.Tensor             # (2 n_dil, n_lc, 1) local-conditioning projection
    w_gc: torch.Tensor             # (2 n_dil, n_global) global-conditioning projection
    w_res: torch.Tensor | None     # (n_res, n_dil, 1); None in the last layer
    b_res: torch.Tensor | None     # (n_res)
    w_skip: torch.Tensor           # (n_skp, n_dil, 1)
    b_skip: torch.Tensor | None    # (n_skp)


def _residual_geometry(x: torch.Tensor, lc: torch.Tensor, w_dil: torch.Tensor, dilation: int, n_out: int) -> int:
    """Checks the time geometry of a residual layer; returns its output length n."""
    if x.dim() != 3 or w_dil.dim() != 3:
        raise ValueError(f"residual layer: x must be (B, n_res, L) and w_dil (2 n_dil, n_res, K), got "
                         f"{tuple(x.shape)} and {tuple(w_dil.shape)}")
    K, L = w_dil.shape[-1], x.shape[-1]
    n = L - (K - 1) * dilation
    if n <= 0:
        raise ValueError(f"residual layer: input of {L} steps is too short for {K} taps at dilation {dilation} "
                         f"(needs more than {(K - 1) * dilation} steps)")
    if not 1 <= n_out <= n:
        raise ValueError(f"residual layer: n_out={n_out} must lie in [1, {n}] (the layer's output length)")
    if lc.shape[-1] < n:
        raise ValueError(f"residual layer: lc has {lc.shape[-1]} steps but the layer outputs {n}")
    return n


def residual_layer_ref(x, lc, g, w: ResidualWeights, dilation: int, n_out: int):
    """Reference gated dilated causal residual layer (plain PyTorch; what ``decoder.ResidualLayer`` computes).

    x: (B, n_res, L) layer input;  lc: (B, n_lc, >= n) local conditioning (its last n steps are used);
    g: (B, n_global) global conditioning;  n = L - (K - 1) * dilation;  w: the layer's weights.

        h = conv_dilated(x) + W_lc lc[..., -n:] + W_gc g;  z = tanh(h[:n_dil]) * sigmoid(h[n_dil:])
        x_out = x[..., -n:] + W_res z (None without w_res);  skip = W_skip z[..., -n_out:]

    returns (x_out (B, n_res, n) or None, skip (B, n_skp, n_out)), in the dtype of the inputs.
    """
    w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip = w
    n = _residual_geometry(x, lc, w_dil, dilation, n_out)
    nd = w_dil.shape[0] // 2
    h = F.conv1d(x, w_dil, b_dil, dilation=dilation)
    h = h + F.conv1d(lc[..., -n:], w_lc) + F.linear(g, w_gc)[..., None]
    gate = torch.tanh(h[:, :nd]) * torch.sigmoid(h[:, nd:])
    x_out = None if w_res is None else x[..., -n:] + F.conv1d(gate, w_res, b_res)
    return x_out, F.conv1d(gate[..., -n_out:], w_skip, b_skip)


class _FusedResidualLayer(torch.autograd.Function):
    """torch.ops.wavenet_ae.residual_layer_fwd / _bwd as one autograd node. Saves the layer's input,
    the conditioning and one (B, 2 n_dil, n) tensor (CPU: tanh and sigmoid values; CUDA: the
    pre-activation); the gate product is recomputed in the backward."""

    @staticmethod
    def forward(ctx, x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip, dilation, n_out):
        with no_autocast(x):
            x_out, skip, saved = torch.ops.wavenet_ae.residual_layer_fwd(
                x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip, dilation, n_out)
        ctx.save_for_backward(x, lc, g, saved, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip)
        ctx.dilation, ctx.n_out = dilation, n_out
        if w_res is None:
            ctx.mark_non_differentiable(x_out)
        return x_out, skip

    @staticmethod
    def backward(ctx, grad_x_out, grad_skip):
        x, lc, g, saved, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_skip is None:
            grad_skip = torch.zeros(x.shape[0], w_skip.shape[0], ctx.n_out, dtype=x.dtype, device=x.device)
        with no_autocast(x):     # backward() called inside an autocast region runs with it on
            grads = torch.ops.wavenet_ae.residual_layer_bwd(
                grad_x_out if w_res is not None else None, grad_skip.contiguous(), x, lc, g, saved,
                w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip, ctx.dilation, ctx.n_out,
                bool(need[0]), bool(need[1]), bool(need[2]))
        inputs = (x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip)
        out = tuple(gr if (t is not None and need[i]) else None for i, (gr, t) in enumerate(zip(grads, inputs)))
        return out + (None, None)


def residual_layer_cpu_info() -> str:
    """How the CPU residual-layer kernel runs in this build: 'elementwise=avx2|generic threads=N', with a
    note when the extension was compiled without -fopenmp (then at::parallel_for is serial there)."""
    require_ext()
    return torch.ops.wavenet_ae.residual_layer_cpu_info(torch.empty(0))


def fused_residual_layer_available(x: torch.Tensor) -> bool:
    """True when the fused residual-layer kernel runs for ``x`` (its device and dtype; under CUDA autocast
    the autocast dtype) and neither ``USE_FUSED_RESIDUAL_LAYER`` nor ``USE_EXT`` is switched off."""
    if not use_kernel("residual_layer_fwd", x, "USE_FUSED_RESIDUAL_LAYER"):
        return False
    dev = x.device.type
    if dev == "cuda":
        dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        return dt in _RESIDUAL_DTYPES["cuda"]
    return dev == "cpu" and x.dtype in _RESIDUAL_DTYPES["cpu"]


def fused_residual_layer(x, lc, g, w: ResidualWeights, dilation: int, n_out: int):
    """The fused residual layer (C++ CPU kernel or CUDA kernels around cuBLAS), forward and backward;
    same contract as ``residual_layer_ref``. Raises if no kernel exists for the inputs (see
    ``fused_residual_layer_available``); ``residual_layer`` picks the kernel or the reference by itself.
    Under CUDA autocast the inputs and weights are cast to the autocast dtype (as conv1d would be)."""
    require_ext()
    _residual_geometry(x, lc, w.w_dil, dilation, n_out)
    if not has_kernel("residual_layer_fwd", x.device):
        raise RuntimeError(f"wavenet_ae._C has no fused residual-layer kernel for {x.device.type}; rebuild it "
                           f"with: {REBUILD_CMD}")
    args = (x, lc, g, *w)
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        args = tuple(None if t is None else t.to(dt) for t in args)
        with torch.autocast("cuda", enabled=False):
            x_out, skip = _FusedResidualLayer.apply(*args, int(dilation), int(n_out))
    else:
        x_out, skip = _FusedResidualLayer.apply(*args, int(dilation), int(n_out))
    return (None if w.w_res is None else x_out), skip


def residual_layer(x, lc, g, w: ResidualWeights, dilation: int, n_out: int):
    """One residual layer: ``fused_residual_layer`` where available (``fused_residual_layer_available``), else
    ``residual_layer_ref``. What ``decoder.ResidualLayer.forward`` calls."""
    if fused_residual_layer_available(x):
        return fused_residual_layer(x, lc, g, w, dilation, n_out)
    return residual_layer_ref(x, lc, g, w, dilation, n_out)


if has_kernel("residual_layer_fwd", "cpu"):

    @torch.library.register_fake("wavenet_ae::residual_layer_fwd")
    def _residual_layer_fwd_fake(x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip, dilation, n_out):
        B, n = x.shape[0], x.shape[-1] - (w_dil.shape[-1] - 1) * dilation
        nc = n if w_res is not None else n_out
        x_out = x.new_empty((B, x.shape[1], n) if w_res is not None else (0,))
        return x_out, x.new_empty((B, w_skip.shape[0], n_out)), x.new_empty((B, w_dil.shape[0], nc))

    @torch.library.register_fake("wavenet_ae::residual_layer_bwd")
    def _residual_layer_bwd_fake(grad_x_out, grad_skip, x, lc, g, saved, w_dil, b_dil, w_lc, w_gc, w_res, b_res,
                                 w_skip, b_skip, dilation, n_out, need_x, need_lc, need_g):
        def like(t, need=True):
            return x.new_empty(t.shape) if (t is not None and need) else x.new_empty((0,))
        return [like(x, need_x), like(lc, need_lc), like(g, need_g), like(w_dil), like(b_dil), like(w_lc),
                like(w_gc), like(w_res), like(b_res), like(w_skip), like(b_skip)]
