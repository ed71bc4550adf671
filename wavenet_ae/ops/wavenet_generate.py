"""Incremental WaveNet generation (fast-wavenet queues), one call per chunk of steps
(``torch.ops.wavenet_ae.wavenet_generate``; kernels csrc/cpu/wavenet_generate.cpp,
csrc/cuda/wavenet_generate.cu, per-step math csrc/wavenet_step.h, checks csrc/wavenet_generate_host.h)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._ext import has_kernel, no_autocast, require_ext, use_kernel


class GenWeights(NamedTuple):
    """A WaveNet decoder packed for incremental generation (see ``generate.pack_decoder``).

    Matrices are input-major (``W[i][o]``, outputs contiguous): ``y = x @ W``.
    ``w_dil[l, k]`` multiplies the layer input ``k`` taps from the current one going back, i.e. at
    time ``t - (K - 1 - k) * dilation``; ``w_out[l]`` has ``[residual | skip]`` columns (the last
    layer's residual columns are zero and unused). The dilated convs' biases and the conditioning
    projections are not here: they are folded into ``cond``.
    """
    embed: torch.Tensor    # (n_quant, n_res) float32
    w_dil: torch.Tensor    # (L, K, n_res, 2 n_dil)
    w_out: torch.Tensor    # (L, n_dil, n_res + n_skp)
    b_out: torch.Tensor    # (L, n_res + n_skp) float32
    w_post1: torch.Tensor  # (n_skp, n_post)
    b_post1: torch.Tensor  # (n_post,) float32
    w_post2: torch.Tensor  # (n_post, n_quant)
    b_post2: torch.Tensor  # (n_quant,) float32
    dilations: tuple       # (L,) ints

    @property
    def n_res(self) -> int:
        return self.embed.shape[1]

    @property
    def n_quant(self) -> int:
        return self.embed.shape[0]

    @property
    def queue_rows(self) -> list:
        """Rows of each layer's queue ((K - 1) * dilation)."""
        K = self.w_dil.shape[1]
        return [(K - 1) * d for d in self.dilations]


def sample_from_logits_ref(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: logits (..., n), u (...) in [0, 1) -> classes (...) int64.

    The smallest k with  sum_{j<=k} e_j > u * sum_j e_j,  e_j = exp(l_j - max l)  (n - 1 if none).
    The kernels add the same terms in 32 chunks (csrc/wavenet_step.h), so classes can differ from
    this only where u lies within float rounding of a CDF boundary.
    """
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    c = e.cumsum(-1)
    k = (c <= (u * c[..., -1])[..., None]).sum(-1)
    return k.clamp(max=logits.shape[-1] - 1)


def wavenet_generate_ref(w: GenWeights, cond: torch.Tensor, u: torch.Tensor, forced: torch.Tensor | None,
                         queues: torch.Tensor, x_prev: torch.Tensor, t0: int, want_logits: bool = False):
    """Reference incremental generation (the ``python`` engine): a plain PyTorch loop over steps.

    cond: (B, S, L * 2 n_dil) per-layer conditioning of each step (lc/gc projections + dilated-conv
          bias); step i predicts the class after ``x_prev`` (the class emitted by step i - 1).
    u: (B, S) uniforms in [0, 1) for sampling.  forced: (B, S) int64 or None; entries >= 0 are
          emitted instead of sampling (teacher forcing), < 0 are sampled.
    queues: (B, sum_l (K - 1) d_l, n_res) past layer inputs, updated in place; the input of absolute
          step t is row ``offset_l + t % ((K - 1) d_l)`` of layer l.  x_prev: (B,) int64, updated in place.
    t0: absolute step index of the first step (so chunks continue each other's queues).
    returns: samples (B, S) int64 and logits (B, S, n_quant) float (want_logits) or (0, S, n_quant).

    Runs in the dtype/device of the weights; the skip path and post-net are skipped at steps where
    every item is forced and no logits are wanted.
    """
    B, S, _ = cond.shape
    K, L = w.w_dil.shape[1], w.w_dil.shape[0]
    nr, nd, nq = w.n_res, w.w_out.shape[1], w.n_quant
    ng = 2 * nd
    rows = w.queue_rows
    offs = [sum(rows[:i]) for i in range(L)]
    views = [queues[:, o: o + r] for o, r in zip(offs, rows)]      # (B, Q_l, n_res) each
    samples = torch.empty(B, S, dtype=torch.int64, device=cond.device)
    logits_out = torch.empty(B if want_logits else 0, S, nq, dtype=cond.dtype, device=cond.device)
    forced_any = forced is not None
    for i in range(S):
        t = t0 + i
        need_out = want_logits or not forced_any or bool((forced[:, i] < 0).any())
        x = w.embed[x_prev]                                          # (B, n_res)
        skip = None
        for l, d in enumerate(w.dilations):
            q, Q = views[l], rows[l]
            last = l == L - 1
            if last and not need_out:
                q[:, t % Q] = x
                continue
            h = cond[:, i, l * ng: (l + 1) * ng] + x @ w.w_dil[l, K - 1]
            for k in range(K - 1):
                h = h + q[:, (t - (K - 1 - k) * d) % Q] @ w.w_dil[l, k]
            q[:, t % Q] = x
            gate = torch.tanh(h[:, :nd]) * torch.sigmoid(h[:, nd:])
            if not need_out:
                x = x + torch.addmm(w.b_out[l, :nr], gate, w.w_out[l, :, :nr])
                continue
            out = torch.addmm(w.b_out[l], gate, w.w_out[l])          # (B, n_res + n_skp)
            if not last:
                x = x + out[:, :nr]
            skip = out[:, nr:] if skip is None else skip + out[:, nr:]
        if need_out:
            hid = torch.relu(torch.addmm(w.b_post1, torch.relu(skip), w.w_post1))
            lg = torch.addmm(w.b_post2, hid, w.w_post2)             # (B, n_quant)
            if want_logits:
                logits_out[:, i] = lg
            y = sample_from_logits_ref(lg, u[:, i])
            if forced_any:
                y = torch.where(forced[:, i] >= 0, forced[:, i], y)
        else:
            y = forced[:, i]
        samples[:, i] = y
        x_prev.copy_(y)
    return samples, logits_out


def wavenet_generate_cpu_path(request: str = "auto") -> str:
    """The CPU code path of the ``cpp`` engine for ``request`` ('auto' | 'generic' | 'avx2'):
    'avx2' (AVX2+FMA+F16C intrinsics, chosen by cpuid at run time) or 'generic' (portable loops); the
    same for every weight dtype."""
    require_ext()
    return torch.ops.wavenet_ae.wavenet_generate_cpu_path(torch.empty(0), request)


def wavenet_generate(w: GenWeights, cond: torch.Tensor, u: torch.Tensor, forced: torch.Tensor | None,
                     queues: torch.Tensor, x_prev: torch.Tensor, t0: int, want_logits: bool = False,
                     path: str = "auto"):
    """Incremental generation over one chunk of steps in one kernel call (``cpp`` engine on CPU,
    ``cuda`` engine on GPU); same contract as ``wavenet_generate_ref``. ``path`` picks the CPU code
    path ('auto' | 'generic' | 'avx2'). Both kernels take float32, float16 or bfloat16 weight matrices
    (widened to float32 as they are read; float32 arithmetic). Falls back to the reference if no kernel
    is available (the reference runs in the weights' dtype)."""
    if use_kernel("wavenet_generate", cond):
        with no_autocast(cond):
            return torch.ops.wavenet_ae.wavenet_generate(
                w.embed, w.w_dil, w.w_out, w.b_out, w.w_post1, w.b_post1, w.w_post2, w.b_post2,
                list(w.dilations), cond, u, forced, queues, x_prev, int(t0), bool(want_logits), path)
    return wavenet_generate_ref(w, cond, u, forced, queues, x_prev, t0, want_logits)


if has_kernel("wavenet_generate", "cpu"):

    @torch.library.register_fake("wavenet_ae::wavenet_generate")
    def _wavenet_generate_fake(embed, w_dil, w_out, b_out, w_post1, b_post1, w_post2, b_post2, dilations,
                               cond, u, forced, queues, x_prev, t0, want_logits, path):
        B, S = cond.shape[0], cond.shape[1]
        return (torch.empty(B, S, dtype=torch.int64, device=cond.device),
                torch.empty(B if want_logits else 0, S, embed.shape[0], dtype=torch.float32, device=cond.device))
