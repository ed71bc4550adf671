"""Custom ops of wavenet_ae: fast kernels from the ``wavenet_ae._C`` extension, each next to its
plain-PyTorch reference, one module per op:

    mu_law                 mu_law_encode / mu_law_decode                   (+ _ref)
    wavenet_generate       incremental generation, one call per chunk      (+ _ref, GenWeights)
    residual_layer         the fused gated residual layer for training      (+ _ref)
    linear_cross_entropy   output layer + cross-entropy, logits never kept  (+ _ref)
    _ext                   loading the extension (ABI check), ``has_kernel(op, device)``, ``build_info()``,
                           warn-once fall-backs

Each op ``foo`` has ``foo_ref``, plain PyTorch: the definition the kernels are tested against and the
fallback where no kernel exists; and ``foo``, which calls ``torch.ops.wavenet_ae.foo`` where the
extension has a kernel for the tensor's device (``has_kernel``), else ``foo_ref`` (warning once).

The switch flags below are attributes of this package, read at call time (debugging a layer is one
flag flip, and tests and benchmarks flip them).
"""
from __future__ import annotations

USE_EXT = True                          # False: the references everywhere, even with the extension loaded
USE_FUSED_RESIDUAL_LAYER = True         # False: residual_layer_ref in the model where a kernel exists
USE_FUSED_LINEAR_CROSS_ENTROPY = True   # False: linear_cross_entropy_ref where a kernel exists

from ._ext import ABI, EXT_IMPORT_ERROR, HAVE_EXT, REBUILD_CMD, build_info, has_kernel, require_ext  # noqa: E402
from .linear_cross_entropy import (fused_linear_cross_entropy_available, linear_cross_entropy,  # noqa: E402
                                   linear_cross_entropy_ref)
from .mu_law import mu_law_decode, mu_law_decode_ref, mu_law_encode, mu_law_encode_ref  # noqa: E402
from .residual_layer import (ResidualWeights, fused_residual_layer, fused_residual_layer_available,  # noqa: E402
                             residual_layer, residual_layer_cpu_info, residual_layer_ref)
from .wavenet_generate import (GenWeights, sample_from_logits_ref, wavenet_generate,  # noqa: E402
                               wavenet_generate_cpu_path, wavenet_generate_ref)
