"""Custom ops of wavenet_ae: fast kernels from the ``wavenet_ae._C`` extension, each next to its
plain-PyTorch reference.

Each op ``foo`` has
  * ``foo_ref``: the reference, plain PyTorch (computed in float64), the definition the kernels are
    tested against and the fallback when no kernel is available;
  * ``foo``: the public function, which calls ``torch.ops.wavenet_ae.foo`` when the extension is
    loaded and has a kernel for the tensor's device, else ``foo_ref``.

The extension is optional. If it is missing the package still works on the references, and the first
call that falls back warns once. ``require_ext()`` raises instead, naming the rebuild command.
``USE_EXT = False`` forces the references everywhere (debugging a layer is one flag flip).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple

import torch

REBUILD_CMD = 'pip install --no-build-isolation -e .'

try:
    from wavenet_ae import _C  # noqa: F401  (importing registers torch.ops.wavenet_ae.*)

    HAVE_EXT = True
    _EXT_IMPORT_ERROR: BaseException | None = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    HAVE_EXT = False
    _EXT_IMPORT_ERROR = e

HAVE_CUDA_KERNELS = HAVE_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(
    "wavenet_ae::mu_law_encode", "CUDA"
)

USE_EXT = True  # set False to run the references even when the extension is loaded

_warned: set = set()


def require_ext() -> None:
    """Raise a clear error if the compiled extension ``wavenet_ae._C`` is not loaded."""
    if not HAVE_EXT:
        raise RuntimeError(
            "wavenet_ae._C (the C++/CUDA extension) is not available "
            f"({type(_EXT_IMPORT_ERROR).__name__}: {_EXT_IMPORT_ERROR}). "
            f"Rebuild it from the repository root with: {REBUILD_CMD}"
        )


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)  # point at the caller of the op


def _use_ext(t: torch.Tensor) -> bool:
    """True when torch.ops.wavenet_ae has a kernel for ``t``'s device (and USE_EXT is on)."""
    if not USE_EXT:
        return False
    if not HAVE_EXT:
        _warn_once(
            "no_ext",
            f"wavenet_ae._C is not available ({_EXT_IMPORT_ERROR}); using the pure-PyTorch path "
            f"(slower). Rebuild the extension with: {REBUILD_CMD}",
        )
        return False
    dev = t.device.type
    if dev in ("cpu", "meta"):
        return True
    if dev == "cuda":
        if not HAVE_CUDA_KERNELS:
            _warn_once(
                "no_cuda",
                "wavenet_ae._C was built without CUDA kernels; using the pure-PyTorch path on CUDA. "
                f"Rebuild with the CUDA toolkit present (WAVENET_AE_FORCE_CUDA=1 {REBUILD_CMD}).",
            )
        return HAVE_CUDA_KERNELS
    return False  # other devices (mps, xpu, ...): references only


