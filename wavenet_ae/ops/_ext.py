"""Loading the compiled extension ``wavenet_ae._C``, and the one query of what it offers.

The extension is optional. If it is missing the package runs on the references and the first op that
falls back warns once; ``require_ext()`` raises instead, naming the rebuild command. Whether an op has
a kernel for a device is one query, ``has_kernel(op, device)``; whether a call takes it also depends on
the switch flags, attributes of ``wavenet_ae.ops`` read at call time (``flag``).
"""
from __future__ import annotations

import contextlib
import sys
import warnings

import torch

REBUILD_CMD = "pip install --no-build-isolation -e ."

try:
    from wavenet_ae import _C  # noqa: F401  (importing registers torch.ops.wavenet_ae.*)

    HAVE_EXT = True
    EXT_IMPORT_ERROR: BaseException | None = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    HAVE_EXT = False
    EXT_IMPORT_ERROR = e

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
    dev = torch.device(device).type
    key = _DISPATCH_KEYS.get("cpu" if dev == "meta" else dev)
    if not HAVE_EXT or key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"wavenet_ae::{op}", key)
    except RuntimeError:  # the op is not in this build
        return False


def require_ext() -> None:
    """Raise a clear error if the compiled extension ``wavenet_ae._C`` is not loaded."""
    if not HAVE_EXT:
        raise RuntimeError(
            "wavenet_ae._C (the C++/CUDA extension) is not available "
            f"({type(EXT_IMPORT_ERROR).__name__}: {EXT_IMPORT_ERROR}). "
            f"Rebuild it from the repository root with: {REBUILD_CMD}"
        )


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
