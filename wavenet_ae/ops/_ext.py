"""Loading the compiled extension ``wavenet_ae._C``, and the one query of what it offers.

The extension is optional. If it is missing, or was built from other sources than these (its ABI
number differs from ``ABI``), it does not count as loaded: the package runs on the references and the
first op that falls back warns once; ``require_ext()`` raises instead, naming the rebuild command.
Whether an op has a kernel for a device is one query, ``has_kernel(op, device)``; whether a call takes
it also depends on the switch flags, attributes of ``wavenet_ae.ops`` read at call time (``flag``).
``build_info()`` says what the loaded build holds and which code paths its CPU kernels take here.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from types import ModuleType

import torch

REBUILD_CMD = "pip install --no-build-isolation -e ."

# The interface version these sources expect of the extension: csrc/bindings.cpp:kAbi. Bump both when an
# op is added or removed or a schema changes; a build with another number is treated as not loaded.
ABI = 1


def check_abi(ext: ModuleType, need: int = ABI) -> ImportError | None:
    """None if the extension module ``ext`` has interface version ``need``, else the error to report
    (builds older than ``build_info()`` count as ABI 0)."""
    info = getattr(ext, "build_info", None)
    have = int(info()["abi"]) if info is not None else 0
    if have == need:
        return None
    age = "older" if have < need else "newer"
    return ImportError(f"wavenet_ae._C was built from {age} sources (ABI {have}, need {need}): "
                       f"rebuild with: {REBUILD_CMD}")


def load_extension(need: int = ABI) -> tuple[ModuleType | None, BaseException | None]:
    """(``wavenet_ae._C``, None) when it imports and has interface version ``need``; else (None, why).
    Importing registers torch.ops.wavenet_ae.* either way; an extension that fails the check is not used."""
    try:
        from wavenet_ae import _C as ext
    except ImportError as e:  # not built, or built against another torch
        return None, e
    err = check_abi(ext, need)
    return (None, err) if err is not None else (ext, None)


_C, EXT_IMPORT_ERROR = load_extension()
HAVE_EXT = _C is not None

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_warned: set = set()


def flag(name: str) -> bool:
    """A switch flag of the package (``wavenet_ae.ops.USE_EXT`` ...), read when an op is called, so that
    tests and benchmarks can flip it."""
    return bool(getattr(sys.modules[__package__], name))


def has_kernel(op: str, device: str | torch.device) -> bool:
    """Whether the loaded extension has a kernel of ``torch.ops.wavenet_ae.<op>`` for ``device``
    ('cpu', 'cuda', or a torch.device; 'meta' counts as 'cpu': the ops' fake functions sit beside their
    CPU kernels)."""
    if not HAVE_EXT:
        return False
    key = _dispatch_key(device)
    return key is not None and _registered(op, key)


# Asked at every op call (the model's forward asks once per layer): the answers are fixed once the
# extension is loaded, so the dispatcher is queried once per op and device.
@functools.lru_cache(maxsize=None)
def _dispatch_key(device: str | torch.device) -> str | None:
    dev = torch.device(device).type
    return _DISPATCH_KEYS.get("cpu" if dev == "meta" else dev)


@functools.lru_cache(maxsize=None)
def _registered(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"wavenet_ae::{op}", key)
    except RuntimeError:  # no such op (with HAVE_EXT the build has every op these sources know)
        return False


def require_ext() -> None:
    """Raise a clear error if the compiled extension ``wavenet_ae._C`` is not loaded."""
    if not HAVE_EXT:
        raise RuntimeError(
            "wavenet_ae._C (the C++/CUDA extension) is not available "
            f"({type(EXT_IMPORT_ERROR).__name__}: {EXT_IMPORT_ERROR}). "
            f"Rebuild it from the repository root with: {REBUILD_CMD}"
        )


def build_info() -> dict:
    """What the loaded extension holds and how its CPU kernels run on this machine (``_C.build_info()``):

    abi               interface version (== ``ABI``, else the extension would not count as loaded)
    torch             the torch version it was compiled against
    simd_compiled     instruction sets enabled for all of its code at compile time (no -march: the x86-64
                      baseline, e.g. ['sse2'])
    simd_runtime      instruction sets of the functions chosen at run time by cpuid (['avx2', 'fma'] on x86)
    cpu_has_avx2      whether this CPU has AVX2 and FMA (cpuid), i.e. whether those functions run
    cpu_paths         the path each CPU kernel takes here: wavenet_generate (for path='auto'),
                      residual_layer and linear_cross_entropy (float32 elementwise passes): 'avx2' | 'generic';
                      gemm: 'blas' (torch's BLAS on raw pointers) | 'aten' (at::mm; WAVENET_AE_CPU_GEMM=aten)
    openmp, threads   compiled with -fopenmp; the threads at::parallel_for uses in the kernels
    cuda, cuda_archs  whether CUDA kernels were built; their nvcc targets (['sm_80', 'compute_90', 'sm_90'])

    Raises like ``require_ext`` when the extension is not loaded."""
    require_ext()
    return dict(_C.build_info())


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)  # point at the caller of the op


def use_kernel(op: str, t: torch.Tensor, switch: str | None = None) -> bool:
    """Whether a call of ``op`` on ``t`` takes the kernel: ``USE_EXT`` (and the op's own ``switch``) on,
    and a kernel for ``t``'s device. A fall-back for want of a kernel warns once per op and device."""
    if not flag("USE_EXT") or (switch is not None and not flag(switch)):
        return False
    dev = t.device.type
    if has_kernel(op, dev):
        return True
    if not HAVE_EXT:
        warn_once("no_ext", f"wavenet_ae._C is not available ({EXT_IMPORT_ERROR}); using the pure-PyTorch "
                            f"references (slower). Rebuild the extension with: {REBUILD_CMD}")
    elif dev in _DISPATCH_KEYS or dev == "meta":
        hint = f"WAVENET_AE_FORCE_CUDA=1 {REBUILD_CMD}" if dev == "cuda" else REBUILD_CMD
        warn_once(f"{op}:{dev}", f"wavenet_ae._C has no {dev} kernel for {op}; using its pure-PyTorch "
                                 f"reference there (slower). Rebuild with: {hint}")
    return False


def no_autocast(t: torch.Tensor):
    """Context for calling a custom op on ``t``'s device. Autocast falls through custom ops but stays on
    inside them, so the ATen products a kernel makes (mm, addmm, bmm) would come back in bfloat16 where
    the kernel expects its input dtype; every op runs with autocast off (its callers cast the inputs)."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if dev in _DISPATCH_KEYS else contextlib.nullcontext()