def _no_autocast(t: torch.Tensor):
    """Context for calling a custom op on ``t``'s device. Autocast falls through custom ops but stays on
    inside them, so the ATen products a kernel makes (mm, addmm, bmm) would come back in bfloat16 where
    the kernel expects its input dtype; every op runs with autocast off (its callers cast the inputs)."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda") else contextlib.nullcontext()


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
    if _use_ext(x):
        with _no_autocast(x):
            return torch.ops.wavenet_ae.mu_law_encode(x, n_quant)
    return mu_law_encode_ref(x, n_quant)


def mu_law_decode(q: torch.Tensor, n_quant: int = 256) -> torch.Tensor:
    """Mu-law decode integer classes ``q`` (*) into float32 audio (*) in [-1, 1]."""
    if _use_ext(q):
        with _no_autocast(q):
            return torch.ops.wavenet_ae.mu_law_decode(q, n_quant)
    return mu_law_decode_ref(q, n_quant)


# Shape functions, so the ops work with FakeTensor / torch.compile / meta tensors.
if HAVE_EXT:

    @torch.library.register_fake("wavenet_ae::mu_law_encode")
    def _mu_law_encode_fake(x, n_quant):
        return torch.empty(x.shape, dtype=torch.int64, device=x.device)

    @torch.library.register_fake("wavenet_ae::mu_law_decode")
    def _mu_law_decode_fake(q, n_quant):
        return torch.empty(q.shape, dtype=torch.float32, device=q.device)


# ---------------------------------------------------------------------------------------------------
# incremental WaveNet generation (fast-wavenet queues), one call per chunk of steps
# ---------------------------------------------------------------------------------------------------


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


def _has_kernel(op: str, key: str) -> bool:
    try:
        return HAVE_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except RuntimeError:  # an extension built before `op` existed
        return False


HAVE_GENERATE_KERNELS = _has_kernel("wavenet_ae::wavenet_generate", "CPU")
HAVE_GENERATE_CUDA = _has_kernel("wavenet_ae::wavenet_generate", "CUDA")


def generate_cpu_path(request: str = "auto") -> str:
    """The CPU code path of the ``cpp`` engine for ``request`` ('auto' | 'generic' | 'avx2'):
    'avx2' (AVX2+FMA intrinsics, chosen by cpuid at run time) or 'generic' (portable loops)."""
    require_ext()
    if not HAVE_GENERATE_KERNELS:
        raise RuntimeError("wavenet_ae._C predates the generation kernels; rebuild it with: " + REBUILD_CMD)
    return torch.ops.wavenet_ae.wavenet_generate_cpu_path(torch.empty(0), request)


def wavenet_generate(w: GenWeights, cond: torch.Tensor, u: torch.Tensor, forced: torch.Tensor | None,
                     queues: torch.Tensor, x_prev: torch.Tensor, t0: int, want_logits: bool = False,
                     path: str = "auto"):
    """Incremental generation over one chunk of steps in one kernel call (``cpp`` engine on CPU,
    ``cuda`` engine on GPU); same contract as ``wavenet_generate_ref``. ``path`` picks the CPU code
    path ('auto' | 'generic' | 'avx2'). The CPU kernel takes float32 weights; the CUDA kernel also
    float16/bfloat16 weight matrices. Falls back to the reference if no kernel is available."""
    if (HAVE_GENERATE_KERNELS and _use_ext(cond)
            and (cond.device.type != "cuda" or HAVE_GENERATE_CUDA)):
        with _no_autocast(cond):
            return torch.ops.wavenet_ae.wavenet_generate(
                w.embed, w.w_dil, w.w_out, w.b_out, w.w_post1, w.b_post1, w.w_post2, w.b_post2,
                list(w.dilations), cond, u, forced, queues, x_prev, int(t0), bool(want_logits), path)
    return wavenet_generate_ref(w, cond, u, forced, queues, x_prev, t0, want_logits)


if HAVE_GENERATE_KERNELS:

    @torch.library.register_fake("wavenet_ae::wavenet_generate")
    def _wavenet_generate_fake(embed, w_dil, w_out, b_out, w_post1, b_post1, w_post2, b_post2, dilations,
                               cond, u, forced, queues, x_prev, t0, want_logits, path):
        B, S = cond.shape[0], cond.shape[1]
        return (torch.empty(B, S, dtype=torch.int64, device=cond.device),
                torch.empty(B if want_logits else 0, S, embed.shape[0], dtype=torch.float32, device=cond.device))


# ---------------------------------------------------------------------------------------------------
# fused gated dilated causal residual layer (training: forward and backward)
# ---------------------------------------------------------------------------------------------------

from torch.nn import functional as F  # noqa: E402

USE_FUSED_RESIDUAL = True  # set False to run residual_layer_ref in the model even where a kernel exists

HAVE_RESIDUAL_KERNELS = _has_kernel("wavenet_ae::residual_layer_fwd", "CPU")
HAVE_RESIDUAL_CUDA = _has_kernel("wavenet_ae::residual_layer_fwd", "CUDA")
_RESIDUAL_DTYPES = {"cpu": (torch.float32, torch.float64),
                    "cuda": (torch.float32, torch.bfloat16, torch.float16)}


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


def residual_layer_ref(x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip,
                       dilation: int, n_out: int):
    """Reference gated dilated causal residual layer (plain PyTorch; what ``decoder.ResidualLayer`` computes).

    x: (B, n_res, L) layer input;  lc: (B, n_lc, >= n) local conditioning (its last n steps are used);
    g: (B, n_global) global conditioning;  n = L - (K - 1) * dilation.
    Weights as the layer's modules hold them: w_dil (2 n_dil, n_res, K), b_dil (2 n_dil) or None,
    w_lc (2 n_dil, n_lc, 1), w_gc (2 n_dil, n_global), w_res (n_res, n_dil, 1) and b_res (n_res), or None in
    the last layer, w_skip (n_skp, n_dil, 1), b_skip (n_skp) or None.

        h = conv_dilated(x) + W_lc lc[..., -n:] + W_gc g;  z = tanh(h[:n_dil]) * sigmoid(h[n_dil:])
        x_out = x[..., -n:] + W_res z (None without w_res);  skip = W_skip z[..., -n_out:]

    returns (x_out (B, n_res, n) or None, skip (B, n_skp, n_out)), in the dtype of the inputs.
    """
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
        with _no_autocast(x):
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
        with _no_autocast(x):     # backward() called inside an autocast region runs with it on
            grads = torch.ops.wavenet_ae.residual_layer_bwd(
                grad_x_out if w_res is not None else None, grad_skip.contiguous(), x, lc, g, saved,
                w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip, ctx.dilation, ctx.n_out,
                bool(need[0]), bool(need[1]), bool(need[2]))
        inputs = (x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip)
        out = tuple(gr if (t is not None and need[i]) else None for i, (gr, t) in enumerate(zip(grads, inputs)))
        return out + (None, None)


def residual_cpu_info() -> str:
    """How the CPU residual-layer kernel runs in this build: 'elementwise=avx2|generic threads=N', with a
    note when the extension was compiled without -fopenmp (then at::parallel_for is serial there)."""
    require_ext()
    if not _has_kernel("wavenet_ae::residual_layer_cpu_info", "CPU"):
        return "no CPU residual kernel in this build"
    return torch.ops.wavenet_ae.residual_layer_cpu_info(torch.empty(0))


def fused_residual_available(x: torch.Tensor) -> bool:
    """True when the fused residual-layer kernel runs for ``x`` (its device and dtype; under CUDA autocast
    the autocast dtype) and neither ``USE_FUSED_RESIDUAL`` nor ``USE_EXT`` is switched off."""
    if not (USE_FUSED_RESIDUAL and _use_ext(x)):
        return False
    dev = x.device.type
    if dev == "cuda":
        if not HAVE_RESIDUAL_CUDA:
            return False
        dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        return dt in _RESIDUAL_DTYPES["cuda"]
    return dev == "cpu" and HAVE_RESIDUAL_KERNELS and x.dtype in _RESIDUAL_DTYPES["cpu"]


def fused_residual_layer(x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip,
                         dilation: int, n_out: int):
    """The fused residual layer (C++ CPU kernel or CUDA kernels around cuBLAS), forward and backward;
    same contract as ``residual_layer_ref``. Raises if no kernel exists for the inputs (see
    ``fused_residual_available``); ``residual_layer`` picks the kernel or the reference by itself.
    Under CUDA autocast the inputs and weights are cast to the autocast dtype (as conv1d would be)."""
    require_ext()
    _residual_geometry(x, lc, w_dil, dilation, n_out)
    ok = HAVE_RESIDUAL_CUDA if x.device.type == "cuda" else HAVE_RESIDUAL_KERNELS
    if not ok:
        raise RuntimeError(f"wavenet_ae._C has no fused residual-layer kernel for {x.device.type}; rebuild it "
                           f"with: {REBUILD_CMD}")
    args = (x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip)
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        args = tuple(None if t is None else t.to(dt) for t in args)
        with torch.autocast("cuda", enabled=False):
            x_out, skip = _FusedResidualLayer.apply(*args, int(dilation), int(n_out))
    else:
        x_out, skip = _FusedResidualLayer.apply(*args, int(dilation), int(n_out))
    return (None if w_res is None else x_out), skip


def residual_layer(x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip, dilation: int, n_out: int):
    """One residual layer: ``fused_residual_layer`` where available (``fused_residual_available``), else
    ``residual_layer_ref``. What ``decoder.ResidualLayer.forward`` calls."""
    if fused_residual_available(x):
        return fused_residual_layer(x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip,
                                    dilation, n_out)
    return residual_layer_ref(x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip, dilation, n_out)


if HAVE_RESIDUAL_KERNELS:

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


# ---------------------------------------------------------------------------------------------------
# fused output layer + cross-entropy (training loss)
# ---------------------------------------------------------------------------------------------------

from torch.autograd.function import once_differentiable  # noqa: E402

USE_FUSED_OUTPUT_LOSS = True  # set False to run linear_cross_entropy_ref even where a kernel exists

HAVE_OUTPUT_LOSS_KERNELS = _has_kernel("wavenet_ae::linear_cross_entropy", "CPU")


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
        with _no_autocast(h):
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


def fused_output_loss_available(h: torch.Tensor) -> bool:
    """True when ``linear_cross_entropy`` runs the fused kernel for ``h`` (a CPU float32/float64 tensor,
    outside autocast, with ``USE_FUSED_OUTPUT_LOSS`` and ``USE_EXT`` on)."""
    return (USE_FUSED_OUTPUT_LOSS and HAVE_OUTPUT_LOSS_KERNELS and h.device.type == "cpu"
            and h.dtype in (torch.float32, torch.float64) and _use_ext(h))


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                         target: torch.Tensor) -> torch.Tensor:
    """``linear_cross_entropy_ref`` (same contract), fused where available (``fused_output_loss_available``):
    the (B, n_quant, N) logits are never stored; their gradients come out of the forward pass."""
    if not fused_output_loss_available(h):
        return linear_cross_entropy_ref(h, w, b, target)
    if w.dtype != h.dtype or (b is not None and b.dtype != h.dtype):
        raise ValueError(f"linear_cross_entropy: h is {h.dtype} but w/b are {w.dtype}"
                         f"{'' if b is None else '/' + str(b.dtype)}")
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, w, b))
    return _FusedLinearCrossEntropy.apply(h, w, b, target.long(), need_grad)


if HAVE_OUTPUT_LOSS_KERNELS:

    @torch.library.register_fake("wavenet_ae::linear_cross_entropy")
    def _linear_cross_entropy_fake(h, w, b, target, need_grad):
        return (h.new_empty(()), h.new_empty(h.shape if need_grad else (0,)),
                w.new_empty(w.shape if need_grad else (0,)),
                w.new_empty((w.shape[0],) if (need_grad and b is not None) else (0,)))
