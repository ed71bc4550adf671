"""Build script for wavenet_ae and its C++/CUDA extension ``wavenet_ae._C``.

Project metadata lives in pyproject.toml; this file only decides what to compile.

Install (the extension is compiled against the torch already installed, hence no build isolation):

    pip install --no-build-isolation -e ".[test]"     # development, .so lands in wavenet_ae/
    pip install --no-build-isolation .                # regular install

Environment switches (read at build time, never from the GPUs visible at build time):

    WAVENET_AE_SKIP_EXT=1    no extension at all: pure-Python package, ops use the PyTorch references
    WAVENET_AE_SKIP_CUDA=1   CPU kernels only
    WAVENET_AE_FORCE_CUDA=1  CUDA kernels required: fail the build if nvcc or a CUDA torch is missing
    TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0+PTX": PTX lets newer GPUs JIT-compile);
                             the build records the nvcc targets: wavenet_ae.ops.build_info()["cuda_archs"]
    MAX_JOBS                 parallel compile jobs for ninja (default 2)
    CUDA_HOME                CUDA toolkit (default /usr/local/cuda when it exists)

Without FORCE/SKIP the CUDA build is chosen when the toolkit (CUDA_HOME/bin/nvcc) exists and the
installed torch is a CUDA build (torch.version.cuda is not None).
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


SKIP_EXT = _flag("WAVENET_AE_SKIP_EXT")
SKIP_CUDA = _flag("WAVENET_AE_SKIP_CUDA")
FORCE_CUDA = _flag("WAVENET_AE_FORCE_CUDA")
if SKIP_CUDA and FORCE_CUDA:
    sys.exit("setup.py: WAVENET_AE_SKIP_CUDA and WAVENET_AE_FORCE_CUDA are both set; pick one")


def _log(msg: str) -> None:
    print(f"[wavenet_ae setup] {msg}", file=sys.stderr, flush=True)


def _sources(pattern: str) -> list:
    # Relative paths keep the build reproducible and the ninja file short.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_arch_tokens() -> list:
    """The CUDA targets nvcc builds for TORCH_CUDA_ARCH_LIST: 'sm_XY' (machine code) and 'compute_XY'
    (PTX), read from torch's own -gencode flags (what the build passes to nvcc); the extension reports them
    in build_info()["cuda_archs"]."""
    import re

    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags
        tokens = [m for flag in _get_cuda_arch_flags() for m in re.findall(r"\bcode=(\w+)", flag)]
    except Exception as e:  # private torch helper: fall back to reading the list ourselves
        _log(f"could not read torch's -gencode flags ({e!r}); parsing TORCH_CUDA_ARCH_LIST")
        tokens = []
        for arch in re.split(r"[;\s,]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "")):
            num = arch.split("+")[0].replace(".", "")
            if num:
                tokens.append(f"sm_{num}")
                if arch.endswith("+PTX"):
                    tokens.append(f"compute_{num}")
    return list(dict.fromkeys(tokens))  # in nvcc's order, once each


def _extensions_and_cmdclass():
    if SKIP_EXT:
        _log("WAVENET_AE_SKIP_EXT=1: building a pure-Python package (no wavenet_ae._C)")
        return [], {}

    # torch's own guess takes the directory above the first `nvcc` on PATH; on machines with a
    # wrapper in /usr/local/bin that gives CUDA_HOME=/usr/local and the link fails (-lcudart).
    # Must be set before torch.utils.cpp_extension is imported: it resolves CUDA_HOME at import.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    os.environ.setdefault("MAX_JOBS", "2")

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    have_nvcc = nvcc is not None and os.path.exists(nvcc)
    cuda_torch = torch.version.cuda is not None

    if SKIP_CUDA:
        with_cuda = False
        why = "WAVENET_AE_SKIP_CUDA=1"
    elif FORCE_CUDA:
        if not have_nvcc:
            sys.exit(f"setup.py: WAVENET_AE_FORCE_CUDA=1 but no nvcc found (CUDA_HOME={CUDA_HOME!r})")
        if not cuda_torch:
            sys.exit(f"setup.py: WAVENET_AE_FORCE_CUDA=1 but torch {torch.__version__} is not a CUDA build")
        with_cuda = True
        why = "WAVENET_AE_FORCE_CUDA=1"
    else:
        with_cuda = have_nvcc and cuda_torch
        why = f"nvcc={'found' if have_nvcc else 'missing'} (CUDA_HOME={CUDA_HOME}), torch.version.cuda={torch.version.cuda}"

    # Plain -O3, no -march: the wheel must run on any x86-64 (kernels that want AVX2 select it at run
    # time with target attributes and cpuid). -fopenmp: at::parallel_for is inlined into our code and
    # runs serially without it; the libgomp.so.1 torch ships (same soname) is the one loaded at run time.
    cxx_flags = ["-O3", "-Wall", "-Wno-unused-function", "-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    # Find libc10/libtorch even when wavenet_ae._C is imported before torch: next to an installed
    # torch in the same site-packages, or the torch this was built against (editable installs).
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    link_args = ["-fopenmp", "-Wl,-rpath,$ORIGIN/../torch/lib", f"-Wl,-rpath,{torch_lib}"]

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += _sources("csrc/cuda/*.cu")
        archs = _cuda_arch_tokens()
        _log(f"building CUDA extension ({why}); TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
             f"({', '.join(archs)}), MAX_JOBS={os.environ['MAX_JOBS']}")
        ext = CUDAExtension(
            name="wavenet_ae._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=[("WAVENET_AE_WITH_CUDA", "1")],
            extra_link_args=link_args,
            extra_compile_args={
                # For build_info() (csrc/bindings.cpp stringifies it): identifiers joined by commas, so no
                # quoting through the ninja file's shell; g++ only, since nvcc splits -D values at commas.
                "cxx": cxx_flags + [f"-DWAVENET_AE_CUDA_ARCHS={','.join(archs)}"],
                "nvcc": ["-O3", "-lineinfo"],
            },
        )
    else:
        _log(f"building CPU-only extension ({why}); MAX_JOBS={os.environ['MAX_JOBS']}")
        ext = CppExtension(
            name="wavenet_ae._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
