"""The decoder's output layer and the training cross-entropy in one op: the (B, n_quant, N) logits are
never stored (``torch.ops.wavenet_ae.linear_cross_entropy``; kernel csrc/cpu/linear_cross_entropy.cpp)."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ._ext import has_kernel, no_autocast, use_kernel


def linear_cross_entropy_ref(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                             target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits W h + b (classes over dim 1 of (B, n_quant, N)) against
    ``target`` (B, N) int64: the decoder's last 1x1 convolution and the training loss, in plain PyTorch.
    h (B, n_in, N), w (n_quant, n_in), b (n_quant) or None."""
    logits = F.linear(h.transpose(1, 2), w, b).reshape(-1, w.shape[0])  # (B N, n_quant): contiguous rows
    if logits.dtype in (torch.float16, torch.bfloat16):  # autocast: the loss in float32
        logits = logits.float()
    return F.cross_entropy(logits, target.reshape(-1))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """torch.ops.wavenet_ae.linear_cross_entropy as one autograd node: the kernel returns the summed
    loss and its gradients in one pass, so the backward only scales them (no logits are saved)."""

    @staticmethod
    def forward(ctx, h, w, b, target, need_grad):
        with no_autocast(h):
            loss, g_h, g_w, g_b = torch.ops.wavenet_ae.linear_cross_entropy(h, w, b, target, need_grad)
        count = target.numel()
        ctx.save_for_backward(g_h, g_w, g_b)
        ctx.count, ctx.has_b = count, b is not None
        return loss / count

    @staticmethod
    @once_differentiable  # the saved gradients are constants: no double backward
    def backward(ctx, grad):
        g_h, g_w, g_b = ctx.saved_tensors
        scale = grad / ctx.count
        return g_h * scale, g_w * scale, (g_b * scale if ctx.has_b else None), None, None


def fused_linear_cross_entropy_available(h: torch.Tensor) -> bool:
    """True when ``linear_cross_entropy`` runs the fused kernel for ``h`` (a CPU float32/float64 tensor,
    outside autocast, with ``USE_FUSED_LINEAR_CROSS_ENTROPY`` and ``USE_EXT`` on)."""
    return (use_kernel("linear_cross_entropy", h, "USE_FUSED_LINEAR_CROSS_ENTROPY")
            and h.dtype in (torch.float32, torch.float64))


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                         target: torch.Tensor) -> torch.Tensor:
    """``linear_cross_entropy_ref`` (same contract), fused where available (``fused_linear_cross_entropy_available``):
    the (B, n_quant, N) logits are never stored; their gradients come out of the forward pass."""
    if not fused_linear_cross_entropy_available(h):
        return linear_cross_entropy_ref(h, w, b, target)
    if w.dtype != h.dtype or (b is not None and b.dtype != h.dtype):
        raise ValueError(f"linear_cross_entropy: h is {h.dtype} but w/b are {w.dtype}"
                         f"{'' if b is None else '/' + str(b.dtype)}")
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, w, b))
    return _FusedLinearCrossEntropy.apply(h, w, b, target.long(), need_grad)


if has_kernel("linear_cross_entropy", "cpu"):

    @torch.library.register_fake("wavenet_ae::linear_cross_entropy")
    def _linear_cross_entropy_fake(h, w, b, target, need_grad):
        return (h.new_empty(()), h.new_empty(h.shape if need_grad else (0,)),
                w.new_empty(w.shape if need_grad else (0,)),
                w.new_empty((w.shape[0],) if (need_grad and b is not None) else (0,)))
